"""scanet.master_weights: bf16 FC copies for the forward, float32 masters in the optimizer (CPU bf16 training).

The unfused step (``native=False``: widen the grads, torch's fused AdamW, refresh the copies) claims the SAME
numbers as autocast's per-step casts, so it is compared bitwise: steps of a small SCANet (eager and fused/native
GCN) on both paths, then whole runs of scanet.train.train (losses, validation MAP, checkpoints, the final
report), resume, and resuming one path's checkpoint on the other. The native one-pass step (the default when the
extension is built, scanet.adam_bf16) equals torch's fused AdamW except for one rounding of exp_avg_sq in a
tensor's last numel % 16 elements (tests/test_adam_bf16.py): here it is compared with autocast to a tolerance,
and its own runs resume bitwise.
"""

from __future__ import annotations

import contextlib
import copy
import json

import pytest
import torch

from helpers import synthetic_preset
from scanet import native

# Triton reads TRITON_INTERPRET when it is first imported (an optimizer's first step imports it, via
# torch._dynamo): import it here, under the conftest's "1", not inside a test below that sets "0" for the
# native backend (the interpreted kernels of later test modules would then fail).
with contextlib.suppress(ImportError):
    import triton.language  # noqa: F401
from scanet.checkpoint import load_checkpoint
from scanet.config import ModelConfig, apply_overrides, get_preset
from scanet.data.graph import random_graph_laplacian
from scanet.loss import scanet_loss
from scanet.master_weights import MasterWeights, store_fc_weights_transposed, transposed_layout, use_master_weights
from scanet.model import SCANet
from scanet.precision import autocast_context

BF16 = torch.bfloat16
needs_native = pytest.mark.skipif(
    not native.available(), reason=f"native extension unavailable: {native.unavailable_reason()}"
)
FC_NAMES = ("text_encoder.fc.", "image_encoder.fc.", "coattention.text_fc.", "coattention.image_fc.", "head.fc.")


def _model(fused: bool, V=37, D=11, N=24, layers=2, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(common_dim=N, coattention_layers=layers, dropout=0.2, gcn_channels=(2, 1))
    return SCANet(V, D, random_graph_laplacian(V, k=3, seed=seed), cfg, fused=fused).train()


def _assert_same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{what}: {k}"


def _assert_close(a: dict, b: dict, what: str) -> None:
    """The native step's tolerance: a 1-ulp exp_avg_sq difference in a tail element moves that parameter by
    ~1e-7 relative per step; after a few steps the trajectories stay within float32 noise of each other."""
    assert a.keys() == b.keys(), what
    for k in a:
        assert a[k].dtype == b[k].dtype, f"{what}: {k}"
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=f"{what}: {k}")


def _opt_state(opt) -> dict:
    return {f"{i}.{n}": t for i, s in opt.state_dict()["state"].items() for n, t in s.items()}


