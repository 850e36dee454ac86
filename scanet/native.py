"""Native CPU backend: the fused Chebyshev graph convolution as C++ torch.library ops (csrc/, built by CMake).

``available()``            True when the compiled library (scanet/_native*.so) matches this torch and CPU and loads.
``unavailable_reason()``   why not (not built, built against another torch, a load error, ...), else None.
``cheb_conv``              the contract of ``scanet.reference.cheb_conv``, forward and backward, on CPU; x in
                           float32/64, bfloat16 or float16; optional fused dropout; runs under torch.autocast.
``dropout_keep_mask``      the keep mask a fused-dropout call applied (regenerated from its seed).
``chebyshev_basis``        [T_0 x, ..., T_{K-1} x] as one (K, B, V, F) tensor: computed once per text for the
                           first GCN layer, whose input (the bag-of-words) never changes.
``cheb_conv_from_basis``   act(sum_k basis[k] W_k + b) from such a basis: the first layer without any SpMM.

The ops are ``torch.ops.scanet_native.*``, with fake (meta) implementations and autograd registered here, so
torch.compile traces them as opaque nodes. Results are laid out as (B, V, F) tensors whose storage is (V, B, F)
(strides (F, B*F, 1)): the kernels read a vertex's neighbours as contiguous rows, the next layer reads them
without a copy, and ``flatten(1)`` before the text FC stays a view. Use ``reshape``, not ``view``, on them.

The Laplacian is a constant (its values get no gradient), as everywhere in SCANet. Backward propagates dx
with L~^T: L~ itself when the caller says (``symmetric=True``) or a one-time check finds L~ symmetric (cached
per Laplacian), else a transpose built once per Laplacian and cached (see ``_LaplacianInfo``); no per-step
transpose either way. Every reduction (dW, db) sums fixed row blocks in a fixed order: results do not depend
on the thread count.

Precision (bf16 / fp16, torch.autocast). The kernels compute in float32 (float64 for float64 inputs): the
Chebyshev recursion T_k = 2 L~ T_{k-1} - T_{k-2} doubles the previous term and subtracts the one before, so a
rounding error in T_{k-1} comes back doubled in T_k and in every later term; the terms T_1..T_{K-1}, the
weight, bias, Laplacian values and all sums therefore stay float32, and only x (read once) and y (written
once) may be bfloat16/float16. Under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (an AutocastCPU kernel
registered for ``scanet_native::cheb_conv_forward``): x is taken in whatever float dtype it comes (an fp32 x
is not rounded first: the kernels widen bf16 anyway, so rounding would only lose bits), weight, bias and the
Laplacian values are used in float32, and y comes out in the autocast dtype, ready for the bf16 GEMM of the
text FC. Gradients come back in each input's own dtype (dW, db in float32 for float32 parameters).
The basis ops (``chebyshev_basis``, ``cheb_conv_from_basis``) are registered to run in float32 under
autocast (their inputs are fixed data and a handful of weights; bf16 would save nothing measurable).

Dropout in the epilogue (``dropout_p``). ``y = act(z) * keep / (1 - p)`` with ``keep[i]`` for the element i of
the (B, V, F_out) output in row-major order computed by a counter-based generator (SplitMix64's output
function of ``seed + (i + 1) * golden``; P(keep) = 1 - p to 2^-32); backward recomputes ``keep`` from
(seed, i) instead of storing a mask. The seed is drawn from torch's default CPU generator per call, so
``torch.manual_seed`` makes a run reproducible and a checkpoint that restores the RNG state resumes exactly.
This replaces ``nn.Dropout`` after the last ChebConv: that dropout's ``bernoulli_`` was 13% of the Wiki step.

Why over 400 lines: the Python side of the ops (fake kernels, autograd, the autocast kernel, input checks and
the public wrappers) registers as one unit once the library is loaded; the file lookup and its checks live in
scanet/native_library.py.

The library is looked up next to this file and checked before it is loaded (see ``_select_library``);
SCANET_NO_NATIVE=1 in the environment turns the backend off at run time as well as at build time.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from scanet import reference
from scanet.laplacian import Laplacian, as_csr

__all__ = [
    "available",
    "unavailable_reason",
    "cheb_conv",
    "chebyshev_basis",
    "cheb_conv_from_basis",
    "dropout_keep_mask",
    "library_path",
    "build_info",
    "clear_laplacian_cache",
]

from scanet.native_library import (  # noqa: F401 - re-exported: the loader's checks are tested through here
    BUILD_STATUS_FILE,
    PKG_DIR,
    _load_from,
    _select_library,
    _stale_schema,
)

_STATE: dict = {"done": False, "ok": False, "reason": None, "path": None, "info": None}
_LOAD_LOCK = threading.Lock()  # one load per process: a second TORCH_LIBRARY registration would fail


def _try_load() -> None:
    path, info = _load_from(PKG_DIR)
    if path is None:
        _STATE["reason"] = info
        return
    stale = _stale_schema()
    if stale:
        _STATE["reason"] = (
            f"{path.name} was built from older sources (it lacks {', '.join(stale)}); rebuild it "
            "with `pip install --no-build-isolation -e .` or `python setup.py build_ext --inplace`"
        )
        return
    try:
        _register_python_side()
    except Exception as e:  # noqa: BLE001 - e.g. a torch without these torch.library APIs: stay on eager
        _STATE["reason"] = f"registering the Python side of {path.name} failed: {type(e).__name__}: {e}"
        return
    _STATE.update(ok=True, reason=None, path=path, info=info)


def _ensure_loaded() -> bool:
    if not _STATE["done"]:
        with _LOAD_LOCK:
            if not _STATE["done"]:
                _try_load()
                _STATE["done"] = True
    return _STATE["ok"]


def available() -> bool:
    """True when the native library is built for this torch and CPU and loaded (scanet_native ops exist)."""
    return _ensure_loaded()


def unavailable_reason() -> str | None:
    """Why ``available()`` is False, or None when it is True."""
    _ensure_loaded()
    return _STATE["reason"]


def library_path() -> Path | None:
    _ensure_loaded()
    return _STATE["path"]


def build_info() -> str | None:
    """The library's own record of what it was built against (torch version, -march), when loaded."""
    return torch.ops.scanet_native.build_info() if _ensure_loaded() else None


