"""Eager PyTorch oracles, one per op. Tests and benchmarks import these; the fused kernels must match them.

``cheb_conv``    one Chebyshev graph convolution over a rescaled Laplacian in CSR.
``coattention``  one co-attention step: softmax(relu(f @ W.T + b)) * g.

The input checks live here too (``check_cheb_inputs``, ``check_coattention_inputs``) so that the fused
implementations raise exactly the same clear errors before any kernel runs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("relu", "none", None)


# ----------------------------------------------------------------------------------------------------- checks
def _fail(msg: str):
    raise ValueError(msg)


def check_laplacian(laplacian_csr: torch.Tensor, *, check_indices: bool = True) -> None:
    """Raise a clear error unless ``laplacian_csr`` is a square sparse CSR matrix with valid, sorted indices."""
    if not isinstance(laplacian_csr, torch.Tensor):
        _fail(f"laplacian_csr must be a torch sparse CSR tensor, got {type(laplacian_csr).__name__}")
    if laplacian_csr.layout != torch.sparse_csr:
        _fail(f"laplacian_csr must have layout torch.sparse_csr, got {laplacian_csr.layout} "
              "(convert with .to_sparse_csr(), or scanet.data.graph.to_torch_csr for a scipy matrix)")
    if laplacian_csr.dim() != 2 or laplacian_csr.shape[0] != laplacian_csr.shape[1]:
        _fail(f"laplacian_csr must be square (V, V), got shape {tuple(laplacian_csr.shape)}")
    if not laplacian_csr.dtype.is_floating_point:
        _fail(f"laplacian_csr must be floating point, got {laplacian_csr.dtype}")
    if not check_indices:
        return
    V = laplacian_csr.shape[0]
    crow, col = laplacian_csr.crow_indices(), laplacian_csr.col_indices()
    if col.numel():
        if int(col.min()) < 0 or int(col.max()) >= V:
            _fail(f"laplacian_csr has column indices out of range [0, {V}): "
                  f"min {int(col.min())}, max {int(col.max())}")
        # Sorted within each row: a decrease is only allowed where a new row starts.
        dec = (col[1:] < col[:-1]).nonzero().flatten() + 1
        if dec.numel():
            row_starts = crow[1:-1]
            if not torch.isin(dec, row_starts).all():
                _fail("laplacian_csr has unsorted column indices within a row "
                      "(sort them, e.g. scipy's .sort_indices() before conversion)")
    if crow[0] != 0 or crow[-1] != col.numel() or bool((crow[1:] < crow[:-1]).any()):
        _fail("laplacian_csr has a malformed crow_indices array")


def check_cheb_inputs(laplacian_csr, x, weight, bias=None, activation="relu", *, check_indices=True) -> None:
    check_laplacian(laplacian_csr, check_indices=check_indices)
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 3:
        _fail(f"x must have shape (B, V, F_in), got {tuple(x.shape)}")
    if weight.dim() != 3:
        _fail(f"weight must have shape (K, F_in, F_out), got {tuple(weight.shape)}")
    B, V, F_in = x.shape
    if V != laplacian_csr.shape[0]:
        _fail(f"x has V={V} vertices but laplacian_csr is {tuple(laplacian_csr.shape)}")
    K, W_in, F_out = weight.shape
    if K < 1:
        _fail("weight must hold K >= 1 Chebyshev terms")
    if W_in != F_in:
        _fail(f"weight expects F_in={W_in} but x has F_in={F_in}")
    if bias is not None and tuple(bias.shape) != (F_out,):
        _fail(f"bias must have shape ({F_out},), got {tuple(bias.shape)}")
    if activation not in ACTIVATIONS:
        _fail(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    tensors = {"laplacian_csr": laplacian_csr, "x": x, "weight": weight}
    if bias is not None:
        tensors["bias"] = bias
    devices = {n: t.device for n, t in tensors.items()}
    if len(set(devices.values())) > 1:
        _fail(f"all inputs must be on one device, got {devices}")
    dtypes = {n: t.dtype for n, t in tensors.items()}
    if len(set(dtypes.values())) > 1:
        _fail(f"all inputs must have one floating dtype, got {dtypes}")


def check_coattention_inputs(f, g, weight, bias) -> None:
    for name, t in (("f", f), ("g", g), ("weight", weight), ("bias", bias)):
        if not isinstance(t, torch.Tensor):
            _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if f.dim() != 2:
        _fail(f"f must have shape (M, N), got {tuple(f.shape)}")
    M, N = f.shape
    if tuple(g.shape) != (M, N):
        _fail(f"g must have the shape of f {(M, N)}, got {tuple(g.shape)}")
    if tuple(weight.shape) != (N, N):
        _fail(f"weight must have shape ({N}, {N}), got {tuple(weight.shape)}")
    if tuple(bias.shape) != (N,):
        _fail(f"bias must have shape ({N},), got {tuple(bias.shape)}")
    tensors = {"f": f, "g": g, "weight": weight, "bias": bias}
    devices = {n: t.device for n, t in tensors.items()}
    if len(set(devices.values())) > 1:
        _fail(f"all inputs must be on one device, got {devices}")
    dtypes = {n: t.dtype for n, t in tensors.items()}
    if len(set(dtypes.values())) > 1 or not f.dtype.is_floating_point:
        _fail(f"all inputs must have one floating dtype, got {dtypes}")


# ------------------------------------------------------------------------------------------------- Chebyshev
def _spmm(laplacian_csr: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L~ applied to every signal of x (B, V, F): one sparse product over a (V, B*F) view."""
    B, V, F_ = x.shape
    flat = x.permute(1, 0, 2).reshape(V, B * F_)
    out = torch.sparse.mm(laplacian_csr, flat)
    return out.reshape(V, B, F_).permute(1, 0, 2)


