"""Fused co-attention step in Triton: out = softmax(relu(f @ W.T + b), dim=-1) * g * scale, forward and backward.

f, g: (M, N); W: (N, N); b: (N,). float32 tensors with any strides (the kernels take strides, nothing is
copied). One file holds the kernels, their launchers and the autograd.Function (Liger-Kernel style); the
torch.library registration and the input checks live in scanet.fused._coattention.

Forward, by bytes (fp32, 4 B an element):
  * N <= 256 (a row fits one BLOCK_M x BLOCK_N tile): ONE kernel. The GEMM accumulates in fp32 (tl.dot over
    K-tiles); the epilogue adds the bias, applies the ReLU, does the whole row softmax in registers, multiplies
    by g and scale and writes ``out``. It writes ``a = relu(h)`` (M x N) and ``lse`` (M) only when backward
    will need them.
  * N > 256: a row spans several column tiles. Pass 1 (the GEMM kernel) writes a = relu(f W^T + b) and, per
    (row, column tile), the tile's max and sum of exp; pass 2 (an elementwise kernel) merges those partial
    statistics into the row's log-sum-exp and writes out = exp(a - lse) * g * scale. Backward needs ``a``
    anyway, so the only extra traffic of the two passes is one read of ``a`` (4 MN bytes). The alternative,
    recomputing the GEMM in pass 2, costs 2 M N^2 FLOPs: at N = 1024 that is 512 FLOPs per extra byte saved,
    far above the H200's ~15 FLOP/B (fp32 CUDA cores) or ~230 FLOP/B (bf16 tensor cores) balance points.

What backward keeps: ``a = relu(h)`` and the row ``lse`` (M floats), not p. p = exp(a - lse) is recomputed for
the price of an exp, and ``a`` also carries the ReLU mask (h > 0 <=> a > 0), so one M x N tensor serves both;
saving p instead would need a second tensor (or a bit mask) for the ReLU. Recomputing h would cost a GEMM.

Backward: one elementwise kernel per BLOCK_M rows makes two passes over the row: pass 1 computes
D = sum_n p * dp = sum_n dout * out (``out`` is saved: it equals p * g * scale, so D needs two loads and no
exp); pass 2 writes dg = dout * p * scale and dh = p * (dout * g * scale - D) * (h > 0), and the per-program
column sums of dh (a (programs, N) buffer summed by torch afterwards: db is deterministic, no atomics).
The two GEMMs dW = dh^T f and df = dh W have no epilogue left to fuse and dh must exist for both, so in fp32
they go to cuBLAS (torch.matmul: it has split-K for dW's long reduction over M). With precision "tf32" or
"bf16" they run ``matmul`` below (tl.dot, fp32 accumulation and fp32 output, deterministic split-K): torch's
TF32 switch is process-global (and its legacy and new APIs may not be mixed), and bf16 cuBLAS would round the
gradients themselves to bf16. ``BACKWARD_GEMM = "triton"`` routes fp32 there too, for measuring.

Precision (``precision`` argument; the vocabulary and the per-GPU checks live in kernels._common):
  "fp32"  tl.dot(input_precision="ieee"): full fp32 products, fp32 accumulation. Measured against the
          float64 reference (CPU, interpreter, random normal inputs, W ~ N(0, 1/N), N in 1..1024, M up to 100,
          3 seeds): max |err| / max |ref| at most 1.1e-6 for out and 1.3e-6 for the gradients.
  "tf32"  tensor-core products with 10-bit mantissas (inputs rounded to ~2^-11 relative), fp32 accumulation.
          Expected: logits h off by ~1e-3 * |h| (relative 2^-11 per product, summed over N with random signs),
          hence out and the gradients relative ~1e-3. UNMEASURED here (no GPU; the interpreter computes fp32).
  "bf16"  f and W tiles cast to bf16 inside the kernel (8 significant bits: inputs rounded to ~2^-9
          relative), fp32 accumulation, fp32 outputs. Expected relative errors ~4e-3 on h, out and the
          gradients. UNMEASURED here (no GPU; the interpreter's bf16 is wrong). The backward GEMMs cast dh, f
          and W tiles the same way.
  "fp16"  as bf16 with fp16 tiles (11 significant bits). Measured under the interpreter, which computes fp16
          tiles with fp32 accumulation as a tensor core does (tests/test_fp16_kernels.py; the backward GEMMs
          run ``matmul`` on CPU too): M = 3, N = 1024, scale = N, 3 seeds: out 3.1e-4, gradients 6.5e-4.
Which GPUs take which precision (kernels._common.check_precision): fp32 everywhere; tf32, bf16 and fp16 on
sm_80 and newer only. V100 (sm_70) is fp32 only: Triton 3.x compiles tl.dot to FMAs on sm_70 whatever the
operand type, and in fp16 those spill (the compile gate, bench/aot_compile.py).
The error of out grows with the logits' size: p depends on exp(h), so an absolute error e on h is a relative
error e on p.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (  # noqa: F401
    GPU,
    INTERPRETED,
    PRECISIONS,
    Plan,
    check_precision,
    default_precision,
    dot_flags,
    dot_step,
    gpu_for,
    index,
    index_64,
)

SINGLE_TILE_MAX_N = 256  # rows up to this width are one tile: one kernel, the softmax in registers
BACKWARD_GEMM = "auto"  # "auto": cuBLAS for fp32, Triton for tf32/bf16/fp16; "triton": Triton for all
WGMMA_TILES = False  # sm_90: keep BLOCK_M >= 64 so that the GEMMs get wgmma (see forward_tiles)


# ------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column block) of program ``pid``, GROUP_M row blocks at a time (the Triton matmul
    tutorial's order): the programs that run together share GROUP_M blocks of rows of the left operand and a
    band of columns of the right one, so both come from L2 rather than HBM. It matters once W outgrows L2
    (N = 4096: 64 MB in fp32); at N <= 1024 W stays in L2 anyway and f streams from HBM once."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _coattention_fwd_kernel(
    f_ptr,
    w_ptr,
    b_ptr,
    g_ptr,
    out_ptr,
    a_ptr,
    lse_ptr,
    part_max_ptr,
    part_sum_ptr,
    M,
    N,
    scale,
    stride_fm,
    stride_fk,
    stride_wn,
    stride_wk,
    stride_b,
    stride_gm,
    stride_gn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_CAST: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
    SAVE: tl.constexpr,
    GROUP_M: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    """One BLOCK_M x BLOCK_N tile of h = f @ W.T + b, then the epilogue (see the module docstring)."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows, cols = index(offs_m, INDEX_64), index(offs_n, INDEX_64)

    f_ptrs = f_ptr + rows[:, None] * stride_fm + offs_k[None, :] * stride_fk  # (BLOCK_M, BLOCK_K)
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn  # (BLOCK_K, BLOCK_N) of W.T
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, N, BLOCK_K):
        mask_k = (k0 + offs_k) < N
        f_tile = tl.load(f_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w_tile = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = dot_step(f_tile, w_tile, acc, DOT_PRECISION, DOT_CAST)
        f_ptrs += BLOCK_K * stride_fk
        w_ptrs += BLOCK_K * stride_wk

    bias = tl.load(b_ptr + offs_n * stride_b, mask=mask_n, other=0.0)
    h = acc + bias[None, :]
    # ReLU written as a select so that NaN stays NaN (maximum(NaN, 0) may return 0 and hide it).
    a = tl.where(h < 0.0, 0.0, h)
    mask = mask_m[:, None] & mask_n[None, :]
    mn_offs = rows[:, None] * N + cols[None, :]  # a, out: contiguous
    if SAVE or not SINGLE_TILE:
        tl.store(a_ptr + mn_offs, a, mask=mask)

    logits = tl.where(mask_n[None, :], a, float("-inf"))
    tile_max = tl.max(logits, axis=1)
    e = tl.exp(logits - tile_max[:, None])
    tile_sum = tl.sum(e, axis=1)
    if SINGLE_TILE:
        g = tl.load(g_ptr + rows[:, None] * stride_gm + cols[None, :] * stride_gn, mask=mask, other=0.0)
        out = e * (scale / tile_sum)[:, None] * g
        tl.store(out_ptr + mn_offs, out, mask=mask)
        if SAVE:
            tl.store(lse_ptr + offs_m, tile_max + tl.log(tile_sum), mask=mask_m)
    else:
        num_tiles = tl.cdiv(N, BLOCK_N)
        tl.store(part_max_ptr + rows * num_tiles + pid_n, tile_max, mask=mask_m)
        tl.store(part_sum_ptr + rows * num_tiles + pid_n, tile_sum, mask=mask_m)


@triton.jit
def _coattention_normalize_kernel(
    a_ptr,
    g_ptr,
    out_ptr,
    lse_ptr,
    part_max_ptr,
    part_sum_ptr,
    M,
    N,
    NUM_TILES,
    scale,
    stride_gm,
    stride_gn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TILES_POW2: tl.constexpr,
    SAVE: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    """Pass 2 of a wide row: merge the column tiles' (max, sum) into lse, then out = exp(a - lse) * g * scale."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_t = tl.arange(0, TILES_POW2)
    mask_m = offs_m < M
    rows = index(offs_m, INDEX_64)
    part_offs = rows[:, None] * NUM_TILES + offs_t[None, :]
    part_mask = mask_m[:, None] & (offs_t < NUM_TILES)[None, :]
    part_max = tl.load(part_max_ptr + part_offs, mask=part_mask, other=float("-inf"))
    part_sum = tl.load(part_sum_ptr + part_offs, mask=part_mask, other=0.0)
    row_max = tl.max(part_max, axis=1)
    row_max = tl.where(mask_m, row_max, 0.0)  # rows past M: keep -inf - -inf out of the arithmetic
    row_sum = tl.sum(part_sum * tl.exp(part_max - row_max[:, None]), axis=1)
    row_sum = tl.where(mask_m, row_sum, 1.0)
    lse = row_max + tl.log(row_sum)
    if SAVE:
        if pid_n == 0:
            tl.store(lse_ptr + offs_m, lse, mask=mask_m)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    cols = index(offs_n, INDEX_64)
    mask = mask_m[:, None] & mask_n[None, :]
    mn_offs = rows[:, None] * N + cols[None, :]
    a = tl.load(a_ptr + mn_offs, mask=mask, other=0.0)
    g = tl.load(g_ptr + rows[:, None] * stride_gm + cols[None, :] * stride_gn, mask=mask, other=0.0)
    out = tl.exp(a - lse[:, None]) * g * scale
    tl.store(out_ptr + mn_offs, out, mask=mask)


@triton.jit
def _coattention_bwd_kernel(
    dout_ptr,
    out_ptr,
    a_ptr,
    lse_ptr,
    g_ptr,
    dg_ptr,
    dh_ptr,
    db_part_ptr,
    M,
    N,
    scale,
    stride_dom,
    stride_don,
    stride_gm,
    stride_gn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    """dg, dh and per-program column sums of dh for BLOCK_M rows; two passes over the row (see docstring)."""
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    rows = index(offs_m, INDEX_64)

    # Pass 1: D = sum_n dout * out (= sum_n p * dp). When the row is one tile the second pass re-reads
    # dout from L1/L2, not HBM.
    row_dot = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = index(n0 + tl.arange(0, BLOCK_N), INDEX_64)
        mask = mask_m[:, None] & (cols < N)[None, :]
        dout = tl.load(dout_ptr + rows[:, None] * stride_dom + cols[None, :] * stride_don, mask=mask, other=0.0)
        out = tl.load(out_ptr + rows[:, None] * N + cols[None, :], mask=mask, other=0.0)
        row_dot += tl.sum(dout * out, axis=1)

    lse = tl.load(lse_ptr + offs_m, mask=mask_m, other=0.0)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        cols = index(offs_n, INDEX_64)
        mask_n = offs_n < N
        mask = mask_m[:, None] & mask_n[None, :]
        mn_offs = rows[:, None] * N + cols[None, :]
        dout = tl.load(dout_ptr + rows[:, None] * stride_dom + cols[None, :] * stride_don, mask=mask, other=0.0)
        g = tl.load(g_ptr + rows[:, None] * stride_gm + cols[None, :] * stride_gn, mask=mask, other=0.0)
        a = tl.load(a_ptr + mn_offs, mask=mask, other=0.0)
        p = tl.exp(a - lse[:, None])
        dg = dout * p * scale
        da = p * (dout * g * scale - row_dot[:, None])
        # torch's ReLU backward passes the gradient where relu(h) > 0 is not false: NaN keeps its gradient.
        dh = tl.where(a <= 0.0, 0.0, da)
        tl.store(dg_ptr + mn_offs, dg, mask=mask)
        tl.store(dh_ptr + mn_offs, dh, mask=mask)
        tl.store(db_part_ptr + index(pid, INDEX_64) * N + cols, tl.sum(dh, axis=0), mask=mask_n)


@triton.jit
def _matmul_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    M,
    N,
    K,
    K_PER_SPLIT,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cs,
    stride_cm,
    stride_cn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_CAST: tl.constexpr,
    GROUP_M: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    """c[split] = a[:, K-slice] @ b[K-slice, :] in fp32; the launcher sums the splits (deterministically)."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows, cols = index(offs_m, INDEX_64), index(offs_n, INDEX_64)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    offs_k = k_start + tl.arange(0, BLOCK_K)
    ks = index(offs_k, INDEX_64)
    a_ptrs = a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        mask_k = (offs_k + (k0 - k_start)) < k_end
        a_tile = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b_tile = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = dot_step(a_tile, b_tile, acc, DOT_PRECISION, DOT_CAST)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + index(pid_k, INDEX_64) * stride_cs + rows[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c_ptrs, acc, mask=mask_m[:, None] & mask_n[None, :])


# ------------------------------------------------------------------------------------------------ tile choices
def forward_tiles(M: int, N: int, gpu: GPU | None, precision: str = "fp32", wgmma: bool | None = None) -> dict:
    """Tile sizes of the forward GEMM kernel: one heuristic, no autotuning (the interpreter allows one config).

    GPU: 128 x 128 output tiles with 32-deep K steps and 3 pipeline stages when there are enough of them;
    smaller tiles while the grid would leave a quarter of the SMs idle (Wiki, M = 256, N = 1024 on 132 SMs:
    8 x 16 programs of 32 x 64). Rows up to 256 wide are one tile: 32 x 256 over 8 warps, 64 x <= 128
    otherwise. fp32 (CUDA-core FMAs, no tensor cores: the operand fragments live in registers) takes 64-row
    tiles at most; the earlier 128 x 128 fp32 tile spilled. Compiled by the gate (bench/results/aot-*-full.json;
    triton 3.9 / 3.6 registers, no spills): the Wiki step's 32 x 64 tiles on sm_80 use 80/96 (fp32), 72/64
    (tf32), 96/64 (bf16, fp16) registers, on sm_90 113/96, 62/70, 55/70, with HMMA (mma.sync); the WebNews
    single 16 x 256 tile 74-190 on both.

    wgmma (sm_90, tensor-core precisions): Hopper's wgmma instructions need BLOCK_M >= 64 (the compile gate
    finds HGMMA in exactly those tiles; 32-row tiles get sm_80-style mma.sync HMMA). ``wgmma=True`` keeps
    BLOCK_M >= 64 (gate: HGMMA.64x64, 78/64 registers in tf32 and 96/85 in bf16 under triton 3.9/3.6, no
    spills): the Wiki step then runs 4 x 16 = 64 programs of 64 x 64 instead of 128 of 32 x 64, i.e.
    half of the 132 SMs idle but twice the operand reuse a program and the faster instruction. Which wins is a
    measurement on the H200 (bench/bench_coattention.py, M = 256, N = 1024, tf32/bf16): the default (False)
    keeps the grid full. CPU: the biggest tiles, because the interpreter pays per program instance.
    """
    single = N <= SINGLE_TILE_MAX_N
    if gpu is None:
        block_n = max(16, triton.next_power_of_2(N)) if single else 128
        block_m = min(64, max(16, triton.next_power_of_2(M)))
        block_k = min(128, max(16, triton.next_power_of_2(N)))
        return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, num_stages=1)
    wgmma = WGMMA_TILES if wgmma is None else wgmma
    min_m = 64 if (wgmma and gpu.capability >= 90 and precision != "fp32") else 16
    sms = gpu.sm_count
    if single:
        block_n = max(16, triton.next_power_of_2(N))
        block_m = 64 if block_n <= 128 else 32
        block_m = max(block_m, min_m)
        while block_m > max(16, min_m) and triton.cdiv(M, block_m) < 0.75 * sms:
            block_m //= 2
    else:
        block_m, block_n = (128 if precision != "fp32" else 64), 128
        min_m = max(min_m, 32)
        while triton.cdiv(M, block_m) * triton.cdiv(N, block_n) < 0.75 * sms and (block_m > min_m or block_n > 64):
            if block_m > min_m:
                block_m //= 2
            else:
                block_n //= 2
    num_warps = 8 if block_m * block_n >= 8192 or block_n >= 256 else 4
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=32, num_warps=num_warps, num_stages=3)


