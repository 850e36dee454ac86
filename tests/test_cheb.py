"""scanet.fused.cheb_conv / ChebConv against the float64 reference scanet.reference.cheb_conv.

On CPU the Triton kernels run under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1); every case
runs on CUDA too when a GPU is present. Inputs are fresh random draws; the reference is computed in float64
from the same (float32-rounded) values. Shapes are tiny: an interpreted program instance costs ~5 ms.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from conftest import devices
from scanet import reference
from scanet.fused import ChebConv, cheb_conv
from scanet.kernels import cheb as kernels
from scanet.laplacian import Laplacian
from scanet.layers import ChebConv as EagerChebConv


def _cpu_path_is_triton() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or _cpu_path_is_triton()),
    reason="needs CUDA or TRITON_INTERPRET=1 (set by tests/conftest.py)",
)
# Where cheb_conv takes the Triton path: CUDA when present, else the CPU interpreter. (On a CUDA machine the CPU
# cases go through scanet.native or the reference: still the contract of cheb_conv, not the kernels.)
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------- inputs
def random_operator(
    V: int, *, symmetric=True, density=0.35, isolated=(), empty_rows=(), self_loops=True, seed=0
) -> torch.Tensor:
    """A dense float64 (V, V) operator with spectral radius <= 1 (like a rescaled Laplacian).

    isolated: vertices with neither in- nor out-edges; empty_rows: rows without entries (columns kept: only
    meaningful for a non-symmetric operator); self_loops: random diagonal entries.
    """
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(V, V, generator=g, dtype=torch.float64) * (torch.rand(V, V, generator=g) < density)
    if not self_loops:
        M.fill_diagonal_(0.0)
    if symmetric:
        M = torch.triu(M) + torch.triu(M, 1).T
    for v in isolated:
        M[v, :] = 0.0
        M[:, v] = 0.0
    for v in empty_rows:
        M[v, :] = 0.0
    norm = M.abs().sum(1).max()  # infinity norm bounds the spectral radius
    return M / norm if norm > 0 else M


def to_csr(M: torch.Tensor, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return M.to(dtype).to_sparse_csr().to(device)


def draw(B, V, F_in, F_out, K, *, bias=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, V, F_in, generator=g, dtype=torch.float64)
    w = torch.randn(K, F_in, F_out, generator=g, dtype=torch.float64) / (K * F_in) ** 0.5
    b = torch.randn(F_out, generator=g, dtype=torch.float64) * 0.1 if bias else None
    return x, w, b


def run(fn, L, x, w, b, activation, dy, *, need_x=True, **kw):
    """Forward + backward of fn; returns (y, dx, dw, db) as float64."""
    x = x.detach().clone().requires_grad_(need_x)
    w = w.detach().clone().requires_grad_(True)
    b = b.detach().clone().requires_grad_(True) if b is not None else None
    y = fn(L, x, w, b, activation, **kw)
    y.backward(dy.to(y.dtype))
    grads = [x.grad if need_x else None, w.grad, b.grad if b is not None else None]
    return [t.double() if t is not None else None for t in [y.detach()] + grads]


def assert_close64(actual, expected, dtype, what):
    """float32 kernels vs float64 reference: a relative error scaled by the size of the result."""
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    scale = 1.0 + expected.abs().max().item()
    err = (actual.cpu() - expected.cpu()).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol * scale:.3e}"


# (name, V, B, F_in, F_out, K, activation, operator kwargs, tile override)
CASES = [
    ("paper_K3_1x1", 13, 5, 1, 1, 3, "relu", dict(isolated=(2,), self_loops=True), {}),
    ("K1", 7, 3, 1, 1, 1, "relu", {}, {}),
    ("K2_no_activation", 10, 4, 1, 1, 2, None, dict(isolated=(0, 9)), {}),
    ("V1", 1, 3, 1, 1, 3, "relu", {}, {}),
    ("B1_K4", 11, 1, 1, 1, 4, "relu", dict(isolated=(5,)), {}),
    ("channels_3x2", 9, 3, 3, 2, 3, "relu", dict(isolated=(4,)), {}),
    ("channels_1x4_K2", 6, 2, 1, 4, 2, None, {}, {}),
    ("wide_9x8_gemm_path", 6, 2, 9, 8, 3, "relu", {}, {}),
    ("nonsymmetric", 12, 3, 1, 1, 4, "relu", dict(symmetric=False, empty_rows=(3,), isolated=(7,)), {}),
    ("nonsymmetric_2x3", 8, 2, 2, 3, 3, None, dict(symmetric=False, empty_rows=(0,)), {}),
    ("nonsymmetric_wide", 5, 2, 8, 9, 2, "relu", dict(symmetric=False), {}),
    ("many_programs", 19, 5, 1, 1, 3, "relu", dict(isolated=(18,)), dict(block_rows=4, block_batch=2)),
    ("many_programs_2x2", 7, 3, 2, 2, 3, "relu", dict(symmetric=False), dict(block_rows=2, block_batch=2)),
]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("need_x", [True, False], ids=["dx", "weights_only"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_float64_reference(case, need_x, device):
    name, V, B, F_in, F_out, K, act, op_kw, tiles = case
    M = random_operator(V, seed=V, **op_kw)
    x, w, b = draw(B, V, F_in, F_out, K, seed=zlib.crc32(name.encode()))
    # The reference sees exactly the float32 values the kernels see.
    x, w, b, M = (t.float().double() for t in (x, w, b, M))
    dy = torch.randn(B, V, F_out, dtype=torch.float64)
    expected = run(reference.cheb_conv, to_csr(M, torch.float64), x, w, b, act, dy, need_x=need_x)
    actual = run(
        cheb_conv,
        to_csr(M, device=device),
        x.float().to(device),
        w.float().to(device),
        b.float().to(device),
        act,
        dy.to(device),
        need_x=need_x,
        **tiles,
    )
    for what, a, e in zip(("y", "dx", "dw", "db"), actual, expected, strict=True):
        if e is not None:
            assert a is not None, what
            assert a.shape == e.shape, what
            assert_close64(a, e, torch.float32, what)
    assert actual[0].abs().max() > 0, "degenerate draw: all outputs are zero"


@pytest.mark.parametrize("device", devices())
def test_float64_inputs_and_no_bias(device):
    V, B, K = 9, 4, 3
    M = random_operator(V, symmetric=False, isolated=(1,))
    x, w, _ = draw(B, V, 2, 2, K, bias=False)
    dy = torch.randn(B, V, 2, dtype=torch.float64)
    expected = run(reference.cheb_conv, to_csr(M, torch.float64), x, w, None, "relu", dy)
    actual = run(cheb_conv, to_csr(M, torch.float64, device), x.to(device), w.to(device), None, "relu", dy.to(device))
    for what, a, e in zip(("y", "dx", "dw"), actual[:3], expected[:3], strict=True):  # no bias: no db
        assert_close64(a, e, torch.float64, what)


@pytest.mark.parametrize("device", devices())
def test_real_rescaled_laplacian(device):
    """A kNN word graph as scanet.data.graph prepares it (symmetric only up to rounding)."""
    from scanet.data.graph import knn_graph, normalized_laplacian, rescale_laplacian, to_torch_csr

    emb = np.random.default_rng(3).normal(size=(24, 6)).astype(np.float32)
    Lt = rescale_laplacian(normalized_laplacian(knn_graph(emb, k=4)), 2.0)
    L32 = to_torch_csr(Lt, torch.float32, device)
    L64 = to_torch_csr(Lt, torch.float64)
    x, w, b = draw(6, 24, 1, 1, 3)
    dy = torch.randn(6, 24, 1, dtype=torch.float64)
    expected = run(reference.cheb_conv, L64, x.float().double(), w.float().double(), b.float().double(), "relu", dy)
    actual = run(
        cheb_conv, L32, x.float().to(device), w.float().to(device), b.float().to(device), "relu", dy.to(device)
    )
    for what, a, e in zip(("y", "dx", "dw", "db"), actual, expected, strict=True):
        assert_close64(a, e, torch.float32, what)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("F", [1, 2, 9], ids=["1x1", "2x2", "9x9_gemm_path"])
def test_gradients_are_bitwise_reproducible(F, device):
    V, B, K = 9, 4, 3  # 3 x 2 programs per launch: several partials in every reduction
    L = to_csr(random_operator(V, symmetric=False), device=device)
    x, w, b = (t.float().to(device) for t in draw(B, V, F, F, K))
    dy = torch.randn(B, V, F, device=device)
    for need_x in (True, False):
        first = run(cheb_conv, L, x, w, b, "relu", dy, need_x=need_x, block_rows=4, block_batch=2)
        second = run(cheb_conv, L, x, w, b, "relu", dy, need_x=need_x, block_rows=4, block_batch=2)
        for a, c in zip(first, second, strict=True):
            if a is not None:
                assert torch.equal(a, c)


def test_symmetry_is_detected_once_and_transpose_cached():
    V, dev = 10, TRITON_DEVICE
    Ls = to_csr(random_operator(V, symmetric=True), device=dev)
    Ln = to_csr(random_operator(V, symmetric=False, empty_rows=(2,)), device=dev)
    x, w, b = (t.float().to(dev) for t in draw(2, V, 1, 1, 3))
    dy = torch.randn(2, V, 1, device=dev)
    for L, symmetric in ((Ls, True), (Ln, False)):
        lap = Laplacian(L)  # checked and prepared once, here
        assert lap.symmetric is symmetric
        transpose = lap.transpose()
        first = run(cheb_conv, lap, x, w, b, "relu", dy)
        second = run(cheb_conv, lap, x, w, b, "relu", dy)
        assert lap.symmetric is symmetric and all(a is c for a, c in zip(lap.transpose(), transpose, strict=True))
        for a, c in zip(first, run(cheb_conv, L, x, w, b, "relu", dy), strict=True):  # a raw CSR: the same result
            if a is not None:
                torch.testing.assert_close(a, c)
        assert all(torch.equal(a, c) for a, c in zip(first, second, strict=True) if a is not None)
    # the kept transpose is the transpose; a symmetric Laplacian keeps none
    lap = Laplacian(Ln)
    crow_t, col_t, values_t = lap.transpose()
    dense_t = torch.sparse_csr_tensor(crow_t, col_t, values_t, (V, V)).to_dense()
    assert torch.equal(dense_t.cpu(), Ln.to_dense().T.cpu())
    assert Laplacian(Ls).crow_t is None
    # loading new values into the same storage re-prepares it: the flag follows the values
    sym = Laplacian(Ls)
    state = {k: v.clone() for k, v in sym.state_dict().items()}
    state["values"] = state["values"] * torch.linspace(0.5, 1.5, state["values"].numel(), device=dev)
    sym.load_state_dict(state)
    assert sym.symmetric is False and torch.equal(
        torch.sparse_csr_tensor(*sym.transpose(), (V, V)).to_dense().cpu(), sym.csr().to_dense().T.cpu()
    )


def test_transpose_csr_of_awkward_patterns():
    for M in (
        random_operator(1),
        random_operator(6, symmetric=False, empty_rows=(0, 5), isolated=(3,)),
        torch.zeros(4, 4, dtype=torch.float64),
    ):
        L = M.to_sparse_csr()
        op = kernels.CSR(L.crow_indices(), L.col_indices(), L.values(), M.shape[0])
        t = kernels.transpose_csr(op)
        assert torch.equal(torch.sparse_csr_tensor(t.crow, t.col, t.values, M.shape).to_dense(), M.T)
        assert kernels.csr_is_symmetric(op, t) == torch.equal(M, M.T)


# ---------------------------------------------------------------------------------------------- errors
def _bad_csr(crow, col, values, V):
    return torch.sparse_csr_tensor(
        torch.tensor(crow), torch.tensor(col), torch.tensor(values), (V, V), check_invariants=False
    )


def test_clear_errors():
    V = 4
    L = to_csr(random_operator(V))
    x, w, b = (t.float() for t in draw(2, V, 1, 1, 3))
    with pytest.raises(ValueError, match="sparse_csr"):
        cheb_conv(L.to_dense(), x, w, b)
    with pytest.raises(ValueError, match="sparse_csr"):
        cheb_conv(L.to_sparse_coo(), x, w, b)
    with pytest.raises(ValueError, match="square"):
        cheb_conv(torch.zeros(4, 5).to_sparse_csr(), x, w, b)
    with pytest.raises(ValueError, match="one floating dtype"):
        cheb_conv(L, x.double(), w, b)
    with pytest.raises(ValueError, match="unsorted"):
        cheb_conv(_bad_csr([0, 2, 2, 3, 4], [2, 1, 0, 3], [1.0, 1.0, 1.0, 1.0], V), x, w, b)
    with pytest.raises(ValueError, match="out of range"):
        cheb_conv(_bad_csr([0, 1, 2, 3, 4], [0, 1, 7, 3], [1.0, 1.0, 1.0, 1.0], V), x, w, b)
    with pytest.raises(ValueError, match="out of range"):
        cheb_conv(_bad_csr([0, 1, 2, 3, 4], [0, -1, 2, 3], [1.0, 1.0, 1.0, 1.0], V), x, w, b)
    with pytest.raises(ValueError, match="vertices"):
        cheb_conv(L, torch.randn(2, V + 1, 1), w, b)
    with pytest.raises(ValueError, match="F_in"):
        cheb_conv(L, torch.randn(2, V, 2), w, b)
    with pytest.raises(ValueError, match="bias"):
        cheb_conv(L, x, w, torch.zeros(3))
    with pytest.raises(ValueError, match="activation"):
        cheb_conv(L, x, w, b, activation="tanh")
    with pytest.raises(ValueError, match="one device"):
        cheb_conv(L, torch.empty(2, V, 1, device="meta"), w, b)
    # float16 is no longer refused by the Triton path: it is widened to float32 and the result narrowed once
    dev = TRITON_DEVICE
    y16 = cheb_conv(L.to(torch.float16).to(dev), x.half().to(dev), w.half().to(dev), b.half().to(dev))
    want = reference.cheb_conv(L.double(), x.half().double(), w.half().double(), b.half().double())
    assert y16.dtype == torch.float16
    torch.testing.assert_close(y16.cpu().double(), want, rtol=2e-3, atol=2e-3 * float(want.abs().max()))
    L_grad = to_csr(random_operator(V), device=dev)
    L_grad.requires_grad_(True)
    with pytest.raises(ValueError, match="constant"):
        cheb_conv(L_grad, x.to(dev), w.to(dev), b.to(dev))
    # a bad Laplacian never becomes a checked Laplacian object: the full index check runs when it is built
    for crow, col in (([0, 2, 2, 3, 4], [2, 1, 0, 3]), ([0, 1, 2, 3, 4], [0, 1, 7, 3])):
        with pytest.raises(ValueError, match="unsorted|out of range"):
            Laplacian(_bad_csr(crow, col, [1.0, 1.0, 1.0, 1.0], V))


def test_cpu_dispatch_without_interpreter(monkeypatch):
    """CPU without TRITON_INTERPRET=1: scanet.native when available, else the eager reference."""
    import types

    import scanet

    V = 6
    L = to_csr(random_operator(V))
    x, w, b = (t.float() for t in draw(2, V, 1, 1, 3))
    calls = []
    seen_kw = []
    fake = types.SimpleNamespace(
        available=lambda: True,
        cheb_conv=lambda *a, **kw: calls.append("native") or seen_kw.append(kw) or torch.full((2, V, 1), 7.0),
    )
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setitem(__import__("sys").modules, "scanet.native", fake)
    monkeypatch.setattr(scanet, "native", fake, raising=False)
    eager = reference.cheb_conv
    monkeypatch.setattr(reference, "cheb_conv", lambda *a: calls.append("eager") or eager(*a))
    assert torch.equal(cheb_conv(L, x, w, b), torch.full((2, V, 1), 7.0)) and calls == ["native"]
    # bf16 (and autocast) go to the native op too, with the Laplacian's symmetry and the dropout handed over
    cheb_conv(Laplacian(L), x.bfloat16(), w, b, dropout_p=0.3, training=False, out_dtype=torch.float32)
    assert calls == ["native", "native"]
    assert seen_kw[-1] == {
        "symmetric": Laplacian(L).symmetric,
        "dropout_p": 0.3,
        "training": False,
        "out_dtype": torch.float32,
        "save_basis": None,
    }
    calls.clear()
    fake.available = lambda: False
    torch.testing.assert_close(cheb_conv(L, x, w, b), eager(L, x, w, b))
    assert calls == ["eager"]
    with pytest.raises(ValueError, match="vertices"):  # the checks run on every path
        cheb_conv(L, torch.randn(2, V + 1, 1), w, b)


# ------------------------------------------------------------------------------------------- reference
def test_reference_gradcheck_float64():
    M = random_operator(5, symmetric=False, empty_rows=(1,))
    L = M.to_sparse_csr()
    x, w, b = draw(2, 5, 2, 2, 3)
    inputs = tuple(t.requires_grad_() for t in (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: reference.cheb_conv(L, x, w, b, None), inputs)


def test_fused_gradcheck_float64():
    M = random_operator(4, symmetric=False)
    L = M.to_sparse_csr().to(TRITON_DEVICE)
    x, w, b = draw(2, 4, 1, 1, 3)
    inputs = tuple(t.to(TRITON_DEVICE).requires_grad_() for t in (x, w, b))
    # activation None: gradcheck's finite differences are not defined at a ReLU kink
    assert torch.autograd.gradcheck(lambda x, w, b: cheb_conv(L, x, w, b, None), inputs)


# ------------------------------------------------------------------------------------------------ modules
@pytest.mark.parametrize("device", devices())
def test_module_is_drop_in(device):
    V, B = 12, 3
    L = to_csr(random_operator(V, isolated=(3,)), device=device)
    torch.manual_seed(0)
    eager = EagerChebConv(2, 3, K=3).to(device)
    with torch.no_grad():
        eager.bias.normal_()
    fused = ChebConv(2, 3, K=3).to(device)
    assert isinstance(fused, EagerChebConv) and type(fused).op is cheb_conv
    assert fused.state_dict().keys() == eager.state_dict().keys()
    fused.load_state_dict(eager.state_dict())
    x = torch.randn(B, V, 2, device=device)
    y_eager, y_fused = eager(x, L), fused(x, L)
    torch.testing.assert_close(y_fused, y_eager, rtol=1e-5, atol=1e-6)
    # and back: a fused checkpoint loads into the eager module
    eager2 = EagerChebConv(2, 3, K=3).to(device)
    eager2.load_state_dict(fused.state_dict())
    torch.testing.assert_close(eager2(x, L), y_fused, rtol=1e-5, atol=1e-6)


def test_short_training_matches_eager():
    from scanet import fused as fused_pkg
    from scanet.config import ModelConfig
    from scanet.model import SCANet

    if not hasattr(fused_pkg, "StackedCoAttention"):
        pytest.skip("scanet.fused.StackedCoAttention does not exist yet (another helper writes it)")
    V, D, N = 20, 8, 8
    rng = np.random.default_rng(0)
    A = sp.random(V, V, density=0.2, random_state=1, format="csr")
    A = A + A.T
    from scanet.data.graph import normalized_laplacian, rescale_laplacian

    Lt = rescale_laplacian(normalized_laplacian(A), 2.0)
    cfg = ModelConfig(common_dim=16, cheb_k=3, gcn_channels=(1, 1), coattention_layers=2, dropout=0.0)
    torch.manual_seed(0)
    eager = SCANet(V, D, Lt, cfg)
    fused = SCANet(V, D, Lt, cfg, fused=True)
    fused.load_state_dict(eager.state_dict())
    bow = torch.from_numpy(rng.poisson(0.5, size=(N, V)).astype(np.float32))
    img = torch.randn(N, D)
    target = torch.from_numpy(rng.integers(0, 2, size=N).astype(np.float32))
    losses = {}
    for name, model in (("eager", eager), ("fused", fused)):
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        losses[name] = []
        for _ in range(3):
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy(model(bow, img), target)
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    assert losses["eager"][-1] != losses["eager"][0], "training did not move"
    np.testing.assert_allclose(losses["fused"], losses["eager"], rtol=1e-4, atol=1e-6)
    for conv_eager, conv_fused in zip(eager.text_encoder.convs, fused.text_encoder.convs, strict=True):
        assert isinstance(conv_fused, ChebConv)
        torch.testing.assert_close(conv_fused.weight, conv_eager.weight, rtol=1e-4, atol=1e-5)