def _require() -> None:
    if not _ensure_loaded():
        raise RuntimeError(f"scanet.native is not available: {_STATE['reason']}")


# ----------------------------------------------------------------------------- fake kernels and autograd
def _is_vb(x: torch.Tensor) -> bool:
    """Is a (B, V, F) tensor stored as (V, B, F) row-major, the layout the kernels read without a copy?"""
    return x.permute(1, 0, 2).is_contiguous()


def _register_python_side() -> None:
    lib = "scanet_native::"

    @torch.library.register_fake(lib + "cheb_conv_forward")
    def _forward_fake(
        crow, col, values, x, weight, bias, relu, save_basis, symmetric=False, dropout_p=0.0, seed=0, out_dtype=None
    ):
        B, V, F_in = x.shape
        K, _, F_out = weight.shape
        acc = _acc_dtype(x.dtype)
        y = x.new_empty_strided((B, V, F_out), (F_out, B * F_out, 1), dtype=out_dtype or x.dtype)
        # T_1..T_{K-1}, preceded by a (V, B, F) copy of T_0 when x is not stored that way (in acc) already.
        direct = _is_vb(x) and x.dtype == acc
        n_saved = (K - 1 + (0 if direct else 1)) if save_basis else 0
        return y, x.new_empty((n_saved, V, B * F_in), dtype=acc)

    @torch.library.register_fake(lib + "cheb_conv_backward")
    def _backward_fake(
        grad_y,
        crow,
        col,
        values,
        crow_t,
        col_t,
        values_t,
        x,
        saved,
        y,
        weight,
        relu,
        has_bias,
        need_x,
        need_w,
        need_b,
        dropout_p=0.0,
        seed=0,
    ):
        B, V, F_in = x.shape
        dx = x.new_empty((B, V, F_in)) if need_x else None  # contiguous, whatever x's layout
        dw = weight.new_empty(weight.shape) if need_w else None
        db = weight.new_empty((weight.shape[2],)) if (need_b and has_bias) else None
        return dx, dw, db

    @torch.library.register_fake(lib + "csr_transpose")
    def _transpose_fake(crow, col, values):
        return torch.empty_like(crow), torch.empty_like(col), torch.empty_like(values)

    @torch.library.register_fake(lib + "chebyshev_basis")
    def _basis_fake(crow, col, values, x, K):
        B, V, F = x.shape
        return x.new_empty_strided((K, B, V, F), (V * B * F, F, B * F, 1))

    @torch.library.register_fake(lib + "cheb_conv_from_basis_forward")
    def _from_basis_fake(basis, weight, bias, relu, index=None):
        _, B, V, _ = basis.shape
        if index is not None:
            B = index.shape[0]
        F_out = weight.shape[2]
        return basis.new_empty_strided((B, V, F_out), (F_out, B * F_out, 1))

    @torch.library.register_fake(lib + "cheb_conv_from_basis_backward")
    def _from_basis_backward_fake(grad_y, basis, y, weight, bias, relu, need_w, need_b, index=None):
        dw = weight.new_empty(weight.shape) if need_w else None
        db = weight.new_empty((weight.shape[2],)) if (need_b and bias is not None) else None
        return dw, db

    def _forward_setup(ctx, inputs, output):
        crow, col, values, x, weight, bias, relu, save_basis, symmetric, dropout_p, seed, _ = (
            tuple(inputs) + (False, 0.0, 0, None)[len(inputs) - 8 :]
        )
        y, saved = output
        ctx.save_for_backward(crow, col, values, x, saved, y, weight)
        ctx.relu, ctx.has_bias, ctx.symmetric = relu, bias is not None, symmetric
        ctx.dropout_p, ctx.seed = dropout_p, seed
        ctx.set_materialize_grads(False)  # the saved-basis output gets no gradient: do not allocate zeros for it
        ctx.mark_non_differentiable(saved)

    def _forward_backward(ctx, grad_y, grad_saved):
        crow, col, values, x, saved, y, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[3], ctx.needs_input_grad[4], ctx.needs_input_grad[5]
        nones = (None,) * 12
        if grad_y is None or not (need_x or need_w or need_b):
            return nones
        # dx, and dW without a saved basis (the adjoint recursion), propagate with L~^T: L~ itself when
        # symmetric, else the transpose (built once, cached).
        adjoint = need_w and saved.shape[0] == 0 and weight.shape[0] >= 2
        transposed = (None, None, None)
        if (need_x or adjoint) and not ctx.symmetric:
            transposed = (
                _laplacian_info(crow, col, values).transpose()
                if _has_storage(crow, col, values)
                else torch.ops.scanet_native.csr_transpose(crow, col, values)
            )  # traced: no cache
        dx, dw, db = torch.ops.scanet_native.cheb_conv_backward(
            grad_y,
            crow,
            col,
            values,
            *transposed,
            x,
            saved,
            y,
            weight,
            ctx.relu,
            ctx.has_bias,
            need_x,
            need_w,
            need_b,
            ctx.dropout_p,
            ctx.seed,
        )
        return (None, None, None, dx, dw, db) + nones[6:]

    torch.library.register_autograd(lib + "cheb_conv_forward", _forward_backward, setup_context=_forward_setup)

    def _from_basis_setup(ctx, inputs, output):
        basis, weight, bias, relu, index = inputs
        ctx.save_for_backward(basis, output, weight, bias, index)
        ctx.relu = relu

    def _from_basis_backward(ctx, grad_y):
        basis, y, weight, bias, index = ctx.saved_tensors
        need_basis, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        dw, db = torch.ops.scanet_native.cheb_conv_from_basis_backward(
            grad_y, basis, y, weight, bias, ctx.relu, need_w, need_b, index
        )
        d_basis = None
        if need_basis:  # not SCANet's use (the basis is data); eager is enough: dz @ W_k^T for every k
            dz = grad_y * (y > 0) if ctx.relu else grad_y
            d_basis = torch.einsum("bvo,kio->kbvi", dz, weight)
            if index is not None:
                d_basis = torch.zeros_like(basis).index_add_(1, index, d_basis)
        return d_basis, dw, db, None, None

    torch.library.register_autograd(
        lib + "cheb_conv_from_basis_forward", _from_basis_backward, setup_context=_from_basis_setup
    )

    _register_autocast()


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The compute dtype of the kernels for an x of ``dtype``: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_LOW = (torch.bfloat16, torch.float16)


