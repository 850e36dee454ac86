"""Mixed precision: every op under torch.autocast (CPU bf16) against its float64 oracle, the dispatch
decisions of the fused ops, the precision setting, bf16 training (loss falls, resume exact) and bf16 scoring.

Tolerances fit bf16: an input or output rounded once to bf16 is off by up to 2^-8 = 0.0039 relative, and a
bf16 GEMM rounds both operands (a few eps of the output scale). Each op is fed bf16 inputs (what autocast
hands it: the previous layer's output) with float32 parameters, and the float64 oracle gets the SAME numbers
(the bf16 values widened), so what is measured is the op's own rounding.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from helpers import encode, make_items, make_model
from scanet import native, reference
from scanet.config import ModelConfig, apply_overrides, get_preset
from scanet.laplacian import Laplacian
from scanet.precision import PRECISIONS, autocast_context, autocast_dtype, check_precision

BF16 = torch.bfloat16
EPS = torch.finfo(BF16).eps  # 2^-7: one bf16 ulp at 1 (a rounding is half of it)
needs_native = pytest.mark.skipif(
    not native.available(), reason=f"native extension unavailable: {native.unavailable_reason()}"
)


def _close(got, want, what, rel=4 * EPS):
    """|got - want| <= rel * (|want| + max|want|): a few bf16 roundings of the output scale."""
    got, want = got.detach().double(), want.detach().double()
    scale = float(want.abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=rel, atol=rel * scale + 1e-30, msg=lambda m: f"{what}: {m}")


def _laplacian(V, symmetric=True, seed=0):
    """A small L~ with empty rows (non-symmetric case), float32 CSR."""
    g = torch.Generator().manual_seed(seed)
    A = (torch.rand(V, V, generator=g) < 0.4).double() * torch.randn(V, V, generator=g, dtype=torch.float64)
    A = A + A.T if symmetric else A.triu(1) * 2.0 + A.tril(-1) * 0.5
    if not symmetric:
        A[::3] = 0
    A = A / (A.abs().sum(1).max().clamp_min(1.0))  # spectral radius <= 1, as a rescaled Laplacian
    return A.float().to_sparse_csr()


def _l64(L):
    return torch.sparse_csr_tensor(L.crow_indices(), L.col_indices(), L.values().double(), L.shape)


def _grads(y, inputs, go):
    return torch.autograd.grad(y, inputs, go.to(y.dtype))


# ------------------------------------------------------------------------------------------ the setting
def test_precision_vocabulary_and_context():
    assert PRECISIONS == ("fp32", "bf16", "fp16")
    with pytest.raises(ValueError, match="precision must be one of .* got 'bf32'"):
        check_precision("bf32")
    with pytest.raises(ValueError, match="precision"):
        autocast_context("cpu", "float16")
    assert isinstance(autocast_context("cpu", "fp32"), contextlib.nullcontext)
    assert autocast_dtype("fp32") is None and autocast_dtype("bf16") == BF16
    with autocast_context(torch.device("cpu"), "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == BF16
    assert not torch.is_autocast_enabled("cpu")
    p = apply_overrides(get_preset("synthetic"), ["precision=bf16"])
    assert p.train.precision == "bf16" and get_preset("synthetic").train.precision == "fp32"


def test_cli_precision_flags():
    from scanet.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["train", "--precision", "bf16"]).precision == "bf16"
    assert parser.parse_args(["train"]).precision is None  # the preset's (fp32 unless --set)
    assert parser.parse_args(["evaluate", "--checkpoint", "x.pt", "--precision", "fp16"]).precision == "fp16"
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--precision", "int8"])


# --------------------------------------------------------------------------------------------- Chebyshev
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape", [(3, 7, 1, 1, 3), (2, 13, 3, 2, 2), (1, 5, 2, 4, 1)])  # B, V, F_in, F_out, K
@pytest.mark.parametrize("x_dtype", [torch.float32, BF16])
def test_reference_cheb_conv_under_autocast(symmetric, shape, x_dtype):
    B, V, F_in, F_out, K = shape
    g = torch.Generator().manual_seed(V * 7 + F_in)
    L = _laplacian(V, symmetric, seed=V)
    x = torch.randn(B, V, F_in, generator=g).to(x_dtype).requires_grad_()
    w = (torch.randn(K, F_in, F_out, generator=g) / K).requires_grad_()
    b = torch.randn(F_out, generator=g).requires_grad_()
    go = torch.randn(B, V, F_out, generator=g)
    with torch.autocast("cpu", dtype=BF16):
        y = reference.cheb_conv(L, x, w, b, "relu")
    assert y.dtype == BF16
    gx, gw, gb = _grads(y, (x, w, b), go)
    assert (gx.dtype, gw.dtype, gb.dtype) == (x_dtype, torch.float32, torch.float32)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    y64 = reference.cheb_conv(_l64(L), x64, w64, b64, "relu")
    want = _grads(y64, (x64, w64, b64), go.to(BF16).double())
    _close(y, y64, "y")
    for got, ref, name in zip((gx, gw, gb), want, "xwb", strict=True):
        _close(got, ref, f"d{name}")


def test_reference_cheb_conv_takes_a_laplacian_object_and_keeps_its_values_float32():
    L = Laplacian(_laplacian(9))
    x = torch.randn(2, 9, 1).to(BF16)
    w, b = torch.randn(3, 1, 2), torch.randn(2)
    y = reference.cheb_conv(L, x, w, b)  # bf16 x, fp32 weights, no autocast: promotion
    assert y.dtype == torch.float32
    want = reference.cheb_conv(_l64(L.csr(torch.float32)), x.double(), w.double(), b.double())
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-6)  # computed in fp32 throughout
    with pytest.raises(ValueError, match="one floating dtype"):
        reference.cheb_conv(L.csr(torch.float32), x.double(), w, b)  # float64 mixes with nothing


def test_fused_cheb_conv_under_autocast_every_cpu_path(monkeypatch):
    """The Triton kernels (interpreted here: they get float32), the native op and the eager fallback."""
    from scanet.fused import _cheb, cheb_conv

    g = torch.Generator().manual_seed(3)
    L = Laplacian(_laplacian(11, symmetric=False, seed=2))
    x = torch.randn(3, 11, 2, generator=g).to(BF16)
    w, b = torch.randn(3, 2, 2, generator=g) / 3, torch.randn(2, generator=g)
    want = reference.cheb_conv(_l64(L.csr(torch.float32)), x.double(), w.double(), b.double())
    paths = {"triton": "1", "native_or_eager": "0"}
    for path, interp in paths.items():
        monkeypatch.setenv("TRITON_INTERPRET", interp)
        with torch.autocast("cpu", dtype=BF16):
            y = cheb_conv(L, x, w, b)
        assert y.dtype == BF16, path
        _close(y, want, path)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(_cheb, "_native_module", lambda: None)  # no native library: the reference
    with torch.autocast("cpu", dtype=BF16):
        y = cheb_conv(L, x, w, b)
    assert y.dtype == BF16
    _close(y, want, "eager fallback")


# ------------------------------------------------------------------------------------------ co-attention
def _coatt_inputs(M, N, seed):
    g = torch.Generator().manual_seed(seed)
    f = (torch.randn(M, N, generator=g)).to(BF16).requires_grad_()
    gg = torch.randn(M, N, generator=g).to(BF16).requires_grad_()
    w = (torch.randn(N, N, generator=g) * 2 / N**0.5).requires_grad_()
    b = (0.5 * torch.randn(N, generator=g)).requires_grad_()
    return f, gg, w, b


def _coatt_check(op, M, N, seed, scale):
    f, g, w, b = _coatt_inputs(M, N, seed)
    go = torch.randn(M, N, generator=torch.Generator().manual_seed(seed + 1))
    with torch.autocast("cpu", dtype=BF16):
        out = op(f, g, w, b, scale=scale)
    assert out.dtype == BF16
    grads = _grads(out, (f, g, w, b), go)
    assert [t.dtype for t in grads] == [BF16, BF16, torch.float32, torch.float32]
    ins64 = [t.detach().double().requires_grad_() for t in (f, g, w, b)]
    out64 = reference.coattention(*ins64, scale=scale)
    want = _grads(out64, ins64, go.to(BF16).double())
    # the GEMM rounds f and W to bf16: logits off by ~eps * |z|, the softmax turns that into relative errors
    _close(out, out64, "out", rel=8 * EPS)
    for got, ref, name in zip(grads, want, ("f", "g", "weight", "bias"), strict=True):
        _close(got, ref, f"d{name}", rel=8 * EPS)


@pytest.mark.parametrize("M, N", [(5, 7), (17, 33), (1, 16)])
@pytest.mark.parametrize("scale", [1.0, "N"])
def test_reference_coattention_under_autocast(M, N, scale):
    _coatt_check(reference.coattention, M, N, seed=M + N, scale=float(N) if scale == "N" else scale)


@pytest.mark.parametrize("M, N", [(5, 7), (17, 33)])
def test_fused_coattention_under_autocast(M, N, monkeypatch):
    """CPU: the interpreted kernels (TRITON_INTERPRET=1, fp32 arithmetic whatever the precision) and the
    reference fallback (=0); both against the float64 oracle, forward and backward."""
    from scanet.fused import coattention

    for interp in ("1", "0"):
        monkeypatch.setenv("TRITON_INTERPRET", interp)
        _coatt_check(coattention, M, N, seed=M * N, scale=float(N))


def test_fused_coattention_dispatch_under_autocast(monkeypatch):
    """Under autocast the kernels get float32 tensors and bf16 GEMM operands, and the result the autocast
    dtype; the torch.library op itself has an autocast kernel (float32 in, autocast excluded)."""
    from scanet.fused import _coattention

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    seen = []
    real = _coattention._forward_op

    def spy(f, g, w, b, scale, precision, save):
        seen.append(([t.dtype for t in (f, g, w, b)], precision, torch.is_autocast_enabled("cpu")))
        return real(f, g, w, b, scale, precision, save)

    monkeypatch.setattr(_coattention, "_forward_op", spy)
    f, g, w, b = (t.detach() for t in _coatt_inputs(4, 8, 0))
    with torch.autocast("cpu", dtype=BF16):
        out = _coattention.coattention(f, g, w, b)
    assert out.dtype == BF16
    assert seen == [([torch.float32] * 4, "bf16", False)]
    seen.clear()
    _coattention.coattention(f.float(), g.float(), w, b)  # plain fp32: untouched
    assert seen == [([torch.float32] * 4, "fp32", False)]
    assert _coattention.kernel_precision(BF16) == "bf16"
    assert _coattention.kernel_precision(torch.float16) == "fp16"
    assert _coattention.kernel_precision(torch.float32) == "fp32"
    assert _coattention.kernel_precision(BF16, "tf32") == "tf32"
    # the custom op under autocast: its registered autocast kernel casts bf16 inputs to float32
    with torch.autocast("cpu", dtype=BF16):
        o, _, _ = real(f, g, w, b, 1.0, "fp32", False)
    assert o.dtype == torch.float32
    want = reference.coattention(f.float(), g.float(), w, b)
    torch.testing.assert_close(o, want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------- the model
def _model(N=16, layers=2, fused=False, seed=0, dropout=0.0):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    A = sp.random(12, 12, density=0.3, random_state=rng)
    from scanet.model import SCANet

    return SCANet(
        12,
        5,
        sp.csr_matrix(0.2 * (A + A.T)),
        ModelConfig(common_dim=N, coattention_layers=layers, dropout=dropout),
        fused=fused,
    )


@pytest.mark.parametrize("fused", [False, True])
def test_scanet_forward_backward_under_autocast(fused, monkeypatch):
    """The whole model under bf16 autocast: similarity float32 (the loss is float32), gradients float32 and
    within bf16 tolerances of the float64 model's."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # fused on CPU: native ChebConv, eager co-attention
    model = _model(fused=fused)
    model64 = _model(fused=False).double()
    model64.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in model.state_dict().items()})
    g = torch.Generator().manual_seed(1)
    bow, img = torch.rand(6, 12, generator=g), torch.randn(6, 5, generator=g)
    with torch.autocast("cpu", dtype=BF16):
        sim = model(bow, img)
    assert sim.dtype == torch.float32
    sim64 = model64(bow.double(), img.double())
    torch.testing.assert_close(sim.double(), sim64, rtol=0, atol=0.03)  # similarities in (0, 1)
    grads = torch.autograd.grad(sim.sum(), list(model.parameters()))
    grads64 = torch.autograd.grad(sim64.sum(), list(model64.parameters()))
    for (name, _), got, want in zip(model.named_parameters(), grads, grads64, strict=True):
        assert got.dtype == torch.float32, name
        _close(got, want, name, rel=0.1)


