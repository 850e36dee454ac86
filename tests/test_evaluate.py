"""MAP and friends against hand-computed cases."""

import numpy as np
import pytest

from scanet.evaluate import (
    average_precisions,
    mean_average_precision,
    precision_at_k,
    precision_recall_curve,
    retrieval_report,
)


def test_map_hand_computed():
    # one query, candidates ranked by score: relevant at ranks 1, 3 (R = 2): AP = (1/1 + 2/3) / 2
    scores = np.array([[0.9, 0.8, 0.7, 0.1]])
    q = np.array([0])
    c = np.array([0, 1, 0, 1])
    assert mean_average_precision(scores, q, c) == pytest.approx((1 + 2 / 3) / 2)
    # two queries: the second ranks its relevant items at 2 and 4: AP = (1/2 + 2/4) / 2 = 0.5
    scores2 = np.array([[0.9, 0.8, 0.7, 0.1], [0.9, 0.8, 0.7, 0.1]])
    q2 = np.array([0, 1])
    assert mean_average_precision(scores2, q2, c) == pytest.approx(((1 + 2 / 3) / 2 + 0.5) / 2)


def test_ties_break_by_candidate_index():
    scores = np.array([[0.5, 0.5, 0.5]])
    # candidate 0 is irrelevant, 1 and 2 relevant: ranks 2 and 3 -> AP = (1/2 + 2/3) / 2
    assert mean_average_precision(scores, [1], [0, 1, 1]) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert mean_average_precision(scores, [0], [0, 1, 1]) == pytest.approx(1.0)


def test_map_at_k_and_precision_at_k():
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5]])
    c = np.array([1, 0, 1, 0, 1])  # relevant at ranks 1, 3, 5; R = 3
    # MAP@2: hits at rank 1 only; normalized by min(R, k) = 2 -> (1/1) / 2
    assert mean_average_precision(scores, [0 * 0 + 1], c, k=2) == pytest.approx(0.5)
    # "retrieved" normalization divides by the relevant items in the top k (1)
    assert mean_average_precision(scores, [1], c, k=2, k_normalization="retrieved") == pytest.approx(1.0)
    assert precision_at_k(scores, [1], c, 2) == pytest.approx(0.5)
    assert precision_at_k(scores, [1], c, 5) == pytest.approx(0.6)
    # k >= n equals MAP@all
    assert mean_average_precision(scores, [1], c, k=5) == pytest.approx(mean_average_precision(scores, [1], c))


def test_multilabel_relevance_hand_computed():
    # relevant = sharing at least one label
    q = np.array([[1, 0, 1]], dtype=bool)
    c = np.array([[0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 0]], dtype=bool)
    scores = np.array([[0.4, 0.3, 0.2, 0.1]])  # relevant: candidates 1, 2 at ranks 2, 3
    assert mean_average_precision(scores, q, c) == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_query_without_relevant_candidate_is_left_out():
    scores = np.array([[0.9, 0.1], [0.2, 0.8]])
    ap = average_precisions(scores, [0, 5], [0, 1])
    assert ap[0] == 1.0 and np.isnan(ap[1])
    assert mean_average_precision(scores, [0, 5], [0, 1]) == 1.0


def test_perfect_and_reversed_rankings():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 30)
    perfect = (labels[:, None] == labels[None, :]).astype(float) + rng.random((30, 30)) * 0.1
    assert mean_average_precision(perfect, labels, labels) == pytest.approx(1.0)
    assert mean_average_precision(-perfect, labels, labels) < 0.5


def test_pr_curve_and_report_shapes():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 20)
    s = rng.random((20, 20))
    rec, prec = precision_recall_curve(s, labels, labels)
    assert len(rec) == len(prec) == 11 and rec[0] == 0 and rec[-1] == 1
    assert all(a >= b - 1e-12 for a, b in zip(prec, prec[1:], strict=False))  # interpolated precision never rises
    rep = retrieval_report(s, labels, labels)
    assert rep["mean_map"] == pytest.approx((rep["text2image"]["map"] + rep["image2text"]["map"]) / 2)
    assert rep["image2text"]["map"] == pytest.approx(mean_average_precision(s.T, labels, labels))


def test_bad_scores_are_rejected():
    with pytest.raises(ValueError, match="shape"):
        mean_average_precision(np.zeros((2, 3)), [0, 1], [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        mean_average_precision(np.array([[np.nan, 1.0]]), [0], [0, 1])
