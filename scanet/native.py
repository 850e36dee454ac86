"""Native CPU backend: the fused Chebyshev graph convolution as C++ torch.library ops (csrc/, built by CMake).

``available()``            True when the compiled library (scanet/_native*.so) matches this torch and CPU and loads.
``unavailable_reason()``   why not (not built, built against another torch, a load error, ...), else None.
``cheb_conv``              the contract of ``scanet.reference.cheb_conv``, forward and backward, CPU float32/64.
``chebyshev_basis``        [T_0 x, ..., T_{K-1} x] as one (K, B, V, F) tensor: computed once per text for the
                           first GCN layer, whose input (the bag-of-words) never changes.
``cheb_conv_from_basis``   act(sum_k basis[k] W_k + b) from such a basis: the first layer without any SpMM.

The ops are ``torch.ops.scanet_native.*``, with fake (meta) implementations and autograd registered here, so
torch.compile traces them as opaque nodes. Results are laid out as (B, V, F) tensors whose storage is (V, B, F)
(strides (F, B*F, 1)): the kernels read a vertex's neighbours as contiguous rows, the next layer reads them
without a copy, and ``flatten(1)`` before the text FC stays a view. Use ``reshape``, not ``view``, on them.

The Laplacian is a constant (its values get no gradient), as everywhere in SCANet. Backward handles any L~:
it propagates with the transpose of L~, which the op builds in O(nnz) (identical to L~ when L~ is symmetric).
Every reduction (dW, db) sums fixed row blocks in a fixed order: results do not depend on the thread count.

The library is looked up next to this file and checked before it is loaded (see ``_select_library``);
SCANET_NO_NATIVE=1 in the environment turns the backend off at run time as well as at build time.
"""
from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import torch

from scanet import reference
from scanet.laplacian import as_csr

__all__ = ["available", "unavailable_reason", "cheb_conv", "chebyshev_basis", "cheb_conv_from_basis",
           "library_path", "build_info"]

_PKG_DIR = Path(__file__).resolve().parent
# Where setup.py records why the last build was skipped or failed (pip hides build output unless -v).
BUILD_STATUS_FILE = _PKG_DIR.parent / "build" / "native" / "status.txt"
_MARKER = re.compile(rb"SCANET_NATIVE_BUILD\{torch=([^;]*);arch=([^}]*)\}")
# CPU flags each -march level of the build needs (Linux /proc/cpuinfo names).
_ARCH_FLAGS = {
    "x86-64-v3": {"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe"},
    "x86-64-v4": {"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe",
                  "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"},
}
_STATE: dict = {"done": False, "ok": False, "reason": None, "path": None, "info": None}
_LOAD_LOCK = threading.Lock()   # one load per process: a second TORCH_LIBRARY registration would fail


# ------------------------------------------------------------------------------------------------ loading
def _disabled() -> bool:
    return os.environ.get("SCANET_NO_NATIVE", "").strip().lower() in ("1", "true", "yes", "on")


def _read_build_info(path: Path) -> dict | None:
    try:
        m = _MARKER.search(path.read_bytes())
    except OSError:
        return None
    if m is None:
        return None
    return {"torch": m.group(1).decode(), "arch": m.group(2).decode().replace("-march=", "")}


def _cpu_flags() -> set[str] | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    m = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    return set(m.group(1).split()) if m else None


def _not_built_reason() -> str:
    msg = ("the native extension is not built (no scanet/_native*.so); build it with "
           "`pip install --no-build-isolation -e .` (needs cmake, a C++ compiler with OpenMP, and torch)")
    try:
        status = BUILD_STATUS_FILE.read_text().strip()
    except OSError:
        status = ""
    return f"{msg}; last build: {status}" if status else msg


def _select_library(candidates, running_torch: str, cpu_flags: set[str] | None):
    """Pick the library built for this torch and CPU among ``candidates``: (path, info, reasons for the rest).

    Decided from the file's bytes BEFORE loading: a library built against another torch has another C++ ABI
    and can crash the process instead of raising, and one built for a wider ISA would die on SIGILL.
    """
    reasons = []
    for path in candidates:
        path = Path(path)
        info = _read_build_info(path)
        if info is None:
            reasons.append(f"{path.name} carries no build record (not built by this setup.py)")
            continue
        if info["torch"] != running_torch:
            reasons.append(f"{path.name} was built against torch {info['torch']} but torch {running_torch} is "
                           "running; rebuild with `pip install --no-build-isolation -e .`")
            continue
        need = _ARCH_FLAGS.get(info["arch"], set())
        if cpu_flags is not None and not need <= cpu_flags:
            reasons.append(f"{path.name} was built for {info['arch']} but this CPU lacks "
                           f"{', '.join(sorted(need - cpu_flags))}; rebuild on this machine")
            continue
        return path, info, reasons
    return None, None, reasons