def chebyshev_basis(laplacian_csr: torch.Tensor, x: torch.Tensor, K: int) -> list[torch.Tensor]:
    """[T_0 x, ..., T_{K-1} x] with T_0 = x, T_1 = L~x, T_k = 2 L~ T_{k-1} - T_{k-2}; each (B, V, F)."""
    basis = [x]
    if K > 1:
        basis.append(_spmm(laplacian_csr, x))
    for _ in range(2, K):
        basis.append(2.0 * _spmm(laplacian_csr, basis[-1]) - basis[-2])
    return basis


def cheb_conv_from_basis(basis, weight, bias=None, activation="relu") -> torch.Tensor:
    """y = act(sum_k T_k @ W_k + b) from a precomputed basis (see ``chebyshev_basis``)."""
    y = sum(torch.matmul(t, weight[k]) for k, t in enumerate(basis))
    if bias is not None:
        y = y + bias
    return F.relu(y) if activation == "relu" else y


def cheb_conv(laplacian_csr, x, weight, bias=None, activation="relu") -> torch.Tensor:
    """One Chebyshev graph convolution.

    laplacian_csr: (V, V) rescaled Laplacian L~ = 2L/lmax - I as a torch sparse CSR tensor.
    x: (B, V, F_in) signals; weight: (K, F_in, F_out); bias: (F_out,) or None; activation: "relu" or None.
    Returns (B, V, F_out) = act(sum_k T_k(L~) x @ weight[k] + bias).
    """
    check_cheb_inputs(laplacian_csr, x, weight, bias, activation, check_indices=False)
    return cheb_conv_from_basis(chebyshev_basis(laplacian_csr, x, weight.shape[0]), weight, bias, activation)


# ---------------------------------------------------------------------------------------------- co-attention
def coattention(f, g, weight, bias, *, scale: float = 1.0) -> torch.Tensor:
    """One co-attention step: softmax(relu(f @ weight.T + bias), dim=-1) * g * scale.

    f: (M, N) features of the modality that attends; g: (M, N) features of the OTHER modality, which the
    attention re-weights; weight: (N, N); bias: (N,). ``scale`` (default 1, the paper's equations) multiplies
    the output: SCANet uses scale = N so that a uniform attention is the identity (see scanet.model).
    """
    check_coattention_inputs(f, g, weight, bias)
    p = torch.softmax(F.relu(F.linear(f, weight, bias)), dim=-1)
    out = p * g
    return out * scale if scale != 1.0 else out
