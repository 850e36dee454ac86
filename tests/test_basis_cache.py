"""The first graph convolution from a per-text cache of its Chebyshev basis (scanet.fused._basis_cache).

``SCANet(texts, image, text_index=idx)`` must give exactly what ``SCANet(texts[idx], image)`` gives (forward
and every gradient, fp32 and under bf16 autocast), both must match the float64 eager model, and the cache
must follow the texts and the Laplacian (in-place writes, another matrix, load_state_dict) but not the
parameters.
"""

from __future__ import annotations

import copy

import pytest
import torch

from scanet import native
from scanet.config import ModelConfig
from scanet.fused import _basis_cache
from scanet.model import SCANet
from test_native import awkward_laplacian, knn_laplacian, vb

pytestmark = pytest.mark.skipif(
    not native.available(), reason=f"native extension unavailable: {native.unavailable_reason()}"
)


@pytest.fixture(autouse=True)
def native_backend(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # fused on CPU = the native op (conftest turns the interpreter on)


def _texts(n, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    bow = torch.rand(n, V, generator=g) * (torch.rand(n, V, generator=g) < 0.3)
    return bow / bow.sum(1, keepdim=True).clamp(min=1e-6)


def _model(V, lap, channels=(1, 1), K=3, fused=True, dropout=0.2, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(common_dim=24, gcn_channels=channels, cheb_k=K, dropout=dropout)
    return SCANet(V, 7, lap, cfg, fused=fused).train()


def _step(model, texts, images, idx, cached, precision, seed=1):
    """sim and every parameter's gradient of one forward/backward (dropout seeded alike)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        sim = model(texts, images[idx], text_index=idx) if cached else model(texts[idx], images[idx])
    (sim * torch.linspace(0.5, 1.5, sim.numel())).sum().backward()  # no cancelling sums
    return sim.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize(
    "V, n, B, channels, K",
    [(53, 40, 17, (1, 1), 3), (97, 31, 31, (1, 3, 1), 2), (40, 9, 23, (1, 1), 1), (131, 64, 5, (1, 2), 5)],
    ids=lambda v: str(v),
)
def test_cached_first_layer_is_exactly_the_gathered_path(precision, V, n, B, channels, K):
    lap = knn_laplacian(V)
    texts, images = _texts(n, V), torch.randn(n, 7)
    idx = torch.randint(0, n, (B,), generator=torch.Generator().manual_seed(2))  # repeats included
    model = _model(V, lap, channels, K)
    sim_g, grads_g = _step(model, texts, images, idx, False, precision)
    sim_c, grads_c = _step(model, texts, images, idx, True, precision)
    assert model.text_encoder.convs[0].basis_cache._view is not None  # the cached path ran
    assert torch.equal(sim_c, sim_g)
    assert grads_c.keys() == grads_g.keys()
    for name in grads_g:
        assert torch.equal(grads_c[name], grads_g[name]), name


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["symmetric", "nonsymmetric", "empty_rows"])
def test_cached_path_matches_the_float64_eager_model(precision, kind):
    V, n = 29, 12
    lap = awkward_laplacian(V, kind, dtype=torch.float32, seed=3)
    texts, images = _texts(n, V, seed=4), torch.randn(n, 7)
    idx = torch.tensor([3, 0, 11, 3, 7, 1, 10, 2, 5])
    model = _model(V, lap, (1, 1), 3, dropout=0.0)
    eager64 = _model(V, lap, (1, 1), 3, fused=False, dropout=0.0).double()
    eager64.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in model.state_dict().items()})
    sim, grads = _step(model, texts, images, idx, True, precision)
    sim64, grads64 = _step(eager64, texts.double(), images.double(), idx, False, "fp32")
    tol = 3e-2 if precision == "bf16" else 1e-5
    torch.testing.assert_close(sim.double(), sim64, rtol=tol, atol=tol)
    for name, want in grads64.items():
        scale = float(want.abs().max()) + 1e-30
        torch.testing.assert_close(grads[name].double(), want, rtol=tol * 3, atol=tol * 3 * scale, msg=name)


@pytest.mark.parametrize("layout", ["runs", "vb", "bv_channels_last", "noncontig"])
@pytest.mark.parametrize("F_out", [1, 3])
def test_from_basis_backward_reads_any_gradient_layout(layout, F_out):
    """cheb_conv_from_basis(index=) backward with the gradient in every layout the next layer may hand it:
    against the float64 reference (dW, db)."""
    V, n, B, K = 67, 13, 11, 3
    L = knn_laplacian(V, dtype=torch.float64)
    texts = _texts(n, V).double()
    cache = native.chebyshev_basis(L, texts.unsqueeze(-1), K).squeeze(-1).permute(1, 0, 2).contiguous()
    basis = cache.permute(1, 0, 2).unsqueeze(-1)
    idx = torch.randint(0, n, (B,), generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(6)
    w = (torch.randn(K, 1, F_out, generator=g, dtype=torch.float64) / K).requires_grad_()
    b = torch.randn(F_out, generator=g, dtype=torch.float64).requires_grad_()
    go = torch.randn(B, V, F_out, generator=g, dtype=torch.float64)
    go = {
        "runs": go.permute(0, 2, 1).contiguous().permute(0, 2, 1),
        "vb": vb(go),
        "bv_channels_last": go.contiguous(),
        "noncontig": torch.randn(B, V, 2 * F_out, generator=g, dtype=torch.float64)[:, :, ::2],
    }[layout]
    y = native.cheb_conv_from_basis(basis, w, b, "relu", index=idx)
    dw, db = torch.autograd.grad(y, (w, b), go)
    w64, b64 = w.detach().requires_grad_(), b.detach().requires_grad_()
    T = [basis[k, idx] for k in range(K)]
    y64 = torch.relu(sum(T[k] @ w64[k] for k in range(K)) + b64)
    dw64, db64 = torch.autograd.grad(y64, (w64, b64), go)
    torch.testing.assert_close(y, y64, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dw, dw64, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(db, db64, rtol=1e-10, atol=1e-10)


def _builds(monkeypatch) -> list:
    calls: list = []
    real = native.chebyshev_basis

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(native, "chebyshev_basis", counting)
    return calls


def test_cache_follows_the_texts_and_the_laplacian_not_the_parameters(monkeypatch):
    V, n = 45, 300  # 300 texts: two chunks of CHUNK_TEXTS
    assert n > _basis_cache.CHUNK_TEXTS
    lap = knn_laplacian(V)
    texts, images = _texts(n, V), torch.randn(n, 7)
    idx = torch.tensor([0, 299, 256, 255, 7, 7, 100, 3])
    model = _model(V, lap)
    calls = _builds(monkeypatch)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def agree():
        sim_c, grads_c = _step(model, texts, images, idx, True, "fp32")
        sim_g, grads_g = _step(model, texts, images, idx, False, "fp32")
        assert torch.equal(sim_c, sim_g)
        assert all(torch.equal(grads_c[k], grads_g[k]) for k in grads_g)

    agree()
    first = len(calls)
    assert first == 2  # built once, in two chunks
    for _ in range(3):  # parameter updates do not rebuild
        _step(model, texts, images, idx, True, "fp32")
        opt.step()
    agree()
    assert len(calls) == first
    texts[7] = texts[7].roll(3)  # in place: the cache must follow
    agree()
    assert len(calls) == 2 * first
    with torch.no_grad():
        model.laplacian.values.mul_(0.5)  # the operator written in place
    agree()
    assert len(calls) == 3 * first
    other = _texts(n, V, seed=9)  # another matrix
    sim_other, _ = _step(model, other, images, idx, True, "fp32")
    assert torch.equal(sim_other, _step(model, other, images, idx, False, "fp32")[0])
    state = copy.deepcopy(model.state_dict())
    state["laplacian.values"] = state["laplacian.values"] * 2.0
    model.load_state_dict(state)  # a new operator loaded into the same buffers
    agree()


def test_cache_is_not_state_and_falls_back_where_it_does_not_apply(monkeypatch):
    V, n = 30, 20
    lap = knn_laplacian(V)
    texts, images, idx = _texts(n, V), torch.randn(n, 7), torch.tensor([1, 5, 5, 19])
    model = _model(V, lap)
    keys = set(model.state_dict())
    _step(model, texts, images, idx, True, "fp32")
    assert set(model.state_dict()) == keys  # nothing of the cache in the checkpoint
    assert copy.deepcopy(model).text_encoder.convs[0].basis_cache._view is None  # a copy starts empty
    calls = _builds(monkeypatch)
    # eager model, one GCN layer (its fused dropout stays on the SpMM path), texts that need a gradient,
    # float64 texts: all gather texts[idx] and give the gathered result.
    for m, t in (
        (_model(V, lap, fused=False), texts),
        (_model(V, lap, channels=(1,)), texts),
        (model, texts.clone().requires_grad_()),
        (_model(V, lap).double(), texts.double()),
    ):
        sim_c, _ = _step(m, t, images.to(t.dtype), idx, True, "fp32")
        sim_g, _ = _step(m, t, images.to(t.dtype), idx, False, "fp32")
        assert torch.equal(sim_c, sim_g)
    assert calls == []


def test_cache_rejects_texts_of_the_wrong_shape():
    lap = _model(10, knn_laplacian(10)).laplacian
    with pytest.raises(ValueError, match="texts must be"):
        _basis_cache.ChebBasisCache().get(torch.rand(4, 11), lap, 3)
    with pytest.raises(ValueError, match="float32 CPU texts"):
        _basis_cache.ChebBasisCache().get(torch.rand(4, 10, dtype=torch.float64), lap, 3)
