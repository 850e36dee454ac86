"""SCANet logits for every (text, image) pair, or for a list of pairs, without materializing per-pair features.

``pair_scores(model, f_t, f_i)`` takes the encoders' outputs f_t (Nt, N) and f_i (Ni, N) and returns LOGITS
(Nt, Ni) (``torch.sigmoid`` of them are the model's similarities), in eval mode (no dropout) and without
autograd (retrieval is inference). By the number of co-attention layers L:

    L = 0   logit = (f_t * w) @ f_i.T + b                                   one GEMM
    L = 1   logit = (f_t * a1_T * w) @ (f_i * a1_I).T + b                   one GEMM: layer 1 is per item
    L = 2   the fused Triton kernel (scanet.kernels.pair_scores): layer 2 per pair, streamed over N
    L > 2   NOT fused: layer 3 needs each pair's whole layer-2 output (its softmax normalized over all N) before
            its own GEMM, which the streaming kernel never holds. Falls back to the eager oracle
            (``scanet.reference.pair_logits``) with a warning.

The kernel runs on CUDA tensors, and on CPU under Triton's interpreter (TRITON_INTERPRET=1 set before
scanet.kernels is imported: the tests do that). On CPU without the interpreter ``pair_scores`` falls back to
the oracle, like the other fused ops (``strict=True`` raises instead). SCANet.score_all routes here on CUDA
(see scanet.model.use_fused_scorer).
"""

from __future__ import annotations

import warnings

import torch

from scanet import reference
from scanet.fused._dispatch import PRECISIONS, check_precision, kernels, kernels_can_run  # noqa: F401
from scanet.reference import _fail, check_pair_inputs, head_weights, layer1_attention


def fused_available(device) -> bool:
    """Can the kernel run on tensors of this device (CUDA, or CPU under TRITON_INTERPRET=1)?"""
    return kernels_can_run(device)


def pair_scores(
    model,
    f_t: torch.Tensor,
    f_i: torch.Tensor,
    *,
    a1_t=None,
    a1_i=None,
    text_index=None,
    image_index=None,
    precision: str = "fp32",
    layout: str = "outer",
    block_sizes: dict | None = None,
    chunk_pairs: int = 16384,
    strict: bool = False,
) -> torch.Tensor:
    """Logits of every (text, image) pair (Nt, Ni), or of the listed pairs (P,) with text_index/image_index.

    ``model``: a SCANet (or anything with its ``coattention`` and ``head``). a1_t / a1_i: layer-1 attention
    maps when already known (a search index stores them), else computed here. ``precision``: "fp32" (default),
    "tf32" or "bf16" GEMM inputs on CUDA (see scanet.kernels.pair_scores; the interpreter always computes fp32).
    The kernel computes in float32 (its GEMM operands in ``scoring_precision``: bf16 for bf16 features or
    under bf16 autocast); the logits are float32 (float64 for float64 features). ``layout="list"`` scores all pairs
    through the kernel's pair-list path; ``block_sizes`` overrides the tile heuristic (tests). Where the
    kernel cannot run (CPU without TRITON_INTERPRET=1) the oracle ``reference.pair_logits`` answers, unless
    ``strict=True``, which raises a ValueError instead.
    """
    with torch.no_grad():
        return _pair_scores(
            model, f_t, f_i, a1_t, a1_i, text_index, image_index, precision, layout, block_sizes, chunk_pairs, strict
        )


def _pair_scores(
    model, f_t, f_i, a1_t, a1_i, text_index, image_index, precision, layout, block_sizes, chunk_pairs, strict
):
    check_pair_inputs(model, f_t, f_i, a1_t, a1_i, text_index, image_index)
    check_precision(precision, f_t.device)
    L = model.coattention.num_layers
    if L > 2:
        warnings.warn(
            f"pair_scores: the fused kernel covers 2 co-attention layers and this model has {L}; "
            "scoring with the eager chunked path instead (layer 3 needs every pair's full layer-2 "
            "output, which the streaming kernel never holds)",
            stacklevel=3,
        )
    if L == 2 and strict and not kernels_can_run(f_t.device):
        _fail(
            f"pair_scores runs a Triton kernel: it needs CUDA tensors, or TRITON_INTERPRET=1 set before "
            f"scanet.kernels is imported to run on CPU (got tensors on {f_t.device}); "
            "scanet.reference.pair_logits is the CPU path"
        )
    if L != 2 or not kernels_can_run(f_t.device):
        return reference.pair_logits(
            model,
            f_t,
            f_i,
            a1_t=a1_t,
            a1_i=a1_i,
            text_index=text_index,
            image_index=image_index,
            chunk_pairs=chunk_pairs,
        )
    pair_scores_layer2 = kernels("pair_scores", f_t.device).pair_scores_layer2

    a1_t = layer1_attention(model, f_t, "text") if a1_t is None else a1_t
    a1_i = layer1_attention(model, f_i, "image") if a1_i is None else a1_i
    coatt = model.coattention
    w, b = head_weights(model, torch.float32)
    dtype = reference.compute_dtype(f_t.device, f_t, f_i)
    with torch.autocast(f_t.device.type, enabled=False):  # the kernel reads float32 and casts itself
        out = pair_scores_layer2(
            f_t,
            f_i,
            a1_t,
            a1_i,
            coatt.text_fc[1].weight,
            coatt.text_fc[1].bias,
            coatt.image_fc[1].weight,
            coatt.image_fc[1].bias,
            w,
            b,
            coatt.scale,
            text_index=text_index,
            image_index=image_index,
            precision=scoring_precision(dtype, precision),
            layout=layout,
            block_sizes=block_sizes,
        )
    return out.to(reference.statistics_dtype(dtype))  # float32 logits for bf16/fp16: bf16 would tie rankings


def scoring_precision(dtype: torch.dtype, precision: str = "fp32") -> str:
    """The kernel's GEMM operand precision: an explicit "tf32"/"bf16" is kept; "fp32" becomes "bf16" for a
    bfloat16 compute dtype (bf16 features or bf16 autocast) and "tf32" for float16 (the kernel has no fp16)."""
    check_precision(precision)
    if precision != "fp32":
        return precision
    return {torch.bfloat16: "bf16", torch.float16: "tf32"}.get(dtype, "fp32")