def _to_float32(t):
    return t.float() if isinstance(t, torch.Tensor) and t.dtype in _LOW else t


def _register_autocast() -> None:
    """AutocastCPU kernels for the scanet_native ops (the precision policy is in the module docstring).

    Written like ``torch.library.register_autocast`` (a kernel that casts, then calls the op with the autocast
    key excluded), but with a per-argument policy: register_autocast casts every float input to one dtype,
    which would round the Laplacian values and the weights of the recursion.
    """
    impl = torch.library.Library("scanet_native", "IMPL")
    _STATE["autocast_lib"] = impl  # registrations live as long as this object

    def register(name, policy):
        register_autocast_cpu(impl, name, policy)

    def forward_policy(
        crow, col, values, x, weight, bias, relu, save_basis, symmetric=False, dropout_p=0.0, seed=0, out_dtype=None
    ):
        if x.dtype != torch.float64:
            values, weight, bias = _to_float32(values), _to_float32(weight), _to_float32(bias)
            if out_dtype is None:
                out_dtype = torch.get_autocast_dtype("cpu")
        return crow, col, values, x, weight, bias, relu, save_basis, symmetric, dropout_p, seed, out_dtype

    def fp32_policy(*args, index=None):  # fixed data and a few weights: float32 (float64 stays float64)
        return tuple(_to_float32(a) for a in args) + ((index,) if index is not None else ())

    register("cheb_conv_forward", forward_policy)
    register("chebyshev_basis", fp32_policy)
    register("cheb_conv_from_basis_forward", fp32_policy)


