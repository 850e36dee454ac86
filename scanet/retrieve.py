"""Retrieval at scale: exhaustive and two-stage search, a search index on disk, and ``scanet search``.

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
     The top ``shortlist`` items of each query by that score (top_k_inner_product: chunked GEMM + top-k, or
     FAISS IndexFlatIP when installed and asked for: the same exact inner products).
  2. re-rank: the full co-attention score of the shortlisted pairs only (gathered pairs: 4 N^2 FLOPs each),
     and the top k of those.
  Cost: Q x C x N (stage 1) + Q x S x 4 N^2 (stage 2) instead of Q x C x 4 N^2. What it loses is measured by
  ``shortlist_report``: recall of the exhaustive top-k within the shortlist, MAP of the two-stage ranking
  (the shortlist re-ranked, then the rest by the stage-1 score) against exhaustive MAP, and the time of each.

``scanet search index`` encodes one side of a dataset split (common-space features and layer-1 attention per
item, which is all that queries need from the collection) and saves it with the hash of the model's weights
and the dataset fingerprint; ``scanet search query`` refuses an index built by another model.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

INDEX_FORMAT = "scanet-search-index-v1"
SIDES = {"images": "image", "texts": "text"}           # --side value -> modality of the collection
STAGE1 = ("layer1", "cosine")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")
AUTO_EXHAUSTIVE_MAX = 5000                              # collections up to this size are searched exhaustively


# ------------------------------------------------------------------------------------------------ encoding
@dataclass
class Items:
    """Encoded items of one modality: common-space features (n, N) and layer-1 attention maps (n, N), the
    latter None for a model without co-attention layers."""
    modality: str                  # "text" or "image"
    features: torch.Tensor
    attention: torch.Tensor | None

    def __post_init__(self):
        if self.modality not in ("text", "image"):
            raise ValueError(f"modality must be 'text' or 'image', got {self.modality!r}")
        if self.attention is not None and self.attention.shape != self.features.shape:
            raise ValueError(f"attention {tuple(self.attention.shape)} and features {tuple(self.features.shape)} "
                             "must have one shape")

    def __len__(self):
        return self.features.shape[0]

    def subset(self, index) -> "Items":
        return Items(self.modality, self.features[index], None if self.attention is None else self.attention[index])

    def to(self, device) -> "Items":
        return Items(self.modality, self.features.to(device),
                     None if self.attention is None else self.attention.to(device))


@torch.no_grad()
def encode_items(model, modality: str, inputs, batch_size: int = 256) -> Items:
    """Encode raw model inputs (bag-of-words features for texts, image features for images) in batches."""
    from scanet.fused._pair_scores import layer1_attention

    if modality not in ("text", "image"):
        raise ValueError(f"modality must be 'text' or 'image', got {modality!r}")
    param = next(model.parameters())
    x = torch.as_tensor(inputs, dtype=param.dtype)
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"{modality} inputs must be a non-empty (n, features) matrix, got {tuple(x.shape)}")
    was_training = model.training
    model.eval()
    try:
        enc = model.encode_text if modality == "text" else model.encode_image
        feats = torch.cat([enc(x[s:s + batch_size].to(param.device)) for s in range(0, x.shape[0], batch_size)])
        att = layer1_attention(model, feats, modality) if model.coattention.num_layers >= 1 else None
    finally:
        model.train(was_training)
    return Items(modality, feats, att)


def _texts_images(queries: Items, collection: Items) -> tuple[Items, Items]:
    if {queries.modality, collection.modality} != {"text", "image"}:
        raise ValueError(f"cross-modal search needs text queries over images or image queries over texts, got "
                         f"{queries.modality} queries over {collection.modality}s")
    return (queries, collection) if queries.modality == "text" else (collection, queries)


# ------------------------------------------------------------------------------------------------- scoring
def _fused_ok(model, features: torch.Tensor) -> bool:
    """The same rule as SCANet._pair_logits: the fused kernel for two layers on CUDA float32 ("auto")."""
    from scanet.fused._pair_scores import fused_available

    scorer = getattr(model, "pair_scorer", "auto")
    if model.coattention.num_layers != 2 or scorer == "never":
        return False
    if scorer == "always":
        return fused_available(features.device)
    return features.is_cuda and features.dtype == torch.float32


@torch.no_grad()
def score_pairs(model, texts: Items, images: Items, text_index=None, image_index=None, precision: str = "fp32",
                chunk_pairs: int = 16384) -> torch.Tensor:
    """Logits of all (text, image) pairs (Nt, Ni), or of the listed pairs (P,)."""
    from scanet.fused._pair_scores import pair_logits_eager, pair_scores

    kw = dict(a1_t=texts.attention, a1_i=images.attention, text_index=text_index, image_index=image_index)
    if _fused_ok(model, texts.features):
        return pair_scores(model, texts.features, images.features, precision=precision, **kw)
    return pair_logits_eager(model, texts.features, images.features, chunk_pairs=chunk_pairs, **kw)


def stage1_vectors(model, items: Items, method: str = "layer1") -> torch.Tensor:
    """Per-item vectors whose inner product is the stage-1 score (see the module docstring)."""
    if method not in STAGE1:
        raise ValueError(f"stage-1 score must be one of {STAGE1}, got {method!r}")
    f = items.features
    if method == "cosine":
        return f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
    v = f if items.attention is None else f * items.attention
    if items.modality == "text":                        # the head's weight goes on one side
        v = v * model.head.fc.weight.detach().reshape(-1).to(v.dtype)
    return v


def _faiss():
    try:
        import faiss  # noqa: F401
    except ImportError:
        return None
    return faiss


def top_k_inner_product(queries: torch.Tensor, keys: torch.Tensor, k: int, backend: str = "torch",
                        chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, indices), each (Q, k): the k keys of largest inner product with each query, best first.

    backend "torch": keys in chunks of ``chunk`` rows (memory O(Q * (chunk + k))), a GEMM and a top-k each,
    merged. "faiss": an exact IndexFlatIP (pip install faiss-cpu). "auto": FAISS if installed, else torch.
    """
    if backend not in ("torch", "faiss", "auto"):
        raise ValueError(f"backend must be 'torch', 'faiss' or 'auto', got {backend!r}")
    C = keys.shape[0]
    if queries.dim() != 2 or keys.dim() != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(f"queries and keys must be (Q, N) and (C, N), got {tuple(queries.shape)} and "
                         f"{tuple(keys.shape)}")
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
    best_s = best_i = None
    for s in range(0, C, chunk):
        scores = queries @ keys[s:s + chunk].T
        top_s, top_i = scores.topk(min(k, scores.shape[1]), dim=1)
        top_i = top_i + s
        if best_s is not None:
            merged = torch.cat([best_s, top_s], 1)
            top_s, pick = merged.topk(min(k, merged.shape[1]), dim=1)
            top_i = torch.cat([best_i, top_i], 1).gather(1, pick)
        best_s, best_i = top_s, top_i
    return best_s, best_i