# ----------------------------------------------------------------------------------------------- the step
@pytest.mark.parametrize("l2", ["decoupled", "loss_fc_only"])
@pytest.mark.parametrize(
    "fused,native_step",
    [(False, False), pytest.param(True, False, marks=needs_native), pytest.param(False, True, marks=needs_native)],
)
def test_master_weight_steps_equal_autocast_steps_bitwise(fused, native_step, l2, monkeypatch):
    """8 steps from one start: the same loss, float32 parameters and Adam moments after every step (bitwise on
    the unfused step; the native step: to a few float32 roundings, see the module docstring)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # fused on CPU: the native GCN (cached layer 1, fused dropout)
    plain = _model(fused)
    # The same storage order on both sides (MasterWeights stores the FC weights transposed; autocast's casts
    # keep the strides): oneDNN's GEMMs may round differently for another order.
    assert store_fc_weights_transposed(plain) == 2 + 2 * 2  # text, image, co-attention FCs; not the head (1, N)
    ours = copy.deepcopy(plain)
    opts = [torch.optim.AdamW(m.parameters(), lr=3e-2, weight_decay=0.01, fused=True) for m in (plain, ours)]
    weights = MasterWeights(ours, opts[1], native=native_step)
    assert weights.native == native_step, weights.native_off_reason
    same = _assert_same if not native_step else _assert_close
    assert len(weights.masters) == 2 + 2 * 2 * 2 + 2 + 2  # text FC, image FC, 2 x 2 co-attention FCs, head
    l2_params = [[p for n, p in m.named_parameters() if n.startswith(FC_NAMES)] for m in (plain, ours)]
    g = torch.Generator().manual_seed(1)
    texts = torch.rand(50, 37, generator=g) * (torch.rand(50, 37, generator=g) < 0.3)
    images = torch.randn(50, 11, generator=g).relu()
    start = {k: v.clone() for k, v in plain.state_dict().items()}
    for step in range(8):
        B = 13 if step % 3 else 16  # a ragged last batch too
        ti, ii = torch.randint(0, 50, (B,), generator=g), torch.randint(0, 50, (B,), generator=g)
        target = (torch.rand(B, generator=g) < 0.5).float()
        losses = []
        for model, stepper, context, l2p in (
            (plain, opts[0], contextlib.nullcontext, l2_params[0]),
            (ours, weights, weights.in_forward, l2_params[1]),
        ):
            torch.manual_seed(100 + step)  # the same dropout masks
            with autocast_context("cpu", "bf16"), context():
                sim = model(texts, images[ii], text_index=ti)
            loss, _ = scanet_loss(sim, target, 0.6, 0.35)
            if l2 == "loss_fc_only":  # a second gradient term on the masters, outside the forward
                loss = loss + 0.5 * 0.01 * sum(p.pow(2).sum() for p in l2p)
            stepper.zero_grad(set_to_none=True)
            loss.backward()
            stepper.step()
            losses.append(loss.detach())
        assert torch.equal(losses[0], losses[1]) or native_step, (step, losses)
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-3, atol=1e-5)
        same(plain.state_dict(), ours.state_dict(), f"parameters after step {step}")
        same(_opt_state(opts[0]), _opt_state(opts[1]), f"Adam state after step {step}")
        for master, low in zip(weights.masters, weights.copies, strict=True):  # the copies follow the masters
            assert low.dtype == BF16 and torch.equal(low, master.to(BF16))
    moved = [k for k, v in plain.state_dict().items() if k.startswith(FC_NAMES) and not torch.equal(v, start[k])]
    assert len(moved) == len(weights.masters)  # every FC weight and bias was trained
    assert all(v.dtype == torch.float32 for v in ours.state_dict().values() if v.is_floating_point())


@pytest.mark.parametrize("native_step", [False, pytest.param(True, marks=needs_native)])
def test_fc_weights_are_stored_transposed_with_their_state_and_train_as_the_plain_layout(native_step):
    """MasterWeights stores each FC weight (in, out) in memory: the same Parameter objects and values, its
    copy, grad and Adam moments (also those that existed before, as on resume) laid out alike; the run follows
    the plain layout's to bf16 GEMM rounding; ``transposed=False`` keeps the layout."""
    plain = _model(False)
    ours = copy.deepcopy(plain)
    g = torch.Generator().manual_seed(3)
    texts = torch.rand(40, 37, generator=g) * (torch.rand(40, 37, generator=g) < 0.3)
    images = torch.randn(40, 11, generator=g).relu()
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True) for m in (plain, ours)]
    for model, opt in zip((plain, ours), opts, strict=True):  # one plain fp32 step: state exists, row-major
        torch.manual_seed(5)  # the same dropout masks
        loss, _ = scanet_loss(model(texts[:8], images[:8]), (torch.arange(8) % 2).float(), 0.6, 0.35)
        loss.backward()
        opt.step()
    params = dict(ours.named_parameters())
    values = {n: p.detach().clone() for n, p in params.items()}
    as_is = MasterWeights(plain, opts[0], native=native_step, transposed=False)
    weights = MasterWeights(ours, opts[1], native=native_step, transposed=True)
    assert weights.transposed and not as_is.transposed
    assert all(p is params[n] and torch.equal(p, values[n]) for n, p in ours.named_parameters())
    transposed = [m for m in weights.masters if m.dim() == 2 and 1 not in m.shape]
    assert len(transposed) == 2 + 2 * 2 and all(m.stride() == (1, m.shape[0]) for m in transposed)
    assert all(m.is_contiguous() for m in as_is.masters)
    for master, low in zip(weights.masters, weights.copies, strict=True):
        assert low.stride() == master.stride() and torch.equal(low, master.to(BF16))
        for key in ("exp_avg", "exp_avg_sq"):
            assert opts[1].state[master][key].stride() == master.stride(), key
    for step in range(4):
        ti, ii = torch.randint(0, 40, (12,), generator=g), torch.randint(0, 40, (12,), generator=g)
        target = (torch.rand(12, generator=g) < 0.5).float()
        losses = []
        for model, stepper in ((plain, as_is), (ours, weights)):
            torch.manual_seed(7 + step)
            with autocast_context("cpu", "bf16"), stepper.in_forward():
                sim = model(texts, images[ii], text_index=ti)
            loss, _ = scanet_loss(sim, target, 0.6, 0.35)
            stepper.zero_grad(set_to_none=True)
            loss.backward()
            if step == 0:
                grads = [c.grad for c in stepper.copies]
                assert all(gr.stride() == c.stride() for gr, c in zip(grads, stepper.copies, strict=True))
            stepper.step()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[0], losses[1], rtol=2e-2, atol=1e-3)
    for k, v in plain.state_dict().items():  # a few steps of bf16 GEMMs rounded in another order: the two
        # trajectories stay far closer to each other than to where they started
        if k in values:
            apart, moved = (ours.state_dict()[k] - v).norm(), (v - values[k]).norm()
            assert apart <= 0.1 * moved, (k, float(apart), float(moved))
    for master in transposed:
        assert master.stride() == (1, master.shape[0]) and opts[1].state[master]["exp_avg"].stride() == master.stride()
    again = transposed_layout(transposed[0])  # already so: no copy, and nothing left to re-lay
    assert again.data_ptr() == transposed[0].data_ptr() and again.stride() == transposed[0].stride()
    assert store_fc_weights_transposed(ours, opts[1]) == 0