def register_autocast_cpu(impl: torch.library.Library, name: str, policy) -> None:
    """An AutocastCPU kernel for ``scanet_native::<name>`` on ``impl`` (a Library("scanet_native", "IMPL") the
    caller keeps alive): ``policy(*args, **kwargs)`` returns the arguments to call the op with (its own casts),
    then the op runs with the autocast key excluded. Also registered for the Python dispatcher (torch.compile)."""
    key = torch._C.DispatchKey.AutocastCPU
    op = getattr(torch.ops.scanet_native, name).default

    def run(*args, **kwargs):  # the dispatcher leaves out trailing arguments that equal their defaults
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(*policy(*args, **kwargs))

    op.py_impl(key)(run)
    impl.impl(name, lambda _keyset, *args, **kwargs: run(*args, **kwargs), "AutocastCPU", with_keyset=True)


# ------------------------------------------------------------------------------- per-Laplacian facts
class _LaplacianInfo:
    """Whether one CSR Laplacian is symmetric, and its transpose if not: computed once, then cached.

    Keyed on the arrays' data pointers, version counters, shape and dtype; the entry holds the arrays, so
    the pointers cannot be reused by other tensors while it lives (at most ``_INFO_CACHE_SIZE``, LRU).
    Writing new values into the same storage behind the CSR's back does not bump the version seen here:
    call ``clear_laplacian_cache()`` after such an update.
    """

    def __init__(self, crow, col, values):
        self.arrays = (crow, col, values)
        self._symmetric: bool | None = None
        self._transpose = None
        self.lock = threading.Lock()

    def _compute(self):
        with self.lock:
            if self._symmetric is None:
                with torch.no_grad():
                    t = torch.ops.scanet_native.csr_transpose(*(a.detach() for a in self.arrays))
                # The transpose comes out with sorted columns: equal arrays <=> symmetric (for sorted input;
                # an unsorted one is reported non-symmetric and takes the transpose, still correct).
                self._symmetric = all(torch.equal(a, b) for a, b in zip(self.arrays, t, strict=True))
                self._transpose = None if self._symmetric else t

    @property
    def symmetric(self) -> bool:
        self._compute()
        return bool(self._symmetric)

    def transpose(self):
        """(crow, col, values) of L~^T: (None, None, None) when L~ is symmetric (backward then uses L~)."""
        self._compute()
        return (None, None, None) if self._symmetric else self._transpose


