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

Protocols (``PROTOCOLS``, ``evaluate_protocols``): "standard" ranks the test split of the other modality and
reports MAP@all (and MAP@50); "paper" ranks the training split of the other modality and reports MAP@100
normalized by the relevant items retrieved, as the SCANet authors' group's public code does. Their numbers are
not comparable: every table labels which protocol a figure comes from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch

from scanet.precision import autocast_context

if TYPE_CHECKING:
    from scanet.data.prepared import PreparedDataset, Split
    from scanet.model import SCANet

# Scores and labels: a torch tensor (any device) or anything numpy reads; labels are class indices or multi-hot rows.
ArrayLike = torch.Tensor | npt.ArrayLike


def _np(a: ArrayLike) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def relevance(query_labels: ArrayLike, candidate_labels: ArrayLike) -> np.ndarray:
    q, c = _np(query_labels), _np(candidate_labels)
    if q.ndim != c.ndim or q.ndim not in (1, 2):
        raise ValueError(f"labels must both be (n,) class indices or (n, C) multi-hot, got {q.shape} and {c.shape}")
    if q.ndim == 1:
        return q[:, None] == c[None, :]
    if q.shape[1] != c.shape[1]:
        raise ValueError(f"multi-hot labels disagree on the number of classes: {q.shape[1]} vs {c.shape[1]}")
    return (q.astype(np.float32) @ c.astype(np.float32).T) > 0


def ranked_relevance(
    scores: ArrayLike, query_labels: ArrayLike, candidate_labels: ArrayLike, k: int | None = None
) -> np.ndarray:
    """(Q, k or Nc) boolean: is the candidate at each rank relevant to the query."""
    s = _np(scores).astype(np.float64)
    rel = relevance(query_labels, candidate_labels)
    if s.shape != rel.shape:
        raise ValueError(
            f"scores have shape {s.shape} but there are {rel.shape[0]} queries and {rel.shape[1]} candidates"
        )
    if np.isnan(s).any():
        raise ValueError("scores contain NaN: the model diverged or its input has NaN")
    order = np.argsort(-s, axis=1, kind="stable")
    if k is not None:
        order = order[:, :k]
    return np.take_along_axis(rel, order, axis=1)


def average_precisions(
    scores: ArrayLike,
    query_labels: ArrayLike,
    candidate_labels: ArrayLike,
    k: int | None = None,
    k_normalization: str = "min_r_k",
) -> np.ndarray:
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


def mean_average_precision(
    scores: ArrayLike,
    query_labels: ArrayLike,
    candidate_labels: ArrayLike,
    k: int | None = None,
    k_normalization: str = "min_r_k",
) -> float:
    """MAP of ranking every candidate for every query (rows of ``scores`` are queries)."""
    ap = average_precisions(scores, query_labels, candidate_labels, k, k_normalization)
    if np.isnan(ap).all():
        raise ValueError("no query has a relevant candidate: MAP is undefined")
    return float(np.nanmean(ap))


def precision_at_k(scores: ArrayLike, query_labels: ArrayLike, candidate_labels: ArrayLike, k: int) -> float:
    hits = ranked_relevance(scores, query_labels, candidate_labels, k)
    return float(hits.mean())


def precision_recall_curve(
    scores: ArrayLike, query_labels: ArrayLike, candidate_labels: ArrayLike, points: int = 11
) -> tuple[list[float], list[float]]:
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


def retrieval_report(
    scores: ArrayLike, text_labels: ArrayLike, image_labels: ArrayLike, ks: Sequence[int] = (10, 50, 100)
) -> dict:
    """Both directions from one (Nt, Ni) text-image score matrix: text->image uses rows, image->text columns."""
    s = _np(scores)
    report: dict[str, Any] = {}
    for direction, mat, ql, cl in (
        ("text2image", s, text_labels, image_labels),
        ("image2text", s.T, image_labels, text_labels),
    ):
        rec, prec = precision_recall_curve(mat, ql, cl)
        report[direction] = {
            "map": mean_average_precision(mat, ql, cl),
            **{f"map@{k}": mean_average_precision(mat, ql, cl, k) for k in ks},
            **{f"p@{k}": precision_at_k(mat, ql, cl, k) for k in ks},
            "pr_curve": {"recall": rec, "precision": prec},
        }
    report["mean_map"] = (report["text2image"]["map"] + report["image2text"]["map"]) / 2
    return report


