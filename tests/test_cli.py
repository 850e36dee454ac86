"""The command line end to end on synthetic data, and its errors."""

import json

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
