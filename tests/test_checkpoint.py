"""scanet.checkpoint: loading never runs code, old checkpoints (Laplacian as top-level buffers) still load, and
the resumed optimizer state survives the safe load."""

import pickle

import pytest
import torch

from scanet.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, load_model, save_checkpoint
from scanet.config import apply_overrides, get_preset
from scanet.data import synthetic
from scanet.index import load_index
from scanet.train import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    ds = synthetic.prepare(root / "data", progress=lambda s: None)
    preset = apply_overrides(
        get_preset("synthetic"), ["epochs=1", "eval_every=0", "positive_pairs=100", "negative_pairs=100"]
    )
    train(preset, ds, root / "run", progress=False, log=lambda s: None)
    return ds, root / "run" / "last.pt"


class _Payload:
    """Unpickling this calls the function pickled in ``__reduce__``: what a malicious checkpoint would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("loader", [load_checkpoint, load_index])
def test_a_file_carrying_code_is_refused_and_the_code_never_runs(tmp_path, loader):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "model": {}, "payload": _Payload(marker)}, path)
    with pytest.raises(ValueError, match="corrupt or not a"):
        loader(path)
    assert not marker.exists()
    # the same payload as a plain pickle would have run it: the test's payload is real
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


def test_training_checkpoint_loads_safely_with_optimizer_state(trained):
    _, path = trained
    state = load_checkpoint(path)
    assert state["optimizer"]["state"] and all(
        isinstance(v, torch.Tensor) for s in state["optimizer"]["state"].values() for v in s.values()
    )
    assert isinstance(state["preset"], dict) and state["epoch"] == 1


def test_old_checkpoint_with_top_level_laplacian_buffers_loads(trained, tmp_path):
    ds, path = trained
    state = load_checkpoint(path)
    new_model, _ = load_model(state, ds)
    old = dict(
        state,
        model={
            ("laplacian_" + k.split(".")[1] if k.startswith("laplacian.") else k): v for k, v in state["model"].items()
        },
    )
    assert "laplacian_crow" in old["model"] and "laplacian.crow" not in old["model"]
    save_checkpoint(tmp_path / "old.pt", old)
    model, _ = load_model(tmp_path / "old.pt", ds)
    for k, v in new_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    # a fresh model also accepts the old names through load_state_dict
    fresh, _ = load_model(state, ds)
    fresh.load_state_dict(old["model"])
    bow = torch.as_tensor(ds.test.text_matrix()[:3])
    img = torch.as_tensor(ds.test.images[:3])
    torch.testing.assert_close(fresh.eval()(bow, img), new_model.eval()(bow, img), rtol=0, atol=0)


def test_tensors_are_written_contiguous_whatever_their_layout_in_memory(tmp_path):
    """A bf16 run keeps its FC weights and their Adam moments transposed in memory (scanet.master_weights):
    the file holds them contiguous, so an optimizer state never arrives laid out unlike a fresh parameter
    (torch's fused AdamW would silently mix up its elements), with the same values."""
    w = torch.arange(12.0).reshape(3, 4)
    transposed = w.t().contiguous().t()
    state = {
        "format": CHECKPOINT_FORMAT,
        "model": {"fc.weight": transposed},
        "optimizer": {"state": {0: {"exp_avg": transposed * 2, "step": torch.tensor(3.0)}}, "param_groups": []},
        "history": [{"epoch": 1}],
        "shapes": (transposed.t(),),
    }
    assert not transposed.is_contiguous()
    save_checkpoint(tmp_path / "c.pt", state)
    back = load_checkpoint(tmp_path / "c.pt")
    tensors = [back["model"]["fc.weight"], back["optimizer"]["state"][0]["exp_avg"], back["shapes"][0]]
    assert all(t.is_contiguous() for t in tensors)
    assert torch.equal(tensors[0], w) and torch.equal(tensors[1], 2 * w) and torch.equal(tensors[2], w.t())
    assert back["history"] == [{"epoch": 1}] and float(back["optimizer"]["state"][0]["step"]) == 3.0
    assert not state["model"]["fc.weight"].is_contiguous()  # the caller's objects are left as they were