def rowwise_tiles(M: int, N: int, gpu: GPU | None) -> dict:
    """Tiles of the elementwise kernels (normalize, backward). GPU: up to 4096 elements a program (16 a
    thread over 8 warps for each of the ~6 live tensors of the backward kernel: no spills), fewer rows a
    program when that keeps at least two programs an SM busy. CPU: up to 8192 (few interpreted programs)."""
    block_n = min(max(16, triton.next_power_of_2(N)), 2048 if gpu is not None else 1024)
    block_m = max(1, (4096 if gpu is not None else 8192) // block_n)
    if gpu is not None:
        target = 2 * gpu.sm_count
        while block_m > 1 and triton.cdiv(M, block_m) < target:
            block_m //= 2
    else:
        block_m = min(block_m, triton.next_power_of_2(M))
    num_warps = 8 if block_m * block_n >= 4096 else 4
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)


def matmul_tiles(M: int, N: int, K: int, gpu: GPU | None, precision: str = "fp32") -> dict:
    """Tiles and split-K of ``matmul``. GPU: 128 x 128 x 32 tiles over 8 warps and 3 stages for the tensor-core
    precisions, 64 x 128 for fp32 (FMAs hold their operands in registers); K is split until the grid
    has two programs an SM, keeping at least 8 K steps a split. CPU: small tiles, 2 splits when K allows
    (exercised by the tests)."""
    if gpu is not None:
        block_m, block_n, block_k = (128 if precision != "fp32" else 64), 128, 32
        num_warps, num_stages = 8, 3
        tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
        splits = max(1, min(triton.cdiv(2 * gpu.sm_count, tiles), K // (8 * block_k)))
    else:
        block_m = min(64, max(16, triton.next_power_of_2(M)))
        block_n = min(64, max(16, triton.next_power_of_2(N)))
        block_k = min(128, max(16, triton.next_power_of_2(K)))
        num_warps, num_stages = 4, 1
        splits = 2 if K >= 2 * block_k else 1
    k_per_split = triton.cdiv(triton.cdiv(K, splits), block_k) * block_k
    return dict(
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=num_warps,
        num_stages=num_stages,
        splits=triton.cdiv(K, k_per_split),
        k_per_split=k_per_split,
    )


def forward_config(M: int, N: int, device: torch.device, precision: str = "fp32") -> dict:
    """``forward_tiles`` for a device (kept for callers of the old name)."""
    return forward_tiles(M, N, gpu_for(device), precision)


def rowwise_config(M: int, N: int, device: torch.device) -> dict:
    """``rowwise_tiles`` for a device (kept for callers of the old name)."""
    return rowwise_tiles(M, N, gpu_for(device))


# ------------------------------------------------------------------------------------------------------ plans
def _check_device(t: torch.Tensor) -> None:
    if t.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "Triton runs on CPU tensors only under its interpreter: set TRITON_INTERPRET=1 before "
            "importing scanet.kernels.coattention (scanet.fused.coattention falls back to the "
            "eager reference by itself)"
        )
    if t.device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"the co-attention kernels run on CUDA (or CPU under the interpreter), not {t.device}")


