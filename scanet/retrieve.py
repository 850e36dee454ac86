"""Retrieval at scale: exhaustive and two-stage search, a search index on disk, and ``scanet search``.

Why a little over 400 lines: the stage-1 scores (layer1, layer2-mean with its reference attention) belong to
the search core they shortlist for; the on-disk index lives in scanet/index.py, FAISS in scanet/ann.py.

Scores are the model's: the logit of (text, image) under the full stacked co-attention (sigmoid of it is the
similarity ``SCANet.forward`` returns). Ranking is by score, descending, ties by collection index, ascending.

Exhaustive search scores every (query, item) pair: SCANet's per-pair layer 2 costs 4 * N^2 FLOPs a pair (two
modalities), on CUDA in the fused kernel (scanet.fused.pair_scores), on CPU by the eager chunked path.

Two-stage search, for large collections:
  1. shortlist: a score that factorizes per item, so that it is one GEMM (or a FAISS inner-product search):
       "layer1"  the model's score with its head applied after co-attention layer 1,
                 logit1 = (f_t * a1_T * w) @ (f_i * a1_I).T + b. Exact for models with one layer (and for none);
                 for two layers it is the same head on the first layer's features, a strong proxy.
       "cosine"  cosine of the encoders' outputs in the common space (model-agnostic, weaker).
       "layer2-mean"  two-layer models: the full two-layer score with the layer-2 attention computed against a
                 fixed partner, the mean layer-1 attention of the other modality over a reference sample
                 (``reference_attention``; the derivation is in scanet.ann's docstring). The best proxy measured.
     The top ``shortlist`` items of each query by that score (top_k_inner_product: chunked GEMM + top-k, or
     FAISS IndexFlatIP when installed and asked for: the same exact inner products).
  2. re-rank: the full co-attention score of the shortlisted pairs only (gathered pairs: 4 N^2 FLOPs each),
     and the top k of those.
  Cost: Q x C x N (stage 1) + Q x S x 4 N^2 (stage 2) instead of Q x C x 4 N^2. What it loses is measured by
  ``shortlist_report``: recall of the exhaustive top-k within the shortlist, MAP of the two-stage ranking
  (the shortlist re-ranked, then the rest by the stage-1 score) against exhaustive MAP, and the time of each.

The on-disk search index and free-text queries are scanet.index; the command is scanet.cli.search.
Every scoring function takes ``scorer`` ("auto", "fused", "eager": see scanet.model.use_fused_scorer).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from scanet import reference
from scanet.io import tensor_hash
from scanet.model import pair_logits

STAGE1 = ("layer1", "cosine", "layer2-mean")


def model_hash(model) -> str:
    """sha256 (16 hex digits) of the model's weights and buffers: names, dtypes, shapes and bytes. A search index
    and its FAISS index record it; loading either refuses another model."""
    return tensor_hash(model.state_dict())[:16]


# ------------------------------------------------------------------------------------------------ encoding
@dataclass
class Items:
    """Encoded items of one modality: common-space features (n, N) and layer-1 attention maps (n, N), the
    latter None for a model without co-attention layers."""

    modality: str  # "text" or "image"
    features: torch.Tensor
    attention: torch.Tensor | None

    def __post_init__(self):
        if self.modality not in ("text", "image"):
            raise ValueError(f"modality must be 'text' or 'image', got {self.modality!r}")
        if self.attention is not None and self.attention.shape != self.features.shape:
            raise ValueError(
                f"attention {tuple(self.attention.shape)} and features {tuple(self.features.shape)} must have one shape"
            )

    def __len__(self):
        return self.features.shape[0]

    def subset(self, index) -> Items:
        return Items(self.modality, self.features[index], None if self.attention is None else self.attention[index])

    def to(self, device) -> Items:
        return Items(
            self.modality, self.features.to(device), None if self.attention is None else self.attention.to(device)
        )


@torch.no_grad()
def encode_items(model, modality: str, inputs, batch_size: int = 256) -> Items:
    """Encode raw model inputs in batches: what the model's encoders read (scanet.inputs: bag-of-words features
    or token ids (n, T) for texts, image features or pixels (n, 3, S, S) for images). ``inputs`` may also be a
    scipy sparse matrix of bag-of-words counts: it goes through text_features batch by batch (no dense (n, V)
    matrix). Integer inputs (token ids, uint8 pixels) keep their type; floats take the model's dtype."""
    if modality == "text" and hasattr(inputs, "tocsr"):
        return _encode_texts(model, inputs, batch_size)
    if modality not in ("text", "image"):
        raise ValueError(f"modality must be 'text' or 'image', got {modality!r}")
    param = next(model.parameters())
    x = torch.as_tensor(inputs)
    x = x.to(param.dtype) if x.is_floating_point() else x
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"{modality} inputs must be a non-empty (n, ...) array, got {tuple(x.shape)}")
    was_training = model.training
    model.eval()
    try:
        enc = model.encode_text if modality == "text" else model.encode_image
        feats = torch.cat([enc(x[s : s + batch_size].to(param.device)) for s in range(0, x.shape[0], batch_size)])
        att = reference.layer1_attention(model, feats, modality) if model.coattention.num_layers >= 1 else None
    finally:
        model.train(was_training)
    return Items(modality, feats, att)


