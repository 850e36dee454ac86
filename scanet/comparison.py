"""Is one method above another? The paired bootstrap over test queries of a MAP difference.

``paired_bootstrap`` resamples per-query AP differences; ``compare_protocols`` applies it to two methods' score
matrices under each evaluation protocol (scanet.evaluate), both directions and their mean from one set of
resamples. ``scanet train`` and ``scanet evaluate --baseline`` report it for the model against each baseline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from scanet.evaluate import ArrayLike, Protocol, _np, average_precisions, get_protocols, protocol_inputs

if TYPE_CHECKING:
    from scanet.data.prepared import PreparedDataset


def paired_bootstrap(
    ap_a: ArrayLike, ap_b: ArrayLike, n_resamples: int = 10_000, seed: int = 0, confidence: float = 0.95
) -> dict:
    """How sure "method a is above method b" is: the paired bootstrap over test queries of the MAP difference.

    ap_a, ap_b: the per-query APs (``average_precisions``) of two methods on the same queries and candidates,
    shape (n,) or (n, d). With d columns, row i of every column belongs to the same test item (a paired
    dataset's text i and image i), one resample draws items, and the statistic is the mean over the columns of
    each column's MAP difference: two columns (text->image, image->text) give the difference of "mean MAP".
    NaN (a query without a relevant candidate) is left out of its column's mean, as in
    ``mean_average_precision``, and must sit at the same places in both.

    Why resample queries, paired: the candidates are fixed and both methods rank them for the same queries, so
    the per-query differences carry the comparison (a query that is hard for one is usually hard for the other,
    which a comparison of two separate intervals would ignore). What it does not cover: the spread between
    training seeds; one model's interval says nothing about another seed's run (README, "Is it above?").

    Returns {"difference": MAP(a) - MAP(b) on the queries as they are, "ci": [lo, hi], the percentile interval
    at ``confidence``, "fraction_above": the share of resamples in which a's MAP is higher, "queries": n,
    "n_resamples", "seed", "confidence"}. Deterministic for a seed.
    """
    return _paired_bootstrap(ap_a, ap_b, n_resamples, seed, confidence)["mean"]


def _paired_bootstrap(
    ap_a: ArrayLike, ap_b: ArrayLike, n_resamples: int, seed: int, confidence: float = 0.95
) -> dict[str, Any]:
    """paired_bootstrap's work: {"mean": its result, "columns": the same summary of each column alone}, all
    from one set of resamples (what compare_protocols reports per direction and for their mean)."""
    a, b = np.asarray(_np(ap_a), dtype=np.float64), np.asarray(_np(ap_b), dtype=np.float64)
    if a.shape != b.shape or a.ndim not in (1, 2) or a.shape[0] == 0:
        raise ValueError(
            f"paired_bootstrap needs two per-query AP arrays of one shape (n,) or (n, d), n > 0; got {a.shape} "
            f"and {b.shape}"
        )
    if not np.array_equal(np.isnan(a), np.isnan(b)):
        raise ValueError("the two AP arrays have NaN (queries without a relevant candidate) at different places")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    a2, b2 = (a[:, None], b[:, None]) if a.ndim == 1 else (a, b)
    valid = ~np.isnan(a2)
    if not valid.any(axis=0).all():
        raise ValueError("a column of the AP arrays has no query with a relevant candidate: MAP is undefined")
    diff = np.where(valid, a2 - b2, 0.0)
    n = diff.shape[0]

    def column_differences(d: np.ndarray, v: np.ndarray) -> np.ndarray:  # (..., n, cols) -> (..., cols)
        with np.errstate(invalid="ignore", divide="ignore"):
            return d.sum(axis=-2) / v.sum(axis=-2)

    rng = np.random.default_rng(seed)
    block = max(1, 4_000_000 // (n * diff.shape[1]))  # resamples per draw: a bounded index array
    stats = []
    for start in range(0, n_resamples, block):
        idx = rng.integers(0, n, size=(min(block, n_resamples - start), n))
        stats.append(column_differences(diff[idx], valid[idx]))
    boot = np.concatenate(stats)  # (n_resamples, cols)
    point = column_differences(diff, valid)
    tail = (1.0 - confidence) / 2 * 100

    def summary(value: float, resampled: np.ndarray) -> dict[str, Any]:
        resampled = resampled[np.isfinite(resampled)]  # a resample that drew no valid query of a column: no MAP
        lo, hi = np.percentile(resampled, [tail, 100 - tail])
        return {
            "difference": float(value),
            "ci": [float(lo), float(hi)],
            "confidence": confidence,
            "fraction_above": float((resampled > 0).mean()),
            "queries": int(n),
            "n_resamples": int(n_resamples),
            "seed": int(seed),
        }

    return {
        "mean": summary(point.mean(), boot.mean(axis=1)),
        "columns": [summary(point[c], boot[:, c]) for c in range(boot.shape[1])],
    }


def protocol_average_precisions(
    protocol: Protocol, scores: dict[tuple[str, str], ArrayLike], dataset: PreparedDataset
) -> dict[str, np.ndarray]:
    """Each test query's AP under ``protocol``, both directions, from the score matrices ``evaluate_protocols``
    used (its ``scores_out``: {(text split, image split): matrix}). Returns {"text2image": (n,), "image2text": (n,)}."""

    def matrix(text_split: str, image_split: str) -> ArrayLike:
        if (text_split, image_split) not in scores:
            raise ValueError(f"no {text_split} x {image_split} score matrix for the {protocol.name} protocol")
        return scores[text_split, image_split]

    t2i, text_queries, image_candidates, i2t, image_queries, text_candidates = protocol_inputs(
        protocol, matrix, dataset
    )
    k, normalization = protocol.k, protocol.k_normalization
    return {
        "text2image": average_precisions(t2i, text_queries, image_candidates, k, normalization),
        "image2text": average_precisions(i2t, image_queries, text_candidates, k, normalization),
    }


def compare_protocols(
    scores_a: dict[tuple[str, str], ArrayLike],
    scores_b: dict[tuple[str, str], ArrayLike],
    dataset: PreparedDataset,
    protocols: str | Sequence[str] = "both",
    n_resamples: int = 10_000,
    seed: int = 0,
) -> dict:
    """Method a minus method b under each protocol, with ``paired_bootstrap`` intervals, from the two methods'
    score matrices (``evaluate_protocols(..., scores_out=...)`` of each). Returns {protocol name:
    {"metric", "text2image": bootstrap, "image2text": bootstrap, "mean": bootstrap of the two directions' mean}}."""
    out: dict[str, Any] = {}
    for p in get_protocols(protocols):
        ap_a, ap_b = (
            protocol_average_precisions(p, scores_a, dataset),
            protocol_average_precisions(p, scores_b, dataset),
        )
        directions = ("text2image", "image2text")
        both = _paired_bootstrap(
            np.stack([ap_a[d] for d in directions], axis=1),
            np.stack([ap_b[d] for d in directions], axis=1),
            n_resamples,
            seed,
        )
        out[p.name] = {"metric": p.metric, **dict(zip(directions, both["columns"], strict=True)), "mean": both["mean"]}
    return out
