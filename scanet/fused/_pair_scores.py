"""SCANet logits for every (text, image) pair, or for a list of pairs, without materializing per-pair features.

``pair_scores(model, f_t, f_i)`` takes the encoders' outputs f_t (Nt, N) and f_i (Ni, N) and returns LOGITS
(Nt, Ni) (``torch.sigmoid`` of them are the model's similarities), in eval mode (no dropout) and without
autograd (retrieval is inference). By the number of co-attention layers L:

    L = 0   logit = (f_t * w) @ f_i.T + b                                   one GEMM
    L = 1   logit = (f_t * a1_T * w) @ (f_i * a1_I).T + b                   one GEMM: layer 1 is per item
    L = 2   the fused Triton kernel (scanet.kernels.pair_scores): layer 2 per pair, streamed over N
    L > 2   NOT fused: layer 3 needs each pair's whole layer-2 output (its softmax normalized over all N) before
            its own GEMM, which the streaming kernel never holds. Falls back to the eager chunked path
            (``pair_logits_eager``) with a warning.

The kernel runs on CUDA tensors, and on CPU only under Triton's interpreter (TRITON_INTERPRET=1 set before
scanet.kernels is imported: the tests do that). SCANet.score_all routes here on CUDA (see scanet.model).
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

from scanet.reference import _fail

PRECISIONS = ("fp32", "tf32", "bf16")


def layer1_attention(model, f: torch.Tensor, modality: str) -> torch.Tensor:
    """a1 = softmax(relu(fc(f))) * scale: layer 1's (scaled) attention map from one modality's features."""
    coatt = model.coattention
    fc = (coatt.text_fc if modality == "text" else coatt.image_fc)[0]
    return torch.softmax(F.relu(F.linear(f, fc.weight.to(f.dtype), fc.bias.to(f.dtype))), dim=-1) * coatt.scale


def _head(model, dtype):
    return model.head.fc.weight.reshape(-1).to(dtype), float(model.head.fc.bias.reshape(()))


def check_pair_inputs(model, f_t, f_i, a1_t=None, a1_i=None, text_index=None, image_index=None) -> None:
    """Raise a clear ValueError unless the inputs fit ``model`` and each other."""
    for name, t in (("f_t", f_t), ("f_i", f_i)):
        if not isinstance(t, torch.Tensor):
            _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            _fail(f"{name} must have shape (items, N), got {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            _fail(f"{name} must be floating point, got {t.dtype}")
    N = model.coattention.dim
    if f_t.shape[1] != N or f_i.shape[1] != N:
        _fail(f"f_t and f_i must have N = {N} columns (the model's common_dim), got {tuple(f_t.shape)} and "
              f"{tuple(f_i.shape)}")
    if f_t.device != f_i.device:
        _fail(f"f_t and f_i must be on one device, got {f_t.device} and {f_i.device}")
    if f_t.dtype != f_i.dtype:
        _fail(f"f_t and f_i must have one dtype, got {f_t.dtype} and {f_i.dtype}")
    param = model.head.fc.weight
    if param.device != f_t.device:
        _fail(f"the model is on {param.device} but the features are on {f_t.device}")
    for name, a, f in (("a1_t", a1_t, f_t), ("a1_i", a1_i, f_i)):
        if a is not None and (not isinstance(a, torch.Tensor) or a.shape != f.shape or a.device != f.device):
            _fail(f"{name} must be a tensor of the shape and device of its features {tuple(f.shape)}, got "
                  f"{tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__}")
    if (text_index is None) != (image_index is None):
        _fail("text_index and image_index must be given together")
    if text_index is not None:
        for name, idx, n in (("text_index", text_index, f_t.shape[0]), ("image_index", image_index, f_i.shape[0])):
            if not isinstance(idx, torch.Tensor) or idx.dim() != 1 or idx.dtype.is_floating_point \
                    or idx.dtype == torch.bool:
                _fail(f"{name} must be a 1-D integer tensor")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
                _fail(f"{name} has entries out of range [0, {n}): min {int(idx.min())}, max {int(idx.max())}")
        if text_index.shape != image_index.shape:
            _fail(f"text_index and image_index must have one length, got {text_index.numel()} and "
                  f"{image_index.numel()}")


@torch.no_grad()
def pair_logits_eager(model, f_t, f_i, *, a1_t=None, a1_i=None, text_index=None, image_index=None,
                      chunk_pairs: int = 16384) -> torch.Tensor:
    """The same logits with the model's own eager layers, any number of co-attention layers.

    Pairs run ``chunk_pairs`` at a time, so peak memory is O(output + chunk_pairs * N). All pairs (no indices):
    (Nt, Ni); a pair list: (P,). Computes in the features' dtype.
    """
    check_pair_inputs(model, f_t, f_i, a1_t, a1_i, text_index, image_index)
    L = model.coattention.num_layers
    w, b = _head(model, f_t.dtype)
    all_pairs = text_index is None
    Nt, Ni = f_t.shape[0], f_i.shape[0]
    if L >= 1:
        a1_t = layer1_attention(model, f_t, "text") if a1_t is None else a1_t.to(f_t.dtype)
        a1_i = layer1_attention(model, f_i, "image") if a1_i is None else a1_i.to(f_t.dtype)
    if all_pairs and L <= 1:
        return (f_t * w) @ f_i.T + b if L == 0 else (f_t * a1_t * w) @ (f_i * a1_i).T + b
    if all_pairs:
        rows = max(1, chunk_pairs // max(Ni, 1))                       # whole rows of texts a chunk
        out = torch.empty(Nt, Ni, dtype=f_t.dtype, device=f_t.device)
        cols = torch.arange(Ni, device=f_t.device)
        for s in range(0, Nt, rows):
            e = min(s + rows, Nt)
            ti = torch.arange(s, e, device=f_t.device).repeat_interleave(Ni)
            out[s:e] = _eager_pairs(model, f_t, f_i, a1_t, a1_i, ti, cols.repeat(e - s), w, b).reshape(e - s, Ni)
        return out
    P = text_index.numel()
    out = torch.empty(P, dtype=f_t.dtype, device=f_t.device)
    for s in range(0, P, max(1, chunk_pairs)):
        e = min(s + chunk_pairs, P)
        out[s:e] = _eager_pairs(model, f_t, f_i, a1_t, a1_i, text_index[s:e], image_index[s:e], w, b)
    return out


def _eager_pairs(model, f_t, f_i, a1_t, a1_i, ti, ii, w, b):
    ti, ii = ti.to(f_t.device).long(), ii.to(f_t.device).long()
    if model.coattention.num_layers == 0:
        return (f_t[ti] * f_i[ii]) @ w + b
    pt = a1_i[ii] * f_t[ti]                  # f_T after layer 1
    pi = a1_t[ti] * f_i[ii]                  # f_I after layer 1
    for k in range(1, model.coattention.num_layers):
        pt, pi = model.coattention.layer(k, pt, pi)
    return (pt * pi) @ w + b


def fused_available(device: torch.device) -> bool:
    """Can the kernel run on tensors of this device (CUDA, or CPU under TRITON_INTERPRET=1)?"""
    device = torch.device(device)
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1")


def pair_scores(model, f_t: torch.Tensor, f_i: torch.Tensor, *, a1_t=None, a1_i=None, text_index=None,
                image_index=None, precision: str = "fp32", layout: str = "outer", block_sizes: dict | None = None,
                chunk_pairs: int = 16384) -> torch.Tensor:
    """Logits of every (text, image) pair (Nt, Ni), or of the listed pairs (P,) with text_index/image_index.

    ``model``: a SCANet (or anything with its ``coattention`` and ``head``). a1_t / a1_i: layer-1 attention
    maps when already known (a search index stores them), else computed here. ``precision``: "fp32" (default),
    "tf32" or "bf16" GEMM inputs on CUDA (see scanet.kernels.pair_scores; the interpreter always computes fp32).
    The kernel computes in float32; the result has the features' dtype. ``layout="list"`` scores all pairs
    through the kernel's pair-list path; ``block_sizes`` overrides the tile heuristic (tests).
    """
    with torch.no_grad():
        return _pair_scores(model, f_t, f_i, a1_t, a1_i, text_index, image_index, precision, layout,
                            block_sizes, chunk_pairs)


def _pair_scores(model, f_t, f_i, a1_t, a1_i, text_index, image_index, precision, layout, block_sizes,
                 chunk_pairs):
    check_pair_inputs(model, f_t, f_i, a1_t, a1_i, text_index, image_index)
    if precision not in PRECISIONS:
        _fail(f"precision must be one of {PRECISIONS}, got {precision!r}")
    L = model.coattention.num_layers
    if L > 2:
        warnings.warn(f"pair_scores: the fused kernel covers 2 co-attention layers and this model has {L}; "
                      "scoring with the eager chunked path instead (layer 3 needs every pair's full layer-2 "
                      "output, which the streaming kernel never holds)", stacklevel=3)
    if L != 2:
        return pair_logits_eager(model, f_t, f_i, a1_t=a1_t, a1_i=a1_i, text_index=text_index,
                                 image_index=image_index, chunk_pairs=chunk_pairs)
    if not fused_available(f_t.device):
        _fail(f"pair_scores runs a Triton kernel: it needs CUDA tensors, or TRITON_INTERPRET=1 set before "
              f"scanet.kernels is imported to run on CPU (got tensors on {f_t.device}); "
              "scanet.fused.pair_logits_eager is the CPU path")
    from scanet.kernels.pair_scores import pair_scores_layer2

    a1_t = layer1_attention(model, f_t, "text") if a1_t is None else a1_t
    a1_i = layer1_attention(model, f_i, "image") if a1_i is None else a1_i
    coatt = model.coattention
    w, b = _head(model, torch.float32)
    out = pair_scores_layer2(
        f_t, f_i, a1_t, a1_i, coatt.text_fc[1].weight, coatt.text_fc[1].bias, coatt.image_fc[1].weight,
        coatt.image_fc[1].bias, w, b, coatt.scale, text_index=text_index, image_index=image_index,
        precision=precision, layout=layout, block_sizes=block_sizes)
    return out.to(f_t.dtype)
