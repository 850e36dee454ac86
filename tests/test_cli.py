"""The command line end to end on synthetic data, and its errors."""

import json

import numpy as np
import pytest

from scanet.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    rc = main(
        [
            "train",
            "--prepared-dir",
            str(root / "prepared"),
            "--out",
            str(root / "run"),
            "--eager",
            "--set",
            "epochs=2",
            "--set",
            "positive_pairs=500",
            "--set",
            "negative_pairs=500",
        ]
    )
    assert rc == 0
    return root


def test_train_writes_results_and_checkpoint(trained, capsys):
    run = trained / "run"
    for name in (
        "last.pt",
        "best.pt",
        "metrics.json",
        "training_curve.png",
        "evaluation.json",
        "results.json",
        "pr_curves.png",
    ):
        assert (run / name).is_file(), name
    results = json.loads((run / "results.json").read_text())
    assert set(results["map"]) == {
        "SCANet",
        "CCA (bag-of-words SVD-100, same image features)",
        "semantic matching (logistic regression per modality, same features)",
    }
    for row in results["map"].values():
        assert 0 < row["text2image"] <= 1 and row["mean"] == pytest.approx((row["text2image"] + row["image2text"]) / 2)
    assert results["epochs"] == 2 and len(results["seconds_per_epoch"]) == 2
    assert results["selected_by"] == "validation MAP" and results["selected_epoch"] in (1, 2)
    assert set(results["protocols"]) == {"standard", "paper"}
    assert "train candidates" in results["protocols"]["paper"]["label"]
    assert set(results["protocols"]["paper"]["rows"]) == set(results["map"])
    # SCANet minus each baseline, per protocol and direction, with its paired-bootstrap interval
    comp = results["comparisons"]
    assert comp["method"] == "SCANet" and set(comp["minus"]) == set(results["map"]) - {"SCANet"}
    for baseline, by_protocol in comp["minus"].items():
        assert set(by_protocol) == {"standard", "paper"}
        for p, c in by_protocol.items():
            rows = results["protocols"][p]["rows"]
            for d in ("text2image", "image2text", "mean"):
                assert c[d]["difference"] == pytest.approx(rows["SCANet"][d] - rows[baseline][d], abs=1e-12)
                assert c[d]["ci"][0] <= c[d]["ci"][1] and c[d]["n_resamples"] == 10_000


def test_evaluate_reproduces_training_map(trained, capsys):
    run = trained / "run"
    # the training run reports its selected (best validation) epoch: evaluating best.pt reproduces it
    rc = main(
        [
            "evaluate",
            "--checkpoint",
            str(run / "best.pt"),
            "--prepared-dir",
            str(trained / "prepared"),
            "--out",
            str(trained / "eval"),
            "--eager",
        ]
    )
    assert rc == 0
    trained_map = json.loads((run / "evaluation.json").read_text())["mean_map"]
    again = json.loads((trained / "eval" / "evaluate_results.json").read_text())["map"]["SCANet"]["mean"]
    assert again == pytest.approx(trained_map, abs=1e-9)


def test_evaluate_ensemble_is_the_mean_of_the_checkpoints_logits(trained, tmp_path, capsys):
    import torch

    from scanet.checkpoint import load_model
    from scanet.data.prepared import PreparedDataset
    from scanet.evaluate import model_scorer, retrieval_report

    other = trained / "run-seed1"  # a second seed, so the members disagree
    argv = ["--prepared-dir", str(trained / "prepared"), "--eager"]
    rc = main(["train", *argv, "--out", str(other), "--no-baseline", "--set", "seed=1", "--set", "epochs=1"])
    assert rc == 0
    members = [trained / "run" / "best.pt", other / "last.pt"]
    assert main(["evaluate", *argv, "--out", str(tmp_path / "ens"), *[f"--checkpoint={m}" for m in members]]) == 0
    results = json.loads((tmp_path / "ens" / "evaluate_results.json").read_text())
    assert results["checkpoints"] == [str(m) for m in members] and len(results["epochs"]) == 2
    (row,) = results["map"].values()
    ds = PreparedDataset.load(trained / "prepared" / "synthetic")
    singles = []
    for m in members:
        model, _ = load_model(m, ds)
        singles.append(model_scorer(model)(ds.test, ds.test).astype(np.float64))
    assert not np.allclose(singles[0], singles[1])
    expected = retrieval_report(np.mean(singles, 0), ds.test.labels, ds.test.labels)
    assert row["mean"] == pytest.approx(expected["mean_map"], abs=1e-6)
    assert set(results["protocols"]) == {"standard", "paper"}

    # several checkpoints need --out; a member trained on other data is named
    capsys.readouterr()
    assert main(["evaluate", *argv, *[f"--checkpoint={m}" for m in members]]) == 2
    assert "2 checkpoints given: name the output folder with --out" in capsys.readouterr().err
    foreign = tmp_path / "foreign.pt"
    state = torch.load(members[1], weights_only=True)
    state["dataset_fingerprint"] = "0" * 16
    torch.save(state, foreign)
    out = tmp_path / "ens2"
    assert main(["evaluate", *argv, "--out", str(out), f"--checkpoint={members[0]}", f"--checkpoint={foreign}"]) == 2
    err = capsys.readouterr().err
    assert str(foreign) in err and "trained on prepared data" in err
    assert not (out / "evaluate_results.json").exists()


def test_errors_are_clear(trained, tmp_path, capsys):
    assert main(["train", "--preset", "wiki"]) == 2
    assert "needs --root" in capsys.readouterr().err
    assert main(["train", "--preset", "nope"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert main(["train", "--set", "nope=1"]) == 2
    assert "unknown config key" in capsys.readouterr().err
    assert main(["prepare", "wiki", "--root", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["evaluate", "--checkpoint", str(bad)]) == 2
    assert "corrupt" in capsys.readouterr().err


def test_prepare_passes_dataset_options_and_names_unknown_ones(tmp_path, capsys):
    out = tmp_path / "syn"
    assert main(["prepare", "synthetic", "--out", str(out), "--option", "n_train=120", "--option", "n_test=36"]) == 0
    import json as _json

    manifest = _json.loads((out / "manifest.json").read_text())
    assert manifest["n_train"] == 120 and manifest["n_test"] == 36
    assert main(["prepare", "wiki", "--root", str(tmp_path), "--option", "n_train=5"]) == 2
    err = capsys.readouterr().err
    assert "has no option 'n_train'" in err and "vocab_size" in err
    assert main(["prepare", "synthetic", "--option", "oops"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_map_table_columns_line_up_for_long_method_names():
    from scanet.cli.train import _map_table_text

    long_name = "semantic matching (logistic regression per modality, same features)"  # 68 characters
    rows = {
        "SCANet": {"text2image": 0.25, "image2text": 0.3, "mean": 0.275},
        long_name: {"text2image": 0.2707, "image2text": 0.3672, "mean": 0.3189},
    }
    lines = _map_table_text(rows).splitlines()
    assert len(lines) == 3 and lines[0].startswith("method ")
    assert len({len(line) for line in lines}) == 1  # every column ends where the header's does
    assert lines[2].startswith(long_name + " ") and lines[2].split()[-3:] == ["0.2707", "0.3672", "0.3189"]
