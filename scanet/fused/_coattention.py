"""Fused co-attention step: ``coattention`` (the op) and ``StackedCoAttention`` (the drop-in module).

``coattention(f, g, weight, bias, *, scale=1.0, precision="fp32")`` has the signature and the result of
scanet.reference.coattention. It checks its inputs with reference.check_coattention_inputs, then dispatches:

  * float32 CUDA tensors               -> the Triton kernels (scanet.kernels.coattention);
  * float32 CPU tensors, TRITON_INTERPRET=1 -> the same kernels, interpreted (slow; for tests);
  * CPU without the interpreter, float32/bf16/fp16 (autocast included), the native extension built
    -> torch's GEMM z = f W^T, then scanet.native_dense's one-pass epilogue softmax(relu(z + b)) * g * scale
    (forward and backward; csrc/dense_epilogues.cpp); ``native=False`` keeps the eager reference;
  * anything else (float64, CPU without the native extension) -> the eager reference.

Non-contiguous inputs are accepted as they are: the kernels take strides, so nothing is copied.

The kernels run behind two torch.library custom ops, ``scanet::coattention_forward`` and
``scanet::coattention_backward``, with fake (meta) implementations and the autograd formula registered, so
torch.compile (fullgraph=True included) keeps the op in its graph instead of breaking it. custom_op is used
rather than triton_op so that the same code works on torch 2.11 and 2.13 and under the CPU interpreter; the
op is opaque to Inductor, which has nothing to fuse into it anyway (the GEMM epilogue is already fused).

Autocast. The kernels take float32 tensors; under ``torch.autocast`` (or with bf16/fp16 f, g) the public op
casts f, g, weight and bias to float32, asks the kernels for bf16 GEMM operands (``kernel_precision``: bf16
for a bf16 compute dtype, tf32 for fp16, whose 10-bit mantissa tf32 keeps; an explicit "tf32"/"bf16" stays),
and casts the result once to the compute dtype. Softmax statistics, accumulation and the saved tensors stay
float32 (a sum over N = 1024 exponentials in bf16 keeps ~8 bits). The custom op itself is registered with
``torch.library.register_autocast`` to run in float32 on CUDA and CPU, so a caller that reaches it under
autocast (torch.compile's graph included) gets the same policy instead of autocast's default of ignoring it.

``precision`` ("fp32" default, "tf32", "bf16") chooses the GEMMs' operand precision on CUDA; accumulation and
every output stay fp32. The errors against the float64 reference are documented in scanet.kernels.coattention
(fp32 measured on CPU: at most 1.1e-6 of max |out| for out, 1.3e-6 for the gradients; tf32 ~1e-3 and
bf16 ~4e-3 expected, unmeasured: no GPU here). On CPU the interpreter computes in fp32 whatever the precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scanet import layers, reference
from scanet.fused._dispatch import PRECISIONS, default_precision, kernels, kernels_can_run  # noqa: F401
from scanet.fused._dispatch import check_precision as _check_precision


# -------------------------------------------------------------------------------------- torch.library ops
@torch.library.custom_op("scanet::coattention_forward", mutates_args=())
def _forward_op(
    f: torch.Tensor,
    g: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    precision: str,
    save_for_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, a, lse); a = relu(f W^T + b) and lse are saved for backward (empty when not saved)."""
    return kernels("coattention", f.device).coattention_forward(f, g, weight, bias, scale, precision, save_for_backward)


@_forward_op.register_fake
def _forward_fake(f, g, weight, bias, scale, precision, save_for_backward):
    M, N = f.shape
    saved_mn = (M, N) if save_for_backward else (0,)
    saved_m = (M,) if save_for_backward else (0,)
    return f.new_empty((M, N)), f.new_empty(saved_mn), f.new_empty(saved_m)


