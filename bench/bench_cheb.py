"""Benchmark of one Chebyshev graph convolution (op "cheb_conv"): the paper's layer, K=3, F_in = F_out = 1, ReLU.

Run: ``pytest bench/bench_cheb.py --benchmark`` (add ``--bench-full`` on CPU for the full sweep).

Graphs: a random symmetric "k-regular-ish" graph per V (every vertex draws k=8 random neighbours, symmetrized
by max, so ~2k = 16 non-zeros per row), normalized Laplacian, rescaled with lmax = 2 (L~ = L - I), float32 CSR
with the int64 indices scanet.data.graph produces. Random neighbours have no locality: the gathers' worst
case; a kNN graph of word embeddings is about as scattered unless the vocabulary is reordered.

Sweep: V in {1k, 10k, 50k} x B in {1, 64, 256, 1024, 4096} x {fwd, bwd, fwd+bwd} on CUDA or with
--bench-full; on CPU without it V in {1k, 10k} x B in {1, 64, 256}.
"fwd" is inference (no autograd); "bwd" times backward alone (forward done once, retain_graph); "fwd+bwd"
both. Gradients: x, weight and bias all require grad.

Providers (side by side in one run; the harness gives every row its ratio to "eager"):
  eager     scanet.reference.cheb_conv: torch.sparse.mm on torch sparse CSR, autograd for backward
  fused     scanet.fused.cheb_conv: the Triton kernels (CUDA only: the interpreter is not a benchmark)
  scipy     CPU only: scipy.sparse CSR @ dense, the same recursion, backward written out by hand
  cusparse  CUDA only: cupyx.scipy.sparse (cuSPARSE SpMM), the same recursion and hand-written backward
  pyg       torch_geometric.nn.ChebConv(1, 1, K=3) on x (B, V, 1) with edge_index/edge_weight of the
            adjacency, normalization "sym", lambda_max = 2 (the same L~; PyG rebuilds it on every call)
  native    scanet.native.cheb_conv when scanet.native.available() (CPU)
scipy and cusparse get the signals already laid out as (V, B); the torch providers take x as (B, V, 1).

Byte model (``bytes``; GB/s = bytes / median): the compulsory traffic of the two-launch algorithm, each
tensor pass counted once, i.e. assuming a neighbour's row, once read, is re-read from cache. With
N = B*F signals per vertex, S = V*N*4 bytes for one fp32 signal tensor, and
C = (V+1)*idx + nnz*(idx + 4) bytes for one read of the CSR (idx = 8 for int64 indices):
  fwd   = 2C + 5S : SpMM 1 reads x, writes T1; SpMM 2 gathers T1, reads x (for -T0 and W_0), writes y
  bwd   = 2C + 8S : SpMM 1 gathers dz from dy and y (2 reads), writes U1; SpMM 2 gathers U1, reads dy, y, x,
                    writes dx  (dW and db are per-program partials: negligible)
  fwd+bwd = 4C + 13S
``bytes_no_reuse`` adds the neighbour re-reads (nnz - V)*N*4 per gathered tensor per SpMM: the traffic when
nothing is cached. The HBM-bound time is bytes / 4.3 TB/s on an H200; the L2 (60 MB) holds one signal tensor up
to V*B ~ 15M, which is why rows at large V*B sit between the two models.
FLOP model: fwd 4 nnz N + 10 V N (two SpMMs, the recursion, three fmas, bias, ReLU); bwd 4 nnz N + 16 V N.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scanet import reference

OP = "cheb_conv"
K = 3
DEGREE = 8
FULL_V = (1_000, 10_000, 50_000)
FULL_B = (1, 64, 256, 1024, 4096)
REDUCED_V = (1_000, 10_000)
REDUCED_B = (1, 64, 256)
MODES = ("fwd", "bwd", "fwd+bwd")
PROVIDERS = ("eager", "fused", "scipy", "cusparse", "pyg", "native")
# PyG materializes one message per (edge, signal): skip it where that alone is many GB.
PYG_MAX_MESSAGES = 2e9


def pytest_generate_tests(metafunc):
    if {"V", "B"} <= set(metafunc.fixturenames):
        full = metafunc.config.getoption("--bench-full") or torch.cuda.is_available()
        vs, bs = (FULL_V, FULL_B) if full else (REDUCED_V, REDUCED_B)
        metafunc.parametrize("V", vs, ids=[f"V={v}" for v in vs])
        metafunc.parametrize("B", bs, ids=[f"B={b}" for b in bs])


# ------------------------------------------------------------------------------------------------- graphs
_GRAPHS: dict = {}


def graph_and_laplacian(V: int, k: int = DEGREE, seed: int = 0):
    """(adjacency, rescaled Laplacian L~) of scanet.data.graph's random graph (its ``random_graph_laplacian``
    is the L~), cached per V: the adjacency's nnz goes into the byte model."""
    from scanet.data import graph

    if V not in _GRAPHS:
        _GRAPHS[V] = (graph.random_graph(V, k, seed), graph.random_graph_laplacian(V, k, seed))
    return _GRAPHS[V]