def _capability(gpu: GPU | None):
    return gpu.capability if gpu is not None else None


def plan_forward(
    f,
    g,
    weight,
    bias,
    scale: float = 1.0,
    precision: str = "fp32",
    save_for_backward: bool = True,
    gpu: GPU | None = None,
    wgmma: bool | None = None,
):
    """The forward launches for these tensors on ``gpu`` (None: from f's device; required for meta tensors).
    Returns (plans, (out, a, lse)): the outputs are allocated on f's device (free on meta); ``a`` is the
    returned one (empty when not saved), the plans hold the buffer the kernels write."""
    gpu = gpu_for(f.device, gpu)
    check_precision(precision, _capability(gpu))
    M, N = f.shape
    dev = f.device
    out = torch.empty((M, N), device=dev, dtype=torch.float32)
    cfg = forward_tiles(M, N, gpu, precision, wgmma)
    single = N <= SINGLE_TILE_MAX_N
    empty = torch.empty((0,), device=dev, dtype=torch.float32)
    a = torch.empty((M, N), device=dev, dtype=torch.float32) if (save_for_backward or not single) else empty
    lse = torch.empty((M if save_for_backward else 0,), device=dev, dtype=torch.float32)
    num_tiles = triton.cdiv(N, cfg["BLOCK_N"])
    if single:
        part_max = part_sum = out  # unused: SINGLE_TILE never touches them
    else:
        part_max = torch.empty((M, num_tiles), device=dev, dtype=torch.float32)
        part_sum = torch.empty((M, num_tiles), device=dev, dtype=torch.float32)
    dot_precision, dot_cast = dot_flags(precision, gpu)
    wide = index_64(f, g, weight, out, part_max)
    meta = dict(M=M, N=N, precision=precision)
    plans = [
        Plan(
            _coattention_fwd_kernel,
            (num_tiles * triton.cdiv(M, cfg["BLOCK_M"]),),
            (
                f,
                weight,
                bias,
                g,
                out,
                a,
                lse,
                part_max,
                part_sum,
                M,
                N,
                float(scale),
                f.stride(0),
                f.stride(1),
                weight.stride(0),
                weight.stride(1),
                bias.stride(0),
                g.stride(0),
                g.stride(1),
            ),
            dict(
                BLOCK_M=cfg["BLOCK_M"],
                BLOCK_N=cfg["BLOCK_N"],
                BLOCK_K=cfg["BLOCK_K"],
                DOT_PRECISION=dot_precision,
                DOT_CAST=dot_cast,
                SINGLE_TILE=single,
                SAVE=save_for_backward,
                GROUP_M=8,
                INDEX_64=wide,
            ),
            cfg["num_warps"],
            cfg["num_stages"],
            label="coattention forward GEMM",
            meta=dict(meta, gemm=True),
        )
    ]
    if not single:
        rc = rowwise_tiles(M, N, gpu)
        plans.append(
            Plan(
                _coattention_normalize_kernel,
                (triton.cdiv(N, rc["BLOCK_N"]), triton.cdiv(M, rc["BLOCK_M"])),
                (a, g, out, lse, part_max, part_sum, M, N, num_tiles, float(scale), g.stride(0), g.stride(1)),
                dict(
                    BLOCK_M=rc["BLOCK_M"],
                    BLOCK_N=rc["BLOCK_N"],
                    TILES_POW2=triton.next_power_of_2(num_tiles),
                    SAVE=save_for_backward,
                    INDEX_64=wide,
                ),
                rc["num_warps"],
                3,
                label="coattention normalize",
                meta=dict(meta, gemm=False),
            )
        )
    return plans, (out, a if save_for_backward else empty, lse)


