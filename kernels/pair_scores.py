"""All-pairs SCANet scores in Triton: the per-pair co-attention layer 2 and the head, streamed over N, writing
only the (Nt, Ni) logit matrix (or one logit per listed pair). Inference only: there is no backward pass.

The math (scanet.model; ``scale`` is N or 1; softmaxes run over the N features):
    layer 1, once per item:  a1_T[i] = softmax(relu(W1_T f_t[i] + b1_T)) * scale, a1_I[j] likewise from f_i[j]
    layer 2, per pair p = (i, j):
        x_T[p] = a1_I[j] * f_t[i]                 x_I[p] = a1_T[i] * f_i[j]
        h_T[p] = W2_T x_T[p] + b2_T               h_I[p] = W2_I x_I[p] + b2_I
        a2_T[p] = softmax(relu(h_T[p])) * scale   a2_I[p] = softmax(relu(h_I[p])) * scale
    head:  logit[p] = sum_n w_n (a2_I x_T)[p, n] (a2_T x_I)[p, n] + b
Since x_T[p, n] x_I[p, n] w_n = u[i, n] v[j, n] with u = f_t * a1_T * w and v = f_i * a1_I (the two factors of
the one-layer score, a GEMM u @ v.T), and with e = exp(relu(h) - m), l = sum_n e (any m >= the row's max):
    logit[p] = scale^2 * sum_n u[i, n] v[j, n] e_T[p, n] e_I[p, n] / (l_T[p] l_I[p]) + b

One program: BLOCK_I texts x BLOCK_J images = BLOCK_P pairs (``PAIR_LIST``: BLOCK_P pairs from two index
arrays), the rows of an implicit per-pair GEMM (BLOCK_P x N) @ (N x N) for each modality.

    for each output tile n0 (BLOCK_N columns of h):
        acc_T, acc_I = 0                                    two (BLOCK_P, BLOCK_N) fp32 accumulators
        for each input tile k0 (BLOCK_K):                   the FULL reduction over the input dimension
            x_T = (f_t[i-block, k0] outer-times a1_I[j-block, k0]) reshaped (BLOCK_P, BLOCK_K)
            x_I = (a1_T[i-block, k0] outer-times f_i[j-block, k0]) reshaped (BLOCK_P, BLOCK_K)
            acc_T += x_T @ W2_T^T[k0, n0];  acc_I += x_I @ W2_I^T[k0, n0]        (tl.dot, fp32 accumulation)
        epilogue: + bias, ReLU, FlashAttention-style online softmax for BOTH modalities (running max m and
        sum l per pair, rescaled by exp(m_old - m_new)), and the head's numerator
        num = num * alpha_T * alpha_I + sum_n u[i, n] v[j, n] e_T e_I
    logit = scale^2 * num / (l_T l_I) + b: one float per pair leaves the program.

Why this shape:
  * The operand x is never stored: a BLOCK_P x N row block (256 x 1024 fp32 = 1 MB) does not fit on chip, so
    each output tile rebuilds its K tiles from the per-item rows. Building costs BLOCK_P * BLOCK_K multiplies
    per 2 * BLOCK_P * BLOCK_K * BLOCK_N MMA FLOPs (1 / (2 * BLOCK_N)), and the loads are the outer-product
    factors: (BLOCK_I + BLOCK_J) * BLOCK_K values a step (24 rows for 8 x 16 pairs), not BLOCK_P rows.
  * The W2^T tile (BLOCK_K x BLOCK_N) is the only operand with real traffic: every program reads both W2
    (2 N^2 values, 8 MB at N = 1024 fp32, resident in the 60 MB L2) once: 2 * BLOCK_P FLOPs per W element,
    i.e. BLOCK_P / 2 FLOP per byte of fp32 (BLOCK_P in bf16: the launcher casts W once). That argues for a
    large BLOCK_P; registers argue against it: the two accumulators and, in the epilogue, e_T, e_I and u*v
    are BLOCK_P x BLOCK_N fp32 tiles each. 128 pairs x 64 columns over 8 warps (64 registers a thread for the
    accumulators), the shape of a FlashAttention forward tile, is the default; 256 pairs would double the
    L2 intensity (to 128 FLOP/B fp32) at the risk of spills: a first thing to try on a GPU.
  * Both modalities advance in one K loop: the epilogue needs e_T and e_I of the same (pair, column) tile, so
    both accumulators must be live at once anyway.
  * ReLU outputs are >= 0, so the running max starts at 0: no -inf arithmetic, and l >= 1 (the max's own term
    is exp(0) = 1), so the final division is safe. Columns past N are masked out of max, sum and numerator.
  * The exps cost 2 * BLOCK_P * BLOCK_N MUFU operations per output tile against 4 * BLOCK_P * BLOCK_N * N MMA
    FLOPs: about 12% of bf16 tensor-core time at N = 1024 if not overlapped, 50% at N = 256 (an estimate).
  * Programs are ordered in groups of GROUP_I text blocks (as in Triton's matmul tutorial) so that item rows
    are re-read from L2 when the collection (10k x 1024 x 3 arrays = 120 MB a side) does not fit.
  * ``PAIR_LIST`` scores arbitrary (text, image) pairs (re-ranking a shortlist): rows are gathered by index,
    BLOCK_P rows of each factor a step (2x the loads of a plain GEMM A tile). It is also the fallback layout
    for all pairs should the outer-product reshape compile badly on some GPU (launcher ``layout="list"``).

FLOPs: 2 modalities x 2 * Nt * Ni * N^2 (layer 2), the same as the eager path, whose intermediates (several
Nt * Ni * N tensors, 4 GB at 1000 x 1000 x 1024 fp32) are what this kernel never writes.

Precision (``precision``; the interpreter computes tf32 and bf16 in fp32, fp16 as asked):
  "fp32"  tl.dot(input_precision="ieee"): fp32 products, fp32 accumulation (CUDA cores, not tensor cores).
          Measured on CPU (interpreter) against float64: logit errors <= 8e-6 of the logits' pair-dependent
          part (max |logit - b|) for N <= 1024 (tests/test_pair_scores.py).
  "tf32"  tensor-core products of operands rounded to 10-bit mantissas, fp32 accumulation. Expected logit
          errors ~1e-3 relative to the logits' spread (h errors of ~2^-11 relative enter through exp). UNMEASURED.
  "bf16"  x and W2 rounded to bf16 (8-bit mantissas), fp32 accumulation and epilogue. Expected ~4e-3.
          UNMEASURED. Rankings (what retrieval needs) are more robust than these logit errors suggest.
  "fp16"  x and W2 rounded to fp16 (11-bit mantissas), fp32 accumulation and epilogue; sm_80 and newer (see
          kernels._common). Measured under the interpreter (fp16 tiles, fp32 accumulation, as on a tensor
          core): logit errors up to 4.7e-3 of max |logit - b| at N = 256, scale = N, 9 x 21 pairs, 3 seeds
          (x = a1 * f reaches O(N) there, so fp16's absolute rounding grows with it).
Block sizes come from one heuristic (``config``), not autotuning (the interpreter allows a single config); they
are UNTUNED on a GPU (none was available when this was written).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import GPU, INTERPRETED, PRECISIONS, Plan, check_precision, dot_flags, dot_step, gpu_for  # noqa: F401

LAYOUTS = ("outer", "list")


# ------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _pair_product(
    a_ptr,
    a_rows,
    a_mask,
    b_ptr,
    b_rows,
    b_mask,
    cols,
    col_mask,
    N,
    PAIR_LIST: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """(BLOCK_P, BLOCK_C) tile of a[row_a(p), cols] * b[row_b(p), cols] for the program's pairs p.

    Outer layout: a_rows (BLOCK_I,) and b_rows (BLOCK_J,), pair p = i_local * BLOCK_J + j_local, built as a
    broadcast product of the two row blocks. Pair list: a_rows and b_rows are (BLOCK_P,) gathered indices.
    """
    cols64 = cols.to(tl.int64)
    a = tl.load(a_ptr + a_rows[:, None] * N + cols64[None, :], mask=a_mask[:, None] & col_mask[None, :], other=0.0)
    b = tl.load(b_ptr + b_rows[:, None] * N + cols64[None, :], mask=b_mask[:, None] & col_mask[None, :], other=0.0)
    if PAIR_LIST:
        x = a * b
    else:
        x = tl.reshape(a[:, None, :] * b[None, :, :], (BLOCK_P, BLOCK_C))
    return x


@triton.jit
def _pair_scores_kernel(
    ft_ptr,
    at_ptr,
    fi_ptr,
    ai_ptr,
    u_ptr,
    v_ptr,  # (Nt, N) f_t, a1_T, u;  (Ni, N) f_i, a1_I, v
    wt_ptr,
    bt_ptr,
    wi_ptr,
    bi_ptr,  # W2_T^T, W2_I^T: (N_in, N_out) row-major; biases (N,)
    tidx_ptr,
    iidx_ptr,
    out_ptr,  # pair indices (PAIR_LIST) and the output
    NT,
    NI,
    NP,
    N,
    out_scale,
    head_bias,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_I: tl.constexpr,
    PAIR_LIST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_CAST: tl.constexpr,
):
    """Logits of BLOCK_I x BLOCK_J pairs (or BLOCK_P listed pairs); see the module docstring."""
    BLOCK_P: tl.constexpr = BLOCK_I * BLOCK_J
    pid = tl.program_id(0)
    if PAIR_LIST:
        offs_p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
        mask_out = offs_p < NP
        rows_t = tl.load(tidx_ptr + offs_p, mask=mask_out, other=0).to(tl.int64)
        rows_i = tl.load(iidx_ptr + offs_p, mask=mask_out, other=0).to(tl.int64)
        mask_t = mask_out
        mask_i = mask_out
        out_offs = offs_p.to(tl.int64)
    else:
        # Grouped order: GROUP_I consecutive text blocks sweep the image blocks together (L2 reuse).
        num_i = tl.cdiv(NT, BLOCK_I)
        num_j = tl.cdiv(NI, BLOCK_J)
        per_group = GROUP_I * num_j
        first_i = (pid // per_group) * GROUP_I
        group_size = tl.minimum(num_i - first_i, GROUP_I)
        pid_i = first_i + (pid % per_group) % group_size
        pid_j = (pid % per_group) // group_size
        offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
        offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
        mask_t = offs_i < NT
        mask_i = offs_j < NI
        rows_t = offs_i.to(tl.int64)
        rows_i = offs_j.to(tl.int64)
        offs_p = tl.arange(0, BLOCK_P)
        pair_t = pid_i * BLOCK_I + offs_p // BLOCK_J  # pair p = i_local * BLOCK_J + j_local
        pair_i = pid_j * BLOCK_J + offs_p % BLOCK_J
        mask_out = (pair_t < NT) & (pair_i < NI)
        out_offs = pair_t.to(tl.int64) * NI + pair_i

    m_t = tl.zeros((BLOCK_P,), dtype=tl.float32)  # running max of relu(h_T): ReLU output is >= 0
    l_t = tl.zeros((BLOCK_P,), dtype=tl.float32)
    m_i = tl.zeros((BLOCK_P,), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_P,), dtype=tl.float32)
    num = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        cols_n = offs_n.to(tl.int64)
        acc_t = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
        acc_i = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, N, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < N
            # x_T = a1_I[j] * f_t[i], x_I = a1_T[i] * f_i[j]: layer 1's output, built as the operand is loaded.
            x_t = _pair_product(
                ft_ptr, rows_t, mask_t, ai_ptr, rows_i, mask_i, offs_k, mask_k, N, PAIR_LIST, BLOCK_P, BLOCK_K
            )
            x_i = _pair_product(
                at_ptr, rows_t, mask_t, fi_ptr, rows_i, mask_i, offs_k, mask_k, N, PAIR_LIST, BLOCK_P, BLOCK_K
            )
            w_offs = offs_k.to(tl.int64)[:, None] * N + cols_n[None, :]
            w_mask = mask_k[:, None] & mask_n[None, :]
            w_t = tl.load(wt_ptr + w_offs, mask=w_mask, other=0.0)
            w_i = tl.load(wi_ptr + w_offs, mask=w_mask, other=0.0)
            acc_t = dot_step(x_t, w_t, acc_t, DOT_PRECISION, DOT_CAST)
            acc_i = dot_step(x_i, w_i, acc_i, DOT_PRECISION, DOT_CAST)

        h_t = acc_t + tl.load(bt_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
        h_i = acc_i + tl.load(bi_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
        # ReLU as a select so that NaN stays NaN; columns past N count as 0 for the max and 0 in the sums.
        r_t = tl.where(mask_n[None, :], tl.where(h_t < 0.0, 0.0, h_t), 0.0)
        r_i = tl.where(mask_n[None, :], tl.where(h_i < 0.0, 0.0, h_i), 0.0)
        m_t_new = tl.maximum(m_t, tl.max(r_t, axis=1))
        m_i_new = tl.maximum(m_i, tl.max(r_i, axis=1))
        e_t = tl.where(mask_n[None, :], tl.exp(r_t - m_t_new[:, None]), 0.0)
        e_i = tl.where(mask_n[None, :], tl.exp(r_i - m_i_new[:, None]), 0.0)
        alpha_t = tl.exp(m_t - m_t_new)
        alpha_i = tl.exp(m_i - m_i_new)
        l_t = l_t * alpha_t + tl.sum(e_t, axis=1)
        l_i = l_i * alpha_i + tl.sum(e_i, axis=1)
        uv = _pair_product(u_ptr, rows_t, mask_t, v_ptr, rows_i, mask_i, offs_n, mask_n, N, PAIR_LIST, BLOCK_P, BLOCK_N)
        num = num * (alpha_t * alpha_i) + tl.sum(uv * e_t * e_i, axis=1)
        m_t = m_t_new
        m_i = m_i_new

    logit = out_scale * num / (l_t * l_i) + head_bias
    tl.store(out_ptr + out_offs, logit, mask=mask_out)


# ------------------------------------------------------------------------------------------ configurations
def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


def tiles(n_text: int, n_image: int, N: int, gpu: GPU | None, pair_list: bool = False, precision: str = "fp32") -> dict:
    """Tile sizes: one heuristic, no autotuning (the interpreter allows one config).

    GPU (untuned for speed; resources checked by the compile gate, bench/aot_compile.py): 64 pairs a program
    (4 texts x 16 images; fewer of a side that has fewer items, the other side widening to keep 64), BLOCK_N =
    64 output columns, BLOCK_K = 16 (fp32, tf32) or 32 (bf16, fp16: the same bytes a step), 8 warps, 3 stages,
    for both layouts, except BLOCK_N = 32 for fp32 pair lists. BLOCK_K = 32 in fp32/tf32 spills on sm_80. Gate
    figures for the Wiki all-pairs scores (693 x 693, N = 1024; triton 3.9 / 3.6 registers, no spills): sm_80
    fp32 174/164, tf32 174/255, bf16 255/243 (HMMA); sm_90 fp32 128/128, tf32 173/194, bf16 160/210
    (HGMMA.64x32). The N = 500 paths (a row stride that is not a multiple of 16) still spill on sm_80/sm_90,
    the pair list most (bench/results/aot-*-full.json): a benchmark shape, not a preset one. Measured by the
    gate (bench/results/aot-*.json): 128 pairs spill on sm_90 in fp32 and tf32 (255 registers), and 128 listed
    pairs in 3 stages need 196-311 KB of shared memory, over the A100 and H100 per-block limits; 64 pairs over
    4 warps spill too (255 registers: the FMA and wgmma operand fragments of two accumulators). 128 pairs in
    the outer layout with bf16 compile without spills on sm_90 (233 registers, triton 3.9) and would double
    W2's L2 intensity: the first candidate to time on a GPU (``block_sizes=dict(BLOCK_I=8)``).
    tl.dot needs every dimension >= 16, so BLOCK_P, BLOCK_N and BLOCK_K are at least 16.
    CPU (interpreter): it pays per program instance and per loop step, not per element, so big N tiles
    (up to 128) and up to 64 pairs a program.
    """
    gpu_path = gpu is not None
    max_pairs = 64
    if gpu_path:
        block_n = 64 if N > 32 else max(16, _pow2(N))
        block_k = (32 if precision in ("bf16", "fp16") else 16) if N > 32 else max(16, _pow2(N))
    else:
        block_n = block_k = min(128, max(16, _pow2(N)))
    if pair_list:
        block_i, block_j = min(max_pairs, max(16, _pow2(n_text))), 1
    else:
        block_j = min(16, _pow2(n_image))
        block_i = min(max_pairs // block_j, _pow2(n_text))
        block_j = min(max_pairs // block_i, _pow2(n_image)) if block_j == 16 else block_j  # few texts: widen
        while block_i * block_j < 16:  # tl.dot's minimum M: pad the pair tile with masked rows
            block_j *= 2
    block_p = block_i * block_j
    if gpu_path and pair_list and precision == "fp32" and N > 32:
        block_n = 32  # 64 x 64 fp32 pair lists spill on sm_90 (8-16 B at the Wiki shortlist); 64 x 32 do not
    num_warps = 8 if gpu_path and block_p * max(block_n, 64) >= 4096 else 4
    stages = 3 if gpu_path else 1
    return dict(
        BLOCK_I=block_i,
        BLOCK_J=block_j,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        GROUP_I=8,
        num_warps=num_warps,
        num_stages=stages,
    )


def config(
    n_text: int, n_image: int, N: int, device: torch.device, pair_list: bool = False, precision: str = "fp32"
) -> dict:
    """``tiles`` for a device (kept for callers of the old name)."""
    return tiles(n_text, n_image, N, gpu_for(device), pair_list, precision)


def _check_blocks(cfg: dict) -> None:
    for name in ("BLOCK_I", "BLOCK_J", "BLOCK_N", "BLOCK_K", "GROUP_I"):
        v = cfg[name]
        if not isinstance(v, int) or v < 1 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two >= 1, got {v!r}")
    if cfg["BLOCK_I"] * cfg["BLOCK_J"] < 16 or cfg["BLOCK_N"] < 16 or cfg["BLOCK_K"] < 16:
        raise ValueError(f"tl.dot needs BLOCK_I * BLOCK_J, BLOCK_N and BLOCK_K >= 16, got {cfg}")


# ----------------------------------------------------------------------------------------------- launchers
def _check_device(t: torch.Tensor) -> None:
    if t.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "the pair-score kernel runs on CPU tensors only under Triton's interpreter: set "
            "TRITON_INTERPRET=1 before importing scanet.kernels.pair_scores"
        )
    if t.device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"the pair-score kernel runs on CUDA (or CPU under the interpreter), not {t.device}")


def plan_layer2(
    f_t: torch.Tensor,
    f_i: torch.Tensor,
    a1_t: torch.Tensor,
    a1_i: torch.Tensor,
    w2_t: torch.Tensor,
    b2_t: torch.Tensor,
    w2_i: torch.Tensor,
    b2_i: torch.Tensor,
    head_w: torch.Tensor,
    head_b: float,
    scale: float,
    *,
    text_index: torch.Tensor | None = None,
    image_index: torch.Tensor | None = None,
    precision: str = "fp32",
    layout: str = "outer",
    block_sizes: dict | None = None,
    gpu: GPU | None = None,
):
    """(plan or None when there are no pairs, out): the launch of ``pair_scores_layer2`` for these tensors on
    ``gpu`` (None: from the device; required for meta tensors). Prepares the operands (u, v, the transposed
    W2 cast once to the GEMM dtype) on the tensors' device: free on meta."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    dev = f_t.device
    gpu = gpu_for(dev, gpu)
    check_precision(precision, gpu.capability if gpu is not None else None)
    f32 = dict(device=dev, dtype=torch.float32)
    f_t, f_i, a1_t, a1_i = (t.to(**f32).contiguous() for t in (f_t, f_i, a1_t, a1_i))
    n_text, N = f_t.shape
    n_image = f_i.shape[0]
    u = (f_t * a1_t * head_w.to(**f32)).contiguous()  # the head weight folds into the text factor
    v = (f_i * a1_i).contiguous()
    dot_precision, dot_cast = dot_flags(precision, gpu)
    w_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dot_cast, torch.float32)
    # (N_in, N_out) row-major, so that a K x BLOCK_N tile is contiguous along the output columns; cast once.
    wt_T = w2_t.to(**f32).t().contiguous().to(w_dtype)
    wi_T = w2_i.to(**f32).t().contiguous().to(w_dtype)
    b2_t, b2_i = b2_t.to(**f32).contiguous(), b2_i.to(**f32).contiguous()

    if text_index is not None or image_index is not None:
        if text_index is None or image_index is None or text_index.shape != image_index.shape:
            raise ValueError("text_index and image_index must be given together, with one shape")
        text_index = text_index.to(device=dev, dtype=torch.int64).reshape(-1).contiguous()
        image_index = image_index.to(device=dev, dtype=torch.int64).reshape(-1).contiguous()
        out_shape = (text_index.numel(),)
        pair_list = True
    elif layout == "list":
        grid_t, grid_i = torch.meshgrid(
            torch.arange(n_text, device=dev), torch.arange(n_image, device=dev), indexing="ij"
        )
        # contiguous: meshgrid gives expanded views, whose reshape can keep a zero stride
        text_index, image_index = grid_t.reshape(-1).contiguous(), grid_i.reshape(-1).contiguous()
        out_shape = (n_text, n_image)
        pair_list = True
    else:
        # unused by the outer layout; one element, so that the launcher gets a valid device pointer
        text_index = image_index = torch.zeros(1, device=dev, dtype=torch.int64)
        out_shape = (n_text, n_image)
        pair_list = False
    n_pairs = text_index.numel() if pair_list else n_text * n_image
    out = torch.empty(out_shape, **f32)
    if n_pairs == 0:
        return None, out
    cfg = tiles(n_pairs if pair_list else n_text, n_image, N, gpu, pair_list, precision)
    if block_sizes:
        unknown = set(block_sizes) - {"BLOCK_I", "BLOCK_J", "BLOCK_N", "BLOCK_K", "GROUP_I", "num_warps", "num_stages"}
        if unknown:
            raise ValueError(f"unknown block size names {sorted(unknown)}")
        cfg.update(block_sizes)
        if pair_list:
            cfg["BLOCK_I"], cfg["BLOCK_J"] = cfg["BLOCK_I"] * cfg["BLOCK_J"], 1
    _check_blocks(cfg)
    block_p = cfg["BLOCK_I"] * cfg["BLOCK_J"]
    if pair_list:
        grid = (triton.cdiv(n_pairs, block_p),)
    else:
        grid = (triton.cdiv(n_text, cfg["BLOCK_I"]) * triton.cdiv(n_image, cfg["BLOCK_J"]),)
    plan = Plan(
        _pair_scores_kernel,
        grid,
        (
            f_t,
            a1_t,
            f_i,
            a1_i,
            u,
            v,
            wt_T,
            b2_t,
            wi_T,
            b2_i,
            text_index,
            image_index,
            out,
            n_text,
            n_image,
            n_pairs,
            N,
            float(scale) ** 2,
            float(head_b),
        ),
        dict(
            BLOCK_I=cfg["BLOCK_I"],
            BLOCK_J=cfg["BLOCK_J"],
            BLOCK_N=cfg["BLOCK_N"],
            BLOCK_K=cfg["BLOCK_K"],
            GROUP_I=cfg["GROUP_I"],
            PAIR_LIST=pair_list,
            DOT_PRECISION=dot_precision,
            DOT_CAST=dot_cast,
        ),
        cfg["num_warps"],
        cfg["num_stages"],
        label=f"pair scores ({'list' if pair_list else 'outer'})",
        meta=dict(n_text=n_text, n_image=n_image, n_pairs=n_pairs, N=N, precision=precision, gemm=True),
    )
    return plan, out