@torch.no_grad()
def _encode_texts(model, bow, batch_size: int) -> Items:
    from scanet.data.text import text_features

    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        feats = torch.cat(
            [
                model.encode_text(
                    torch.as_tensor(text_features(bow[s : s + batch_size]), dtype=param.dtype, device=param.device)
                )
                for s in range(0, bow.shape[0], batch_size)
            ]
        )
        att = reference.layer1_attention(model, feats, "text") if model.coattention.num_layers >= 1 else None
    finally:
        model.train(was_training)
    return Items("text", feats, att)


def _texts_images(queries: Items, collection: Items) -> tuple[Items, Items]:
    if {queries.modality, collection.modality} != {"text", "image"}:
        raise ValueError(
            f"cross-modal search needs text queries over images or image queries over texts, got "
            f"{queries.modality} queries over {collection.modality}s"
        )
    return (queries, collection) if queries.modality == "text" else (collection, queries)


# ------------------------------------------------------------------------------------------------- scoring
@torch.no_grad()
def score_pairs(
    model,
    texts: Items,
    images: Items,
    text_index=None,
    image_index=None,
    precision: str = "fp32",
    chunk_pairs: int = 16384,
    scorer: str = "auto",
) -> torch.Tensor:
    """Logits of all (text, image) pairs (Nt, Ni), or of the listed pairs (P,)."""
    return pair_logits(
        model,
        texts.features,
        images.features,
        scorer=scorer,
        precision=precision,
        chunk_pairs=chunk_pairs,
        a1_t=texts.attention,
        a1_i=images.attention,
        text_index=text_index,
        image_index=image_index,
    )


def mean_attention(items: Items) -> torch.Tensor:
    """(N,) the mean layer-1 attention of encoded items: a "layer2-mean" reference."""
    if items.attention is None or len(items) == 0:
        raise ValueError("mean_attention needs items of a model with co-attention layers (attention maps)")
    return items.attention.double().mean(0).to(items.attention.dtype)


def reference_attention(texts: Items, images: Items) -> dict:
    """{"text": mean text attention, "image": mean image attention} of reference samples (the training split)."""
    return {"text": mean_attention(texts), "image": mean_attention(images)}


@torch.no_grad()
def stage1_vectors(model, items: Items, method: str = "layer1", reference: dict | None = None) -> torch.Tensor:
    """Per-item vectors whose inner product is the stage-1 score (see the module docstring); "layer2-mean"
    needs ``reference`` (reference_attention)."""
    if method not in STAGE1:
        raise ValueError(f"stage-1 score must be one of {STAGE1}, got {method!r}")
    f = items.features
    if method == "cosine":
        return f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
    if method == "layer2-mean":
        v = _layer2_mean_vectors(model, items, reference)
    else:
        v = f if items.attention is None else f * items.attention
    if items.modality == "text":  # the head's weight goes on one side
        v = v * model.head.fc.weight.detach().reshape(-1).to(v.dtype)
    return v