_INFO_CACHE_SIZE = 8
_info_cache: OrderedDict = OrderedDict()
_info_lock = threading.Lock()


def _has_storage(*tensors) -> bool:
    """False for the fake / functional tensors of torch.compile's tracing (no data pointer to key a cache on)."""
    try:
        for t in tensors:
            t.data_ptr()
    except RuntimeError:
        return False
    return True


def _laplacian_info(crow, col, values) -> _LaplacianInfo:
    key = (
        values.dtype,
        crow.numel(),
        col.numel(),
        crow.data_ptr(),
        col.data_ptr(),
        values.data_ptr(),
        crow._version,
        col._version,
        values._version,
    )
    with _info_lock:
        entry = _info_cache.get(key)
        if entry is not None:
            _info_cache.move_to_end(key)
            return entry
        entry = _info_cache[key] = _LaplacianInfo(crow, col, values)
        while len(_info_cache) > _INFO_CACHE_SIZE:
            _info_cache.popitem(last=False)
        return entry


def clear_laplacian_cache() -> None:
    """Forget every cached symmetry flag and transpose (after writing into a Laplacian's storage in place)."""
    with _info_lock:
        _info_cache.clear()


# ------------------------------------------------------------------------------------------------ the ops
_CHEB_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_BASIS_DTYPES = (torch.float32, torch.float64)


def _check_native_inputs(tensors: dict, dtypes=_CHEB_DTYPES) -> None:
    for name, t in tensors.items():
        if t.device.type != "cpu":
            raise ValueError(f"scanet.native runs on CPU tensors only; {name} is on {t.device}")
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise ValueError(f"scanet.native supports {names} here; {name} is {t.dtype}")


def _csr_arrays(laplacian_csr: torch.Tensor):
    crow, col, values = laplacian_csr.crow_indices(), laplacian_csr.col_indices(), laplacian_csr.values()
    if crow.dtype != torch.int64:  # int32 CSR (e.g. from scipy) is accepted: the kernels index with int64
        crow, col = crow.long(), col.long()
    if values.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "scanet.native treats laplacian_csr as a constant, but its values require grad; "
            "detach it or use scanet.reference.cheb_conv"
        )
    return crow, col, values


def _run(op, *args):
    """Call an op; its CSR index checks (RuntimeError in C++) become the ValueError the reference raises."""
    try:
        return op(*args)
    except RuntimeError as e:
        msg = str(e)
        if "laplacian_csr" in msg and not torch.compiler.is_compiling():
            first = next((line for line in msg.splitlines() if "laplacian_csr" in line), msg)
            raise ValueError(first.strip()) from None
        raise