def coattention_forward(
    f,
    g,
    weight,
    bias,
    scale: float = 1.0,
    precision: str = "fp32",
    save_for_backward: bool = True,
    gpu: GPU | None = None,
):
    """Launch the forward pass. Returns (out, a, lse); a = relu(f W^T + b) (M, N) and lse (M,) are what
    ``coattention_backward`` needs, and are empty (0,) tensors when ``save_for_backward`` is False.

    Expects checked float32 inputs (scanet.fused.coattention checks them) with M, N >= 1. ``gpu`` overrides
    the device description the plan is made for (None: read from the device).
    """
    check_precision(precision)
    _check_device(f)
    plans, result = plan_forward(f, g, weight, bias, scale, precision, save_for_backward, gpu)
    for plan in plans:
        plan.launch()
    return result


def plan_matmul(a: torch.Tensor, b: torch.Tensor, precision: str = "fp32", gpu: GPU | None = None):
    """(plan, c) of ``matmul``: c is the (splits, M, N) fp32 partial buffer the plan writes."""
    gpu = gpu_for(a.device, gpu)
    check_precision(precision, _capability(gpu))
    M, K = a.shape
    K2, N = b.shape
    if K != K2:
        raise ValueError(f"matmul: inner dimensions differ, {tuple(a.shape)} @ {tuple(b.shape)}")
    cfg = matmul_tiles(M, N, K, gpu, precision)
    c = torch.empty((cfg["splits"], M, N), device=a.device, dtype=torch.float32)
    dot_precision, dot_cast = dot_flags(precision, gpu)
    plan = Plan(
        _matmul_kernel,
        (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]), cfg["splits"]),
        (
            a,
            b,
            c,
            M,
            N,
            K,
            cfg["k_per_split"],
            a.stride(0),
            a.stride(1),
            b.stride(0),
            b.stride(1),
            c.stride(0),
            c.stride(1),
            c.stride(2),
        ),
        dict(
            BLOCK_M=cfg["BLOCK_M"],
            BLOCK_N=cfg["BLOCK_N"],
            BLOCK_K=cfg["BLOCK_K"],
            DOT_PRECISION=dot_precision,
            DOT_CAST=dot_cast,
            GROUP_M=8,
            INDEX_64=index_64(a, b, c),
        ),
        cfg["num_warps"],
        cfg["num_stages"],
        label="matmul",
        meta=dict(M=M, N=N, K=K, precision=precision, gemm=True),
    )
    return plan, c