def byte_model(V: int, nnz: int, N: int, mode: str, idx_bytes: int = 8) -> tuple[int, int]:
    """(compulsory bytes, bytes with no neighbour reuse) of the K=3 layer; see the module docstring."""
    C = (V + 1) * idx_bytes + nnz * (idx_bytes + 4)
    S = V * N * 4
    regather = (nnz - V) * N * 4
    fwd = (2 * C + 5 * S, 2 * regather)  # gathers: x, T1
    bwd = (2 * C + 8 * S, 3 * regather)  # gathers: dy and y (masked dz), U1
    parts = {"fwd": [fwd], "bwd": [bwd], "fwd+bwd": [fwd, bwd]}[mode]
    compulsory = sum(p[0] for p in parts)
    return compulsory, compulsory + sum(p[1] for p in parts)


def flop_model(V: int, nnz: int, N: int, mode: str) -> int:
    fwd, bwd = 4 * nnz * N + 10 * V * N, 4 * nnz * N + 16 * V * N
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


# ---------------------------------------------------------------------------------------------- providers
def _torch_runner(op, L, x, w, b, dy, mode):
    """fn() for a torch op with the reference signature."""
    if mode == "fwd":

        def fwd():
            with torch.no_grad():
                return op(L, x, w, b, "relu")

        return fwd
    xg, wg, bg = (t.detach().clone().requires_grad_() for t in (x, w, b))

    def clear():
        xg.grad = wg.grad = bg.grad = None

    if mode == "fwd+bwd":

        def fwd_bwd():
            op(L, xg, wg, bg, "relu").backward(dy)
            clear()

        return fwd_bwd
    y = op(L, xg, wg, bg, "relu")

    def bwd():
        y.backward(dy, retain_graph=True)
        clear()

    return bwd


def _array_runner(xp, Lmat, LTmat, X, wv, bv, dY, mode):
    """fn() for the same layer in scipy/cupy with signals as (V, B); backward written out by hand."""
    w0, w1, w2 = (float(v) for v in wv)
    bias = float(bv.reshape(-1)[0])

    def forward():
        T1 = Lmat @ X
        T2 = 2.0 * (Lmat @ T1) - X
        Z = w0 * X + w1 * T1 + w2 * T2 + bias
        return xp.maximum(Z, 0.0), (T1, T2)

    def backward(Y, basis):
        T1, T2 = basis
        dZ = dY * (Y > 0)
        U1 = LTmat @ dZ
        U2 = 2.0 * (LTmat @ U1) - dZ
        dX = w0 * dZ + w1 * U1 + w2 * U2
        dW = [float((X * dZ).sum()), float((T1 * dZ).sum()), float((T2 * dZ).sum())]
        return dX, dW, float(dZ.sum())

    if mode == "fwd":
        return lambda: forward()[0]
    if mode == "fwd+bwd":
        return lambda: backward(*forward())
    saved = forward()
    return lambda: backward(*saved)


