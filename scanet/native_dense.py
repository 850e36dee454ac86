"""Native CPU epilogues of SCANet's dense part (csrc/dense_epilogues.cpp): one pass each way instead of eager
torch's chain of elementwise kernels around the co-attention and head GEMMs.

``available()`` / ``unavailable_reason()``  the ops are in the loaded native library (scanet.native)
``coattention_epilogue(z, g, scale)``       softmax(relu(z), dim=-1) * g * scale, z = the co-attention GEMM's
                                            output (f W^T + b, which torch runs); differentiable in z and g
``similarity_head(f_t, f_i, weight, bias, dropout_p, training)``
                                            the head's logit b + w . dropout(f_t * f_i), dropout by the
                                            counter-based mask of the Chebyshev epilogue (regenerated in
                                            backward); differentiable in all four
``standardize_rows(x, mean, std)``           the image encoder's (x - mean) / std of fixed features, one pass,
                                            written in the dtype the image FC's GEMM reads (not differentiable)

Where they run: scanet.fused's co-attention op, SimilarityHead and ImageEncoder use them on CPU when this module
is available (``native=False`` on those modules keeps the eager ops, e.g. for the "as before" benchmark rows);
float64 keeps the eager reference (the kernels compute in float32).

Precision. Inputs in float32, bfloat16 or float16 (mixed, as torch.autocast hands them over), every sum and
statistic in float32 or float64, one rounding on the way out: the epilogue's result in ``out_dtype`` (the
autocast dtype under autocast, else z's dtype), its gradients in z's and g's dtypes; the head's logits in
float32 (a sum over N products, and the loss reads it in float32 anyway: eager autocast rounds it to bf16
first), its gradients in each input's dtype. Registered with torch.library (fake kernels, autograd, AutocastCPU
kernels: the epilogue takes its inputs as they come and answers in the autocast dtype; the head casts its weight
and bias to the autocast dtype, as autocast does for an FC), so torch.compile keeps them as opaque nodes.

Dropout. ``keep`` of element (m, n) is the Chebyshev epilogue's hash of ``m * N + n`` (csrc/native_common.h),
the seed drawn per call from torch's default generator: ``torch.manual_seed`` reproduces a run and a checkpoint
that restores the RNG state resumes exactly. It is a different random stream from ``nn.Dropout``'s, so a fused
run's masks differ from an eager run's (the distribution is the same: P(keep) = 1 - p).
"""

from __future__ import annotations

import threading

import torch

from scanet import native

__all__ = [
    "available",
    "unavailable_reason",
    "coattention_epilogue",
    "similarity_head",
    "head_keep_mask",
    "standardize_rows",
]

_OPS = (
    "coattention_epilogue_forward",
    "coattention_epilogue_backward",
    "similarity_head_forward",
    "similarity_head_backward",
    "standardize_rows",
)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_STATE: dict = {"done": False, "lib": None, "reason": None}
_LOCK = threading.Lock()


def unavailable_reason() -> str | None:
    """Why the ops cannot run here (None when they can)."""
    if not native.available():
        return f"the native extension is unavailable: {native.unavailable_reason()}"
    missing = [name for name in _OPS if not hasattr(torch.ops.scanet_native, name)]
    if missing:
        return (
            f"the native library lacks {', '.join(missing)} (built from older csrc/); rebuild it with "
            "`python setup.py build_ext --inplace`"
        )
    if not _STATE["done"]:
        with _LOCK:
            if not _STATE["done"]:
                try:
                    _register()
                except Exception as e:  # noqa: BLE001 - e.g. a torch without these torch.library APIs: eager
                    _STATE["reason"] = f"registering the Python side of the native epilogues failed: {e!r}"
                _STATE["done"] = True
    return _STATE["reason"]


def available() -> bool:
    return unavailable_reason() is None


def runs_on(t: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """Whether a drop-in of scanet.fused hands tensors like ``t`` to these ops: a non-empty CPU tensor, of
    ``dtype`` when given (else anything but float64, which keeps the eager reference), and the ops available."""
    if t.device.type != "cpu" or t.numel() == 0:
        return False
    if (t.dtype != dtype) if dtype is not None else (t.dtype == torch.float64):
        return False
    return available()


def _require() -> None:
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"scanet.native_dense is not available: {reason}")


