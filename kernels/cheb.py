"""Fused Chebyshev graph convolution: y = act(sum_k T_k(L~) x W_k + b), forward and backward in Triton.

Notation. L~ is the (V, V) rescaled Laplacian in CSR (crow, col, values), x is (B, V, F_in), W is
(K, F_in, F_out), T_0 = x, T_1 = L~x, T_k = 2 L~ T_{k-1} - T_{k-2}.

Layout. Every signal lives as a (V, B, C) row-major buffer, i.e. a (V, B*C) matrix: the row of
vertex v holds all B*C values, so gathering a neighbour is one contiguous load of BLOCK_B*C values. The input
is transposed once (free when it already has that layout, e.g. the output of a previous layer); the output is
written in that layout and returned as a (B, V, F_out) view of it, so two stacked layers hand over for free.

Forward: K-1 launches of ``_cheb_step_kernel`` (one program per (block of BLOCK_R rows, block of BLOCK_B
signals)), each a CSR row gather acc = L~ S_{k-1}, then S_k = 2*acc - S_{k-2}. Intermediate steps write S_k;
the LAST step's epilogue does 2*acc - S_{K-3}, the weight combination sum_k S_k W_k (a scalar fma per element
when F_in = F_out = 1: no GEMM machinery), the bias and the activation (a constexpr) and writes y only. K = 1
is one launch with no gather. What backward needs is the input, the output (its sign is the ReLU mask: relu(z)
> 0 iff z > 0) and, only when x needs no gradient, the basis (see below).

Grid order: axis 0 (the fastest-varying program id) walks the row blocks, axis 1 the signal blocks, so the
programs resident at any moment gather from one column slice of the source signal, V * BLOCK_B * C * 4 bytes
(10 MB at V = 10k, BLOCK_B = 256): it stays in L2 and a neighbour's row, read by ~2k rows of a k-NN graph,
comes from DRAM about once, whatever B is.

Backward: dz = dy * (y > 0) is never materialized; kernels read dy and y and mask on the fly.
  * x needs a gradient: propagate dz itself through the transpose, U_0 = dz, U_1 = L~^T dz,
    U_k = 2 L~^T U_{k-1} - U_{k-2}  (U_k = T_k(L~^T) dz = T_k(L~)^T dz), which is the SAME step kernel run on
    L~^T with the roles of F_in and F_out swapped. Its last epilogue writes dx = sum_k U_k W_k^T and, per
    program, the partial sums of dW_k = sum_(b,v) x^T U_k (= sum T_k^T dz) and of db = sum dz. So no basis has
    to be kept from the forward pass. When L~ is symmetric L~^T is L~ and the forward CSR is reused; when it
    is not, the caller passes the transposed CSR (``transpose_csr`` builds it with torch ops, once).
  * x needs no gradient (the first layer of SCANet, whose input is a bag of words): the forward pass also
    writes T_{K-1} and keeps T_1..T_{K-1}; backward is one launch of ``_cheb_weight_grad_kernel`` reducing
    dW_k = sum T_k^T dz and db = sum dz. No propagation, no transpose.
Reductions are deterministic: every program writes its own partial (fixed-order tl.sum within the tile), and
the partials are summed by torch in a fixed order (a two-stage reduction, no atomics), so two runs give
bitwise-equal gradients.

Wide channels. The in-register weight combination holds a (BLOCK_R, BLOCK_B, C, O) product; it is used when
next_pow2(F_in) * next_pow2(F_out) <= 64 (``FUSED_MAX_CHANNEL_PRODUCT``). Wider layers run the same step kernels
as pure propagations (all S_k written) and do the weight combinations as torch GEMMs, which is what tensor
cores are for.

Accumulation is in float32 for float32 inputs and float64 for float64 inputs; other dtypes are refused.

Plans: every launch goes through ``_step`` (or the weight-gradient launch), which builds a ``Plan`` and runs
it; inside ``collect_plans()`` the plans are collected instead of run, so the compile gate
(bench/aot_compile.py) gets exactly the launches ``cheb_forward`` / ``cheb_backward`` make, from meta tensors.
The tiles do not depend on the GPU (no tensor cores: a gather and FMAs).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import Plan

_COLLECT: contextvars.ContextVar = contextvars.ContextVar("cheb_collect_plans", default=None)

# Largest next_pow2(F_in) * next_pow2(F_out) whose weight combination is done inside the last kernel.
FUSED_MAX_CHANNEL_PRODUCT = 64
# Elements of a program's tile (BLOCK_R * BLOCK_B * channels): 2048 fp32 = 16 per thread with 4 warps.
_TILE_ELEMENTS = 2048
# Width of one gathered row segment: 256 fp32 = 1 KiB contiguous per neighbour.
_MAX_ROW_LANES = 256
_MAX_BLOCK_R = 64


class CSR(NamedTuple):
    """A (V, V) sparse operator in CSR: row pointers, column indices (sorted within a row), values."""

    crow: torch.Tensor
    col: torch.Tensor
    values: torch.Tensor
    V: int


# ------------------------------------------------------------------------------------------------ jit helpers
@triton.jit
def _load_masked_signal(s_ptr, y_ptr, offs, mask, MASK_RELU: tl.constexpr, ACC: tl.constexpr):
    """Load a signal tile; with MASK_RELU it is dz = dy * (y > 0), read from dy and the saved output y."""
    s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(ACC)
    if MASK_RELU:
        y = tl.load(y_ptr + offs, mask=mask, other=0.0)
        s = tl.where(y > 0, s, 0.0)
    return s


@triton.jit
def _combine(out, s, w_ptr, cc, oo, cmask, omask, stride_wc, stride_wo, SCALAR: tl.constexpr, ACC: tl.constexpr):
    """out[r, b, o] += sum_c s[r, b, c] * M[c, o]; with one channel in and out, one scalar fma."""
    if SCALAR:
        out += s * tl.load(w_ptr).to(ACC)
    else:
        w = tl.load(
            w_ptr + cc[:, None] * stride_wc + oo[None, :] * stride_wo, mask=cmask[:, None] & omask[None, :], other=0.0
        ).to(ACC)
        out += tl.sum(s[:, :, :, None] * w[None, None, :, :], axis=2)
    return out


@triton.jit
def _store_outer_partial(part_ptr, a, s, dd, cc, dmask, cmask, C: tl.constexpr, SCALAR: tl.constexpr):
    """part[d, c] = sum over the tile's (row, signal) of a[r, b, d] * s[r, b, c] (fixed order: deterministic)."""
    if SCALAR:
        tl.store(part_ptr, tl.sum(tl.sum(tl.sum(a * s, axis=2), axis=1), axis=0))
    else:
        p = tl.sum(tl.sum(a[:, :, :, None] * s[:, :, None, :], axis=1), axis=0)
        tl.store(part_ptr + dd[:, None] * C + cc[None, :], p, mask=dmask[:, None] & cmask[None, :])