@pytest.mark.parametrize("native_step", [False, pytest.param(True, marks=needs_native)])
def test_transposed_storage_by_default_only_with_the_native_step(native_step):
    """torch's fused AdamW runs far slower on transposed parameters: the unfused step keeps the layout."""
    model = _model(False)
    weights = MasterWeights(model, torch.optim.AdamW(model.parameters(), fused=True), native=native_step)
    assert weights.transposed == native_step
    fc = model.text_encoder.fc.weight
    assert fc.stride() == ((1, fc.shape[0]) if native_step else (fc.shape[1], 1))


def test_in_forward_swaps_the_fc_layers_only_and_always_restores():
    model = _model(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = dict(model.named_parameters())
    keys = list(model.state_dict())
    weights = MasterWeights(model, opt)
    with weights.in_forward():
        inside = dict(model.named_parameters())
        for name, p in inside.items():
            fc = name.startswith(FC_NAMES)
            assert p.dtype == (BF16 if fc else torch.float32), name
            assert (p is before[name]) != fc, name  # FC: the copy; the Chebyshev filters: untouched
            if fc:
                assert torch.equal(p, before[name].to(BF16))  # round to nearest even, as autocast's cast
    assert all(p is before[n] for n, p in model.named_parameters())  # the masters back, the same objects
    with pytest.raises(RuntimeError, match="boom"), weights.in_forward():
        raise RuntimeError("boom")
    assert all(p is before[n] for n, p in model.named_parameters())
    assert list(model.state_dict()) == keys and all(v.dtype != BF16 for v in model.state_dict().values())


@pytest.mark.parametrize("native_step", [False, pytest.param(True, marks=needs_native)])
def test_a_layer_without_a_gradient_keeps_no_grad_and_refresh_rounds(native_step):
    """A master whose copy got no gradient gets none (optimizer skips it, as with autocast); refresh()
    copies values set on the masters (e.g. a load_state_dict) into the copies."""
    model = _model(False, layers=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    weights = MasterWeights(model, opt, native=native_step)
    assert weights.native == native_step
    ties = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8]).repeat(12)  # halfway between bf16 neighbours (ulp 2^-7)
    with torch.no_grad():
        model.head.fc.weight.copy_(ties.reshape(1, -1))
    weights.refresh()
    head_copy = next(c for m, c in zip(weights.masters, weights.copies, strict=True) if m is model.head.fc.weight)
    even = torch.tensor([1.0, 1 + 2**-6]).repeat(12).reshape(1, -1)  # to the even mantissa, not up, not down
    assert torch.equal(head_copy.float(), even) and torch.equal(head_copy, model.head.fc.weight.to(BF16))
    with autocast_context("cpu", "bf16"), weights.in_forward():
        f_i = model.encode_image(torch.randn(4, 11))
    weights.zero_grad()
    f_i.float().sum().backward()
    before = model.text_encoder.fc.weight.detach().clone()
    image_before = model.image_encoder.fc.weight.detach().clone()
    weights.step()
    assert model.text_encoder.fc.weight.grad is None and torch.equal(model.text_encoder.fc.weight, before)
    image_fc = model.image_encoder.fc.weight
    assert not torch.equal(image_fc, image_before)  # stepped
    if native_step:  # the native pass consumed the bf16 grad without widening it into master.grad
        assert image_fc.grad is None and opt.state[image_fc]["step"] == 1
    else:
        assert image_fc.grad is not None and image_fc.grad.dtype == torch.float32
    image_copy = next(c for m, c in zip(weights.masters, weights.copies, strict=True) if m is image_fc)
    assert torch.equal(image_copy, image_fc.to(BF16)) and model.text_encoder.fc.weight not in opt.state


