"""The paired bootstrap of a MAP difference (scanet.comparison.paired_bootstrap / compare_protocols) and
``scanet evaluate --baseline``'s comparisons."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from scanet.cli import main
from scanet.comparison import compare_protocols, paired_bootstrap, protocol_average_precisions
from scanet.evaluate import PROTOCOLS, evaluate_protocols


def test_identical_methods_differ_by_exactly_zero():
    ap = np.random.default_rng(0).random((50, 2))
    r = paired_bootstrap(ap, ap.copy(), n_resamples=200)
    assert r["difference"] == 0.0 and r["ci"] == [0.0, 0.0] and r["fraction_above"] == 0.0
    assert r["queries"] == 50 and r["n_resamples"] == 200


def test_difference_by_hand_and_columns_averaged_with_nan_left_out():
    # column 0: APs of a [1, .5, .25, nan], of b [.5, .5, .5, nan] -> MAP diff (1.75 - 1.5) / 3 = 1/12
    # column 1: a [1, 1, 0, 0], b [0, 0, 0, 0] -> 1/2; the statistic is their mean, 7/24
    a = np.array([[1.0, 1.0], [0.5, 1.0], [0.25, 0.0], [np.nan, 0.0]])
    b = np.array([[0.5, 0.0], [0.5, 0.0], [0.5, 0.0], [np.nan, 0.0]])
    r = paired_bootstrap(a, b, n_resamples=500, seed=3)
    assert r["difference"] == pytest.approx(7 / 24)
    assert r["ci"][0] <= r["difference"] <= r["ci"][1]
    # one column alone is the plain MAP difference
    assert paired_bootstrap(a[:, 1], b[:, 1], n_resamples=10)["difference"] == pytest.approx(0.5)


def test_above_on_every_query_gives_an_interval_above_zero():
    rng = np.random.default_rng(1)
    b = rng.random(300) * 0.8
    a = b + 0.01 + 0.1 * rng.random(300)  # better on every query, by 0.01 to 0.11
    r = paired_bootstrap(a, b, n_resamples=2000)
    assert r["fraction_above"] == 1.0 and 0.01 < r["ci"][0] < r["difference"] < r["ci"][1] < 0.11


def test_interval_matches_the_normal_approximation_for_many_queries():
    # per-query differences iid N(0.02, 0.2): the 95% interval is close to mean +- 1.96 sd / sqrt(n)
    rng = np.random.default_rng(7)
    n = 2000
    b = rng.random(n)
    a = b + rng.normal(0.02, 0.2, n)
    r = paired_bootstrap(a, b, n_resamples=4000, seed=11)
    d = a - b
    half = 1.96 * d.std(ddof=1) / np.sqrt(n)
    assert r["ci"][0] == pytest.approx(d.mean() - half, abs=0.15 * half)
    assert r["ci"][1] == pytest.approx(d.mean() + half, abs=0.15 * half)


def test_deterministic_for_a_seed():
    rng = np.random.default_rng(2)
    a, b = rng.random(40), rng.random(40)
    assert paired_bootstrap(a, b, 300, seed=5) == paired_bootstrap(a, b, 300, seed=5)
    assert paired_bootstrap(a, b, 300, seed=5)["ci"] != paired_bootstrap(a, b, 300, seed=6)["ci"]


@pytest.mark.parametrize(
    "a, b, kwargs, message",
    [
        (np.ones(3), np.ones(4), {}, r"one shape .* got \(3,\) and \(4,\)"),
        (np.ones(0), np.ones(0), {}, "n > 0"),
        (np.array([1.0, np.nan]), np.array([np.nan, 1.0]), {}, "NaN .* at different places"),
        (np.array([np.nan, np.nan]), np.array([np.nan, np.nan]), {}, "no query with a relevant candidate"),
        (np.ones(3), np.ones(3), {"n_resamples": 0}, "n_resamples must be >= 1"),
        (np.ones(3), np.ones(3), {"confidence": 1.0}, "strictly between 0 and 1"),
    ],
)
def test_bad_input_is_named(a, b, kwargs, message):
    with pytest.raises(ValueError, match=message):
        paired_bootstrap(a, b, **kwargs)


def _split(labels, offset):
    labels = np.asarray(labels)
    return SimpleNamespace(labels=labels, key=offset + np.arange(len(labels)))


def _same(x, y):  # equal up to the summation order's last bits
    assert x["ci"] == pytest.approx(y["ci"], rel=1e-12) and x["difference"] == pytest.approx(y["difference"], rel=1e-12)
    assert {k: v for k, v in x.items() if k not in ("ci", "difference")} == {
        k: v for k, v in y.items() if k not in ("ci", "difference")
    }


def test_compare_protocols_differences_are_the_protocol_reports_differences():
    rng = np.random.default_rng(4)
    ds = SimpleNamespace(train=_split(rng.integers(0, 3, 40), 100), test=_split(rng.integers(0, 3, 25), 0))
    noise = {
        k: rng.normal(size=(len(getattr(ds, k[0]).labels), len(getattr(ds, k[1]).labels)))
        for k in [("test", "test"), ("test", "train"), ("train", "test")]
    }

    def scorer(strength):
        def score(ts, is_):
            key = ("test" if ts is ds.test else "train", "test" if is_ is ds.test else "train")
            return strength * (ts.labels[:, None] == is_.labels[None, :]) + noise[key]

        return score

    ma, mb = {}, {}
    ra = evaluate_protocols(scorer(1.5), ds, "both", scores_out=ma)
    rb = evaluate_protocols(scorer(0.5), ds, "both", scores_out=mb)
    assert set(ma) == {("test", "test"), ("test", "train"), ("train", "test")}
    c = compare_protocols(ma, mb, ds, "both", n_resamples=300)
    for p in ("standard", "paper"):
        metric = PROTOCOLS[p].metric
        assert c[p]["metric"] == metric
        for d in ("text2image", "image2text"):
            assert c[p][d]["difference"] == pytest.approx(ra[p][d][metric] - rb[p][d][metric])
        assert c[p]["mean"]["difference"] == pytest.approx(ra[p]["mean"] - rb[p]["mean"])
        assert c[p]["mean"]["queries"] == 25
        # one set of resamples serves both directions and their mean: each direction's entry is that direction's
        # own paired_bootstrap (same seed), the mean's is that of the two columns
        ap_a, ap_b = (
            protocol_average_precisions(PROTOCOLS[p], ma, ds),
            protocol_average_precisions(PROTOCOLS[p], mb, ds),
        )
        for d in ("text2image", "image2text"):
            _same(c[p][d], paired_bootstrap(ap_a[d], ap_b[d], 300))
        stack = lambda ap: np.stack([ap["text2image"], ap["image2text"]], axis=1)  # noqa: E731
        _same(c[p]["mean"], paired_bootstrap(stack(ap_a), stack(ap_b), 300))
    with pytest.raises(ValueError, match="no test x train score matrix for the paper protocol"):
        protocol_average_precisions(PROTOCOLS["paper"], {("test", "test"): ma["test", "test"]}, ds)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("paired")
    argv = ["--prepared-dir", str(root / "prepared"), "--eager", "--no-baseline"]
    sets = ["--set", "epochs=1", "--set", "positive_pairs=300", "--set", "negative_pairs=300"]
    assert main(["train", *argv, "--out", str(root / "run"), *sets]) == 0
    return root


def test_evaluate_baseline_writes_and_prints_the_paired_comparisons(run, capsys):
    argv = ["evaluate", "--checkpoint", str(run / "run" / "last.pt"), "--prepared-dir", str(run / "prepared")]
    assert main([*argv, "--eager", "--baseline", "--bootstrap", "500", "--out", str(run / "e")]) == 0
    printed = capsys.readouterr().out
    res = json.loads((run / "e" / "evaluate_results.json").read_text())
    comp = res["comparisons"]
    assert comp["method"] == "SCANet" and set(comp["minus"]) == set(res["map"]) - {"SCANet"}
    for baseline, by_protocol in comp["minus"].items():
        for p, c in by_protocol.items():
            rows = res["protocols"][p]["rows"]
            for d in ("text2image", "image2text", "mean"):
                assert c[d]["difference"] == pytest.approx(rows["SCANet"][d] - rows[baseline][d], abs=1e-12)
                assert c[d]["ci"][0] <= c[d]["ci"][1] and c[d]["n_resamples"] == 500
        assert f"SCANet minus {baseline}" in printed
    # --bootstrap 0: no comparison; a negative count is refused by name
    assert main([*argv, "--eager", "--baseline", "--bootstrap", "0", "--out", str(run / "e0")]) == 0
    assert "comparisons" not in json.loads((run / "e0" / "evaluate_results.json").read_text())
    with pytest.raises(SystemExit):
        main([*argv, "--bootstrap", "-3", "--out", str(run / "e1")])
    assert "--bootstrap=-3: --bootstrap must be an int >= 0" in capsys.readouterr().err