@needs_native
def test_text_encoder_dropout_runs_in_the_native_epilogue(monkeypatch):
    """Fused TextEncoder on the native backend: the last ChebConv applies the dropout (no bernoulli_ pass),
    reproducibly by seed, off in eval mode; the state_dict is the eager encoder's."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = _model(fused=True, dropout=0.5)
    eager = _model(fused=False, dropout=0.5)
    assert model.state_dict().keys() == eager.state_dict().keys()
    eager.load_state_dict(model.state_dict())
    bow = torch.rand(4, 12)
    enc = model.text_encoder.train()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.manual_seed(5)
        a = enc(bow, model.laplacian)
    names = {e.key for e in prof.key_averages()}
    assert "aten::bernoulli_" not in names and "aten::dropout" not in names
    torch.manual_seed(5)
    assert torch.equal(a, enc(bow, model.laplacian))  # reproducible by seed
    torch.manual_seed(6)
    assert not torch.equal(a, enc(bow, model.laplacian))  # and a mask that depends on it
    # the mask: the last layer's output equals the no-dropout output * keep / (1 - p), keep from the seed
    enc.eval()
    torch.testing.assert_close(enc(bow, model.laplacian), eager.text_encoder.eval()(bow, model.laplacian))
    hidden = []
    hook = enc.convs[0].register_forward_hook(lambda mod, args, out: hidden.append(out.dtype))
    with torch.autocast("cpu", dtype=BF16):  # and under autocast
        enc.train()
        torch.manual_seed(5)
        c = enc(bow, model.laplacian)
    hook.remove()
    assert c.dtype == BF16 and hidden == [torch.float32]  # the hidden signal stays float32
    _close(c, a, "dropout under autocast", rel=8 * EPS)


# ------------------------------------------------------------------------------------------- all pairs
@pytest.mark.parametrize("layers", [0, 1, 2])
def test_reference_pair_logits_under_autocast(layers):
    """All-pairs logits under bf16 autocast: float32 out, within bf16 tolerances of the float64 logits."""
    model64 = make_model(24, layers=layers, seed=layers)
    bow, img = make_items(9, 11, seed=3)
    f_t64, f_i64 = encode(model64, bow, img)
    model = copy.deepcopy(model64).float()  # .float() converts in place: keep the float64 model
    f_t, f_i = f_t64.float().to(BF16), f_i64.float().to(BF16)  # bf16 features: what autocast encoders give
    with torch.autocast("cpu", dtype=BF16):
        got = reference.pair_logits(model, f_t, f_i, chunk_pairs=7)
    assert got.dtype == torch.float32
    # the oracle on the same (bf16-rounded) features, so the comparison measures the scorer's own rounding
    want = reference.pair_logits(model64, f_t.double(), f_i.double())
    _close(got, want, "logits", rel=0.05)
    P = torch.arange(5)
    with torch.autocast("cpu", dtype=BF16):
        listed = reference.pair_logits(model, f_t, f_i, text_index=P, image_index=P + 1)
    assert listed.dtype == torch.float32
    _close(listed, got[P, P + 1], "listed pairs vs all pairs", rel=0.05)  # two bf16 orders of rounding


def test_fused_scorer_precision_follows_the_features(monkeypatch):
    """The fused scorer: bf16 features (or autocast) ask the kernel for bf16 GEMM operands; logits float32.
    Interpreted here (fp32 arithmetic), so the numbers equal the float32 oracle's on the same features."""
    from scanet.fused import _pair_scores

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _pair_scores.scoring_precision(BF16) == "bf16"
    assert _pair_scores.scoring_precision(torch.float16) == "tf32"
    assert _pair_scores.scoring_precision(torch.float32) == "fp32"
    assert _pair_scores.scoring_precision(torch.float32, "tf32") == "tf32"
    model64 = make_model(16, layers=2, seed=4)
    bow, img = make_items(5, 6, seed=4)
    f_t, f_i = (t.float().to(BF16) for t in encode(model64, bow, img))
    model = copy.deepcopy(model64).float()
    asked = []
    kernels_mod = _pair_scores.kernels("pair_scores", "cpu")
    real = kernels_mod.pair_scores_layer2
    monkeypatch.setattr(
        kernels_mod, "pair_scores_layer2", lambda *a, **kw: asked.append(kw["precision"]) or real(*a, **kw)
    )
    with torch.autocast("cpu", dtype=BF16):
        got = _pair_scores.pair_scores(model, f_t, f_i)
    assert asked == ["bf16"] and got.dtype == torch.float32
    want = reference.pair_logits(model64, f_t.double(), f_i.double())
    _close(got, want, "fused logits", rel=0.05)


