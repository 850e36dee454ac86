"""Fused Chebyshev graph convolution: ``cheb_conv`` (functional) and ``ChebConv`` (drop-in module).

``cheb_conv(laplacian, x, weight, bias=None, activation="relu")`` has the signature and the result of
``scanet.reference.cheb_conv`` and raises the same errors (``reference.check_cheb_inputs`` runs first). It
dispatches on the device of x:

    CUDA                          the Triton kernels of scanet.kernels.cheb (float32 or float64)
    CPU, TRITON_INTERPRET=1       the same kernels, interpreted (slow: for tests)
    CPU otherwise                 scanet.native.cheb_conv when scanet.native.available(), else the reference

The result has shape (B, V, F_out) and is a view of a (V, B, F_out) buffer (the kernels' layout): feeding it
to another ChebConv costs no transpose. No gradient flows to the Laplacian; it is a constant.

``laplacian`` is a ``scanet.laplacian.Laplacian`` (what SCANet owns: checked once when built, its symmetry
known, its transpose kept when it is not symmetric) or a raw torch sparse CSR tensor, which is turned into a
Laplacian on every call (the full index check, which synchronizes, and an O(nnz) transpose): pass the object
when calling in a loop. There is no process-global cache.
"""
from __future__ import annotations

import torch

from scanet import reference
from scanet.fused._dispatch import interpreted_kernels, interpreter_on
from scanet.laplacian import Laplacian
from scanet.layers import ChebConv as _EagerChebConv


def _native_module():
    try:
        from scanet import native
    except ImportError:
        return None
    return native if native.available() else None


def _triton_cheb_conv(kernels, lap: Laplacian, x, weight, bias, activation, **tiles):
    if x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"the fused (Triton) cheb_conv takes float32 or float64 tensors, got {x.dtype}")
    V = lap.size
    op = kernels.CSR(lap.crow, lap.col, lap.values.to(x.dtype), V)
    op_t = op if lap.symmetric else kernels.CSR(*lap.transpose(x.dtype), V)
    return kernels.cheb_conv(op, x, weight, bias, activation, op_t=op_t, **tiles)


def cheb_conv(laplacian, x, weight, bias=None, activation="relu", **tiles) -> torch.Tensor:
    """One Chebyshev graph convolution act(sum_k T_k(L~) x W_k + b); see ``scanet.reference.cheb_conv``.

    laplacian: (V, V) ``Laplacian`` or torch sparse CSR; x: (B, V, F_in); weight: (K, F_in, F_out); bias:
    (F_out,) or None; activation: "relu" or None. ``tiles`` (block_rows=, block_batch=) override the kernels'
    tile heuristic on the Triton path (tests use it to run many programs on tiny inputs).
    """
    given = laplacian
    csr = laplacian.csr(x.dtype if isinstance(x, torch.Tensor) else None) if isinstance(laplacian, Laplacian) \
        else laplacian
    reference.check_cheb_inputs(csr, x, weight, bias, activation)   # indices: once per tensor
    if not isinstance(given, Laplacian) and csr.requires_grad:
        raise ValueError("the fused cheb_conv treats the Laplacian as a constant, but laplacian_csr requires "
                         "grad; use scanet.reference.cheb_conv for gradients with respect to the Laplacian")
    lap = Laplacian.of(given)                   # a raw CSR: checked (indices, symmetry) once per tensor
    if x.numel() == 0 or weight.shape[2] == 0:
        return reference.cheb_conv(csr, x, weight, bias, activation)
    if x.device.type == "cuda":
        from scanet.kernels import cheb as kernels

        return _triton_cheb_conv(kernels, lap, x, weight, bias, activation, **tiles)
    if x.device.type == "cpu":
        if interpreter_on():
            return _triton_cheb_conv(interpreted_kernels("cheb"), lap, x, weight, bias, activation, **tiles)
        native = _native_module()
        if native is not None and x.dtype in (torch.float32, torch.float64):
            return native.cheb_conv(csr, x, weight, bias, activation)
    return reference.cheb_conv(csr, x, weight, bias, activation)


class ChebConv(_EagerChebConv):
    """Drop-in for ``scanet.layers.ChebConv`` (same constructor, parameters and state_dict) over ``cheb_conv``."""

    op = staticmethod(cheb_conv)