# ------------------------------------------------------------------------------------------------ protocols
@dataclass(frozen=True)
class Protocol:
    """Which candidates a test query ranks, and which MAP summarizes the ranking.

    standard   the Wiki cross-modal literature: test queries against the TEST split of the other modality,
               MAP@all (AP normalized by all R relevant candidates), MAP@50 beside it.
    paper      the SCANet authors' group's public evaluation code (SCKR, rn_model, keras_gcn; no SCANet code
               is public): test queries against the TRAINING split of the other modality, MAP@100 with AP
               divided by the relevant items found in the top 100 (``k_normalization="retrieved"``). A query
               that finds relevant items anywhere in its top 100 can score 1 with a single early hit, and the
               candidate pool is 3x larger, so its numbers are much higher than the standard protocol's and
               the two must never share a table column.
    """

    name: str
    candidates: str  # "test" or "train": the split the candidates come from
    k: int | None  # None: MAP@all
    k_normalization: str
    extra_ks: tuple = ()

    @property
    def metric(self) -> str:
        return "map" if self.k is None else f"map@{self.k}"

    @property
    def label(self) -> str:
        what = (
            "MAP@all"
            if self.k is None
            else (f"MAP@{self.k}" + (" (AP / relevant retrieved)" if self.k_normalization == "retrieved" else ""))
        )
        return f"{what}, test queries vs {self.candidates} candidates"


PROTOCOLS = {
    "standard": Protocol("standard", "test", None, "min_r_k", extra_ks=(50,)),
    "paper": Protocol("paper", "train", 100, "retrieved"),
}


def get_protocols(names: str | Sequence[str]) -> list[Protocol]:
    """``"both"``, one name, or a list of names -> Protocol objects (a clear error for an unknown name)."""
    if isinstance(names, str):
        names = list(PROTOCOLS) if names == "both" else [names]
    unknown = [n for n in names if n not in PROTOCOLS]
    if unknown:
        raise ValueError(f"unknown evaluation protocol {unknown[0]!r}; choose one of {', '.join(PROTOCOLS)} or 'both'")
    return [PROTOCOLS[n] for n in names]


def protocol_inputs(
    protocol: Protocol, scores: Callable[[str, str], ArrayLike], dataset: PreparedDataset
) -> tuple[ArrayLike, ArrayLike, ArrayLike, ArrayLike, ArrayLike, ArrayLike]:
    """``protocol_report``'s six arrays under ``protocol``: test texts x candidate images, test labels, candidate
    labels, test images x candidate texts, test labels, candidate labels. ``scores(text split, image split)``
    ("test" / "train") gives a (texts, images) matrix; the image->text one is the (candidate texts, test images)
    matrix transposed. The one place that says which matrix serves which direction."""
    c, test = protocol.candidates, dataset.test
    cand = getattr(dataset, c)
    return scores("test", c), test.labels, cand.labels, _np(scores(c, "test")).T, test.labels, cand.labels


def protocol_report(
    protocol: Protocol,
    text2image_scores: ArrayLike,
    text_query_labels: ArrayLike,
    image_candidate_labels: ArrayLike,
    image2text_scores: ArrayLike,
    image_query_labels: ArrayLike,
    text_candidate_labels: ArrayLike,
) -> dict:
    """MAP of both directions under ``protocol`` from two score matrices (rows are the test queries).

    text2image_scores: (test texts, candidate images); image2text_scores: (test images, candidate texts).
    Returns {"protocol", "label", "text2image": {metric: ...}, "image2text": {...}, "mean": headline mean}.
    """
    out: dict[str, Any] = {"protocol": protocol.name, "label": protocol.label, "metric": protocol.metric}
    for direction, s, ql, cl in (
        ("text2image", text2image_scores, text_query_labels, image_candidate_labels),
        ("image2text", image2text_scores, image_query_labels, text_candidate_labels),
    ):
        row = {protocol.metric: mean_average_precision(s, ql, cl, protocol.k, protocol.k_normalization)}
        for k in protocol.extra_ks:
            row[f"map@{k}"] = mean_average_precision(s, ql, cl, k)
        out[direction] = row
    out["mean"] = (out["text2image"][protocol.metric] + out["image2text"][protocol.metric]) / 2
    return out