# --------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from scanet.data import synthetic

    return synthetic.prepare(tmp_path_factory.mktemp("prep") / "synthetic", progress=lambda s: None)


def _preset(**train):
    p = get_preset("synthetic")
    return dataclasses.replace(p, train=dataclasses.replace(p.train, **train))


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=needs_native)])
def test_bf16_training_lowers_the_loss_and_resumes_exactly(dataset, tmp_path, fused, monkeypatch):
    from scanet.checkpoint import load_checkpoint
    from scanet.train import train

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # fused on CPU: the native GCN with fused dropout
    preset = _preset(epochs=3, eval_every=0, positive_pairs=600, negative_pairs=600, precision="bf16")
    quiet = dict(progress=False, log=lambda s: None, fused=fused)
    full = train(preset, dataset, tmp_path / "full", **quiet)
    losses = [h["loss"] for h in full["history"]]
    assert losses[-1] < losses[0] - 0.01, losses
    train(preset, dataset, tmp_path / "cut", stop_after_epoch=1, **quiet)
    resumed = train(preset, dataset, tmp_path / "cut", resume=True, **quiet)
    assert [h["loss"] for h in resumed["history"]] == losses
    a = load_checkpoint(tmp_path / "full" / "last.pt")
    b = load_checkpoint(tmp_path / "cut" / "last.pt")
    for k in a["model"]:
        assert a["model"][k].dtype == b["model"][k].dtype
        assert torch.equal(a["model"][k], b["model"][k]), k
    # parameters and Adam's moments stay float32
    assert all(v.dtype == torch.float32 for k, v in a["model"].items() if v.is_floating_point())
    moments = [t for s in a["optimizer"]["state"].values() for n, t in s.items() if n in ("exp_avg", "exp_avg_sq")]
    assert moments and all(t.dtype == torch.float32 for t in moments)
    assert resumed["report"]["mean_map"] == full["report"]["mean_map"]


