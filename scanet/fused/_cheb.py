"""Fused Chebyshev graph convolution: ``cheb_conv`` (functional) and ``ChebConv`` (drop-in module).

``cheb_conv(laplacian, x, weight, bias=None, activation="relu")`` has the signature and the result of
``scanet.reference.cheb_conv`` and raises the same errors (``reference.check_cheb_inputs`` runs first). It
dispatches on the device of x:

    CUDA                          the Triton kernels of scanet.kernels.cheb (float32 or float64)
    CPU, TRITON_INTERPRET=1       the same kernels, interpreted (slow: for tests)
    CPU otherwise                 scanet.native.cheb_conv when scanet.native.available(), else the reference

The result has shape (B, V, F_out) and is a view of a (V, B, F_out) buffer (the kernels' layout): feeding it
to another ChebConv costs no transpose. No gradient flows to the Laplacian; it is a constant.

Precision (torch.autocast, bf16/fp16 x). The recursion and its sums stay float32 everywhere (each Chebyshev
step doubles the previous term's rounding error): on CPU the native op takes bf16/fp16 x and fp32 weights
as they come and returns the autocast dtype (its AutocastCPU kernel, see scanet.native); the Triton kernels
(float32/float64 only) get x, weight and bias cast to float32 and their result is cast to the compute dtype;
the eager fallback computes in float32 likewise (scanet.reference.cheb_conv). The Laplacian's values stay
float32 for low-precision x (never rounded to bf16).

Dropout (``dropout_p``, ``training``): on the native path it is applied in the op's epilogue (a
counter-based mask regenerated in backward, seeded from torch's default generator: reproducible by seed);
elsewhere ``F.dropout`` on the result, the same distribution. ``fuses_dropout(x)`` says which.

``laplacian`` is a ``scanet.laplacian.Laplacian`` (what SCANet owns: checked once when built, its symmetry
known, its transpose kept when it is not symmetric) or a raw torch sparse CSR tensor, which is turned into a
Laplacian on every call (the full index check, which synchronizes, and an O(nnz) transpose): pass the object
when calling in a loop. There is no process-global cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scanet import reference
from scanet.fused._basis_cache import ChebBasisCache
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
    # The kernels compute in float32 or float64: low-precision / autocast inputs are widened here and the
    # result narrowed once to the compute dtype (the recursion stays float32, see the module docstring).
    dtype = reference.compute_dtype(x.device, x, weight, bias)
    acc = reference.statistics_dtype(dtype)
    with torch.autocast(x.device.type, enabled=False):
        x, weight = x.to(acc), weight.to(acc)
        bias = None if bias is None else bias.to(acc)
        V = lap.size
        op = kernels.CSR(lap.crow, lap.col, lap.values.to(acc), V)
        op_t = op if lap.symmetric else kernels.CSR(*lap.transpose(acc), V)
        y = kernels.cheb_conv(op, x, weight, bias, activation, op_t=op_t, **tiles)
    return y if y.dtype == dtype else y.to(dtype)


def _low(x, weight, bias) -> bool:
    return x.dtype != torch.float64 and (
        torch.is_autocast_enabled(x.device.type)
        or any(t is not None and t.dtype in reference.LOW_PRECISION for t in (x, weight, bias))
    )


def fuses_dropout(x: torch.Tensor) -> bool:
    """True when ``cheb_conv`` on x runs the native op, which applies dropout in its epilogue."""
    return (
        isinstance(x, torch.Tensor)
        and x.device.type == "cpu"
        and not interpreter_on()
        and x.numel() > 0
        and _native_module() is not None
    )


def cheb_conv(
    laplacian,
    x,
    weight,
    bias=None,
    activation="relu",
    *,
    dropout_p: float = 0.0,
    training: bool = True,
    out_dtype: torch.dtype | None = None,
    save_basis: bool | None = None,
    **tiles,
) -> torch.Tensor:
    """One Chebyshev graph convolution dropout(act(sum_k T_k(L~) x W_k + b)); see ``scanet.reference.cheb_conv``.

    laplacian: (V, V) ``Laplacian`` or torch sparse CSR; x: (B, V, F_in); weight: (K, F_in, F_out); bias:
    (F_out,) or None; activation: "relu" or None. dropout_p, training: dropout on the result (fused into the
    native epilogue on CPU). ``out_dtype``: the result's dtype (default: ``reference.compute_dtype``); under
    autocast, float32 keeps a hidden layer's output float32 (the next layer reads it in place, and its dx is
    not narrowed to bf16). ``save_basis``: what the native CPU op keeps for the weight gradient
    (``scanet.native.cheb_conv``; None picks). ``tiles`` (block_rows=, block_batch=) override the kernels'
    tile heuristic on the Triton path (tests use it to run many programs on tiny inputs).
    """
    given = laplacian
    if isinstance(laplacian, Laplacian):
        low = isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor) and _low(x, weight, bias)
        csr = laplacian.csr(torch.float32 if low else (x.dtype if isinstance(x, torch.Tensor) else None))
    else:
        csr = laplacian
    reference.check_cheb_inputs(csr, x, weight, bias, activation)  # indices: once per tensor
    if not isinstance(given, Laplacian) and csr.requires_grad:
        raise ValueError(
            "the fused cheb_conv treats the Laplacian as a constant, but laplacian_csr requires "
            "grad; use scanet.reference.cheb_conv for gradients with respect to the Laplacian"
        )
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= float(dropout_p) <= 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1], got {dropout_p!r}")
    lap = Laplacian.of(given)  # a raw CSR: checked (indices, symmetry) once per tensor
    if fuses_dropout(x) and weight.shape[2] > 0:
        return _native_module().cheb_conv(
            csr,
            x,
            weight,
            bias,
            activation,
            symmetric=lap.symmetric,
            dropout_p=dropout_p,
            training=training,
            out_dtype=out_dtype,
            save_basis=save_basis,
        )
    if x.numel() == 0 or weight.shape[2] == 0:
        y = reference.cheb_conv(csr, x, weight, bias, activation)
    elif x.device.type == "cuda":
        from scanet.kernels import cheb as kernels

        y = _triton_cheb_conv(kernels, lap, x, weight, bias, activation, **tiles)
    elif x.device.type == "cpu" and interpreter_on():
        y = _triton_cheb_conv(interpreted_kernels("cheb"), lap, x, weight, bias, activation, **tiles)
    else:
        y = reference.cheb_conv(csr, x, weight, bias, activation)
    if out_dtype is not None and y.dtype != out_dtype:
        y = y.to(out_dtype)
    return F.dropout(y, dropout_p, training) if dropout_p > 0.0 else y


class ChebConv(_EagerChebConv):
    """Drop-in for ``scanet.layers.ChebConv`` (same constructor, parameters and state_dict) over ``cheb_conv``.

    ``forward(x, laplacian, dropout_p=0.0, training=True, out_dtype=None)``: the dropout after this layer, in
    the native epilogue where ``fuses_dropout(x)`` (scanet.layers.TextEncoder asks before handing it over),
    and the output dtype (TextEncoder keeps hidden layers float32 under autocast).

    ``save_basis`` (attribute, not state; default None): passed to the native op, which then picks how backward
    gets the weight gradient (``scanet.native.cheb_conv``); True keeps the saved-basis backward everywhere.
    """

    op = staticmethod(cheb_conv)
    save_basis: bool | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.basis_cache = ChebBasisCache()  # not state: rebuilt from the texts and the Laplacian when needed

    @staticmethod
    def fuses_dropout(x: torch.Tensor) -> bool:
        return fuses_dropout(x)

    def on_cached_basis(self, texts: torch.Tensor, laplacian, index: torch.Tensor) -> torch.Tensor | None:
        """This layer on ``texts[index]`` (texts (N, V), one input channel) from the per-text Chebyshev basis
        (``self.basis_cache``, computed once; see scanet.fused._basis_cache): no SpMM, no gather; the same
        result as ``forward(texts[index].unsqueeze(-1), laplacian)``. None where the cache does not apply (the
        caller then gathers and calls ``forward``): not the native CPU backend, texts not float32 data, a raw
        CSR instead of a Laplacian, a float64 weight, or under torch.compile's tracing."""
        if not (
            isinstance(laplacian, Laplacian)
            and isinstance(texts, torch.Tensor)
            and isinstance(index, torch.Tensor)
            and texts.dim() == 2
            and texts.dtype == torch.float32
            and not texts.requires_grad
            and index.device.type == "cpu"
            and self.in_channels == 1
            and self.weight.dtype == torch.float32
            and fuses_dropout(texts)
            and not torch.compiler.is_compiling()
        ):
            return None
        basis = self.basis_cache.get(texts, laplacian, self.K)
        return _native_module().cheb_conv_from_basis(basis, self.weight, self.bias, self.activation, index=index)

    def forward(
        self,
        x: torch.Tensor,
        laplacian,
        dropout_p: float = 0.0,
        training: bool = True,
        out_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        if dropout_p == 0.0 and out_dtype is None and self.save_basis is None:
            return type(self).op(laplacian, x, self.weight, self.bias, self.activation)
        return type(self).op(
            laplacian,
            x,
            self.weight,
            self.bias,
            self.activation,
            dropout_p=dropout_p,
            training=training,
            out_dtype=out_dtype,
            save_basis=self.save_basis,
        )