def _load_from(pkg_dir: Path):
    """Find, check and load the library in ``pkg_dir``: (path, info) or (None, reason)."""
    if _disabled():
        return None, "disabled by the environment variable SCANET_NO_NATIVE"
    candidates = sorted(Path(pkg_dir).glob("_native*.so"))
    if not candidates:
        return None, _not_built_reason()
    path, info, reasons = _select_library(candidates, str(torch.__version__), _cpu_flags())
    if path is None:
        return None, "; ".join(reasons)
    try:
        torch.ops.load_library(str(path))
    except (OSError, ImportError, RuntimeError) as e:
        return None, f"loading {path.name} failed: {type(e).__name__}: {e}"
    return path, info


def _try_load() -> None:
    path, info = _load_from(_PKG_DIR)
    if path is None:
        _STATE["reason"] = info
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
    def _forward_fake(crow, col, values, x, weight, bias, relu, save_basis):
        B, V, F_in = x.shape
        K, _, F_out = weight.shape
        y = x.new_empty_strided((B, V, F_out), (F_out, B * F_out, 1))
        # T_1..T_{K-1}, preceded by a (V, B, F) copy of T_0 when x is not stored that way already.
        n_saved = (K - 1 + (0 if _is_vb(x) else 1)) if save_basis else 0
        return y, x.new_empty((n_saved, V, B * F_in))

    @torch.library.register_fake(lib + "cheb_conv_backward")
    def _backward_fake(grad_y, crow, col, values, crow_t, col_t, values_t, x, saved, y, weight, relu, has_bias,
                       need_x, need_w, need_b):
        B, V, F_in = x.shape
        dx = x.new_empty_strided((B, V, F_in), (F_in, B * F_in, 1)) if need_x else None
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
        crow, col, values, x, weight, bias, relu, save_basis = inputs
        y, saved = output
        ctx.save_for_backward(crow, col, values, x, saved, y, weight)
        ctx.relu, ctx.has_bias = relu, bias is not None
        ctx.set_materialize_grads(False)  # the saved-basis output gets no gradient: do not allocate zeros for it
        ctx.mark_non_differentiable(saved)

    def _forward_backward(ctx, grad_y, grad_saved):
        crow, col, values, x, saved, y, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[3], ctx.needs_input_grad[4], ctx.needs_input_grad[5]
        if grad_y is None or not (need_x or need_w or need_b):
            return None, None, None, None, None, None, None, None
        if need_w and saved.shape[0] != weight.shape[0] - 1 + (0 if _is_vb(x) else 1):
            raise RuntimeError("scanet_native.cheb_conv_forward ran with save_basis=False, so the weight "
                               "gradient cannot be computed; call scanet.native.cheb_conv instead")
        # dx propagates with L~^T: built in O(nnz) here (equal to L~ for the symmetric Laplacians of SCANet).
        transposed = torch.ops.scanet_native.csr_transpose(crow, col, values) if need_x else (None, None, None)
        dx, dw, db = torch.ops.scanet_native.cheb_conv_backward(
            grad_y, crow, col, values, *transposed, x, saved, y, weight, ctx.relu, ctx.has_bias,
            need_x, need_w, need_b)
        return None, None, None, dx, dw, db, None, None

    torch.library.register_autograd(lib + "cheb_conv_forward", _forward_backward, setup_context=_forward_setup)

    def _from_basis_setup(ctx, inputs, output):
        basis, weight, bias, relu, index = inputs
        ctx.save_for_backward(basis, output, weight, bias, index)
        ctx.relu = relu

    def _from_basis_backward(ctx, grad_y):
        basis, y, weight, bias, index = ctx.saved_tensors
        need_basis, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        dw, db = torch.ops.scanet_native.cheb_conv_from_basis_backward(
            grad_y, basis, y, weight, bias, ctx.relu, need_w, need_b, index)
        d_basis = None
        if need_basis:  # not SCANet's use (the basis is data); eager is enough: dz @ W_k^T for every k
            dz = grad_y * (y > 0) if ctx.relu else grad_y
            d_basis = torch.einsum("bvo,kio->kbvi", dz, weight)
            if index is not None:
                d_basis = torch.zeros_like(basis).index_add_(1, index, d_basis)
        return d_basis, dw, db, None, None

    torch.library.register_autograd(lib + "cheb_conv_from_basis_forward", _from_basis_backward,
                                    setup_context=_from_basis_setup)


# ------------------------------------------------------------------------------------------------ the ops
def _check_native_inputs(tensors: dict) -> None:
    for name, t in tensors.items():
        if t.device.type != "cpu":
            raise ValueError(f"scanet.native runs on CPU tensors only; {name} is on {t.device}")
        if t.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"scanet.native supports float32 and float64; {name} is {t.dtype}")


