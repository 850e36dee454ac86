"""Model selection on a validation split carved from training: best.pt, patience, the selected epoch's report."""

import json

import pytest
import torch

from helpers import synthetic_preset
from scanet.checkpoint import load_checkpoint, load_model
from scanet.train import train


@pytest.fixture(scope="module")
def dataset(synthetic_dataset):
    return synthetic_dataset


_preset = synthetic_preset


def test_best_checkpoint_is_the_best_validation_epoch(dataset, tmp_path):
    result = train(
        _preset(epochs=4, eval_every=0, positive_pairs=800, negative_pairs=800),
        dataset,
        tmp_path,
        progress=False,
        log=lambda s: None,
    )
    hist = json.loads((tmp_path / "metrics.json").read_text())
    vals = [h["val_mean_map"] for h in hist]
    best_epoch = 1 + max(range(len(vals)), key=lambda i: (vals[i], -i))  # first epoch with the best value
    assert result["selected_epoch"] == best_epoch
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["epoch"] == best_epoch and best["best"]["val_mean_map"] == pytest.approx(max(vals))
    assert result["report"]["selected_epoch"] == best_epoch
    assert result["report"]["selected_by"] == "validation MAP"
    assert set(result["report"]["protocols"]) == {"standard", "paper"}
    # the final report is the best checkpoint's test MAP, not the last epoch's model
    from scanet.checkpoint import load_model
    from scanet.evaluate import evaluate_model

    model, _ = load_model(tmp_path / "best.pt", dataset)
    rep, _ = evaluate_model(model, dataset)
    assert rep["mean_map"] == pytest.approx(result["report"]["mean_map"])


def test_patience_stops_a_run_that_no_longer_improves(dataset, tmp_path):
    # lr = 0: the validation MAP never improves after epoch 1, so patience 2 stops after epoch 3 of 10
    result = train(
        _preset(epochs=10, eval_every=0, lr=0.0, patience=2, positive_pairs=200, negative_pairs=200),
        dataset,
        tmp_path,
        progress=False,
        log=lambda s: None,
    )
    assert [h["epoch"] for h in result["history"]] == [1, 2, 3]
    assert result["selected_epoch"] == 1


def test_no_validation_split_selects_the_last_epoch(dataset, tmp_path):
    result = train(
        _preset(epochs=2, eval_every=0, validation_fraction=0.0, positive_pairs=200, negative_pairs=200),
        dataset,
        tmp_path,
        progress=False,
        log=lambda s: None,
    )
    assert result["selected_epoch"] == 2 and not (tmp_path / "best.pt").exists()
    assert "val_mean_map" not in result["history"][0]


def test_validation_items_are_not_trained_on(dataset, tmp_path, monkeypatch):
    """The pairs are drawn from the reduced training split: no validation item appears in them."""
    import scanet.train as train_mod
    from scanet.data.splits import carve_validation

    seen = {}
    real = train_mod.make_pairs

    def spy(labels, *a, **k):
        seen["n"] = len(labels)
        return real(labels, *a, **k)

    monkeypatch.setattr(train_mod, "make_pairs", spy)
    train(
        _preset(epochs=1, eval_every=0, positive_pairs=100, negative_pairs=100),
        dataset,
        tmp_path,
        progress=False,
        log=lambda s: None,
    )
    tr, val = carve_validation(dataset.train, 0.1, 0)
    assert seen["n"] == len(tr) == len(dataset.train) - len(val)
    assert torch.tensor(len(val)) > 0


def test_l2_in_the_loss_over_fc_layers_only(dataset, tmp_path):
    """l2_mode="loss_fc_only" adds weight_decay * sum ||w||^2 / 2 over the FC weights and biases (Chebyshev filters
    excluded) to the loss, with no optimizer decay: with a vanishing learning rate the reported loss exceeds the
    decoupled run's by exactly that term."""
    from scanet.train import l2_loss_parameters

    common = dict(
        epochs=1,
        eval_every=0,
        lr=1e-12,
        weight_decay=0.5,
        validation_fraction=0.0,
        positive_pairs=32,
        negative_pairs=32,
        batch_size=64,
    )
    plain = train(_preset(**common), dataset, tmp_path / "plain", progress=False, log=lambda s: None)
    fc = train(_preset(**common, l2_mode="loss_fc_only"), dataset, tmp_path / "fc", progress=False, log=lambda s: None)
    model, _ = load_model(tmp_path / "fc" / "last.pt", dataset)
    names = [n for n, _ in model.named_parameters()]
    params = l2_loss_parameters(model)
    assert len(params) == len(names) - sum(n.startswith("text_encoder.convs.") for n in names) > 0
    term = 0.5 * 0.5 * float(sum(p.detach().double().pow(2).sum() for p in params))
    assert fc["history"][0]["loss"] - plain["history"][0]["loss"] == pytest.approx(term, rel=1e-4)