def _stand_in(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A zero-stride tensor with t's shape and device in ``dtype``: no memory, for the reference's checks."""
    return torch.empty((), dtype=dtype, device=t.device).expand(t.shape)


def _check_cheb_dtypes(laplacian_csr, x, weight, bias) -> None:
    """The native op's dtype rule: float64 all together, or any mix of float32, bfloat16 and float16."""
    tensors = {"laplacian_csr": laplacian_csr, "x": x, "weight": weight} | ({"bias": bias} if bias is not None else {})
    dtypes = {n: t.dtype for n, t in tensors.items()}
    for name, dt in dtypes.items():
        if dt not in _CHEB_DTYPES:
            raise ValueError(f"scanet.native supports float32, float64, bfloat16 and float16; {name} is {dt}")
    if torch.float64 in dtypes.values() and len(set(dtypes.values())) > 1:
        raise ValueError(f"all inputs must have one floating dtype when one is float64, got {dtypes}")


def cheb_conv(
    laplacian_csr,
    x,
    weight,
    bias=None,
    activation="relu",
    *,
    symmetric: bool | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
    out_dtype: torch.dtype | None = None,
    save_basis: bool | None = None,
) -> torch.Tensor:
    """One Chebyshev graph convolution, the contract of ``scanet.reference.cheb_conv``, fused on CPU.

    laplacian_csr: (V, V) rescaled Laplacian L~ (torch sparse CSR, any sparsity, symmetric or not), or a
    scanet.laplacian.Laplacian (used in x's dtype).
    x: (B, V, F_in); weight: (K, F_in, F_out); bias: (F_out,) or None; activation: "relu" or None/"none".
    Returns (B, V, F_out) = dropout(act(sum_k T_k(L~) x W_k + b)), stored as (V, B, F_out) (see the module
    docstring). Differentiable in x, weight and bias.

    dtypes: float64 throughout, or x in float32/bfloat16/float16 with weight, bias and L~ in any of those
    (used in float32 inside). The output dtype is ``out_dtype`` when given (float32, bfloat16 or float16;
    float64 only with float64 inputs), else the autocast dtype under ``torch.autocast("cpu")``, else the
    promoted dtype of x, weight and bias (bf16 x with an fp32 weight gives fp32). Between two stacked layers
    under autocast, ``out_dtype=torch.float32`` keeps the hidden signal in float32 (the next layer then reads
    it in place, and its dx needs no narrowing); the last layer's bf16 output feeds the bf16 GEMM after it.
    symmetric: True says L~ = L~^T (backward reuses L~, nothing is transposed); False makes backward use the
    transpose (built once per Laplacian and cached); None checks once per Laplacian (cached). Passing True
    for a non-symmetric L~ gives a wrong dx.
    dropout_p, training: with ``training`` and ``dropout_p > 0`` the result is ``y * keep / (1 - dropout_p)``
    (``nn.Dropout`` on the output, fused into the epilogue; see the module docstring); the seed is drawn from
    torch's default generator.
    save_basis: how backward gets the weight gradient. True: the forward saves T_1 x .. T_{K-1} x and backward
    reads them (dW_k = <T_k x, dz>); False: nothing is saved and backward runs the adjoint recursion
    U_k = T_k(L~^T) dz (dW_k = <x, U_k>; K-1 SpMMs over F_out channels, which it runs anyway when dx is wanted);
    None (default): True where x does not require grad (the first layer: backward then needs no SpMM at all) or
    F_out > F_in, else False (the Wiki layer 2: 20 MB a step less written and read). Same result either way, up to
    the order of float32 sums.
    """
    if isinstance(laplacian_csr, Laplacian):
        # The prepared operator knows whether it is symmetric (computed once); its values stay float32 for
        # bf16/fp16 inputs (the kernels compute in float32 anyway).
        if symmetric is None:
            symmetric = laplacian_csr.symmetric
        x_dtype = getattr(x, "dtype", None)
        laplacian_csr = laplacian_csr.csr(torch.float64 if x_dtype == torch.float64 else torch.float32)
    reference.check_laplacian(laplacian_csr)  # indices: once per tensor
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _check_cheb_dtypes(laplacian_csr, x, weight, bias)
    common = laplacian_csr.dtype
    # The reference's shape, device and activation checks, without its one-dtype rule (mixed dtypes are
    # allowed here): x, weight and bias are replaced by stand-ins of the Laplacian's dtype.
    reference.check_cheb_inputs(
        laplacian_csr,
        _stand_in(x, common),
        _stand_in(weight, common),
        None if bias is None else _stand_in(bias, common),
        activation,
        check_indices=False,
    )
    _check_native_inputs(
        {"x": x, "weight": weight, "laplacian_csr": laplacian_csr.values()}
        | ({"bias": bias} if bias is not None else {})
    )
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= float(dropout_p) <= 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1], got {dropout_p!r}")
    if symmetric not in (None, True, False):
        raise ValueError(f"symmetric must be True, False or None, got {symmetric!r}")
    if save_basis not in (None, True, False):
        raise ValueError(f"save_basis must be True, False or None, got {save_basis!r}")
    if out_dtype is not None and (
        out_dtype not in _CHEB_DTYPES or (out_dtype == torch.float64) != (x.dtype == torch.float64)
    ):
        raise ValueError(
            f"out_dtype must be float32, bfloat16 or float16 (float64 only for float64 inputs), "
            f"got {out_dtype} for x of dtype {x.dtype}"
        )
    _require()
    crow, col, values = _csr_arrays(laplacian_csr)
    acc = _acc_dtype(x.dtype)
    autocast = torch.is_autocast_enabled("cpu") and acc == torch.float32
    if out_dtype is None and not autocast:  # under autocast, None lets the AutocastCPU kernel choose
        out_dtype = torch.promote_types(
            x.dtype, weight.dtype if bias is None else torch.promote_types(weight.dtype, bias.dtype)
        )
    # The kernels take the parameters and the operator in the compute dtype (a no-op for float32 ones).
    values = values.to(acc)
    weight = weight.to(acc)
    bias = bias.to(acc) if bias is not None else None
    if symmetric is None:  # only backward's dx uses it; under tracing, backward transposes (correct either way)
        symmetric = (
            _laplacian_info(crow, col, values).symmetric
            if (x.requires_grad and torch.is_grad_enabled() and _has_storage(crow, col, values))
            else False
        )
    p = float(dropout_p) if training else 0.0
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64)) if p > 0.0 else 0
    # The basis T_1 x .. T_{K-1} x is saved for dW only where backward would not run the recursion anyway: when
    # dx is wanted too (x requires grad), backward's K-1 SpMMs give dW from U_k = T_k(L~^T) dz instead (the
    # adjoint recursion, csrc/cheb_conv.cpp), which costs no more there while F_out <= F_in; the forward then
    # writes no basis (Wiki layer 2: 20 MB a step).
    if save_basis is None:
        save_basis = not (x.requires_grad and weight.shape[-1] <= weight.shape[-2])
    save_basis = bool(save_basis) and torch.is_grad_enabled() and weight.requires_grad
    y, _ = _run(
        torch.ops.scanet_native.cheb_conv_forward,
        crow,
        col,
        values,
        x,
        weight,
        bias,
        activation == "relu",
        save_basis,
        bool(symmetric),
        p,
        seed,
        out_dtype,
    )
    return y