def evaluate_protocols(
    score_fn: Callable[[Split, Split], ArrayLike],
    dataset: PreparedDataset,
    protocols: str | Sequence[str] = "both",
    known: dict[tuple[str, str], ArrayLike | None] | None = None,
    scores_out: dict[tuple[str, str], np.ndarray] | None = None,
) -> dict:
    """Evaluate a scorer under each protocol. ``score_fn(text_split, image_split)`` returns the
    (texts of text_split, images of image_split) score matrix; higher = more similar.

    The standard protocol needs one test x test matrix; the paper protocol two more (test texts x training
    images, training texts x test images). ``known`` maps (text split, image split) names to score matrices
    already computed (e.g. {("test", "test"): the scores evaluate_model returned}), so they are not computed again.
    ``scores_out``, a dict, receives every matrix used, keyed the same way (for ``compare_protocols``).
    Returns {protocol name: protocol_report}.
    """
    reports = {}
    cache = scores_out if scores_out is not None else {}
    cache.update({k: _np(v) for k, v in (known or {}).items() if v is not None})

    def scores(text_split: str, image_split: str) -> np.ndarray:
        if (text_split, image_split) not in cache:
            cache[text_split, image_split] = _np(score_fn(getattr(dataset, text_split), getattr(dataset, image_split)))
        return cache[text_split, image_split]

    for p in get_protocols(protocols):
        reports[p.name] = protocol_report(p, *protocol_inputs(p, scores, dataset))
    return reports


def model_scorer(
    model: SCANet, chunk_size: int = 64, progress: bool = False, precision: str = "fp32"
) -> Callable[[Split, Split], np.ndarray]:
    """``score_fn`` for evaluate_protocols: the model's logits of every (text, image) pair of two splits,
    scored under ``autocast_context(precision)`` (the logits stay float32)."""
    from scanet.inputs import as_model_tensor, image_input, text_input

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    config = model.config

    def score(text_split: Split, image_split: Split) -> np.ndarray:
        texts = as_model_tensor(text_input(text_split, config), device, dtype)
        images = as_model_tensor(image_input(image_split, config), device, dtype)
        with autocast_context(device, precision):
            out = model.score_all(texts, images, chunk_size=chunk_size, progress=progress, logits=True)
        return out.cpu().numpy()

    return score


def ensemble_scorer(score_fns: Sequence[Callable[[Split, Split], ArrayLike]]) -> Callable[[Split, Split], np.ndarray]:
    """``score_fn`` of an ensemble: the mean of the members' score matrices (for model_scorer members, their
    logits), for evaluate_protocols like one model's.

    Why an ensemble at all: on Eng-Wiki each seed's errors are largely its own, and the mean of six seeds' logits
    gains 0.0155 mean MAP over one seed (three: 0.012; README, "Another machine, and ensembles"). Why the logits'
    mean: the sigmoid's mean and the mean of per-model z-scores ranked the same there (within 0.0001).
    """
    members = list(score_fns)
    if not members:
        raise ValueError("an ensemble needs at least one scorer")

    def score(text_split: Split, image_split: Split) -> np.ndarray:
        total = _np(members[0](text_split, image_split)).astype(np.float64)
        for member in members[1:]:
            total += _np(member(text_split, image_split))
        return (total / len(members)).astype(np.float32)

    return score


def evaluate_model(
    model: SCANet,
    dataset: PreparedDataset,
    split: str = "test",
    chunk_size: int = 64,
    device: str | torch.device | None = None,
    progress: bool = False,
    precision: str = "fp32",
) -> tuple[dict, np.ndarray]:
    """Score every test text against every test image with ``model.score_all`` and report MAP both ways.

    Ranks by the logits (the similarity's ranking without float32 sigmoid saturation); returns them too.
    ``precision``: scoring under ``scanet.precision.autocast_context`` ("bf16": the layer-2 GEMMs on AMX).
    """
    from scanet.inputs import model_inputs

    s = getattr(dataset, split)
    device = device or next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    dataset.require_inputs(model.config)
    texts, images = model_inputs(s, model.config, device, dtype, where=f"{dataset.name!r} {split} split")
    with autocast_context(device, precision):
        logits = model.score_all(texts, images, chunk_size=chunk_size, progress=progress, logits=True)
    scores = logits.cpu().numpy()
    return retrieval_report(scores, s.labels, s.labels), scores
