"""Fused Chebyshev graph convolution: ``cheb_conv`` (functional) and ``ChebConv`` (drop-in module).

``cheb_conv(laplacian_csr, x, weight, bias=None, activation="relu")`` has the signature and the result of
``scanet.reference.cheb_conv`` and raises the same errors (``reference.check_cheb_inputs`` runs first). It
dispatches on the device of x:

    CUDA                          the Triton kernels of scanet.kernels.cheb (float32 or float64)
    CPU, TRITON_INTERPRET=1       the same kernels, interpreted (slow: for tests)
    CPU otherwise                 scanet.native.cheb_conv when scanet.native.available(), else the reference

The result has shape (B, V, F_out) and is a view of a (V, B, F_out) buffer (the kernels' layout): feeding it
to another ChebConv costs no transpose. No gradient flows to the Laplacian; it is a constant.

Per-Laplacian work is done once and cached, keyed on the CSR arrays (device, dtype, shape, nnz, data
pointers, version counters): the full index check (``check_indices=True``: ranges, sorted columns) and, the
first time a gradient of x is needed, whether L~ is symmetric (then backward reuses the forward CSR) or else
its transposed CSR, built with torch ops. The cache holds references to the arrays it keys on, so a key's
pointers cannot be reused by other tensors while the entry lives (at most ``_CACHE_SIZE`` entries, LRU).
Limitation: writing new values into the SAME storage behind the CSR's back (e.g. ``load_state_dict`` into
SCANet's Laplacian buffers) does not bump the version counter seen through the CSR tensor; the forward pass
always reads the live arrays, but a cached symmetry flag or transpose could then be stale: call
``clear_cheb_cache()`` after such an in-place update.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict

import torch

from scanet import reference
from scanet.model import ChebConv as _EagerChebConv

_CACHE_SIZE = 8
_cache: OrderedDict = OrderedDict()
_cache_lock = threading.Lock()


class _PreparedLaplacian:
    """What is known about one Laplacian: its index check passed; its symmetry and transpose, once needed."""

    def __init__(self, laplacian_csr: torch.Tensor):
        # Strong references: while this entry lives, no other tensor can get these data pointers.
        self.arrays = (laplacian_csr.crow_indices(), laplacian_csr.col_indices(), laplacian_csr.values())
        self.symmetric: bool | None = None
        self.transpose = None
        self.lock = threading.Lock()

    def transpose_of(self, op):
        """The CSR of L~^T: ``op`` itself when L~ is symmetric (checked once), else the cached transpose."""
        from scanet.kernels import cheb as kernels

        with self.lock:
            if self.symmetric is None:
                op_t = kernels.transpose_csr(op)
                self.symmetric = kernels.csr_is_symmetric(op, op_t)
                self.transpose = None if self.symmetric else op_t
            return op if self.symmetric else self.transpose


def _cache_key(laplacian_csr: torch.Tensor):
    crow, col, values = laplacian_csr.crow_indices(), laplacian_csr.col_indices(), laplacian_csr.values()
    return (str(laplacian_csr.device), values.dtype, crow.dtype, col.dtype, tuple(laplacian_csr.shape),
            col.numel(), crow.data_ptr(), col.data_ptr(), values.data_ptr(),
            crow._version, col._version, values._version)


def _prepared(laplacian_csr: torch.Tensor) -> _PreparedLaplacian:
    """The cache entry of a Laplacian whose layout and shape are already checked; full index check on a miss."""
    key = _cache_key(laplacian_csr)
    with _cache_lock:
        entry = _cache.get(key)
        if entry is not None:
            _cache.move_to_end(key)
            return entry
    reference.check_laplacian(laplacian_csr, check_indices=True)   # once per Laplacian: it synchronizes
    entry = _PreparedLaplacian(laplacian_csr)
    with _cache_lock:
        _cache[key] = entry
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return entry


def clear_cheb_cache() -> None:
    """Forget every cached Laplacian check, symmetry flag and transpose."""
    with _cache_lock:
        _cache.clear()


def _native_module():
    try:
        from scanet import native
    except ImportError:
        return None
    return native if native.available() else None


def _interpreted_kernels():
    """scanet.kernels.cheb, verifying that its kernels were built for the interpreter."""
    from triton.runtime.interpreter import InterpretedFunction

    from scanet.kernels import cheb as kernels

    if not isinstance(kernels._cheb_step_kernel, InterpretedFunction):
        raise RuntimeError("TRITON_INTERPRET=1 is set but scanet.kernels.cheb was imported before it was: "
                           "set TRITON_INTERPRET=1 before anything imports the kernels")
    return kernels


def _triton_cheb_conv(kernels, laplacian_csr, x, weight, bias, activation, entry, **tiles):
    if x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"the fused (Triton) cheb_conv takes float32 or float64 tensors, got {x.dtype}")
    if laplacian_csr.requires_grad:
        raise ValueError("the fused cheb_conv treats the Laplacian as a constant, but laplacian_csr requires "
                         "grad; use scanet.reference.cheb_conv for gradients with respect to the Laplacian")
    op = kernels.CSR(laplacian_csr.crow_indices(), laplacian_csr.col_indices(), laplacian_csr.values(),
                     laplacian_csr.shape[0])
    return kernels.cheb_conv(op, x, weight, bias, activation, op_t=lambda: entry.transpose_of(op), **tiles)


def cheb_conv(laplacian_csr, x, weight, bias=None, activation="relu", **tiles) -> torch.Tensor:
    """One Chebyshev graph convolution act(sum_k T_k(L~) x W_k + b); see ``scanet.reference.cheb_conv``.

    laplacian_csr: (V, V) torch sparse CSR; x: (B, V, F_in); weight: (K, F_in, F_out); bias: (F_out,) or
    None; activation: "relu" or None. ``tiles`` (block_rows=, block_batch=) override the kernels' tile
    heuristic on the Triton path (tests use it to run many programs on tiny inputs).
    """
    reference.check_cheb_inputs(laplacian_csr, x, weight, bias, activation, check_indices=False)
    entry = _prepared(laplacian_csr)
    if x.numel() == 0 or weight.shape[2] == 0:
        return reference.cheb_conv(laplacian_csr, x, weight, bias, activation)
    if x.device.type == "cuda":
        from scanet.kernels import cheb as kernels

        return _triton_cheb_conv(kernels, laplacian_csr, x, weight, bias, activation, entry, **tiles)
    if x.device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return _triton_cheb_conv(_interpreted_kernels(), laplacian_csr, x, weight, bias, activation, entry,
                                     **tiles)
        native = _native_module()
        if native is not None and x.dtype in (torch.float32, torch.float64):
            return native.cheb_conv(laplacian_csr, x, weight, bias, activation)
    return reference.cheb_conv(laplacian_csr, x, weight, bias, activation)


class ChebConv(_EagerChebConv):
    """Drop-in for ``scanet.model.ChebConv`` (same constructor, parameters and state_dict) over ``cheb_conv``."""

    op = staticmethod(cheb_conv)