@triton.jit
def _slot(k, stride_slot):
    """Offset of slot k of a (slots, V, B, C) buffer, in int64 (k * V*B*C can pass 2^31)."""
    return tl.full([1, 1, 1], k, tl.int64) * stride_slot


# ---------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _cheb_step_kernel(
    crow_ptr,
    col_ptr,
    val_ptr,  # CSR of the operator (L~ forward, L~^T backward)
    s0_ptr,
    y_ptr,  # S_0 (V, B, C); y: saved output whose sign masks S_0 (MASK_S0)
    sbuf_ptr,
    stride_slot,  # S_1.. in slots (slot k-1 holds S_k), each (V, B, C)
    w_ptr,
    stride_wk,
    stride_wc,
    stride_wo,  # combination matrices M_k[c, o]
    bias_ptr,  # (O,)
    out_ptr,  # (V, B, O): the combination
    xr_ptr,
    dw_part_ptr,
    db_part_ptr,  # REDUCE: xr (V, B, D); partials (P, K, D, C) and (P, C)
    V,
    B,
    K: tl.constexpr,
    STEP: tl.constexpr,
    C: tl.constexpr,
    CP: tl.constexpr,
    O: tl.constexpr,
    OP: tl.constexpr,
    D: tl.constexpr,
    DP: tl.constexpr,
    COMBINE: tl.constexpr,
    STORE_STEP: tl.constexpr,
    MASK_S0: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RELU: tl.constexpr,
    REDUCE: tl.constexpr,
    SCALAR: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """One Chebyshev step S_STEP = 2 A S_{STEP-1} - S_{STEP-2} (S_1 = A S_0) for a tile of rows and signals.

    STEP = 0 skips the gather (K = 1). COMBINE (the last step): out = act(sum_k S_k M_k + bias). REDUCE: per
    program partials of sum xr^T S_k (dW) and sum S_0 (db); it is used by backward only, where xr = x has
    D = O channels, so SCALAR (C = O = 1) implies D = 1.
    """
    pid_r = tl.program_id(0)
    pid_b = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    bb = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cc = tl.arange(0, CP)
    rmask = rows < V
    bmask = bb < B
    cmask = cc < C
    rows64 = rows.to(tl.int64)
    lane = (bb * C)[None, :, None] + cc[None, None, :]  # offset inside one vertex's row
    lane_mask = bmask[None, :, None] & cmask[None, None, :]
    own = rows64[:, None, None] * (B * C) + lane
    own_mask = rmask[:, None, None] & lane_mask

    if STEP > 0:
        acc = tl.zeros([BLOCK_R, BLOCK_B, CP], dtype=ACC)
        start = tl.load(crow_ptr + rows, mask=rmask, other=0)
        deg = tl.load(crow_ptr + rows + 1, mask=rmask, other=0) - start
        # Row-gather: j-th non-zero of every row of the block at once; rows shorter than the longest are masked.
        for j in range(0, tl.max(deg, axis=0)):
            live = j < deg
            nbr = tl.load(col_ptr + start + j, mask=live, other=0).to(tl.int64)
            a = tl.load(val_ptr + start + j, mask=live, other=0.0).to(ACC)
            src = nbr[:, None, None] * (B * C) + lane
            src_mask = live[:, None, None] & lane_mask
            if STEP == 1:
                s = _load_masked_signal(s0_ptr, y_ptr, src, src_mask, MASK_S0, ACC)
            else:
                s = tl.load(sbuf_ptr + _slot(STEP - 2, stride_slot) + src, mask=src_mask, other=0.0).to(ACC)
            acc += a[:, None, None] * s
        if STEP == 1:
            s_new = acc
        elif STEP == 2:
            s_new = 2.0 * acc - _load_masked_signal(s0_ptr, y_ptr, own, own_mask, MASK_S0, ACC)
        else:
            prev = tl.load(sbuf_ptr + _slot(STEP - 3, stride_slot) + own, mask=own_mask, other=0.0).to(ACC)
            s_new = 2.0 * acc - prev
        if STORE_STEP:
            tl.store(sbuf_ptr + _slot(STEP - 1, stride_slot) + own, s_new.to(sbuf_ptr.dtype.element_ty), mask=own_mask)

    if COMBINE:
        oo = tl.arange(0, OP)
        omask = oo < O
        out = tl.zeros([BLOCK_R, BLOCK_B, OP], dtype=ACC)
        if REDUCE:
            pid = pid_r * tl.num_programs(1) + pid_b
            dd = tl.arange(0, DP)
            dmask = dd < D
            xr = tl.load(
                xr_ptr + rows64[:, None, None] * (B * D) + (bb * D)[None, :, None] + dd[None, None, :],
                mask=rmask[:, None, None] & bmask[None, :, None] & dmask[None, None, :],
                other=0.0,
            ).to(ACC)
        for k in tl.static_range(K):
            if k == 0:
                s_k = _load_masked_signal(s0_ptr, y_ptr, own, own_mask, MASK_S0, ACC)
                if REDUCE:
                    db = tl.sum(tl.sum(s_k, axis=1), axis=0)
                    tl.store(db_part_ptr + pid * C + cc, db, mask=cmask)
            elif k == STEP:
                s_k = s_new
            else:
                s_k = tl.load(sbuf_ptr + _slot(k - 1, stride_slot) + own, mask=own_mask, other=0.0).to(ACC)
            out = _combine(out, s_k, w_ptr + k * stride_wk, cc, oo, cmask, omask, stride_wc, stride_wo, SCALAR, ACC)
            if REDUCE:
                _store_outer_partial(dw_part_ptr + (pid * K + k) * (D * C), xr, s_k, dd, cc, dmask, cmask, C, SCALAR)
        if HAS_BIAS:
            out += tl.load(bias_ptr + oo, mask=omask, other=0.0).to(ACC)[None, None, :]
        if RELU:
            out = tl.maximum(out, 0.0)
        tl.store(
            out_ptr + rows64[:, None, None] * (B * O) + (bb * O)[None, :, None] + oo[None, None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=rmask[:, None, None] & bmask[None, :, None] & omask[None, None, :],
        )


@triton.jit
def _cheb_weight_grad_kernel(
    s0_ptr,
    sbuf_ptr,
    stride_slot,  # the forward basis: T_0 = x and slots T_1..T_{K-1}, each (V, B, C)
    dy_ptr,
    y_ptr,  # (V, B, O)
    dw_part_ptr,
    db_part_ptr,  # partials (P, K, C, O) and (P, O)
    V,
    B,
    K: tl.constexpr,
    C: tl.constexpr,
    CP: tl.constexpr,
    O: tl.constexpr,
    OP: tl.constexpr,
    RELU: tl.constexpr,
    SCALAR: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """Per-program partials of dW_k = sum T_k^T dz and db = sum dz, with dz = dy * (y > 0)."""
    pid_r = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid = pid_r * tl.num_programs(1) + pid_b
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    bb = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cc = tl.arange(0, CP)
    oo = tl.arange(0, OP)
    rmask = rows < V
    bmask = bb < B
    cmask = cc < C
    omask = oo < O
    rows64 = rows.to(tl.int64)
    rb_mask = rmask[:, None, None] & bmask[None, :, None]
    dz_offs = rows64[:, None, None] * (B * O) + (bb * O)[None, :, None] + oo[None, None, :]
    dz = _load_masked_signal(dy_ptr, y_ptr, dz_offs, rb_mask & omask[None, None, :], RELU, ACC)
    tl.store(db_part_ptr + pid * O + oo, tl.sum(tl.sum(dz, axis=1), axis=0), mask=omask)
    t_offs = rows64[:, None, None] * (B * C) + (bb * C)[None, :, None] + cc[None, None, :]
    t_mask = rb_mask & cmask[None, None, :]
    for k in tl.static_range(K):
        if k == 0:
            t_k = tl.load(s0_ptr + t_offs, mask=t_mask, other=0.0).to(ACC)
        else:
            t_k = tl.load(sbuf_ptr + _slot(k - 1, stride_slot) + t_offs, mask=t_mask, other=0.0).to(ACC)
        _store_outer_partial(dw_part_ptr + (pid * K + k) * (C * O), t_k, dz, cc, oo, cmask, omask, O, SCALAR)


# -------------------------------------------------------------------------------------------------- launchers
def _acc_type(dtype: torch.dtype):
    if dtype == torch.float32:
        return tl.float32
    if dtype == torch.float64:
        return tl.float64
    raise ValueError(f"the Triton Chebyshev kernels take float32 or float64 tensors, got {dtype}")


def fused_combination(F_in: int, F_out: int) -> bool:
    """Whether the weight combination of an (F_in -> F_out) layer runs inside the last kernel (else a GEMM)."""
    return triton.next_power_of_2(F_in) * triton.next_power_of_2(F_out) <= FUSED_MAX_CHANNEL_PRODUCT


def pick_tiles(B: int, C: int, O: int = 1, block_rows: int | None = None, block_batch: int | None = None):
    """(BLOCK_R, BLOCK_B, num_warps): up to 256 gathered lanes per neighbour row, ~2048-element tiles.

    A heuristic, not autotuning: the interpreter accepts a single config only, and the best tile depends on
    B and the channel counts, which are known at launch.
    """
    CP, OP = triton.next_power_of_2(C), triton.next_power_of_2(O)
    bb = block_batch or min(triton.next_power_of_2(B), max(1, _MAX_ROW_LANES // CP))
    br = block_rows or max(1, min(_MAX_BLOCK_R, _TILE_ELEMENTS // (bb * CP * OP)))
    if bb & (bb - 1) or br & (br - 1):
        raise ValueError(f"tile sizes must be powers of two, got block_rows={br}, block_batch={bb}")
    tile = br * bb * max(CP, OP)
    num_warps = 8 if tile >= 4096 else 4 if tile >= 1024 else 2 if tile >= 256 else 1
    return br, bb, num_warps


def _run(plan: Plan) -> None:
    """Launch a plan, or hand it to the enclosing ``collect_plans()``."""
    collected = _COLLECT.get()
    if collected is None:
        plan.launch()
    else:
        collected.append(plan)


@contextlib.contextmanager
def collect_plans():
    """Within this block the launchers record their plans in the yielded list instead of launching them
    (use meta tensors: the torch work around the launches still runs). The compile gate's entry point."""
    plans: list = []
    token = _COLLECT.set(plans)
    try:
        yield plans
    finally:
        _COLLECT.reset(token)


def _step(
    op: CSR,
    s0,
    sbuf,
    *,
    K,
    step,
    C,
    combine=False,
    store_step=True,
    mask_y=None,
    weight_view=None,
    bias=None,
    relu=False,
    out=None,
    reduce_x=None,
    dw_part=None,
    db_part=None,
    tiles,
):
    """Launch ``_cheb_step_kernel`` once. weight_view: (K, C, O) strided view of the combination matrices."""
    V, B = s0.shape[0], s0.shape[1]
    O = weight_view.shape[2] if combine else 1
    D = reduce_x.shape[2] if reduce_x is not None else 1
    br, bb, nw = tiles
    grid = (triton.cdiv(V, br), triton.cdiv(B, bb))
    dummy = s0
    w = weight_view if combine else dummy
    _run(
        Plan(
            _cheb_step_kernel,
            grid,
            (
                op.crow,
                op.col,
                op.values,
                s0,
                mask_y if mask_y is not None else dummy,
                sbuf if sbuf is not None else dummy,
                V * B * C,
                w,
                w.stride(0) if combine else 0,
                w.stride(1) if combine else 0,
                w.stride(2) if combine else 0,
                bias if bias is not None else dummy,
                out if out is not None else dummy,
                reduce_x if reduce_x is not None else dummy,
                dw_part if dw_part is not None else dummy,
                db_part if db_part is not None else dummy,
                V,
                B,
            ),
            dict(
                K=K,
                STEP=step,
                C=C,
                CP=triton.next_power_of_2(C),
                O=O,
                OP=triton.next_power_of_2(O),
                D=D,
                DP=triton.next_power_of_2(D),
                COMBINE=combine,
                STORE_STEP=store_step,
                MASK_S0=mask_y is not None,
                HAS_BIAS=bias is not None,
                RELU=relu,
                REDUCE=reduce_x is not None,
                SCALAR=(C == 1 and O == 1),
                ACC=_acc_type(s0.dtype),
                BLOCK_R=br,
                BLOCK_B=bb,
            ),
            nw,
            3,
            label=f"cheb step {step}/{K - 1}" + (" + combine" if combine else ""),
            meta=dict(V=V, B=B, C=C, O=O, K=K, dtype=str(s0.dtype), gemm=False),
        )
    )
    return grid[0] * grid[1]


def cheb_forward(
    op: CSR,
    X: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    relu: bool,
    keep_basis: bool,
    block_rows: int | None = None,
    block_batch: int | None = None,
):
    """Forward over X (V, B, F_in) contiguous. Returns (Y (V, B, F_out), basis slots or None).

    keep_basis: also return T_1..T_{K-1} as a (K-1, V, B, F_in) buffer (for the weight-only backward).
    """
    _acc_type(X.dtype)
    V, B, F_in = X.shape
    K, _, F_out = weight.shape
    if not fused_combination(F_in, F_out):
        basis = _propagate(op, X, K, None, block_rows, block_batch)
        z = torch.matmul(X.view(V * B, F_in), weight[0])
        for k in range(1, K):
            z += torch.matmul(basis[k - 1].view(V * B, F_in), weight[k])
        if bias is not None:
            z += bias
        Y = (torch.relu_(z) if relu else z).view(V, B, F_out)
        return Y, (basis if keep_basis else None)
    Y = X.new_empty((V, B, F_out))
    tiles = pick_tiles(B, F_in, F_out, block_rows, block_batch)
    slots = K - 1 if keep_basis else max(K - 2, 0)
    sbuf = X.new_empty((slots, V, B, F_in)) if slots else None
    for step in range(1 if K > 1 else 0, K):
        last = step == K - 1
        _step(
            op,
            X,
            sbuf,
            K=K,
            step=step,
            C=F_in,
            combine=last,
            store_step=(not last) or keep_basis,
            weight_view=weight,
            bias=bias,
            relu=relu,
            out=Y,
            tiles=tiles,
        )
    return Y, (sbuf if keep_basis else None)


def _propagate(op: CSR, S0: torch.Tensor, K: int, mask_y, block_rows, block_batch):
    """All of S_1..S_{K-1} (K-1, V, B, C) of S_0 (with the ReLU mask of mask_y applied to S_0 if given)."""
    V, B, C = S0.shape
    sbuf = S0.new_empty((max(K - 1, 0), V, B, C))
    tiles = pick_tiles(B, C, 1, block_rows, block_batch)
    for step in range(1, K):
        _step(op, S0, sbuf, K=K, step=step, C=C, mask_y=mask_y, tiles=tiles)
    return sbuf


def cheb_backward(
    op_t: CSR | None,
    X,
    Y,
    dY,
    weight,
    basis,
    relu: bool,
    need_x: bool,
    need_w: bool,
    need_b: bool,
    block_rows=None,
    block_batch=None,
):
    """Gradients (dX (V, B, F_in) or None, dW or None, db or None) from dY (V, B, F_out).

    op_t: CSR of L~^T (the forward CSR when L~ is symmetric), needed only when need_x. basis: the slots kept by
    ``cheb_forward(keep_basis=True)``, needed only when not need_x.
    """
    V, B, F_in = X.shape
    K, _, F_out = weight.shape
    acc_dtype = torch.float64 if X.dtype == torch.float64 else torch.float32
    dX = dW = db = None
    if not fused_combination(F_in, F_out):
        # Wide channels: the kernels propagate, torch GEMMs combine (deterministic, no split-K atomics).
        dZ = dY * (Y > 0) if relu else dY
        flat = lambda t, c: t.reshape(V * B, c)  # noqa: E731
        if need_b:
            db = flat(dZ, F_out).sum(0)
        if need_x:
            U = [dZ] + list(_propagate(op_t, dZ.contiguous(), K, None, block_rows, block_batch))
            dX = sum(flat(U[k], F_out) @ weight[k].T for k in range(K)).view(V, B, F_in)
            if need_w:  # dW_k = sum x^T U_k = sum T_k^T dz
                dW = torch.stack([flat(X, F_in).T @ flat(U[k], F_out) for k in range(K)])
        elif need_w:
            T = [X] + list(basis)
            dW = torch.stack([flat(T[k], F_in).T @ flat(dZ, F_out) for k in range(K)])
        return dX, dW, db
    mask_y = Y if relu else None
    if need_x:
        # Propagate dz through L~^T (F_out channels); the last step combines with W_k^T into dx.
        tiles = pick_tiles(B, F_out, F_in, block_rows, block_batch)
        reduce = need_w or need_b
        sbuf = dY.new_empty((K - 2, V, B, F_out)) if K > 2 else None
        dX = X.new_empty((V, B, F_in))
        P = triton.cdiv(V, tiles[0]) * triton.cdiv(B, tiles[1])
        dw_part = torch.empty((P, K, F_in, F_out), dtype=acc_dtype, device=X.device) if reduce else None
        db_part = torch.empty((P, F_out), dtype=acc_dtype, device=X.device) if reduce else None
        for step in range(1 if K > 1 else 0, K):
            last = step == K - 1
            _step(
                op_t,
                dY,
                sbuf,
                K=K,
                step=step,
                C=F_out,
                combine=last,
                store_step=not last,
                mask_y=mask_y,
                weight_view=weight.permute(0, 2, 1),
                out=dX,
                reduce_x=X if (last and reduce) else None,
                dw_part=dw_part,
                db_part=db_part,
                tiles=tiles,
            )
    else:
        tiles = pick_tiles(B, F_in, F_out, block_rows, block_batch)
        br, bb, nw = tiles
        grid = (triton.cdiv(V, br), triton.cdiv(B, bb))
        P = grid[0] * grid[1]
        dw_part = torch.empty((P, K, F_in, F_out), dtype=acc_dtype, device=X.device)
        db_part = torch.empty((P, F_out), dtype=acc_dtype, device=X.device)
        _run(
            Plan(
                _cheb_weight_grad_kernel,
                grid,
                (X, basis if basis is not None and basis.numel() else X, V * B * F_in, dY, Y, dw_part, db_part, V, B),
                dict(
                    K=K,
                    C=F_in,
                    CP=triton.next_power_of_2(F_in),
                    O=F_out,
                    OP=triton.next_power_of_2(F_out),
                    RELU=relu,
                    SCALAR=(F_in == 1 and F_out == 1),
                    ACC=_acc_type(X.dtype),
                    BLOCK_R=br,
                    BLOCK_B=bb,
                ),
                nw,
                3,
                label="cheb weight gradient",
                meta=dict(V=V, B=B, C=F_in, O=F_out, K=K, dtype=str(X.dtype), gemm=False),
            )
        )
        reduce = True
    if reduce:
        # Second stage of the deterministic reduction: a fixed-order sum over the programs' partials.
        if need_w:
            dW = dw_part.sum(0).to(weight.dtype)
        if need_b:
            db = db_part.sum(0).to(weight.dtype)
    return dX, dW, db


# ------------------------------------------------------------------------------------------ CSR preparation
def transpose_csr(op: CSR) -> CSR:
    """The CSR of A^T with torch ops (a stable sort by (column, row)); sorted column indices in every row."""
    crow, col, values, V = op
    counts = crow[1:] - crow[:-1]
    rows = torch.repeat_interleave(torch.arange(V, device=col.device, dtype=col.dtype), counts.to(torch.int64))
    order = torch.argsort(col.to(torch.int64) * V + rows.to(torch.int64), stable=True)
    crow_t = torch.zeros(V + 1, dtype=crow.dtype, device=crow.device)
    crow_t[1:] = torch.cumsum(torch.bincount(col.to(torch.int64), minlength=V), 0).to(crow.dtype)
    return CSR(crow_t, rows[order].contiguous(), values[order].contiguous(), V)


def csr_is_symmetric(op: CSR, op_t: CSR, rel_tol: float | None = None) -> bool:
    """Same pattern and values equal within rel_tol * max|value| (default 8 ulp of the dtype).

    A tolerance, not bitwise equality: D^-1/2 A D^-1/2 computed in floating point is symmetric only up to
    an ulp or so, and using L~ for L~^T then changes the gradient by that much.
    """
    if op.col.numel() != op_t.col.numel():
        return False
    if not (torch.equal(op.crow, op_t.crow) and torch.equal(op.col, op_t.col)):
        return False
    if op.values.numel() == 0:
        return True
    if rel_tol is None:
        rel_tol = 8 * torch.finfo(op.values.dtype).eps
    scale = op.values.abs().max()
    return bool(((op.values - op_t.values).abs() <= rel_tol * scale).all())


# --------------------------------------------------------------------------------------------------- autograd
class ChebConvFunction(torch.autograd.Function):
    """Autograd over the kernels. Inputs x (B, V, F_in), weight, bias; the CSRs are constants."""

    @staticmethod
    def forward(ctx, x, weight, bias, op, op_t_fn, relu, block_rows, block_batch):
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        X = x.permute(1, 0, 2).contiguous()  # (V, B, F_in): no copy when x is a previous layer's output
        keep_basis = (need_w or need_b) and not need_x
        Y, basis = cheb_forward(op, X, weight, bias, relu, keep_basis, block_rows, block_batch)
        y = Y.permute(1, 0, 2)
        ctx.save_for_backward(X, y, weight, basis)
        ctx.op_t_fn, ctx.relu, ctx.tiles = op_t_fn, relu, (block_rows, block_batch)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        X, y, weight, basis = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dY = dy.permute(1, 0, 2).contiguous()
        op_t = ctx.op_t_fn() if need_x else None
        dX, dW, db = cheb_backward(
            op_t, X, y.permute(1, 0, 2), dY, weight, basis, ctx.relu, need_x, need_w, need_b, *ctx.tiles
        )
        dx = dX.permute(1, 0, 2) if dX is not None else None
        return dx, dW, db, None, None, None, None, None


def cheb_conv(
    op: CSR,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = "relu",
    op_t=None,
    block_rows: int | None = None,
    block_batch: int | None = None,
) -> torch.Tensor:
    """act(sum_k T_k(L~) x W_k + b) with the Triton kernels; inputs are assumed checked.

    op: CSR of L~. op_t: CSR of L~^T, or a zero-argument callable returning it (called only if dx is needed),
    or None to build the transpose here with ``transpose_csr`` (pass ``op`` itself when L~ is symmetric).
    block_rows / block_batch override the tile heuristic (tests use them to get many programs on tiny inputs).
    """
    _acc_type(x.dtype)
    relu = activation == "relu"
    if bias is not None:
        bias = bias.contiguous()  # the kernels index it densely
    if op_t is None:
        op_t_fn = lambda: transpose_csr(op)  # noqa: E731
    elif callable(op_t) and not isinstance(op_t, CSR):
        op_t_fn = op_t
    else:
        op_t_fn = lambda: op_t  # noqa: E731
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if needs_grad:
        return ChebConvFunction.apply(x, weight, bias, op, op_t_fn, relu, block_rows, block_batch)
    X = x.permute(1, 0, 2).contiguous()
    Y, _ = cheb_forward(op, X, weight, bias, relu, False, block_rows, block_batch)
    return Y.permute(1, 0, 2)