def _register() -> None:
    lib = "scanet_native::"

    @torch.library.register_fake(lib + "coattention_epilogue_forward")
    def _epilogue_fake(z, g, scale, save_p, out_dtype=None, bias=None):
        M, N = z.shape
        return z.new_empty((M, N), dtype=out_dtype or z.dtype), z.new_empty(
            (M, N) if save_p else (0,), dtype=torch.float32
        )

    @torch.library.register_fake(lib + "coattention_epilogue_backward")
    def _epilogue_backward_fake(dout, p, z, g, scale, need_z, need_g, bias=None, need_bias=False):
        with_b = need_bias and bias is not None
        return (
            z.new_empty(z.shape if need_z else (0,)),
            g.new_empty(g.shape if need_g else (0,)),
            z.new_empty((z.shape[1],) if with_b else (0,), dtype=torch.float32),
        )

    @torch.library.register_fake(lib + "similarity_head_forward")
    def _head_fake(f_t, f_i, weight, bias, dropout_p, seed):
        return f_t.new_empty((f_t.shape[0],), dtype=torch.float32)

    @torch.library.register_fake(lib + "similarity_head_backward")
    def _head_backward_fake(grad, f_t, f_i, weight, dropout_p, seed, need_f, need_w):
        return (
            f_t.new_empty(f_t.shape if need_f else (0,)),
            f_i.new_empty(f_i.shape if need_f else (0,)),
            weight.new_empty(weight.shape if need_w else (0,)),
            weight.new_empty((1,) if need_w else (0,), dtype=torch.float32),
        )

    @torch.library.register_fake(lib + "standardize_rows")
    def _standardize_fake(x, mean, std, out_dtype=None):
        return x.new_empty(x.shape, dtype=out_dtype or torch.float32)

    def _epilogue_setup(ctx, inputs, output):
        z, g, scale = inputs[:3]
        bias = inputs[5] if len(inputs) > 5 else None
        _, p = output
        ctx.save_for_backward(p, z, g, bias)
        ctx.scale = scale
        ctx.mark_non_differentiable(p)
        ctx.set_materialize_grads(False)

    def _epilogue_backward(ctx, dout, _grad_p):
        need_z, need_g = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = len(ctx.needs_input_grad) > 5 and ctx.needs_input_grad[5]
        nones = (None,) * 4
        if dout is None or not (need_z or need_g or need_b):
            return (None, None) + nones
        p, z, g, bias = ctx.saved_tensors
        if p.numel() != z.numel():
            raise RuntimeError(
                "scanet_native.coattention_epilogue_forward ran with save_p=False, so it has no gradient; "
                "call scanet.native_dense.coattention_epilogue instead"
            )
        dz, dg, db = torch.ops.scanet_native.coattention_epilogue_backward(
            dout, p, z, g, ctx.scale, need_z, need_g, bias, need_b
        )
        return (
            (dz if need_z else None),
            (dg if need_g else None),
            None,
            None,
            None,
            (db.to(bias.dtype) if need_b else None),
        )

    torch.library.register_autograd(
        lib + "coattention_epilogue_forward", _epilogue_backward, setup_context=_epilogue_setup
    )

    def _head_setup(ctx, inputs, output):
        f_t, f_i, weight, bias, dropout_p, seed = inputs
        ctx.save_for_backward(f_t, f_i, weight)
        ctx.dropout_p, ctx.seed = dropout_p, seed
        ctx.bias_dtype = None if bias is None else bias.dtype

    def _head_backward(ctx, grad):
        f_t, f_i, weight = ctx.saved_tensors
        need_t, need_i, need_w, need_b = ctx.needs_input_grad[:4]
        dft, dfi, dw, db = torch.ops.scanet_native.similarity_head_backward(
            grad, f_t, f_i, weight, ctx.dropout_p, ctx.seed, need_t or need_i, need_w or need_b
        )
        return (
            dft if need_t else None,
            dfi if need_i else None,
            dw if need_w else None,
            db.to(ctx.bias_dtype) if (need_b and ctx.bias_dtype is not None) else None,
            None,
            None,
        )

    torch.library.register_autograd(lib + "similarity_head_forward", _head_backward, setup_context=_head_setup)

    # Under autocast the epilogue takes its inputs as they come (the kernel widens bf16/fp16 to float32 itself)
    # and writes its result in the autocast dtype, ready for the next GEMM. The head's weight and bias are
    # cast to the autocast dtype, as autocast casts an FC's (nn.Linear's) for its GEMM: a plain autocast run and
    # a master-weight run (bf16 copies, scanet.master_weights) then hand the kernel the same numbers.
    impl = torch.library.Library("scanet_native", "IMPL")
    _STATE["lib"] = impl  # registrations live as long as this object

    def epilogue_policy(z, g, scale, save_p, out_dtype=None, bias=None):
        low = torch.get_autocast_dtype("cpu")
        # the bias rounded as autocast rounds an FC's bias for its GEMM (the eager path adds it there)
        return z, g, scale, save_p, out_dtype or low, None if bias is None else bias.to(low)

    def head_policy(f_t, f_i, weight, bias, dropout_p, seed):
        low = torch.get_autocast_dtype("cpu")
        return f_t, f_i, weight.to(low), None if bias is None else bias.to(low), dropout_p, seed

    def standardize_policy(x, mean, std, out_dtype=None):  # ready for the image FC's bf16 GEMM
        return x, mean, std, out_dtype or torch.get_autocast_dtype("cpu")

    native.register_autocast_cpu(impl, "standardize_rows", standardize_policy)
    native.register_autocast_cpu(impl, "coattention_epilogue_forward", epilogue_policy)
    native.register_autocast_cpu(impl, "similarity_head_forward", head_policy)


