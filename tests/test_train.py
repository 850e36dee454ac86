"""Training: pairs, a short synthetic run that raises MAP, exact resume, checkpoints, presets."""

import json

import numpy as np
import pytest
import torch

from helpers import synthetic_preset
from scanet.checkpoint import load_checkpoint, load_model, save_checkpoint
from scanet.config import apply_overrides, get_preset
from scanet.data import synthetic
from scanet.pairs import make_pairs
from scanet.train import train


@pytest.fixture(scope="module")
def dataset(synthetic_dataset):
    return synthetic_dataset


_preset = synthetic_preset


def test_make_pairs_counts_and_targets():
    labels = np.array([0, 0, 1, 1, 2, 2, 2])
    t, i, y = make_pairs(labels, 50, 70, seed=0)
    assert len(t) == len(i) == len(y) == 120
    assert y.sum() == 50
    assert (labels[t][y == 1] == labels[i][y == 1]).all()
    assert (labels[t][y == 0] != labels[i][y == 0]).all()
    multi = np.array([[1, 0], [1, 1], [0, 1]], dtype=bool)
    t, i, y = make_pairs(multi, 20, 20, seed=1)
    assert (multi[t] & multi[i]).any(1)[y == 1].all()
    assert not (multi[t] & multi[i]).any(1)[y == 0].any()


def test_short_synthetic_run_raises_map(dataset, tmp_path):
    from scanet.checkpoint import build_model
    from scanet.evaluate import evaluate_model

    preset = _preset(epochs=3, eval_every=0)
    torch.manual_seed(preset.train.seed)
    before, _ = evaluate_model(build_model(preset, dataset), dataset)
    result = train(preset, dataset, tmp_path, progress=False, log=lambda s: None)
    after = result["report"]["mean_map"]
    assert after > before["mean_map"] + 0.1, (before["mean_map"], after)
    hist = json.loads((tmp_path / "metrics.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert (tmp_path / "training_curve.png").stat().st_size > 1000
    assert (tmp_path / "pr_curves.png").stat().st_size > 1000


def test_resume_equals_uninterrupted(dataset, tmp_path):
    preset = _preset(epochs=3, eval_every=0, positive_pairs=600, negative_pairs=600)
    full = train(preset, dataset, tmp_path / "full", progress=False, log=lambda s: None)
    train(preset, dataset, tmp_path / "cut", progress=False, stop_after_epoch=1, log=lambda s: None)
    resumed = train(preset, dataset, tmp_path / "cut", progress=False, resume=True, log=lambda s: None)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]
    a = load_checkpoint(tmp_path / "full" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "cut" / "last.pt")["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_refuses_other_config(dataset, tmp_path):
    train(
        _preset(epochs=1, eval_every=0, positive_pairs=100, negative_pairs=100),
        dataset,
        tmp_path,
        progress=False,
        log=lambda s: None,
    )
    with pytest.raises(ValueError, match="configuration"):
        train(
            _preset(epochs=2, eval_every=0, positive_pairs=100, negative_pairs=101),
            dataset,
            tmp_path,
            progress=False,
            resume=True,
            log=lambda s: None,
        )


def test_checkpoint_errors_and_roundtrip(dataset, tmp_path):
    train(
        _preset(epochs=1, eval_every=0, positive_pairs=100, negative_pairs=100),
        dataset,
        tmp_path,
        progress=False,
        log=lambda s: None,
    )
    model, state = load_model(tmp_path / "last.pt", dataset)
    assert state["epoch"] == 1
    bad = tmp_path / "bad.pt"
    bad.write_bytes((tmp_path / "last.pt").read_bytes()[:1000])  # truncated
    with pytest.raises(ValueError, match="corrupt"):
        load_checkpoint(bad)
    torch.save({"something": 1}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a SCANet checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")
    other = synthetic.prepare(tmp_path / "other", progress=lambda s: None, seed=5)
    with pytest.raises(ValueError, match="prepared data"):
        load_model(tmp_path / "last.pt", other)


def test_atomic_checkpoint_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"format": "x", "v": 1})

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        save_checkpoint(path, {"format": "x", "v": Boom()})
    assert torch.load(path, weights_only=True)["v"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def test_presets_and_overrides():
    p = get_preset("wiki")
    assert (p.model.common_dim, p.train.batch_size, p.train.lr, p.train.weight_decay) == (1024, 256, 1e-4, 0.005)
    assert (p.train.margin, p.train.lam, p.train.epochs, p.model.dropout) == (0.6, 0.35, 80, 0.2)
    assert (p.train.positive_pairs, p.train.negative_pairs, p.vocab_size, p.knn) == (40000, 40000, 10055, 8)
    q = apply_overrides(p, ["epochs=3", "model.common_dim=64", "lr=0.001"])
    assert (q.train.epochs, q.model.common_dim, q.train.lr) == (3, 64, 0.001)
    assert p.train.epochs == 80
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("nope")
    with pytest.raises(ValueError, match="unknown config key"):
        apply_overrides(p, ["nope=1"])


def test_cuda_graphs_need_cuda(dataset, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the CPU error path does not apply")
    with pytest.raises(ValueError, match="CUDA"):
        train(_preset(epochs=1), dataset, tmp_path, cuda_graphs=True, progress=False, log=lambda s: None)


def test_pairs_can_include_every_ground_truth_pair():
    labels = np.array([0, 0, 1, 1, 2, 2, 2])
    t, i, y = make_pairs(labels, 20, 10, seed=3, include_ground_truth=True)
    pos = set(zip(t[y == 1].tolist(), i[y == 1].tolist(), strict=True))
    assert {(k, k) for k in range(len(labels))} <= pos  # each text with its own image
    assert (labels[t][y == 1] == labels[i][y == 1]).all() and y.sum() == 20
    t0, i0, y0 = make_pairs(labels, 20, 10, seed=3)  # the default draw is unchanged
    t1, i1, y1 = make_pairs(labels, 20, 10, seed=3, include_ground_truth=False)
    assert (t0 == t1).all() and (i0 == i1).all() and (y0 == y1).all()