def _make_runner(provider, V, B, mode, device):
    A, Lt = graph_and_laplacian(V)
    gen = torch.Generator().manual_seed(V + B)
    x = torch.rand(B, V, 1, generator=gen)
    w = torch.randn(K, 1, 1, generator=gen) * 0.5
    w[0] += 1.0
    b = torch.zeros(1)
    dy = torch.randn(B, V, 1, generator=gen)
    if provider in ("eager", "fused", "native"):
        from scanet.data.graph import to_torch_csr

        L = to_torch_csr(Lt, torch.float32, device)
        if provider == "eager":
            op = reference.cheb_conv
        elif provider == "fused":
            if device.type != "cuda":
                pytest.skip(
                    "fused: the Triton kernels are benchmarked on CUDA only (the interpreter is not a benchmark)"
                )
            from scanet.fused import cheb_conv as op
        else:
            try:
                from scanet import native
            except ImportError:
                pytest.skip("native: scanet.native does not exist")
            if device.type != "cpu" or not native.available():
                pytest.skip("native: scanet.native.available() is False or this run benchmarks CUDA")
            op = native.cheb_conv
        xd, wd, bd, dyd = (t.to(device) for t in (x, w, b, dy))
        if mode != "fwd" and provider == "native":
            probe = op(L, xd.clone().requires_grad_(), wd, bd, "relu")
            if not probe.requires_grad:
                pytest.skip("native: no autograd support, backward not benchmarked")
        return _torch_runner(op, L, xd, wd, bd, dyd, mode)
    if provider == "scipy":
        if device.type != "cpu":
            pytest.skip("scipy: CPU baseline, skipped when benchmarking CUDA")
        X = np.ascontiguousarray(x[:, :, 0].T.numpy())
        dY = np.ascontiguousarray(dy[:, :, 0].T.numpy())
        return _array_runner(np, Lt, Lt.T.tocsr(), X, w.flatten().numpy(), b.numpy(), dY, mode)
    if provider == "cusparse":
        if device.type != "cuda":
            pytest.skip("cusparse: needs CUDA")
        cp = pytest.importorskip("cupy", reason="cusparse: cupy is not installed")
        import cupyx.scipy.sparse as csp

        Lc = csp.csr_matrix(Lt.astype(np.float32))
        LTc = csp.csr_matrix(Lt.T.tocsr().astype(np.float32))
        X = cp.asarray(np.ascontiguousarray(x[:, :, 0].T.numpy()))
        dY = cp.asarray(np.ascontiguousarray(dy[:, :, 0].T.numpy()))
        return _array_runner(cp, Lc, LTc, X, w.flatten().numpy(), b.numpy(), dY, mode)
    if provider == "pyg":
        pyg_nn = pytest.importorskip("torch_geometric.nn", reason="pyg: torch_geometric is not installed")
        if B * A.nnz > PYG_MAX_MESSAGES:
            pytest.skip(
                f"pyg: B*nnz = {B * A.nnz:.1e} messages (> {PYG_MAX_MESSAGES:.0e}) is too slow for the time budget"
            )
        coo = A.tocoo()
        edge_index = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64)).to(device)
        edge_weight = torch.from_numpy(coo.data.astype(np.float32)).to(device)
        conv = pyg_nn.ChebConv(1, 1, K=K, normalization="sym").to(device)
        xd, dyd = x.to(device), dy.to(device)

        def op(L, x_, w_, b_, act):
            return torch.relu(conv(x_, edge_index, edge_weight, lambda_max=2.0))

        if mode == "fwd":

            def fwd():
                with torch.no_grad():
                    return op(None, xd, None, None, "relu")

            return fwd
        xg = xd.clone().requires_grad_()

        def clear():
            xg.grad = None
            conv.zero_grad(set_to_none=True)

        if mode == "fwd+bwd":

            def fwd_bwd():
                op(None, xg, None, None, "relu").backward(dyd)
                clear()

            return fwd_bwd
        y = op(None, xg, None, None, "relu")

        def bwd():
            y.backward(dyd, retain_graph=True)
            clear()

        return bwd
    raise AssertionError(provider)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_cheb_conv(benchmark, measure, bench_device, provider, mode, V, B):
    fn = _make_runner(provider, V, B, mode, bench_device)
    nnz = graph_and_laplacian(V)[1].nnz
    compulsory, no_reuse = byte_model(V, nnz, B, mode)
    measure(
        benchmark,
        fn,
        op=OP,
        case=f"V={V} B={B} {mode}",
        provider=provider,
        device=bench_device,
        bytes=compulsory,
        flops=flop_model(V, nnz, B, mode),
        bytes_no_reuse=no_reuse,
        nnz=nnz,
    )