def pair_scores_layer2(
    f_t: torch.Tensor,
    f_i: torch.Tensor,
    a1_t: torch.Tensor,
    a1_i: torch.Tensor,
    w2_t: torch.Tensor,
    b2_t: torch.Tensor,
    w2_i: torch.Tensor,
    b2_i: torch.Tensor,
    head_w: torch.Tensor,
    head_b: float,
    scale: float,
    *,
    text_index: torch.Tensor | None = None,
    image_index: torch.Tensor | None = None,
    precision: str = "fp32",
    layout: str = "outer",
    block_sizes: dict | None = None,
    gpu: GPU | None = None,
) -> torch.Tensor:
    """Logits of a two-layer SCANet head for every (text, image) pair: (Nt, Ni) float32.

    f_t (Nt, N), f_i (Ni, N): encoder outputs; a1_t, a1_i: layer-1 attention maps (scaled); w2_t, w2_i (N, N)
    and b2_t, b2_i (N,): layer 2's text_fc / image_fc (nn.Linear layout, out x in); head_w (N,), head_b: the
    head; scale: the attention scale. With ``text_index`` and ``image_index`` (P,) integer tensors, scores only
    those pairs and returns (P,). ``layout="list"`` scores all pairs through the pair-list path (a fallback).
    Expects checked inputs on one device (scanet.fused.pair_scores checks them); computes in float32.
    ``gpu`` overrides the device description the plan is made for (None: read from the device).
    """
    check_precision(precision)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    _check_device(f_t)
    plan, out = plan_layer2(
        f_t,
        f_i,
        a1_t,
        a1_i,
        w2_t,
        b2_t,
        w2_i,
        b2_i,
        head_w,
        head_b,
        scale,
        text_index=text_index,
        image_index=image_index,
        precision=precision,
        layout=layout,
        block_sizes=block_sizes,
        gpu=gpu,
    )
    if plan is not None:
        plan.launch()
    return out