def test_bf16_scoring_of_a_trained_model_keeps_map_and_rankings(dataset, tmp_path):
    """A model trained in fp32, scored in fp32 and under bf16 autocast: mean MAP within 0.002, top-10 lists
    mostly shared."""
    from scanet.evaluate import evaluate_model
    from scanet.train import train

    preset = _preset(epochs=3, eval_every=0)
    train(preset, dataset, tmp_path, progress=False, log=lambda s: None)
    from scanet.checkpoint import load_model

    model, _ = load_model(tmp_path / "last.pt", dataset)
    r32, s32 = evaluate_model(model, dataset, "test", precision="fp32")
    r16, s16 = evaluate_model(model, dataset, "test", precision="bf16")
    assert s16.dtype == np.float32
    assert r32["mean_map"] > 0.3  # a model that ranks (chance is lower)
    assert abs(r16["mean_map"] - r32["mean_map"]) < 0.002, (r32["mean_map"], r16["mean_map"])
    k = 10
    top32, top16 = np.argsort(-s32, 1)[:, :k], np.argsort(-s16, 1)[:, :k]
    overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(top32, top16, strict=True)])
    assert overlap > 0.9, overlap


def test_a_checkpoint_from_before_the_precision_setting_resumes(dataset, tmp_path):
    """Checkpoints written before TrainConfig.precision existed trained in fp32 and still resume."""
    from scanet.checkpoint import load_checkpoint, save_checkpoint
    from scanet.train import train

    preset = _preset(epochs=2, eval_every=0, positive_pairs=200, negative_pairs=200)
    train(preset, dataset, tmp_path, progress=False, stop_after_epoch=1, log=lambda s: None)
    state = load_checkpoint(tmp_path / "last.pt")
    del state["preset"]["train"]["precision"]
    save_checkpoint(tmp_path / "last.pt", state)
    assert load_checkpoint(tmp_path / "last.pt")["preset"]["train"]["precision"] == "fp32"
    out = train(preset, dataset, tmp_path, progress=False, resume=True, log=lambda s: None)
    assert [h["epoch"] for h in out["history"]] == [1, 2]
    with pytest.raises(ValueError, match="another configuration"):  # but not as a bf16 run
        train(
            dataclasses.replace(preset, train=dataclasses.replace(preset.train, precision="bf16", epochs=3)),
            dataset,
            tmp_path,
            progress=False,
            resume=True,
            log=lambda s: None,
        )