def test_the_optimizer_must_step_the_fc_parameters():
    model = _model(False)
    opt = torch.optim.AdamW(model.text_encoder.convs.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="optimizer does not step Linear.weight"):
        MasterWeights(model, opt)


def test_where_master_weights_apply():
    model = _model(False)
    assert use_master_weights(model, "cpu", "bf16") == (True, "")
    for kwargs, why in (
        (dict(precision="fp32"), "precision 'fp32'"),
        (dict(precision="fp16"), "precision 'fp16'"),
        (dict(device="cuda:0"), "CPU only"),
        (dict(distributed=True), "DistributedDataParallel"),
        (dict(cuda_graphs=True), "CUDA graphs"),
        (dict(compile=True), "torch.compile"),
    ):
        args = {"device": "cpu", "precision": "bf16", **kwargs}
        ok, reason = use_master_weights(model, args.pop("device"), args.pop("precision"), **args)
        assert not ok and why in reason, (kwargs, reason)
    cnn5 = SCANet(5, 3, random_graph_laplacian(5, k=2), ModelConfig(common_dim=8, image_encoder="cnn5"))
    ok, reason = use_master_weights(cnn5, "cpu", "bf16")
    assert not ok and "cnn5" in reason


# ------------------------------------------------------------------------------------------ whole runs
@pytest.fixture(scope="module")
def dataset(synthetic_dataset):
    return synthetic_dataset


def _counting(monkeypatch, native_step: bool = False) -> list:
    """Make scanet.train's MasterWeights count its steps (so a test knows the scheme really ran) and take the
    unfused step (bitwise autocast's) or the native one."""
    import scanet.train as train_module

    calls: list = []

    class Counting(MasterWeights):
        def __init__(self, model, optimizer):
            super().__init__(model, optimizer, native=native_step)
            assert self.native == native_step, self.native_off_reason

        def step(self):
            calls.append(1)
            super().step()

    monkeypatch.setattr(train_module, "MasterWeights", Counting)
    return calls