def _csr_arrays(laplacian_csr: torch.Tensor):
    crow, col, values = laplacian_csr.crow_indices(), laplacian_csr.col_indices(), laplacian_csr.values()
    if crow.dtype != torch.int64:  # int32 CSR (e.g. from scipy) is accepted: the kernels index with int64
        crow, col = crow.long(), col.long()
    if values.requires_grad and torch.is_grad_enabled():
        raise ValueError("scanet.native treats laplacian_csr as a constant, but its values require grad; "
                         "detach it or use scanet.reference.cheb_conv")
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


def cheb_conv(laplacian_csr, x, weight, bias=None, activation="relu") -> torch.Tensor:
    """One Chebyshev graph convolution, the contract of ``scanet.reference.cheb_conv``, fused on CPU.

    laplacian_csr: (V, V) rescaled Laplacian L~ (torch sparse CSR, any sparsity, symmetric or not), or a
    scanet.laplacian.Laplacian (used in x's dtype).
    x: (B, V, F_in); weight: (K, F_in, F_out); bias: (F_out,) or None; activation: "relu" or None/"none".
    Returns (B, V, F_out) = act(sum_k T_k(L~) x W_k + b), stored as (V, B, F_out) (see the module docstring).
    Differentiable in x, weight and bias.
    """
    laplacian_csr = as_csr(laplacian_csr, getattr(x, "dtype", None))
    reference.check_cheb_inputs(laplacian_csr, x, weight, bias, activation, check_indices=False)
    tensors = {"x": x, "weight": weight, "laplacian_csr values": laplacian_csr.values()}
    if bias is not None:
        tensors["bias"] = bias
    _check_native_inputs(tensors)
    _require()
    crow, col, values = _csr_arrays(laplacian_csr)
    save_basis = torch.is_grad_enabled() and weight.requires_grad
    y, _ = _run(torch.ops.scanet_native.cheb_conv_forward, crow, col, values, x, weight, bias,
                activation == "relu", save_basis)
    return y


def chebyshev_basis(laplacian_csr, x, K: int) -> torch.Tensor:
    """[T_0 x, ..., T_{K-1} x] stacked as (K, B, V, F); ``basis[k]`` equals ``reference.chebyshev_basis(...)[k]``.

    Meant for fixed inputs (SCANet's bag-of-words): compute it once per text and feed batches of it to
    ``cheb_conv_from_basis``. Not differentiable (x is data).
    """
    if not isinstance(K, int) or K < 1:
        raise ValueError(f"K must be an int >= 1, got {K!r}")
    laplacian_csr = as_csr(laplacian_csr, getattr(x, "dtype", None))
    reference.check_laplacian(laplacian_csr, check_indices=False)
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must be a (B, V, F) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if x.shape[1] != laplacian_csr.shape[0]:
        raise ValueError(f"x has V={x.shape[1]} vertices but laplacian_csr is {tuple(laplacian_csr.shape)}")
    if x.dtype != laplacian_csr.dtype:
        raise ValueError(f"x and laplacian_csr must have one floating dtype, got {x.dtype} and {laplacian_csr.dtype}")
    _check_native_inputs({"x": x, "laplacian_csr values": laplacian_csr.values()})
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
        raise ValueError(f"weight {tuple(weight.shape)} does not match basis {tuple(basis.shape)}: "
                         f"expected ({K}, {F_in}, F_out)")
    if bias is not None and tuple(bias.shape) != (weight.shape[2],):
        raise ValueError(f"bias must have shape ({weight.shape[2]},), got {tuple(bias.shape)}")
    if activation not in reference.ACTIVATIONS:
        raise ValueError(f"activation must be one of {reference.ACTIVATIONS}, got {activation!r}")
    tensors = {"basis": basis, "weight": weight} | ({"bias": bias} if bias is not None else {})
    if len({t.dtype for t in tensors.values()}) > 1:
        raise ValueError(f"all inputs must have one floating dtype, got { {n: t.dtype for n, t in tensors.items()} }")
    _check_native_inputs(tensors)


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
            raise ValueError(f"index must be a 1-D int64 tensor, got {getattr(index, 'dtype', type(index))} "
                             f"of shape {tuple(getattr(index, 'shape', ()))}")
        if index.device.type != "cpu":
            raise ValueError(f"scanet.native runs on CPU tensors only; index is on {index.device}")
        if index.numel() and not torch.compiler.is_compiling():
            lo, hi = int(index.min()), int(index.max())
            if lo < 0 or hi >= basis.shape[1]:
                raise ValueError(f"index has entries out of range [0, {basis.shape[1]}): min {lo}, max {hi}")
    _require()
    return torch.ops.scanet_native.cheb_conv_from_basis_forward(basis, weight, bias, activation == "relu", index)