def matmul(a: torch.Tensor, b: torch.Tensor, precision: str = "fp32", gpu: GPU | None = None) -> torch.Tensor:
    """a @ b in fp32 with tl.dot at ``precision``; any strides. Long reductions are split over K into
    (splits, M, N) fp32 partials that torch sums: deterministic, and it fills the SMs when M x N is small."""
    check_precision(precision)
    _check_device(a)
    plan, c = plan_matmul(a, b, precision, gpu)
    plan.launch()
    return c[0] if c.shape[0] == 1 else c.sum(0)


def triton_backward_gemms(precision: str, gpu: GPU | None) -> bool:
    """Whether backward's two GEMMs run ``matmul`` (else torch.matmul: cuBLAS, or the CPU). On CPU fp16 runs
    them too, so that the interpreter measures the fp16 error a GPU has (its tf32 and bf16 compute fp32)."""
    if gpu is None:
        return precision == "fp16"
    return precision != "fp32" or BACKWARD_GEMM == "triton"


def plan_backward(
    dout,
    out,
    a,
    lse,
    f,
    g,
    weight,
    scale: float = 1.0,
    precision: str = "fp32",
    need_df: bool = True,
    need_dweight: bool = True,
    gpu: GPU | None = None,
):
    """(plan of the elementwise backward kernel, (dg, dh, db_part), GEMMs): GEMMs lists the (name, left, right)
    operands of the products still to do, df = dh @ W and dW = dh^T @ f (what ``coattention_backward`` runs,
    and what the compile gate plans with ``plan_matmul``)."""
    gpu = gpu_for(f.device, gpu)
    check_precision(precision, _capability(gpu))
    M, N = f.shape
    dev = f.device
    rc = rowwise_tiles(M, N, gpu)
    programs = triton.cdiv(M, rc["BLOCK_M"])
    dg = torch.empty((M, N), device=dev, dtype=torch.float32)
    dh = torch.empty((M, N), device=dev, dtype=torch.float32)
    db_part = torch.empty((programs, N), device=dev, dtype=torch.float32)
    plan = Plan(
        _coattention_bwd_kernel,
        (programs,),
        (
            dout,
            out,
            a,
            lse,
            g,
            dg,
            dh,
            db_part,
            M,
            N,
            float(scale),
            dout.stride(0),
            dout.stride(1),
            g.stride(0),
            g.stride(1),
        ),
        dict(BLOCK_M=rc["BLOCK_M"], BLOCK_N=rc["BLOCK_N"], INDEX_64=index_64(dout, g, dh, db_part)),
        rc["num_warps"],
        3,
        label="coattention backward",
        meta=dict(M=M, N=N, precision=precision, gemm=False),
    )
    gemms = ([("df", dh, weight)] if need_df else []) + ([("dweight", dh.t(), f)] if need_dweight else [])
    return plan, (dg, dh, db_part), gemms