def _run_files(out) -> tuple[dict, dict, dict]:
    state = load_checkpoint(out / "last.pt")
    return state["model"], _flat(state["optimizer"]["state"]), json.loads((out / "evaluation.json").read_text())


def _flat(opt_state: dict) -> dict:
    return {f"{i}.{n}": t for i, s in opt_state.items() for n, t in s.items()}


@pytest.mark.parametrize(
    "l2_mode,fused",
    [("decoupled", False), pytest.param("decoupled", True, marks=needs_native), ("loss_fc_only", False)],
)
def test_a_bf16_run_is_the_same_with_and_without_master_weights(dataset, tmp_path, monkeypatch, l2_mode, fused):
    """train(): the same epoch losses, validation MAP (so the same best.pt), checkpoints and final report."""
    from scanet.train import train

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    calls = _counting(monkeypatch)
    preset = synthetic_preset(
        epochs=2, eval_every=1, positive_pairs=300, negative_pairs=300, precision="bf16", l2_mode=l2_mode
    )
    quiet = dict(progress=False, log=lambda s: None, fused=fused)
    old = train(preset, dataset, tmp_path / "autocast", master_weights=False, **quiet)
    assert not calls
    new = train(preset, dataset, tmp_path / "master", **quiet)
    assert len(calls) >= 2 * 2  # the scheme stepped every batch of both epochs
    assert new["history"] and [{k: v for k, v in h.items() if "seconds" not in k} for h in new["history"]] == [
        {k: v for k, v in h.items() if "seconds" not in k} for h in old["history"]
    ]
    (m_old, o_old, e_old), (m_new, o_new, e_new) = _run_files(tmp_path / "autocast"), _run_files(tmp_path / "master")
    _assert_same(m_old, m_new, "last.pt model")
    _assert_same(o_old, o_new, "last.pt Adam state")
    assert all(v.dtype == torch.float32 for v in m_new.values() if v.is_floating_point())  # today's format
    assert e_new == e_old and new["selected_epoch"] == old["selected_epoch"]
    _assert_same(
        load_checkpoint(tmp_path / "autocast" / "best.pt")["model"],
        load_checkpoint(tmp_path / "master" / "best.pt")["model"],
        "best.pt",
    )


def test_master_weight_runs_resume_exactly_and_across_paths(dataset, tmp_path, monkeypatch):
    """Cut after epoch 1 and resumed == uninterrupted, on the master-weight path, and when the first epoch
    ran on the autocast path (its checkpoint is resumed by the master-weight path) or the other way round."""
    from scanet.train import train

    calls = _counting(monkeypatch)
    preset = synthetic_preset(epochs=3, eval_every=0, positive_pairs=300, negative_pairs=300, precision="bf16")
    quiet = dict(progress=False, log=lambda s: None)
    full = train(preset, dataset, tmp_path / "full", **quiet)
    losses = [h["loss"] for h in full["history"]]
    m_full, o_full, e_full = _run_files(tmp_path / "full")
    for first, then in ((True, True), (False, True), (True, False)):
        out = tmp_path / f"cut_{first}_{then}"
        train(preset, dataset, out, stop_after_epoch=1, master_weights=first, **quiet)
        n = len(calls)
        resumed = train(preset, dataset, out, resume=True, master_weights=then, **quiet)
        assert (len(calls) > n) == then
        assert [h["loss"] for h in resumed["history"]] == losses, (first, then)
        m, o, e = _run_files(out)
        _assert_same(m_full, m, f"resumed model {first, then}")
        _assert_same(o_full, o, f"resumed Adam state {first, then}")
        assert e == e_full