def _check(tensors: dict, shape: tuple | None = None) -> None:
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cpu":
            raise ValueError(f"{name} must be on the CPU for the native op, got {t.device}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16 or float16 for the native op, got {t.dtype}")
        if shape is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


def coattention_epilogue(
    z: torch.Tensor,
    g: torch.Tensor,
    scale: float = 1.0,
    out_dtype: torch.dtype | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(relu(z + bias), dim=-1) * g * scale for z, g (M, N) and bias (N,) or None on CPU, in one pass
    (see the module docstring); differentiable in z, g and bias.

    ``out_dtype``: float32, bfloat16 or float16; default the autocast dtype under CPU autocast, else z's dtype.
    """
    if not isinstance(z, torch.Tensor) or z.dim() != 2:
        raise ValueError(f"z must be a 2-D (M, N) tensor, got {getattr(z, 'shape', type(z).__name__)}")
    _check({"z": z, "g": g}, tuple(z.shape))
    if bias is not None:
        _check({"bias": bias}, (z.shape[1],))
    if out_dtype is not None and out_dtype not in _DTYPES:
        raise ValueError(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    _require()
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (z, g, bias))
    out, _ = torch.ops.scanet_native.coattention_epilogue_forward(z, g, float(scale), save, out_dtype, bias)
    return out


def similarity_head(
    f_t: torch.Tensor,
    f_i: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
    *,
    seed: int | None = None,
) -> torch.Tensor:
    """Logits (M,) float32: bias + weight . dropout(f_t * f_i) for f_t, f_i (M, N), weight (1, N) or (N,) (an
    nn.Linear(N, 1)'s), bias (1,) or None. Dropout (training and dropout_p > 0) by the counter-based mask; the
    seed is drawn from torch's default generator unless given."""
    if not isinstance(f_t, torch.Tensor) or f_t.dim() != 2:
        raise ValueError(f"f_t must be a 2-D (M, N) tensor, got {getattr(f_t, 'shape', type(f_t).__name__)}")
    M, N = f_t.shape
    _check({"f_t": f_t, "f_i": f_i}, (M, N))
    _check({"weight": weight})
    if weight.numel() != N or weight.dim() not in (1, 2):
        raise ValueError(f"weight must have shape (1, {N}) or ({N},), got {tuple(weight.shape)}")
    if bias is not None:
        _check({"bias": bias})
        if bias.numel() != 1:
            raise ValueError(f"bias must have one element, got shape {tuple(bias.shape)}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= float(dropout_p) <= 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1], got {dropout_p!r}")
    _require()
    p = float(dropout_p) if training else 0.0
    if seed is None:
        seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64)) if p > 0.0 else 0
    return torch.ops.scanet_native.similarity_head_forward(
        f_t, f_i, weight.reshape(N), None if bias is None else bias.reshape(1), p, int(seed)
    )


def standardize_rows(
    x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """(x - mean) / std for fixed features x (B, D) float32 and per-column mean, std (D,) float32, in one pass,
    rounded once into ``out_dtype`` (default: the autocast dtype under CPU autocast, else float32): the same bits
    as eager torch's subtraction, division and autocast's cast. Not differentiable (x is data)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D (B, D) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    for name, t in (("x", x), ("mean", mean), ("std", std)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.device.type != "cpu":
            raise ValueError(f"{name} must be a float32 CPU tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if t.requires_grad:
            raise ValueError(f"{name} requires grad: standardize_rows is for fixed features (use the eager ops)")
    for name, t in (("mean", mean), ("std", std)):
        if tuple(t.shape) != (x.shape[1],):
            raise ValueError(f"{name} must have shape ({x.shape[1]},), got {tuple(t.shape)}")
    if out_dtype is not None and out_dtype not in _DTYPES:
        raise ValueError(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    _require()
    return torch.ops.scanet_native.standardize_rows(x, mean, std, out_dtype)


def head_keep_mask(seed: int, shape: tuple[int, int], dropout_p: float) -> torch.Tensor:
    """The keep mask (bool, (M, N)) that ``similarity_head(..., dropout_p, seed=seed)`` applies."""
    M, N = shape
    return native.dropout_keep_mask(seed, (M, N), dropout_p)