def coattention_backward(
    dout,
    out,
    a,
    lse,
    f,
    g,
    weight,
    scale: float = 1.0,
    precision: str = "fp32",
    need_df: bool = True,
    need_dweight: bool = True,
    gpu: GPU | None = None,
):
    """Gradients (df, dg, dweight, dbias) from the saved (out, a, lse); df or (dweight, dbias) are empty (0,)
    tensors when not needed. dout may have any strides (a sum's gradient is an expanded view)."""
    check_precision(precision)
    _check_device(f)
    if a.numel() != f.numel() or lse.numel() != f.shape[0]:
        raise RuntimeError("coattention backward: the forward ran with save_for_backward=False")
    gpu = gpu_for(f.device, gpu)
    dev = f.device
    dout = dout.to(torch.float32)
    plan, (dg, dh, db_part), gemms = plan_backward(
        dout, out, a, lse, f, g, weight, scale, precision, need_df, need_dweight, gpu
    )
    plan.launch()
    products = {}
    for name, left, right in gemms:
        products[name] = (
            matmul(left, right, precision, gpu) if triton_backward_gemms(precision, gpu) else torch.matmul(left, right)
        )

    def empty():  # a fresh one each: outputs of a torch.library op may not alias each other
        return torch.empty((0,), device=dev, dtype=torch.float32)

    df = products["df"] if need_df else empty()
    if need_dweight:
        dweight, dbias = products["dweight"], db_part.sum(0)
    else:
        dweight, dbias = empty(), empty()
    return df, dg, dweight, dbias


# ----------------------------------------------------------------------------------------- autograd.Function
class CoAttentionFunction(torch.autograd.Function):
    """Autograd over the launchers, for use without torch.library. scanet.fused.coattention (checks, dispatch,
    a torch.library op that torch.compile keeps in its graph) is the public entry point."""

    @staticmethod
    def forward(ctx, f, g, weight, bias, scale=1.0, precision="fp32"):
        save = any(ctx.needs_input_grad[:4])
        out, a, lse = coattention_forward(f, g, weight, bias, scale, precision, save)
        ctx.save_for_backward(out, a, lse, f, g, weight)
        ctx.scale, ctx.precision = float(scale), precision
        return out

    @staticmethod
    def backward(ctx, dout):
        out, a, lse, f, g, weight = ctx.saved_tensors
        need_df, need_dg, need_dw, need_db = ctx.needs_input_grad[:4]
        df, dg, dw, db = coattention_backward(
            dout, out, a, lse, f, g, weight, ctx.scale, ctx.precision, need_df, need_dw or need_db
        )
        return (
            df if need_df else None,
            dg if need_dg else None,
            dw if need_dw else None,
            db if need_db else None,
            None,
            None,
        )