@needs_native
@pytest.mark.parametrize("l2_mode", ["decoupled", "loss_fc_only"])
def test_native_step_runs_match_autocast_closely_and_resume_exactly(dataset, tmp_path, monkeypatch, l2_mode):
    """train() on the native one-pass step: losses and the trained model within float32 noise of the autocast
    run, the checkpoint in today's format (float32 masters, torch's Adam state keys), and cut after epoch 1 and
    resumed == uninterrupted, bitwise."""
    from scanet.train import train

    calls = _counting(monkeypatch, native_step=True)
    preset = synthetic_preset(
        epochs=3, eval_every=0, positive_pairs=300, negative_pairs=300, precision="bf16", l2_mode=l2_mode
    )
    quiet = dict(progress=False, log=lambda s: None)
    old = train(preset, dataset, tmp_path / "autocast", master_weights=False, **quiet)
    assert not calls
    full = train(preset, dataset, tmp_path / "full", **quiet)
    assert len(calls) >= 3 * 2
    losses = [h["loss"] for h in full["history"]]
    torch.testing.assert_close(losses, [h["loss"] for h in old["history"]], rtol=1e-3, atol=0)
    (m_old, o_old, _), (m_full, o_full, e_full) = _run_files(tmp_path / "autocast"), _run_files(tmp_path / "full")
    assert o_old.keys() == o_full.keys() and all(o_old[k].dtype == o_full[k].dtype for k in o_old)
    assert all(v.dtype == torch.float32 for v in m_full.values() if v.is_floating_point())
    _assert_close(m_old, m_full, "native-step run vs autocast run")
    out = tmp_path / "cut"
    train(preset, dataset, out, stop_after_epoch=1, **quiet)
    resumed = train(preset, dataset, out, resume=True, **quiet)
    assert [h["loss"] for h in resumed["history"]] == losses
    m, o, e = _run_files(out)
    _assert_same(m_full, m, "resumed model (native step)")
    _assert_same(o_full, o, "resumed Adam state (native step)")
    assert e == e_full


def test_train_says_why_master_weights_are_off(tmp_path):
    """bf16 with the CNN-5 image encoder: the plain autocast path, and the log says why."""
    from scanet.data.synthetic import generate
    from scanet.train import train

    tiny = generate(n_train=40, n_test=20, vocab_size=30, text_len=10, pixel_size=32)
    preset = apply_overrides(
        get_preset("synthetic"),
        ["image_encoder=cnn5", "common_dim=16", "epochs=1", "eval_every=0", "validation_fraction=0"]
        + ["positive_pairs=32", "negative_pairs=32", "batch_size=32", "precision=bf16"],
    )
    lines: list = []
    out = train(preset, tiny, tmp_path, progress=False, log=lines.append)
    assert any("master weights off: image_encoder='cnn5'" in s for s in lines), lines
    assert out["history"][0]["loss"] > 0


@pytest.mark.parametrize("text_encoder", ["lstm", "cnn"])
def test_the_lstm_and_cnn_text_encoders_train_the_same_with_master_weights(tmp_path, monkeypatch, text_encoder):
    """Their output FC is an nn.Linear too (embeddings, LSTM and convolutions stay float32, cast by autocast)."""
    from scanet.data.synthetic import generate
    from scanet.train import train

    calls = _counting(monkeypatch)
    tiny = generate(n_train=60, n_test=30, vocab_size=40, text_len=12)
    preset = apply_overrides(
        get_preset("synthetic"),
        [f"text_encoder={text_encoder}", "common_dim=16", "lstm_hidden=8", "cnn_filters=4", "max_tokens=12"]
        + ["epochs=2", "eval_every=0", "positive_pairs=64", "negative_pairs=64", "batch_size=32", "precision=bf16"],
    )
    quiet = dict(progress=False, log=lambda s: None)
    old = train(preset, tiny, tmp_path / "autocast", master_weights=False, **quiet)
    new = train(preset, tiny, tmp_path / "master", **quiet)
    assert calls and [h["loss"] for h in new["history"]] == [h["loss"] for h in old["history"]]
    (m_old, o_old, e_old), (m_new, o_new, e_new) = _run_files(tmp_path / "autocast"), _run_files(tmp_path / "master")
    _assert_same(m_old, m_new, f"{text_encoder} model")
    _assert_same(o_old, o_new, f"{text_encoder} Adam state")
    assert e_new == e_old