def dropout_keep_mask(seed: int, shape, dropout_p: float) -> torch.Tensor:
    """The keep mask (bool, ``shape``) that the fused dropout with (seed, dropout_p) applies to an output of
    that shape (B, V, F_out), element i of its row-major order being ``keep[i]``."""
    _require()
    shape = tuple(shape)
    return torch.ops.scanet_native.dropout_keep_mask(int(seed), math.prod(shape), float(dropout_p)).view(shape)


def chebyshev_basis(laplacian_csr, x, K: int) -> torch.Tensor:
    """[T_0 x, ..., T_{K-1} x] stacked as (K, B, V, F); ``basis[k]`` equals ``reference.chebyshev_basis(...)[k]``.

    Meant for fixed inputs (SCANet's bag-of-words): compute it once per text and feed batches of it to
    ``cheb_conv_from_basis``. Not differentiable (x is data).
    """
    if not isinstance(K, int) or K < 1:
        raise ValueError(f"K must be an int >= 1, got {K!r}")
    laplacian_csr = as_csr(laplacian_csr, getattr(x, "dtype", None))
    reference.check_laplacian(laplacian_csr)  # indices: once per tensor
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must be a (B, V, F) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if x.shape[1] != laplacian_csr.shape[0]:
        raise ValueError(f"x has V={x.shape[1]} vertices but laplacian_csr is {tuple(laplacian_csr.shape)}")
    if x.dtype != laplacian_csr.dtype:
        raise ValueError(f"x and laplacian_csr must have one floating dtype, got {x.dtype} and {laplacian_csr.dtype}")
    _check_native_inputs({"x": x, "laplacian_csr values": laplacian_csr.values()}, _BASIS_DTYPES)
    _require()
    crow, col, values = laplacian_csr.crow_indices().long(), laplacian_csr.col_indices().long(), laplacian_csr.values()
    with torch.no_grad():  # x is data (the bag-of-words): the basis is a constant
        return _run(torch.ops.scanet_native.chebyshev_basis, crow, col, values.detach(), x.detach(), K)