@torch.library.custom_op("scanet::coattention_backward", mutates_args=())
def _backward_op(
    dout: torch.Tensor,
    out: torch.Tensor,
    a: torch.Tensor,
    lse: torch.Tensor,
    f: torch.Tensor,
    g: torch.Tensor,
    weight: torch.Tensor,
    scale: float,
    precision: str,
    need_df: bool,
    need_dweight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(df, dg, dweight, dbias); df, or dweight and dbias, are empty when not needed."""
    return kernels("coattention", f.device).coattention_backward(
        dout, out, a, lse, f, g, weight, scale, precision, need_df, need_dweight
    )


@_backward_op.register_fake
def _backward_fake(dout, out, a, lse, f, g, weight, scale, precision, need_df, need_dweight):
    M, N = f.shape
    return (
        f.new_empty((M, N) if need_df else (0,)),
        f.new_empty((M, N)),
        f.new_empty((N, N) if need_dweight else (0,)),
        f.new_empty((N,) if need_dweight else (0,)),
    )


def _setup_context(ctx, inputs, output):
    f, g, weight, bias, scale, precision, _save = inputs
    out, a, lse = output
    ctx.save_for_backward(out, a, lse, f, g, weight)
    ctx.scale, ctx.precision = scale, precision


def _backward(ctx, dout, _grad_a, _grad_lse):
    # a and lse are internal outputs (coattention returns only out): their gradients are ignored.
    out, a, lse, f, g, weight = ctx.saved_tensors
    need_df, need_dg, need_dw, need_db = ctx.needs_input_grad[:4]
    df, dg, dw, db = _backward_op(
        dout, out, a, lse, f, g, weight, ctx.scale, ctx.precision, need_df, need_dw or need_db
    )
    return (
        df if need_df else None,
        dg if need_dg else None,
        dw if need_dw else None,
        db if need_db else None,
        None,
        None,
        None,
    )


_forward_op.register_autograd(_backward, setup_context=_setup_context)
for _device_type in ("cuda", "cpu"):
    torch.library.register_autocast("scanet::coattention_forward", _device_type, torch.float32)
    torch.library.register_autocast("scanet::coattention_backward", _device_type, torch.float32)


# ---------------------------------------------------------------------------------------------- public op
def uses_kernels(f: torch.Tensor) -> bool:
    """True when ``coattention`` on tensors like ``f`` runs the Triton kernels (else the eager reference):
    float32, bfloat16 or float16 (the last two, and autocast, through float32 with low-precision GEMMs)."""
    if f.dtype not in reference.MIXABLE or f.numel() == 0:
        return False
    return kernels_can_run(f.device)


def kernel_precision(dtype: torch.dtype, precision: str = "fp32") -> str:
    """The kernels' GEMM operand precision for a compute dtype: an explicit "tf32"/"bf16"/"fp16" is kept; "fp32"
    becomes "bf16" for bfloat16 and "fp16" for float16 (fp16 operands, fp32 accumulation)."""
    _check_precision(precision)
    if precision != "fp32":
        return precision
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def uses_native_epilogue(f: torch.Tensor) -> bool:
    """True when ``coattention`` on CPU tensors like ``f`` (not under the interpreter) runs the native epilogue:
    float32, bfloat16 or float16 (autocast included; float64 keeps the reference) and the extension built."""
    if kernels_can_run(f.device):
        return False
    from scanet import native_dense

    return native_dense.runs_on(f)


def coattention(
    f, g, weight, bias, *, scale: float = 1.0, precision: str | None = None, native: bool = True
) -> torch.Tensor:
    """softmax(relu(f @ weight.T + bias), dim=-1) * g * scale, fused (see the module docstring).

    f, g: (M, N); weight: (N, N); bias: (N,); one device; float64 alone or any mix of float32/bf16/fp16 (the
    result has ``reference.compute_dtype``: the autocast dtype under autocast). Differentiable in all four.
    precision: None picks the device's default (``scanet.fused.default_precision``: tf32 on sm_80+, else fp32),
    or under autocast the autocast dtype's; an explicit tf32/bf16/fp16 on a GPU without those tensor cores
    (V100) raises a ValueError.
    native: on CPU, the native epilogue where ``uses_native_epilogue`` (False: the eager reference there).
    """
    reference.check_coattention_inputs(f, g, weight, bias)
    explicit = precision is not None
    if precision is None:
        precision = default_precision(f.device)
    _check_precision(precision, f.device)
    if not uses_kernels(f):
        if native and uses_native_epilogue(f):
            from scanet import native_dense

            dtype = reference.compute_dtype(f.device, f, g, weight, bias)
            if dtype != torch.float64:
                # the reference's GEMM (oneDNN) without its bias, which the epilogue adds (no bias copy into
                # z) and differentiates (no separate sum over rows for its gradient)
                z = F.linear(f.to(dtype), weight.to(dtype))
                return native_dense.coattention_epilogue(z, g, scale, out_dtype=dtype, bias=bias)
        return reference.coattention(f, g, weight, bias, scale=scale)
    dtype = reference.compute_dtype(f.device, f, g, weight, bias)
    if dtype != torch.float32 or any(t.dtype != torch.float32 for t in (g, weight, bias)):
        # Autocast or low-precision inputs: float32 tensors, low-precision GEMM operands, one cast at the end.
        precision = kernel_precision(dtype, precision if explicit else "fp32")
        try:
            _check_precision(precision, f.device)
        except ValueError:  # autocast asked for operands this GPU's tensor cores lack (V100): fp32
            precision = "fp32"
        f, g, weight, bias = (t.float() for t in (f, g, weight, bias))
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (f, g, weight, bias))
    with torch.autocast(f.device.type, enabled=False):
        out, _, _ = _forward_op(f, g, weight, bias, float(scale), precision, save)
    return out if out.dtype == dtype else out.to(dtype)


# ------------------------------------------------------------------------------------------------- module
class StackedCoAttention(layers.StackedCoAttention):
    """scanet.layers.StackedCoAttention with the fused op: same constructor, parameters and state_dict.

    ``precision`` (constructor keyword or attribute; None: the device's default, or "fp32", "tf32", "bf16",
    "fp16") is passed to every step; so is ``native`` (the native CPU epilogue where it applies).
    ``attention()`` (used by SCANet.score_all) stays the eager computation of the maps.
    """

    op = staticmethod(coattention)

    def __init__(
        self, dim: int, num_layers: int = 2, scale: float = 1.0, *, precision: str | None = None, native: bool = True
    ):
        super().__init__(dim, num_layers, scale)
        if precision is not None:
            _check_precision(precision)
        self.precision = precision
        self.native = native  # the native CPU epilogue where it applies (False: eager on CPU)

    def layer(self, k: int, f_t: torch.Tensor, f_i: torch.Tensor):
        op = type(self).op
        scale, precision, native = self.scale, self.precision, self.native
        new_i = op(
            f_t, f_i, self.text_fc[k].weight, self.text_fc[k].bias, scale=scale, precision=precision, native=native
        )  # p_T * f_I
        new_t = op(
            f_i, f_t, self.image_fc[k].weight, self.image_fc[k].bias, scale=scale, precision=precision, native=native
        )  # p_I * f_T
        return new_t, new_i

    def extra_repr(self):
        return (
            f"dim={self.dim}, num_layers={self.num_layers}, scale={self.scale}, precision={self.precision!r}, "
            f"native={self.native}"
        )
