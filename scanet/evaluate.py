"""Retrieval metrics (MAP@all, MAP@k, precision@k, precision-recall) and model evaluation.

Ranking: the whole candidate set by score, descending; ties broken by candidate index, ascending (a stable
sort), so results never depend on the sort algorithm.

AP of a query with R relevant candidates: (1/R) * sum over the ranks r of relevant candidates of P@r, the
definition used throughout the Wiki cross-modal literature (MAP@all). MAP@k truncates the ranking at k and
normalizes by min(R, k), so a perfect top-k scores 1; ``k_normalization="retrieved"`` divides by the number of
relevant items found in the top k instead (the convention of some public code, e.g. DCMH's calc_map).
Queries with no relevant candidate are left out of the mean (their AP is undefined) and counted.

Relevance: labels of shape (n,) are class indices (relevant = same class); labels of shape (n, C) are
multi-hot (relevant = sharing at least one label).
"""
from __future__ import annotations

import numpy as np
import torch


def _np(a) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def relevance(query_labels, candidate_labels) -> np.ndarray:
    q, c = _np(query_labels), _np(candidate_labels)
    if q.ndim != c.ndim or q.ndim not in (1, 2):
        raise ValueError(f"labels must both be (n,) class indices or (n, C) multi-hot, got {q.shape} and {c.shape}")
    if q.ndim == 1:
        return q[:, None] == c[None, :]
    if q.shape[1] != c.shape[1]:
        raise ValueError(f"multi-hot labels disagree on the number of classes: {q.shape[1]} vs {c.shape[1]}")
    return (q.astype(np.float32) @ c.astype(np.float32).T) > 0


def ranked_relevance(scores, query_labels, candidate_labels, k: int | None = None) -> np.ndarray:
    """(Q, k or Nc) boolean: is the candidate at each rank relevant to the query."""
    s = _np(scores).astype(np.float64)
    rel = relevance(query_labels, candidate_labels)
    if s.shape != rel.shape:
        raise ValueError(f"scores have shape {s.shape} but there are {rel.shape[0]} queries and "
                         f"{rel.shape[1]} candidates")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN: the model diverged or its input has NaN")
    order = np.argsort(-s, axis=1, kind="stable")
    if k is not None:
        order = order[:, :k]
    return np.take_along_axis(rel, order, axis=1)


def average_precisions(scores, query_labels, candidate_labels, k: int | None = None,
                       k_normalization: str = "min_r_k") -> np.ndarray:
    """AP of each query (NaN where the query has no relevant candidate)."""
    rel_all = relevance(query_labels, candidate_labels)
    R = rel_all.sum(axis=1).astype(np.float64)
    hits = ranked_relevance(scores, query_labels, candidate_labels, k)
    ranks = np.arange(1, hits.shape[1] + 1)
    prec = np.cumsum(hits, axis=1) / ranks
    summed = (prec * hits).sum(axis=1)
    if k is None:
        denom = R
    elif k_normalization == "min_r_k":
        denom = np.minimum(R, k)
    elif k_normalization == "retrieved":
        denom = hits.sum(axis=1).astype(np.float64)
    else:
        raise ValueError(f"k_normalization must be 'min_r_k' or 'retrieved', got {k_normalization!r}")
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = np.where(denom > 0, summed / np.maximum(denom, 1), 0.0)
    ap[R == 0] = np.nan
    return ap


def mean_average_precision(scores, query_labels, candidate_labels, k: int | None = None,
                           k_normalization: str = "min_r_k") -> float:
    """MAP of ranking every candidate for every query (rows of ``scores`` are queries)."""
    ap = average_precisions(scores, query_labels, candidate_labels, k, k_normalization)
    if np.isnan(ap).all():
        raise ValueError("no query has a relevant candidate: MAP is undefined")
    return float(np.nanmean(ap))


def precision_at_k(scores, query_labels, candidate_labels, k: int) -> float:
    hits = ranked_relevance(scores, query_labels, candidate_labels, k)
    return float(hits.mean())


def precision_recall_curve(scores, query_labels, candidate_labels, points: int = 11):
    """Mean interpolated precision at ``points`` recall levels 0, 0.1, ..., 1 (queries with R > 0)."""
    hits = ranked_relevance(scores, query_labels, candidate_labels)
    R = hits.sum(axis=1)
    keep = R > 0
    hits, R = hits[keep], R[keep]
    tp = np.cumsum(hits, axis=1)
    prec = tp / np.arange(1, hits.shape[1] + 1)
    rec = tp / R[:, None]
    # Interpolated precision: the best precision at any recall >= r.
    prec_interp = np.maximum.accumulate(prec[:, ::-1], axis=1)[:, ::-1]
    levels = np.linspace(0, 1, points)
    out = []
    for r in levels:
        idx = np.argmax(rec >= r - 1e-12, axis=1)
        out.append(float(prec_interp[np.arange(len(idx)), idx].mean()))
    return levels.tolist(), out


def retrieval_report(scores, text_labels, image_labels, ks=(10, 50, 100)) -> dict:
    """Both directions from one (Nt, Ni) text-image score matrix: text->image uses rows, image->text columns."""
    s = _np(scores)
    report = {}
    for direction, mat, ql, cl in (("text2image", s, text_labels, image_labels),
                                   ("image2text", s.T, image_labels, text_labels)):
        rec, prec = precision_recall_curve(mat, ql, cl)
        report[direction] = {
            "map": mean_average_precision(mat, ql, cl),
            **{f"map@{k}": mean_average_precision(mat, ql, cl, k) for k in ks},
            **{f"p@{k}": precision_at_k(mat, ql, cl, k) for k in ks},
            "pr_curve": {"recall": rec, "precision": prec},
        }
    report["mean_map"] = (report["text2image"]["map"] + report["image2text"]["map"]) / 2
    return report


def evaluate_model(model, dataset, split: str = "test", chunk_size: int = 64, device=None,
                   progress: bool = False) -> tuple[dict, np.ndarray]:
    """Score every test text against every test image with ``model.score_all`` and report MAP both ways.

    Ranks by the logits (the similarity's ranking without float32 sigmoid saturation); returns them too.
    """
    s = getattr(dataset, split)
    device = device or next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    texts = torch.as_tensor(s.text_matrix(), device=device, dtype=dtype)
    images = torch.as_tensor(s.images, device=device, dtype=dtype)
    scores = model.score_all(texts, images, chunk_size=chunk_size, progress=progress, logits=True).cpu().numpy()
    return retrieval_report(scores, s.labels, s.labels), scores