def _layer2_mean_vectors(model, items: Items, reference: dict | None) -> torch.Tensor:
    c = model.coattention
    if c.num_layers != 2:
        raise ValueError(
            f"stage-1 'layer2-mean' is for models with 2 co-attention layers, this one has "
            f"{c.num_layers}: use 'layer1' (exact for 1 layer)"
        )
    if reference is None or set(reference) != {"text", "image"}:
        raise ValueError(
            "stage-1 'layer2-mean' needs reference={'text': ..., 'image': ...}, the mean layer-1 "
            "attention of each modality (scanet.retrieve.reference_attention of the training split)"
        )
    other = "image" if items.modality == "text" else "text"
    f, a1 = items.features, items.attention
    partner = torch.as_tensor(reference[other], dtype=f.dtype, device=f.device)
    if partner.shape != (f.shape[1],):
        raise ValueError(f"reference attention of the {other}s must be ({f.shape[1]},), got {tuple(partner.shape)}")
    # The layer-2 attention that weighs THIS item's side comes from the partner's layer-2 map computed on this
    # item's layer-1 features: text features attend through text_fc[1], image features through image_fc[1].
    fc = (c.text_fc if items.modality == "text" else c.image_fc)[1]
    p2 = (
        torch.softmax(
            torch.relu(torch.nn.functional.linear(partner * f, fc.weight.to(f.dtype), fc.bias.to(f.dtype))), dim=-1
        )
        * c.scale
    )
    return p2 * a1 * f


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def top_k_inner_product(
    queries: torch.Tensor, keys: torch.Tensor, k: int, backend: str = "torch", chunk: int = 65536
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, indices), each (Q, k): the k keys of largest inner product with each query, best first.

    backend "torch": keys in chunks of ``chunk`` rows (memory O(Q * (chunk + k))), a GEMM and a top-k each,
    merged. "faiss": an exact IndexFlatIP (pip install faiss-cpu). "auto": FAISS if installed, else torch.
    """
    if backend not in ("torch", "faiss", "auto"):
        raise ValueError(f"backend must be 'torch', 'faiss' or 'auto', got {backend!r}")
    C = keys.shape[0]
    if queries.dim() != 2 or keys.dim() != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(
            f"queries and keys must be (Q, N) and (C, N), got {tuple(queries.shape)} and {tuple(keys.shape)}"
        )
    if not 1 <= k:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, C)
    faiss = _faiss() if backend != "torch" else None
    if backend == "faiss" and faiss is None:
        raise ValueError("backend 'faiss' needs the faiss package (pip install faiss-cpu); use backend='torch'")
    if faiss is not None:
        index = faiss.IndexFlatIP(keys.shape[1])
        index.add(np.ascontiguousarray(keys.detach().float().cpu().numpy()))
        d, i = index.search(np.ascontiguousarray(queries.detach().float().cpu().numpy()), k)
        return torch.from_numpy(d).to(queries.device), torch.from_numpy(i).long().to(queries.device)
    best_s: torch.Tensor | None = None
    best_i: torch.Tensor | None = None
    for s in range(0, C, chunk):
        scores = queries @ keys[s : s + chunk].T
        top_s, top_i = scores.topk(min(k, scores.shape[1]), dim=1)
        top_i = top_i + s
        if best_s is not None and best_i is not None:
            merged = torch.cat([best_s, top_s], 1)
            top_s, pick = merged.topk(min(k, merged.shape[1]), dim=1)
            top_i = torch.cat([best_i, top_i], 1).gather(1, pick)
        best_s, best_i = top_s, top_i
    if best_s is None or best_i is None:
        raise ValueError("keys has no rows: there is nothing to search")
    return best_s, best_i


def rank(scores: torch.Tensor, candidates: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top k of each row by score, descending, ties by candidate index ascending: (scores, candidates)."""
    by_index = candidates.argsort(dim=1, stable=True)
    scores, candidates = scores.gather(1, by_index), candidates.gather(1, by_index)
    order = scores.argsort(dim=1, descending=True, stable=True)[:, :k]
    return scores.gather(1, order), candidates.gather(1, order)


@dataclass
class SearchResult:
    logits: torch.Tensor  # (Q, k) full-model logits of the results, best first
    indices: torch.Tensor  # (Q, k) collection indices
    shortlist: torch.Tensor | None = None  # (Q, S) stage-1 candidates (two-stage only)


@torch.no_grad()
def exhaustive_search(
    model, queries: Items, collection: Items, k: int, precision: str = "fp32", scorer: str = "auto"
) -> SearchResult:
    """Score every (query, item) pair with the full model and keep the top k."""
    texts, images = _texts_images(queries, collection)
    logits = score_pairs(model, texts, images, precision=precision, scorer=scorer)
    if queries.modality == "image":
        logits = logits.T
    cand = torch.arange(len(collection), device=logits.device).expand(len(queries), -1)
    top, idx = rank(logits, cand, min(k, len(collection)))
    return SearchResult(top, idx)


@torch.no_grad()
def two_stage_search(
    model,
    queries: Items,
    collection: Items,
    k: int,
    shortlist: int,
    stage1: str = "layer1",
    backend: str = "torch",
    precision: str = "fp32",
    scorer: str = "auto",
    reference: dict | None = None,
) -> SearchResult:
    """Shortlist ``shortlist`` items per query by the stage-1 score, re-rank them by the full model, keep k.
    ``reference``: the reference attention of stage-1 "layer2-mean" (reference_attention)."""
    if shortlist < 1:
        raise ValueError(f"shortlist must be >= 1, got {shortlist}")
    texts, images = _texts_images(queries, collection)
    _, short = top_k_inner_product(
        stage1_vectors(model, queries, stage1, reference),
        stage1_vectors(model, collection, stage1, reference),
        shortlist,
        backend=backend,
    )
    Q, S = short.shape
    q_index = torch.arange(Q, device=short.device).repeat_interleave(S)
    c_index = short.reshape(-1)
    ti, ii = (q_index, c_index) if queries.modality == "text" else (c_index, q_index)
    logits = score_pairs(model, texts, images, ti, ii, precision=precision, scorer=scorer).reshape(Q, S)
    top, idx = rank(logits, short, min(k, S))
    return SearchResult(top, idx, short)