def rank(scores: torch.Tensor, candidates: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top k of each row by score, descending, ties by candidate index ascending: (scores, candidates)."""
    by_index = candidates.argsort(dim=1, stable=True)
    scores, candidates = scores.gather(1, by_index), candidates.gather(1, by_index)
    order = scores.argsort(dim=1, descending=True, stable=True)[:, :k]
    return scores.gather(1, order), candidates.gather(1, order)


@dataclass
class SearchResult:
    logits: torch.Tensor           # (Q, k) full-model logits of the results, best first
    indices: torch.Tensor          # (Q, k) collection indices
    shortlist: torch.Tensor | None = None    # (Q, S) stage-1 candidates (two-stage only)


@torch.no_grad()
def exhaustive_search(model, queries: Items, collection: Items, k: int, precision: str = "fp32") -> SearchResult:
    """Score every (query, item) pair with the full model and keep the top k."""
    texts, images = _texts_images(queries, collection)
    logits = score_pairs(model, texts, images, precision=precision)
    if queries.modality == "image":
        logits = logits.T
    cand = torch.arange(len(collection), device=logits.device).expand(len(queries), -1)
    top, idx = rank(logits, cand, min(k, len(collection)))
    return SearchResult(top, idx)


@torch.no_grad()
def two_stage_search(model, queries: Items, collection: Items, k: int, shortlist: int, stage1: str = "layer1",
                     backend: str = "torch", precision: str = "fp32") -> SearchResult:
    """Shortlist ``shortlist`` items per query by the stage-1 score, re-rank them by the full model, keep k."""
    if shortlist < 1:
        raise ValueError(f"shortlist must be >= 1, got {shortlist}")
    texts, images = _texts_images(queries, collection)
    _, short = top_k_inner_product(stage1_vectors(model, queries, stage1), stage1_vectors(model, collection, stage1),
                                   shortlist, backend=backend)
    Q, S = short.shape
    q_index = torch.arange(Q, device=short.device).repeat_interleave(S)
    c_index = short.reshape(-1)
    ti, ii = (q_index, c_index) if queries.modality == "text" else (c_index, q_index)
    logits = score_pairs(model, texts, images, ti, ii, precision=precision).reshape(Q, S)
    top, idx = rank(logits, short, min(k, S))
    return SearchResult(top, idx, short)


def shortlist_report(model, queries: Items, collection: Items, query_labels, collection_labels, k: int = 10,
                     shortlists=(50, 100, 200), stage1: str = "layer1", backend: str = "torch",
                     precision: str = "fp32") -> dict:
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
    full = score_pairs(model, texts, images, precision=precision)
    full = full if queries.modality == "text" else full.T
    cand = torch.arange(C, device=full.device).expand(Q, -1)
    _, exh_idx = rank(full, cand, min(k, C))
    _sync(queries.features)
    exh_seconds = time.perf_counter() - t0
    full_np = full.double().cpu().numpy()
    exh = {"map": mean_average_precision(full_np, query_labels, collection_labels),
           "map_at_k": mean_average_precision(full_np, query_labels, collection_labels, k),
           "seconds": exh_seconds}
    s1 = stage1_vectors(model, queries, stage1) @ stage1_vectors(model, collection, stage1).T
    rows = []
    for S in shortlists:
        S = min(int(S), C)
        _sync(queries.features)
        t0 = time.perf_counter()
        res = two_stage_search(model, queries, collection, S, S, stage1, backend, precision)   # keep all S
        _sync(queries.features)
        seconds = time.perf_counter() - t0
        found = (exh_idx.cpu()[:, :, None] == res.shortlist.cpu()[:, None, :]).any(-1).float().mean().item()
        composite = _ranking_matrix(res.indices.cpu(), s1.detach().double().cpu())
        m = mean_average_precision(composite, query_labels, collection_labels)
        mk = mean_average_precision(composite, query_labels, collection_labels, k)
        rows.append({"shortlist": S, "recall_at_k": found, "map": m, "map_at_k": mk, "map_lost": exh["map"] - m,
                     "map_at_k_lost": exh["map_at_k"] - mk, "seconds": seconds,
                     "speedup": exh_seconds / seconds if seconds > 0 else float("inf")})
    return {"k": k, "queries": Q, "collection": C, "direction": f"{queries.modality}2{collection.modality}",
            "stage1": stage1, "exhaustive": exh, "two_stage": rows}


def _ranking_matrix(head: torch.Tensor, stage1_scores: torch.Tensor) -> np.ndarray:
    """(Q, C) scores (minus the rank) of the ranking: ``head`` (Q, S) in its order, then every other item by
    the stage-1 score, descending, ties by index."""
    Q, C = stage1_scores.shape
    S = head.shape[1]
    rest_scores = stage1_scores.clone().scatter_(1, head, float("-inf"))
    rest = rest_scores.argsort(dim=1, descending=True, stable=True)[:, :C - S]
    order = torch.cat([head, rest], 1).numpy()
    scores = np.empty((Q, C))
    np.put_along_axis(scores, order, np.broadcast_to(-np.arange(C, dtype=np.float64), (Q, C)), axis=1)
    return scores


def _sync(t: torch.Tensor) -> None:
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


# --------------------------------------------------------------------------------------------------- index
def model_hash(model) -> str:
    """sha256 (16 hex digits) of the model's weights and buffers: names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def dataset_language(dataset) -> str:
    """The tokenizer language of a prepared dataset: its manifest's, "whitespace" for the synthetic dataset
    (its texts are lists of vocabulary words), English otherwise (Wiki)."""
    params = (dataset.manifest or {}).get("params", {}) or {}
    if params.get("language"):
        return str(params["language"])
    return "whitespace" if dataset.name == "synthetic" else "en"


def _split(dataset, split: str):
    from scanet.data.prepared import Split

    if split in ("train", "test"):
        return getattr(dataset, split)
    if split != "all":
        raise ValueError(f"split must be 'test', 'train' or 'all', got {split!r}")
    import scipy.sparse as sp

    a, b = dataset.train, dataset.test
    return Split(a.text_ids + b.text_ids, a.image_ids + b.image_ids, sp.vstack([a.bow, b.bow]).tocsr(),
                 np.concatenate([a.images, b.images]), np.concatenate([a.labels, b.labels]))


@torch.no_grad()
def _encode_texts(model, bow, batch_size: int) -> Items:
    """Texts from their bag-of-words counts, through text_features batch by batch (no dense (n, V) matrix)."""
    from scanet.data.text import text_features
    from scanet.fused._pair_scores import layer1_attention

    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        feats = torch.cat([model.encode_text(torch.as_tensor(text_features(bow[s:s + batch_size]), dtype=param.dtype,
                                                             device=param.device))
                           for s in range(0, bow.shape[0], batch_size)])
        att = layer1_attention(model, feats, "text") if model.coattention.num_layers >= 1 else None
    finally:
        model.train(was_training)
    return Items("text", feats, att)


def _record(items: Items, ids, labels, words=None) -> dict:
    return {"modality": items.modality, "ids": list(ids), "labels": np.asarray(labels),
            "features": items.features.detach().float().cpu(),
            "attention": None if items.attention is None else items.attention.detach().float().cpu(),
            "words": words}


def top_words(bow, vocab, n: int = 8) -> list[str]:
    """The n most frequent vocabulary words of each text (ties by vocabulary order), space separated: what a
    contact sheet shows of a text whose file is not at hand."""
    bow = bow.tocsr()
    out = []
    for r in range(bow.shape[0]):
        cols, vals = bow.indices[bow.indptr[r]:bow.indptr[r + 1]], bow.data[bow.indptr[r]:bow.indptr[r + 1]]
        order = np.lexsort((cols, -vals))[:n]
        out.append(" ".join(vocab[c] for c in cols[order]))
    return out


def _items(record: dict, device="cpu", dtype=torch.float32) -> Items:
    att = record["attention"]
    return Items(record["modality"], record["features"].to(device=device, dtype=dtype),
                 None if att is None else att.to(device=device, dtype=dtype))


def build_index(model, dataset, side: str, split: str = "test", *, root=None, stopwords=(), batch_size: int = 256,
                checkpoint=None) -> dict:
    """Encode one side of a split as the searchable collection (and the other side, so that an item of the
    split can be a query by its id). Everything a query needs except the model itself."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {sorted(SIDES)}, got {side!r}")
    s = _split(dataset, split)
    texts = _encode_texts(model, s.bow, batch_size)
    images = encode_items(model, "image", s.images, batch_size)
    t_rec = _record(texts, s.text_ids, s.labels, top_words(s.bow, dataset.vocab))
    i_rec = _record(images, s.image_ids, s.labels)
    collection, queries = (i_rec, t_rec) if side == "images" else (t_rec, i_rec)
    return {
        "format": INDEX_FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "side": side, "split": split,
        "model_hash": model_hash(model), "checkpoint": str(checkpoint) if checkpoint else None,
        "dataset_fingerprint": dataset.fingerprint, "dataset_name": dataset.name, "classes": list(dataset.classes),
        "common_dim": model.coattention.dim, "coattention_layers": model.coattention.num_layers,
        "collection": collection, "queries": queries,
        "vocab": list(dataset.vocab), "language": dataset_language(dataset), "stopwords": sorted(set(stopwords)),
        "root": str(Path(root).resolve()) if root else None,
    }


def save_index(index: dict, path) -> None:
    from scanet.train import save_checkpoint

    save_checkpoint(path, index)           # atomic write (temporary file, fsync, rename)


def load_index(path, model=None) -> dict:
    """Load an index; with ``model``, refuse it unless it was built by exactly these weights."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"search index not found: {path} (build one with `scanet search index`)")
    try:
        index = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for a truncated or foreign file
        raise ValueError(f"{path} is corrupt or not a search index ({type(e).__name__}: {e})") from e
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise ValueError(f"{path} is not a SCANet search index (format {INDEX_FORMAT!r} expected)")
    if model is not None:
        h = model_hash(model)
        if h != index["model_hash"]:
            raise ValueError(f"the index {path} was built with model {index['model_hash']} but this checkpoint is "
                             f"model {h}: scores would not be comparable; rebuild the index with this checkpoint")
    return index


# --------------------------------------------------------------------------------------------------- query
def query_tokenizer(language: str):
    """The training tokenizer of ``language`` WITHOUT its stop-word filter (stop words are reported apart)."""
    if language == "en":
        from scanet.data.text import english_tokenizer

        return english_tokenizer(())
    if language == "whitespace":
        return lambda text: text.lower().split()
    try:
        from scanet.data.languages import tokenizer_for
    except ImportError as e:
        raise ValueError(f"no tokenizer for language {language!r}") from e
    return tokenizer_for(language)


def prepare_query_text(text: str, vocab, language: str = "en", stopwords=()) -> dict:
    """Free text -> tokens (the dataset's tokenizer) -> known words, unknown words, ignored stop words, and the
    model's text input (text_features of the bag-of-words over the saved vocabulary). No known word: an error."""
    from scanet.data.text import bag_of_words, text_features

    tokens = query_tokenizer(language)(text)
    stop, vocab_set = set(stopwords), set(vocab)
    known = [w for w in tokens if w in vocab_set and w not in stop]
    unknown = sorted({w for w in tokens if w not in vocab_set and w not in stop})
    ignored = sorted({w for w in tokens if w in stop})
    if not known:
        raise ValueError(f"the query {text!r} has no word of the model's vocabulary ({len(vocab)} words)"
                         + (f"; unknown: {', '.join(unknown)}" if unknown else "")
                         + (f"; stop words ignored: {', '.join(ignored)}" if ignored else ""))
    features = text_features(bag_of_words([known], list(vocab)))
    return {"tokens": tokens, "known": known, "unknown_words": unknown, "stopwords_ignored": ignored,
            "features": features}


def class_name(classes, label) -> str:
    label = np.asarray(label)
    if label.ndim == 0:
        c = int(label)
        return classes[c] if 0 <= c < len(classes) else str(c)
    return ", ".join(classes[c] for c in np.flatnonzero(label)) or "-"


def _resolve_shortlist(shortlist, n: int, k: int) -> int:
    """0 = exhaustive. "auto": exhaustive up to AUTO_EXHAUSTIVE_MAX items, else max(20 k, 200)."""
    if shortlist in (None, "auto"):
        return 0 if n <= AUTO_EXHAUSTIVE_MAX else max(20 * k, 200)
    try:
        s = int(shortlist)
    except (TypeError, ValueError):
        raise ValueError(f"shortlist must be 'auto' or an integer >= 0, got {shortlist!r}") from None
    if s < 0:
        raise ValueError(f"shortlist must be 'auto' or an integer >= 0, got {s}")
    return s


@torch.no_grad()
def search_index(model, index: dict, *, text: str | None = None, text_id: str | None = None,
                 image_id: str | None = None, top_k: int = 10, shortlist="auto", stage1: str = "layer1",
                 precision: str = "fp32") -> dict:
    """One query (free text, or an item of the index's split by id) against the index's collection."""
    if sum(x is not None for x in (text, text_id, image_id)) != 1:
        raise ValueError("give exactly one of text, text_id, image_id")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    param = next(model.parameters())
    coll = index["collection"]
    want = "image" if (text is not None or text_id is not None) else "text"
    if coll["modality"] != want:
        q = "a text" if want == "image" else "an image"
        raise ValueError(f"this index holds {coll['modality']}s: {q} query needs an index built with "
                         f"--side {want}s")
    collection = _items(coll, param.device, param.dtype)
    info: dict = {}
    if text is not None:
        prep = prepare_query_text(text, index["vocab"], index.get("language", "en"), index.get("stopwords", ()))
        queries = encode_items(model, "text", prep["features"])
        info = {"kind": "free text", "text": text, "known_words": len(prep["known"]),
                "unknown_words": prep["unknown_words"], "stopwords_ignored": prep["stopwords_ignored"]}
    else:
        qrec = index["queries"]
        qid = text_id if text_id is not None else image_id
        try:
            pos = qrec["ids"].index(qid)
        except ValueError:
            raise ValueError(f"{qrec['modality']} id {qid!r} is not in the index ({index['split']} split of "
                             f"{index['dataset_name']}; ids look like {', '.join(qrec['ids'][:3])})") from None
        queries = _items(qrec, param.device, param.dtype).subset(slice(pos, pos + 1))
        info = {"kind": f"{qrec['modality']} id", "id": qid,
                "class": class_name(index["classes"], qrec["labels"][pos])}
        if qrec.get("words"):
            info["words"] = qrec["words"][pos]
    S = _resolve_shortlist(shortlist, len(collection), top_k)
    if S == 0 or S >= len(collection):
        res, mode = exhaustive_search(model, queries, collection, top_k, precision), "exhaustive"
    else:
        res = two_stage_search(model, queries, collection, top_k, S, stage1, precision=precision)
        mode = f"two-stage ({stage1} shortlist of {S})"
    results = []
    for r, (i, logit) in enumerate(zip(res.indices[0].tolist(), res.logits[0].tolist())):
        results.append({"rank": r + 1, "id": coll["ids"][i], "index": i, "logit": logit,
                        "similarity": float(torch.sigmoid(torch.tensor(logit, dtype=torch.float64))),
                        "class": class_name(index["classes"], coll["labels"][i])})
        if coll.get("words"):
            results[-1]["words"] = coll["words"][i]
    return {"query": info, "collection": {"modality": coll["modality"], "size": len(collection),
                                          "dataset": index["dataset_name"], "split": index["split"]},
            "mode": mode, "results": results}


# ---------------------------------------------------------------------------------------------- contact sheet
def _safe_id(item_id: str) -> bool:
    return bool(item_id) and item_id not in (".", "..") and not any(c in item_id for c in "/\\\0")


def find_image_file(root, image_id: str, category: str | None = None) -> Path | None:
    """The image file of an item if it exists: ROOT/images/<category>/<id>.<ext>, then ROOT/images/<id>.<ext>
    (ext: jpg, jpeg, png, either case). None when there is no root or no such file."""
    if not root or not _safe_id(str(image_id)):
        return None
    base = Path(root) / "images"
    dirs = ([base / category] if category and _safe_id(category) else []) + [base]
    for d in dirs:
        for ext in IMAGE_EXTENSIONS:
            p = d / f"{image_id}{ext}"
            if p.is_file():
                return p
    return None


def find_text_snippet(root, text_id: str, chars: int = 180) -> str | None:
    """The first characters of ROOT/texts/<id>.xml or .txt (markup removed), if the file exists."""
    import html
    import re

    if not root or not _safe_id(str(text_id)):
        return None
    for ext in (".xml", ".txt"):
        p = Path(root) / "texts" / f"{text_id}{ext}"
        if p.is_file():
            raw = p.read_text(encoding="utf-8", errors="replace")
            body = re.search(r"<text>(.*?)</text>", raw, re.DOTALL)
            txt = html.unescape(re.sub(r"<[^>]{0,200}>", " ", body.group(1) if body else raw))
            txt = " ".join(txt.split())
            return txt[:chars] + ("..." if len(txt) > chars else "")
    return None


def contact_sheet(result: dict, path, root=None, columns: int = 5) -> Path:
    """A PNG grid: the query, then each result (rank, id, class, similarity). Images are drawn where
    find_image_file finds a file under ``root``, otherwise (and for texts) a text tile."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tiles = []
    q = result["query"]
    if q["kind"] == "free text":
        tiles.append(("query (free text)", textwrap.shorten(q["text"], 160), None))
    else:
        qmod = "image" if q["kind"].startswith("image") else "text"
        img = find_image_file(root, q["id"], q.get("class")) if qmod == "image" else None
        body = (find_text_snippet(root, q["id"]) or q.get("words", "")) if qmod == "text" else "(no image file)"
        tiles.append((f"query: {qmod} {q['id']}\n{q.get('class', '')}", body, img))
    modality = result["collection"]["modality"]
    for r in result["results"]:
        title = f"#{r['rank']} {r['id']}  {r['similarity']:.3f}\n{r['class']}"
        if modality == "image":
            tiles.append((title, "(no image file)", find_image_file(root, r["id"], r["class"])))
        else:
            tiles.append((title, find_text_snippet(root, r["id"]) or r.get("words", ""), None))
    cols = max(1, min(columns, len(tiles)))
    rows = -(-len(tiles) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, body, img) in zip(axes.flat, tiles):
        ax.set_title(title, fontsize=8)
        if img is not None:
            try:
                ax.imshow(plt.imread(img))
                continue
            except Exception:  # an unreadable image file: fall back to a text tile
                body = f"(unreadable image {Path(img).name})"
        ax.add_patch(plt.Rectangle((0, 0), 1, 1, transform=ax.transAxes, facecolor="#f2f2f2", edgecolor="#999999"))
        ax.text(0.5, 0.5, textwrap.fill(body, 28), ha="center", va="center", fontsize=7, transform=ax.transAxes,
                wrap=True)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------------ CLI
def cmd_index(args) -> None:
    from scanet.cli import load_dataset
    from scanet.config import get_preset
    from scanet.data.text import read_stopwords
    from scanet.train import load_checkpoint, load_model, preset_from_dict

    state = load_checkpoint(args.checkpoint)
    preset = get_preset(args.preset) if args.preset else preset_from_dict(state["preset"])
    dataset = load_dataset(args, preset)
    model, _ = load_model(state, dataset, device=args.device)
    stop_file = Path(args.root) / "stopwords.txt" if args.root else None
    stopwords = read_stopwords(stop_file) if stop_file is not None and stop_file.is_file() else ()
    t0 = time.perf_counter()
    index = build_index(model, dataset, args.side, args.split, root=args.root, stopwords=stopwords,
                        batch_size=args.batch_size, checkpoint=args.checkpoint)
    save_index(index, args.out)
    print(f"indexed {len(index['collection']['ids'])} {args.side} ({dataset.name}, {args.split} split) with model "
          f"{index['model_hash']} in {time.perf_counter() - t0:.1f} s -> {args.out}")


def cmd_query(args) -> None:
    from scanet.train import load_checkpoint, load_model

    model, _ = load_model(load_checkpoint(args.checkpoint), None, device=args.device)
    model.eval()
    index = load_index(args.index, model)
    result = search_index(model, index, text=args.text, text_id=args.text_id, image_id=args.image_id,
                          top_k=args.top_k, shortlist=args.shortlist, stage1=args.stage1, precision=args.precision)
    root = args.root or index.get("root")
    if args.contact_sheet:
        result["contact_sheet"] = str(contact_sheet(result, args.contact_sheet, root))
    if args.json:
        print(json.dumps(result, indent=1))
        return
    q = result["query"]
    if q["kind"] == "free text":
        print(f"query: free text {q['text']!r} ({q['known_words']} known words)")
        if q["unknown_words"]:
            print(f"unknown words (not in the model's vocabulary, ignored): {', '.join(q['unknown_words'])}")
        if q["stopwords_ignored"]:
            print(f"stop words ignored: {', '.join(q['stopwords_ignored'])}")
    else:
        print(f"query: {q['kind']} {q['id']} ({q['class']})")
    c = result["collection"]
    print(f"searched {c['size']} {c['modality']}s ({c['dataset']}, {c['split']} split), {result['mode']}")
    print(f"{'rank':>4}  {c['modality'] + ' id':<16} {'similarity':>10} {'logit':>10}  class")
    for r in result["results"]:
        print(f"{r['rank']:>4}  {r['id']:<16} {r['similarity']:>10.6f} {r['logit']:>10.4f}  {r['class']}")
    if args.contact_sheet:
        print(f"contact sheet: {result['contact_sheet']}")


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("search", help="index one side of a dataset and query it (text <-> image)",
                              description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="search_command", required=True)

    pi = sub.add_parser("index", help="encode the images (or texts) of a split into a search index")
    pi.add_argument("--checkpoint", required=True, help="a training checkpoint (runs/<preset>/last.pt)")
    pi.add_argument("--preset", help="dataset preset to load (default: the checkpoint's)")
    pi.add_argument("--root", help="raw data directory of the dataset (also where contact sheets find images)")
    pi.add_argument("--data", help="an already prepared dataset folder (instead of --root)")
    pi.add_argument("--prepared-dir", default="prepared", help="where prepared datasets are cached")
    pi.add_argument("--side", required=True, choices=sorted(SIDES), help="what the index holds (and returns)")
    pi.add_argument("--split", default="test", choices=["test", "train", "all"])
    pi.add_argument("--out", required=True, help="the index file to write (.pt)")
    pi.add_argument("--device", default="cpu")
    pi.add_argument("--batch-size", type=int, default=256, help="items encoded at a time")
    pi.set_defaults(func=cmd_index)

    pq = sub.add_parser("query", help="top-k of one query against an index")
    pq.add_argument("--index", required=True)
    pq.add_argument("--checkpoint", required=True, help="the checkpoint the index was built with")
    g = pq.add_mutually_exclusive_group(required=True)
    g.add_argument("--text", help="free text (tokenized as the training texts; images index)")
    g.add_argument("--text-id", help="a text of the indexed split, by id (images index)")
    g.add_argument("--image-id", help="an image of the indexed split, by id (texts index)")
    pq.add_argument("--top-k", type=int, default=10)
    pq.add_argument("--shortlist", default="auto",
                    help=f"two-stage shortlist size; 0 = exhaustive; auto = exhaustive up to {AUTO_EXHAUSTIVE_MAX} "
                         "items, else max(20 k, 200)")
    pq.add_argument("--stage1", default="layer1", choices=STAGE1, help="the shortlist's score")
    pq.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"],
                    help="GEMM inputs of the fused scorer (CUDA only)")
    pq.add_argument("--contact-sheet", help="write a PNG of the query and its results")
    pq.add_argument("--root", help="raw data directory for image files (default: the index's --root)")
    pq.add_argument("--device", default="cpu")
    pq.add_argument("--json", action="store_true", help="print the result as JSON")
    pq.set_defaults(func=cmd_query)
