"""The two evaluation protocols (standard: test vs test, MAP@all; paper: test vs train, MAP@100 / retrieved)."""

from types import SimpleNamespace

import numpy as np
import pytest

from scanet.evaluate import PROTOCOLS, evaluate_protocols, get_protocols, protocol_report


def _ranked_scores(n: int) -> np.ndarray:
    return np.linspace(1.0, 0.0, n)[None, :]  # candidate j at rank j + 1


def test_paper_protocol_normalizes_by_relevant_retrieved_in_top_100():
    # 150 candidates; the query's relevant ones sit at ranks 2 and 120 (R = 2).
    n = 150
    cand = np.zeros(n, dtype=np.int64)
    cand[[1, 119]] = 1
    s = _ranked_scores(n)
    q = np.array([1])
    paper = protocol_report(PROTOCOLS["paper"], s, q, cand, s, q, cand)
    standard = protocol_report(PROTOCOLS["standard"], s, q, cand, s, q, cand)
    # paper: only rank 2 is inside the top 100: AP = (1/2) / 1
    assert paper["text2image"]["map@100"] == pytest.approx(0.5)
    assert paper["mean"] == pytest.approx(0.5)
    # standard: MAP@all = (1/2 + 2/120) / 2; MAP@50 = (1/2) / min(R=2, 50)
    assert standard["text2image"]["map"] == pytest.approx((1 / 2 + 2 / 120) / 2)
    assert standard["text2image"]["map@50"] == pytest.approx(0.25)
    assert standard["metric"] == "map" and paper["metric"] == "map@100"
    assert "train" in paper["label"] and "test candidates" in standard["label"]


def test_paper_protocol_query_without_hit_in_top_100_scores_zero():
    n = 120
    cand = np.zeros(n, dtype=np.int64)
    cand[110] = 1  # relevant only at rank 111
    s = _ranked_scores(n)
    rep = protocol_report(PROTOCOLS["paper"], s, np.array([1]), cand, s, np.array([1]), cand)
    assert rep["text2image"]["map@100"] == 0.0


def _split(labels, offset):
    labels = np.asarray(labels)
    return SimpleNamespace(labels=labels, key=offset + np.arange(len(labels)))


def test_evaluate_protocols_uses_the_right_candidate_splits_and_directions():
    # test: classes [0, 1]; train: classes [1, 1, 0]. A scorer that knows every item's class ranks perfectly,
    # except that it scores the pair (train text 2, test image 0) lowest: that pair only enters the paper
    # protocol's image->text direction.
    test = _split([0, 1], 0)
    train = _split([1, 1, 0], 100)
    calls = []

    def score_fn(text_split, image_split):
        calls.append((text_split is train, image_split is train))
        s = (text_split.labels[:, None] == image_split.labels[None, :]).astype(float)
        if text_split is train and image_split is test:
            s[2, 0] = -1.0  # the only relevant train text of test image 0, ranked last
        return s

    ds = SimpleNamespace(train=train, test=test)
    reps = evaluate_protocols(score_fn, ds, "both")
    assert set(reps) == {"standard", "paper"}
    assert reps["standard"]["text2image"]["map"] == pytest.approx(1.0)
    assert reps["standard"]["image2text"]["map"] == pytest.approx(1.0)
    assert reps["paper"]["text2image"]["map@100"] == pytest.approx(1.0)
    # test image 0 (class 0) ranks the train texts [1, 1, 0] with its one relevant text last (rank 3): AP 1/3;
    # test image 1 (class 1): relevant at ranks 1, 2: AP 1.
    assert reps["paper"]["image2text"]["map@100"] == pytest.approx((1 / 3 + 1) / 2)
    # each score matrix computed once: (test, test), (test, train), (train, test)
    assert sorted(calls) == [(False, False), (False, True), (True, False)]


def test_protocol_names():
    assert [p.name for p in get_protocols("both")] == ["standard", "paper"]
    assert [p.name for p in get_protocols("paper")] == ["paper"]
    with pytest.raises(ValueError, match="unknown evaluation protocol 'papr'"):
        get_protocols("papr")


def test_baselines_under_both_protocols():
    from scanet.baselines import cca_report, cca_split_scorer, semantic_matching_split_scorer
    from scanet.data.synthetic import generate

    ds = generate(n_train=120, n_test=60, vocab_size=60, image_dim=8, seed=3)
    reps = evaluate_protocols(semantic_matching_split_scorer(ds), ds)
    for r in reps.values():
        assert 0.0 < r["mean"] <= 1.0
    # the standard protocol of the split scorer equals the classic test-vs-test report
    cca = evaluate_protocols(cca_split_scorer(ds), ds, "standard")["standard"]
    assert cca["text2image"]["map"] == pytest.approx(cca_report(ds)["text2image"]["map"])


def test_known_score_matrices_are_not_computed_again():
    test, train = _split([0, 1, 1], 0), _split([1, 0], 100)
    calls = []

    def score_fn(text_split, image_split):
        calls.append((text_split is train, image_split is train))
        return (text_split.labels[:, None] == image_split.labels[None, :]).astype(float)

    ds = SimpleNamespace(train=train, test=test)
    fresh = evaluate_protocols(score_fn, ds, "both")
    calls.clear()
    seeded = evaluate_protocols(score_fn, ds, "both", known={("test", "test"): score_fn(test, test)})
    assert calls.count((False, False)) == 1  # only the call that built `known`
    assert seeded == fresh


def test_ensemble_scorer_is_the_mean_of_its_members():
    from scanet.evaluate import ensemble_scorer

    rng = np.random.default_rng()
    mats = [rng.standard_normal((5, 7)).astype(np.float32) for _ in range(3)]
    calls = []

    def member(m):
        def score(text_split, image_split):
            calls.append((text_split, image_split))
            return m

        return score

    score = ensemble_scorer([member(m) for m in mats])
    got = score("texts", "images")
    np.testing.assert_allclose(got, np.mean(np.stack(mats).astype(np.float64), 0), rtol=1e-6)
    assert got.shape == (5, 7) and calls == [("texts", "images")] * 3  # each member asked for the same splits
    # a ranking the members disagree on: the mean decides (the first member puts image 0 first, the second image 1)
    two = ensemble_scorer([lambda t, i: np.array([[3.0, 0.0]]), lambda t, i: np.array([[0.0, 1.0]])])
    assert two(None, None).argmax() == 0
    with pytest.raises(ValueError, match="at least one scorer"):
        ensemble_scorer([])