def shortlist_report(
    model,
    queries: Items,
    collection: Items,
    query_labels,
    collection_labels,
    k: int = 10,
    shortlists=(50, 100, 200),
    stage1: str = "layer1",
    backend: str = "torch",
    precision: str = "fp32",
    scorer: str = "auto",
) -> dict:
    """What two-stage search loses and wins against exhaustive search, on labelled data.

    For each shortlist size S: ``recall_at_k``, the mean fraction of the exhaustive top k found in the shortlist
    (= the overlap of the two top-k lists); ``map`` (MAP@all of the two-stage ranking: the shortlist re-ranked by
    the full score, then the rest by the stage-1 score) and ``map_at_k``, against the exhaustive ones
    (``map_lost`` = exhaustive - two-stage); ``seconds`` and ``speedup`` = exhaustive seconds / two-stage
    seconds, measured here one after the other on the same device (a single run: noisy for small inputs).
    """
    from scanet.evaluate import mean_average_precision

    texts, images = _texts_images(queries, collection)
    Q, C = len(queries), len(collection)
    _sync(queries.features)
    t0 = time.perf_counter()
    full = score_pairs(model, texts, images, precision=precision, scorer=scorer)
    full = full if queries.modality == "text" else full.T
    cand = torch.arange(C, device=full.device).expand(Q, -1)
    _, exh_idx = rank(full, cand, min(k, C))
    _sync(queries.features)
    exh_seconds = time.perf_counter() - t0
    full_np = full.double().cpu().numpy()
    exh = {
        "map": mean_average_precision(full_np, query_labels, collection_labels),
        "map_at_k": mean_average_precision(full_np, query_labels, collection_labels, k),
        "seconds": exh_seconds,
    }
    s1 = stage1_vectors(model, queries, stage1) @ stage1_vectors(model, collection, stage1).T
    rows = []
    for S in shortlists:
        S = min(int(S), C)
        _sync(queries.features)
        t0 = time.perf_counter()
        res = two_stage_search(model, queries, collection, S, S, stage1, backend, precision, scorer)  # keep all S
        _sync(queries.features)
        seconds = time.perf_counter() - t0
        assert res.shortlist is not None  # two_stage_search always keeps its shortlist
        found = (exh_idx.cpu()[:, :, None] == res.shortlist.cpu()[:, None, :]).any(-1).float().mean().item()
        composite = _ranking_matrix(res.indices.cpu(), s1.detach().double().cpu())
        m = mean_average_precision(composite, query_labels, collection_labels)
        mk = mean_average_precision(composite, query_labels, collection_labels, k)
        rows.append(
            {
                "shortlist": S,
                "recall_at_k": found,
                "map": m,
                "map_at_k": mk,
                "map_lost": exh["map"] - m,
                "map_at_k_lost": exh["map_at_k"] - mk,
                "seconds": seconds,
                "speedup": exh_seconds / seconds if seconds > 0 else float("inf"),
            }
        )
    return {
        "k": k,
        "queries": Q,
        "collection": C,
        "direction": f"{queries.modality}2{collection.modality}",
        "stage1": stage1,
        "exhaustive": exh,
        "two_stage": rows,
    }


def _ranking_matrix(head: torch.Tensor, stage1_scores: torch.Tensor) -> np.ndarray:
    """(Q, C) scores (minus the rank) of the ranking: ``head`` (Q, S) in its order, then every other item by
    the stage-1 score, descending, ties by index."""
    Q, C = stage1_scores.shape
    S = head.shape[1]
    rest_scores = stage1_scores.clone().scatter_(1, head, float("-inf"))
    rest = rest_scores.argsort(dim=1, descending=True, stable=True)[:, : C - S]
    order = torch.cat([head, rest], 1).numpy()
    scores = np.empty((Q, C))
    np.put_along_axis(scores, order, np.broadcast_to(-np.arange(C, dtype=np.float64), (Q, C)), axis=1)
    return scores


def _sync(t: torch.Tensor) -> None:
    if t.is_cuda:
        torch.cuda.synchronize(t.device)
