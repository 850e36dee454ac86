"""Eager PyTorch oracles, one per op. Tests and benchmarks import these; the fused kernels must match them.

``cheb_conv``      one Chebyshev graph convolution over a rescaled Laplacian (torch CSR or scanet.laplacian.Laplacian).
``coattention``    one co-attention step: softmax(relu(f @ W.T + b)) * g.
``attention_map``  the (scaled) attention softmax(relu(f @ W.T + b)) * scale: layer 1's maps, computed once.
``pair_logits``    SCANet logits of every (text, image) pair or of a pair list, with the signature of
                   ``scanet.fused.pair_scores`` (its oracle and its CPU fallback).

The input checks live here too (``check_cheb_inputs``, ``check_coattention_inputs``, ``check_pair_inputs``;
the Laplacian's own in scanet.laplacian) so that the fused implementations raise exactly the same clear errors
before any kernel runs.

Precision (``compute_dtype``). float64 must come alone (the oracle's own precision). Otherwise any mix of
float32, bfloat16 and float16 is accepted, which is what ``torch.autocast`` hands an op (bf16 activations,
float32 parameters): under autocast the result has the autocast dtype, outside it the promoted dtype of the
inputs. What stays float32 and why: the Chebyshev recursion (every sparse product and the sum over k; each
step doubles the previous term's rounding error), the softmax statistics of the attention (max and sum over
N terms), and all-pairs logits (bf16 would tie rankings). The co-attention GEMM f W^T runs in the compute
dtype (bf16 on the CPU's AMX under autocast): it is most of the FLOPs and accumulates in float32 anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NoReturn

import torch
import torch.nn.functional as F

from scanet.laplacian import Laplacian, check_laplacian  # check_laplacian: public here

ACTIVATIONS = ("relu", "none", None)
LOW_PRECISION = (torch.bfloat16, torch.float16)
# Pairs scored at a time at most, whatever chunk_pairs allows: a (4096, 1024) bf16 intermediate is 8 MB, so the
# dozen elementwise passes of a chunk (relu, softmax, products) run from cache instead of DRAM. Measured on the
# 2-core machine, 693 x 693 at N = 1024 in bf16: chunks of 4 texts (2.8k pairs) 1.3-1.8 s per 64 texts against
# 2.4-2.6 s for one chunk of 64 texts (44k pairs).
CACHE_PAIRS = 4096
MIXABLE = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------------- checks
def _fail(msg: str) -> NoReturn:
    raise ValueError(msg)


def _check_dtypes(dtypes: dict) -> None:
    """float64 alone, or any mix of float32 / bfloat16 / float16 (what autocast hands an op)."""
    values = set(dtypes.values())
    if not all(d.is_floating_point for d in values) or (len(values) > 1 and not values <= set(MIXABLE)):
        _fail(f"all inputs must have one floating dtype (or a mix of float32, bfloat16 and float16), got {dtypes}")


def compute_dtype(device, *tensors) -> torch.dtype:
    """The dtype an op computes its GEMMs in and returns: float64 for float64 inputs; else the autocast dtype
    when autocast is on for ``device``; else the promoted dtype of the (checked) inputs."""
    dtypes = [t.dtype for t in tensors if t is not None]
    if torch.float64 in dtypes:
        return torch.float64
    device_type = torch.device(device).type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums, softmax statistics and logits: float64 stays float64, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_cheb_inputs(
    laplacian_csr: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = "relu",
    *,
    check_indices: bool = True,
) -> None:
    """``laplacian_csr``: a torch sparse CSR tensor (a Laplacian object is converted by the callers first)."""
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
    _check_dtypes({n: t.dtype for n, t in tensors.items()})


def check_coattention_inputs(f: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
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
    _check_dtypes({n: t.dtype for n, t in tensors.items()})


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


def cheb_conv_from_basis(
    basis: Sequence[torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = "relu",
) -> torch.Tensor:
    """y = act(sum_k T_k @ W_k + b) from a precomputed basis (see ``chebyshev_basis``)."""
    y = torch.matmul(basis[0], weight[0])
    for k in range(1, len(basis)):
        y = y + torch.matmul(basis[k], weight[k])
    if bias is not None:
        y = y + bias
    return F.relu(y) if activation == "relu" else y


def cheb_conv(
    laplacian_csr: torch.Tensor | Laplacian,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = "relu",
) -> torch.Tensor:
    """One Chebyshev graph convolution.

    laplacian_csr: (V, V) rescaled Laplacian L~ = 2L/lmax - I as a torch sparse CSR tensor.
    x: (B, V, F_in) signals; weight: (K, F_in, F_out); bias: (F_out,) or None; activation: "relu" or None.
    Returns (B, V, F_out) = act(sum_k T_k(L~) x @ weight[k] + bias). A ``Laplacian`` is used in x's dtype
    (float32 for bf16/fp16 x).

    Low precision (bf16/fp16 inputs, or any input under ``torch.autocast``): the whole convolution, sparse
    products, recursion and the sum over k, is computed in float32 with autocast off (the recursion doubles
    each term's rounding error; torch's CSR kernels have no bf16 anyway), and the result is cast once to
    ``compute_dtype`` (the autocast dtype under autocast). Gradients come back in each input's dtype.
    """
    tensors = all(isinstance(t, torch.Tensor) for t in (x, weight)) and (bias is None or isinstance(bias, torch.Tensor))
    low = (
        tensors
        and x.dtype != torch.float64
        and (
            torch.is_autocast_enabled(x.device.type)
            or any(t is not None and t.dtype in LOW_PRECISION for t in (x, weight, bias))
        )
    )
    if isinstance(laplacian_csr, Laplacian):
        laplacian_csr = laplacian_csr.csr(torch.float32 if low else (x.dtype if isinstance(x, torch.Tensor) else None))
    check_cheb_inputs(laplacian_csr, x, weight, bias, activation)  # indices: once per tensor
    if not low:
        return cheb_conv_from_basis(chebyshev_basis(laplacian_csr, x, weight.shape[0]), weight, bias, activation)
    out_dtype = compute_dtype(x.device, x, weight, bias)
    lap32 = laplacian_csr if laplacian_csr.dtype == torch.float32 else laplacian_csr.to(torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        basis = chebyshev_basis(lap32, x.float(), weight.shape[0])
        y = cheb_conv_from_basis(basis, weight.float(), None if bias is None else bias.float(), activation)
    return y.to(out_dtype)


# ---------------------------------------------------------------------------------------------- co-attention
def coattention(f, g, weight, bias, *, scale: float = 1.0) -> torch.Tensor:
    """One co-attention step: softmax(relu(f @ weight.T + bias), dim=-1) * g * scale.

    f: (M, N) features of the modality that attends; g: (M, N) features of the OTHER modality, which the
    attention re-weights; weight: (N, N); bias: (N,). ``scale`` (default 1, the paper's equations) multiplies
    the output: SCANet uses scale = N so that a uniform attention is the identity (see scanet.model).

    dtypes: see the module docstring. Everything runs in ``compute_dtype`` (bf16 under bf16 autocast: the GEMM
    on AMX), with the softmax statistics in float32 (see ``_attention``). Under autocast an fp32 weight/bias
    with bf16 f/g is the normal case, not an error.
    """
    check_coattention_inputs(f, g, weight, bias)
    dtype = compute_dtype(f.device, f, g, weight, bias)
    out = _attention(f, weight, bias, dtype) * g.to(dtype)
    return out * scale if scale != 1.0 else out


def _attention(f, weight, bias, dtype):
    """softmax(relu(f W^T + b)) in ``dtype``. For bf16/fp16 torch's softmax kernels (CPU and CUDA) keep the
    row max and the sum of exponentials in float32 and round only the output: the statistics stay float32
    without a float32 copy of the (M, N) map (measured: max relative error 2^-9, one rounding, at N = 1e5)."""
    z = F.linear(f.to(dtype), weight.to(dtype), bias.to(dtype))
    return torch.softmax(F.relu(z), dim=-1)


def attention_map(f, weight, bias, scale: float = 1.0) -> torch.Tensor:
    """softmax(relu(f @ weight.T + bias), dim=-1) * scale: the map a co-attention step applies, in
    ``compute_dtype(f, weight, bias)`` (f's dtype unless mixed or under autocast); softmax statistics float32."""
    dtype = compute_dtype(f.device, f, weight, bias)
    p = _attention(f, weight, bias, dtype)
    return p * scale if scale != 1.0 else p


# ------------------------------------------------------------------------------------------ all-pair logits
def layer1_attention(model, f: torch.Tensor, modality: str) -> torch.Tensor:
    """a1 = softmax(relu(fc(f))) * scale: layer 1's (scaled) attention map from one modality's features."""
    return model.coattention.attention(0, modality, f)


def head_weights(model, dtype) -> tuple[torch.Tensor, float]:
    """(w, b) of the similarity head: logit = w . (f_T * f_I) + b."""
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
        _fail(
            f"f_t and f_i must have N = {N} columns (the model's common_dim), got {tuple(f_t.shape)} and "
            f"{tuple(f_i.shape)}"
        )
    if f_t.device != f_i.device:
        _fail(f"f_t and f_i must be on one device, got {f_t.device} and {f_i.device}")
    if f_t.dtype != f_i.dtype:
        _fail(f"f_t and f_i must have one dtype, got {f_t.dtype} and {f_i.dtype}")
    param = model.head.fc.weight
    if param.device != f_t.device:
        _fail(f"the model is on {param.device} but the features are on {f_t.device}")
    for name, a, f in (("a1_t", a1_t, f_t), ("a1_i", a1_i, f_i)):
        if a is not None and (not isinstance(a, torch.Tensor) or a.shape != f.shape or a.device != f.device):
            _fail(
                f"{name} must be a tensor of the shape and device of its features {tuple(f.shape)}, got "
                f"{tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__}"
            )
    if (text_index is None) != (image_index is None):
        _fail("text_index and image_index must be given together")
    if text_index is not None:
        for name, idx, n in (("text_index", text_index, f_t.shape[0]), ("image_index", image_index, f_i.shape[0])):
            if (
                not isinstance(idx, torch.Tensor)
                or idx.dim() != 1
                or idx.dtype.is_floating_point
                or idx.dtype == torch.bool
            ):
                _fail(f"{name} must be a 1-D integer tensor")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
                _fail(f"{name} has entries out of range [0, {n}): min {int(idx.min())}, max {int(idx.max())}")
        if text_index.shape != image_index.shape:
            _fail(
                f"text_index and image_index must have one length, got {text_index.numel()} and {image_index.numel()}"
            )


@torch.no_grad()
def pair_logits(
    model,
    f_t,
    f_i,
    *,
    a1_t=None,
    a1_i=None,
    text_index=None,
    image_index=None,
    chunk_pairs: int = 16384,
    progress: bool = False,
    **_fused_only,
) -> torch.Tensor:
    """SCANet logits of every (text, image) pair (Nt, Ni), or of the listed pairs (P,), with the model's own eager
    layers, any number of co-attention layers. The oracle of ``scanet.fused.pair_scores`` (same signature; its
    kernel-only options ``precision``, ``layout``, ``block_sizes`` are accepted and ignored).

    ``model``: a SCANet (anything with its ``coattention`` and ``head``), in eval mode. By the number of layers L:
    L = 0: (f_t * w) @ f_i.T + b, one GEMM; L = 1: layer 1 is per item, (f_t * a1_T * w) @ (f_i * a1_I).T + b,
    one GEMM; L >= 2: layers >= 2 per pair, at most ``chunk_pairs`` (and at most ``CACHE_PAIRS``) pairs at a
    time, so peak memory is O(output + chunk_pairs * N). a1_t / a1_i: layer-1 attention maps when already known.

    Precision: computes in ``compute_dtype`` of the features (bf16 under bf16 autocast: the layer-2 GEMMs of
    every chunk, 2 Nt Ni N^2 FLOPs, are the whole cost and run on the CPU's AMX); softmax statistics and the
    head's dot product w . (f_T * f_I) are float32, and the logits are float32 for bf16/fp16 features (a
    bf16 logit has 8 significant bits: near-equal pairs would tie and MAP would move). float64 stays float64.
    """
    if isinstance(chunk_pairs, bool) or not isinstance(chunk_pairs, int) or chunk_pairs < 1:
        _fail(f"chunk_pairs={chunk_pairs!r}: chunk_pairs must be an int >= 1")
    check_pair_inputs(model, f_t, f_i, a1_t, a1_i, text_index, image_index)
    L = model.coattention.num_layers
    dtype = compute_dtype(f_t.device, f_t, f_i)
    out_dtype = statistics_dtype(dtype)  # the logits: float32 (float64 for float64)
    f_t, f_i = f_t.to(dtype), f_i.to(dtype)
    w, b = head_weights(model, out_dtype)
    all_pairs = text_index is None
    Nt, Ni = f_t.shape[0], f_i.shape[0]
    if L >= 1:
        a1_t = layer1_attention(model, f_t, "text") if a1_t is None else a1_t
        a1_i = layer1_attention(model, f_i, "image") if a1_i is None else a1_i
        a1_t, a1_i = a1_t.to(dtype), a1_i.to(dtype)
    if all_pairs and L <= 1:
        lhs, rhs = (f_t, f_i) if L == 0 else (f_t * a1_t, f_i * a1_i)
        with torch.autocast(f_t.device.type, enabled=False):  # one small GEMM (Nt Ni N): in float32
            return (lhs.to(out_dtype) * w) @ rhs.to(out_dtype).T + b
    if all_pairs:
        rows = max(1, min(chunk_pairs, CACHE_PAIRS) // max(Ni, 1))  # whole rows of texts a chunk
        out = torch.empty(Nt, Ni, dtype=out_dtype, device=f_t.device)
        starts = range(0, Nt, rows)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc="scoring", unit="chunk")
        for s in starts:
            e = min(s + rows, Nt)
            # layer 1 applied by broadcasting (text s..e against every image): no gathered copies of f, a1
            pt = (a1_i.unsqueeze(0) * f_t[s:e].unsqueeze(1)).reshape(-1, f_t.shape[1])
            pi = (a1_t[s:e].unsqueeze(1) * f_i.unsqueeze(0)).reshape(-1, f_t.shape[1])
            out[s:e] = _layers_and_head(model, pt, pi, w, b).reshape(e - s, Ni)
        return out
    P = text_index.numel()
    out = torch.empty(P, dtype=out_dtype, device=f_t.device)
    step = max(1, min(chunk_pairs, CACHE_PAIRS))
    for s in range(0, P, step):
        e = min(s + step, P)
        out[s:e] = _pairs(model, f_t, f_i, a1_t, a1_i, text_index[s:e], image_index[s:e], w, b)
    return out


def _pairs(model, f_t, f_i, a1_t, a1_i, ti, ii, w, b):
    ti, ii = ti.to(f_t.device).long(), ii.to(f_t.device).long()
    if model.coattention.num_layers == 0:
        pt, pi = f_t[ti], f_i[ii]
    else:
        pt = a1_i[ii] * f_t[ti]  # f_T after layer 1
        pi = a1_t[ti] * f_i[ii]  # f_I after layer 1
    return _layers_and_head(model, pt, pi, w, b)


def _layers_and_head(model, pt, pi, w, b):
    """Co-attention layers >= 2 on per-pair features, then the head. The last layer runs unscaled and its
    scale, squared (it multiplies both factors of f_T * f_I), is folded into the head's weight: one pass over
    the (P, N) features fewer each way. The logit's dot product is in w's dtype (float32 for bf16 features:
    the product f_T * f_I is written in float32 directly, and the sum over N is float32)."""
    coatt = model.coattention
    L = coatt.num_layers
    for k in range(1, L - 1):
        pt, pi = coatt.layer(k, pt, pi)
    if L >= 2:
        k, dtype = L - 1, compute_dtype(pt.device, pt, pi)
        pt, pi = (
            _attention(pi, coatt.image_fc[k].weight, coatt.image_fc[k].bias, dtype) * pt,  # p_I * f_T
            _attention(pt, coatt.text_fc[k].weight, coatt.text_fc[k].bias, dtype) * pi,
        )  # p_T * f_I
        w = w * (coatt.scale * coatt.scale)
    with torch.autocast(pt.device.type, enabled=False):
        prod = torch.empty(pt.shape, dtype=w.dtype, device=pt.device)
        return torch.mul(pt, pi, out=prod) @ w + b