def check_basis_inputs(basis, weight, bias=None, activation="relu") -> None:
    for name, t in (("basis", basis), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if basis.dim() != 4:
        raise ValueError(f"basis must have shape (K, B, V, F_in), got {tuple(basis.shape)}")
    if weight.dim() != 3:
        raise ValueError(f"weight must have shape (K, F_in, F_out), got {tuple(weight.shape)}")
    K, _, _, F_in = basis.shape
    if weight.shape[0] != K or weight.shape[1] != F_in:
        raise ValueError(
            f"weight {tuple(weight.shape)} does not match basis {tuple(basis.shape)}: expected ({K}, {F_in}, F_out)"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[2],):
        raise ValueError(f"bias must have shape ({weight.shape[2]},), got {tuple(bias.shape)}")
    if activation not in reference.ACTIVATIONS:
        raise ValueError(f"activation must be one of {reference.ACTIVATIONS}, got {activation!r}")
    tensors = {"basis": basis, "weight": weight} | ({"bias": bias} if bias is not None else {})
    if len({t.dtype for t in tensors.values()}) > 1:
        raise ValueError(f"all inputs must have one floating dtype, got { {n: t.dtype for n, t in tensors.items()} }")
    _check_native_inputs(tensors, _BASIS_DTYPES)


def cheb_conv_from_basis(basis, weight, bias=None, activation="relu", *, index=None) -> torch.Tensor:
    """act(sum_k basis[k] @ W_k + b) for a basis (K, B, V, F_in) of any strides.

    With ``index`` (B,) int64, ``basis`` is a cache (K, N, V, F_in) of N signals and the rows ``index`` are
    used, read in place when F_in = 1 and V is contiguous (``cache.permute(1, 0, 2).unsqueeze(-1)`` of an
    (N, K, V) per-text cache): no per-step gather. Same result as
    ``reference.cheb_conv_from_basis(list(basis[:, index]), weight, bias, activation)``; output stored as
    (V, B, F_out) like ``cheb_conv``'s, ready for the next layer. Differentiable in weight and bias (and basis).
    """
    if isinstance(basis, (list, tuple)):
        basis = torch.stack(list(basis))
    check_basis_inputs(basis, weight, bias, activation)
    if index is not None:
        if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.dtype != torch.int64:
            raise ValueError(
                f"index must be a 1-D int64 tensor, got {getattr(index, 'dtype', type(index))} "
                f"of shape {tuple(getattr(index, 'shape', ()))}"
            )
        if index.device.type != "cpu":
            raise ValueError(f"scanet.native runs on CPU tensors only; index is on {index.device}")
        if index.numel() and not torch.compiler.is_compiling():
            lo, hi = int(index.min()), int(index.max())
            if lo < 0 or hi >= basis.shape[1]:
                raise ValueError(f"index has entries out of range [0, {basis.shape[1]}): min {lo}, max {hi}")
    _require()
    return torch.ops.scanet_native.cheb_conv_from_basis_forward(basis, weight, bias, activation == "relu", index)
