"""The native CPU backend (scanet.native, csrc/cheb_conv.cpp) against the float64 eager oracles.

Tests that need the compiled library skip with scanet.native.unavailable_reason() when it is not built; the
loader's own checks (torch version, CPU, load errors) run always, on fake library files.
"""

from __future__ import annotations

import pytest
import torch

from scanet import native, reference

needs_native = pytest.mark.skipif(
    not native.available(), reason=f"native extension unavailable: {native.unavailable_reason()}"
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny problems on a shared 2-core machine: an OpenMP barrier can wait a scheduler quantum for a
    descheduled thread (measured 10 ms per region under load). One thread keeps these tests fast;
    test_thread_count_does_not_change_results_bitwise runs the parallel paths and checks them against it."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ------------------------------------------------------------------------------------------------- graphs
def _csr(dense: torch.Tensor) -> torch.Tensor:
    return dense.to_sparse_csr()


def awkward_laplacian(V: int, kind: str, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    """Small graphs with what breaks SpMM kernels: empty rows, isolated vertices, self loops, asymmetry."""
    g = torch.Generator().manual_seed(seed)
    A = (torch.rand(V, V, generator=g) < 0.35).to(dtype) * torch.randn(V, V, generator=g, dtype=dtype)
    if kind == "symmetric":
        A = A + A.T
    elif kind == "nonsymmetric":
        A = A.triu(1) * 2.0 + A.tril(-1) * 0.5  # different values across the diagonal
    elif kind == "empty_rows":  # non-symmetric: some rows empty, their columns not
        A[::3] = 0
    elif kind == "isolated":  # symmetric, with isolated vertices
        A = A + A.T
        A[1::4] = 0
        A[:, 1::4] = 0
    elif kind == "self_loops":
        A = A + A.T
        A.diagonal().copy_(torch.randn(V, generator=g, dtype=dtype))
    elif kind == "empty":
        A = torch.zeros(V, V, dtype=dtype)
    else:
        raise ValueError(kind)
    return _csr(A)


def knn_laplacian(V: int, k: int = 6, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """L~ = -D^-1/2 A D^-1/2 (lmax = 2) of a symmetrized random kNN graph: the shape of SCANet's word graph."""
    g = torch.Generator().manual_seed(seed)
    pts = torch.randn(V, 8, generator=g, dtype=torch.float64)
    d = torch.cdist(pts, pts)
    d.fill_diagonal_(float("inf"))
    idx = d.topk(k, largest=False).indices
    A = torch.zeros(V, V, dtype=torch.float64)
    A.scatter_(1, idx, 1.0)
    A = torch.maximum(A, A.T)
    dinv = A.sum(1).rsqrt()
    return _csr((-(dinv[:, None] * A * dinv[None, :])).to(dtype))


def vb(t: torch.Tensor) -> torch.Tensor:
    """The same (B, V, F) values, stored as (V, B, F): the layout the native ops produce and read in place."""
    return t.permute(1, 0, 2).contiguous().permute(1, 0, 2)


def _inputs(B, V, F_in, F_out, K, dtype=torch.float64, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, V, F_in, generator=g, dtype=dtype)
    w = torch.randn(K, F_in, F_out, generator=g, dtype=dtype) / K
    b = torch.randn(F_out, generator=g, dtype=dtype) if bias else None
    return x, w, b


def _grads(fn, L, x, w, b, act, grad_out):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    leaves = [x, w] + ([b.detach().requires_grad_()] if b is not None else [])
    y = fn(L, x, w, leaves[2] if b is not None else None, act)
    grads = torch.autograd.grad(y, leaves, grad_out)
    return y.detach(), grads


# ------------------------------------------------------------------------------------- forward / backward
GRAPHS = ["symmetric", "nonsymmetric", "empty_rows", "isolated", "self_loops", "empty"]
SHAPES = [  # (B, V, F_in, F_out)
    (1, 1, 1, 1),
    (3, 7, 1, 1),
    (2, 13, 3, 2),
    (5, 33, 2, 3),
    (17, 70, 1, 1),  # B*F not a multiple of the vector width, V above one reduction block
]


@needs_native
@pytest.mark.parametrize("kind", GRAPHS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}V{}Fi{}Fo{}".format(*s))
@pytest.mark.parametrize("K", [1, 2, 3, 5])
def test_cheb_conv_matches_reference_float64(kind, shape, K):
    B, V, F_in, F_out = shape
    L = awkward_laplacian(V, kind)
    for act, bias, x_layout, g_layout in [
        ("relu", True, "bv", "bv"),
        (None, False, "vb", "vb"),
        ("relu", True, "vb", "bv"),
        ("none", True, "bv", "vb"),
    ]:
        x, w, b = _inputs(B, V, F_in, F_out, K, bias=bias, seed=K)
        if x_layout == "vb":
            x = vb(x)
        go = torch.randn(B, V, F_out, dtype=torch.float64)
        if g_layout == "vb":
            go = vb(go)
        y, grads = _grads(native.cheb_conv, L, x, w, b, act, go)
        y_ref, grads_ref = _grads(reference.cheb_conv, L, x, w, b, act, go)
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        for name, got, want in zip(("dx", "dW", "db")[: len(grads)], grads, grads_ref, strict=True):  # db: if bias
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")


def _raw_forward(L, x, w, b, save_basis, dropout_p=0.0, seed=0, out_dtype=None):
    """scanet_native::cheb_conv_forward itself (through its registered autograd), save_basis as given."""
    crow, col, values = L.crow_indices(), L.col_indices(), L.values()
    y, _ = torch.ops.scanet_native.cheb_conv_forward(
        crow, col, values.to(w.dtype), x, w, b, True, save_basis, False, dropout_p, seed, out_dtype
    )
    return y


@needs_native
@pytest.mark.parametrize("kind", ["symmetric", "nonsymmetric", "empty_rows"])
@pytest.mark.parametrize("shape", [(3, 7, 1, 1), (17, 70, 1, 1), (2, 13, 3, 2), (5, 33, 2, 3)], ids=str)
@pytest.mark.parametrize("K", [2, 3, 4, 5])
@pytest.mark.parametrize("want", ["w", "x+w"])
def test_backward_with_and_without_saved_basis(kind, shape, K, want):
    """dW from the saved basis (<T_k x, dz>) and from the adjoint recursion (<x, T_k(L~^T) dz>, no basis saved)
    both match the float64 reference, with and without dx, with dropout and F_out above or below F_in."""
    B, V, F_in, F_out = shape
    L = awkward_laplacian(V, kind)
    x, w, b = _inputs(B, V, F_in, F_out, K, seed=K + 11)
    go = torch.randn(B, V, F_out, dtype=torch.float64)
    got = {}
    for save in (True, False):
        xr = x.clone().requires_grad_(want == "x+w")
        wr, br = w.clone().requires_grad_(), b.clone().requires_grad_()
        leaves = [xr, wr, br] if want == "x+w" else [wr, br]
        y = _raw_forward(L, xr, wr, br, save)
        got[save] = torch.autograd.grad(y, leaves, go)
        yd = _raw_forward(L, xr, wr, br, save, dropout_p=0.3, seed=7)
        got[save, "dropout"] = torch.autograd.grad(yd, leaves, go)
    xr, wr, br = x.clone().requires_grad_(want == "x+w"), w.clone().requires_grad_(), b.clone().requires_grad_()
    y_ref = reference.cheb_conv(L, xr, wr, br, "relu")
    want_grads = torch.autograd.grad(y_ref, [xr, wr, br] if want == "x+w" else [wr, br], go)
    for save in (True, False):
        for a, c in zip(got[save], want_grads, strict=True):
            torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)
        for a, c in zip(got[save, "dropout"], got[True, "dropout"], strict=True):  # same mask either way
            torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)
    assert any(g.abs().sum() > 0 for g in got[False, "dropout"])


@needs_native
def test_backward_without_saved_basis_low_precision_x():
    """bf16 / fp16 x (not stored as the kernels read it: converted in backward) and a bf16 output, the adjoint
    path against the saved-basis path (same float32 arithmetic but the order of dW's sums)."""
    B, V, K = 21, 90, 3
    L = knn_laplacian(V)
    x64, w64, b64 = _inputs(B, V, 1, 1, K, seed=4)
    go = torch.randn(B, V, 1)
    for dtype in (torch.bfloat16, torch.float16):
        res = []
        for save in (True, False):
            xr = x64.to(dtype).requires_grad_()
            wr, br = w64.float().requires_grad_(), b64.float().requires_grad_()
            y = _raw_forward(L, xr, wr, br, save, dropout_p=0.2, seed=3, out_dtype=dtype)
            res.append(torch.autograd.grad(y, [xr, wr, br], go.to(dtype)))
        for a, c in zip(*res, strict=True):
            assert a.dtype == c.dtype
            torch.testing.assert_close(a.float(), c.float(), rtol=1e-4, atol=1e-4)


@needs_native
def test_native_cheb_conv_saves_the_basis_only_where_backward_needs_it(monkeypatch):
    """cheb_conv saves T_1..T_{K-1} for dW only when x does not require grad or F_out > F_in (else the adjoint)."""
    L = knn_laplacian(40)
    forward = torch.ops.scanet_native.cheb_conv_forward
    seen = []
    real_run = native._run

    def spy(op, *args):
        if op is forward:
            seen.append(args[7])  # save_basis
        return real_run(op, *args)

    monkeypatch.setattr(native, "_run", spy)
    for x_grad, F_out, expect in [(False, 1, True), (True, 1, False), (True, 3, True), (True, 2, False)]:
        F_in = 2 if F_out == 2 else 1
        g = torch.Generator().manual_seed(F_out)
        x = torch.rand(4, 40, F_in, generator=g).requires_grad_(x_grad)
        w = (torch.rand(3, F_in, F_out, generator=g) + 0.5).requires_grad_()  # y > 0 somewhere: w.grad != 0
        native.cheb_conv(L, x, w, None, "relu").sum().backward()
        assert seen[-1] is expect, (x_grad, F_in, F_out)
        assert w.grad is not None and w.grad.abs().sum() > 0
        for forced in (True, False):  # save_basis= overrides the choice; the gradients agree
            w2 = w.detach().clone().requires_grad_()
            native.cheb_conv(L, x, w2, None, "relu", save_basis=forced).sum().backward()
            assert seen[-1] is forced
            torch.testing.assert_close(w2.grad, w.grad, rtol=1e-5, atol=1e-6)
        w.grad = None
    with pytest.raises(ValueError, match="save_basis must be True, False or None"):
        native.cheb_conv(L, x, w, None, "relu", save_basis="yes")


@needs_native
@pytest.mark.parametrize("K", [1, 3])
def test_cheb_conv_float32_against_float64_reference(K):
    B, V, F_in, F_out = 19, 150, 1, 1
    L64 = knn_laplacian(V, dtype=torch.float64)
    L32 = knn_laplacian(V, dtype=torch.float32)
    x, w, b = _inputs(B, V, F_in, F_out, K, dtype=torch.float64, seed=3)
    go = torch.randn(B, V, F_out, dtype=torch.float64)
    y, grads = _grads(native.cheb_conv, L32, x.float(), w.float(), b.float(), "relu", go.float())
    y_ref, grads_ref = _grads(reference.cheb_conv, L64, x, w, b, "relu", go)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@needs_native
def test_empty_shapes():
    L = awkward_laplacian(5, "symmetric")
    for shape in ((0, 5, 1, 1), (2, 5, 0, 2)):
        x, w, b = _inputs(*shape, 3)
        y, grads = _grads(native.cheb_conv, L, x, w, b, "relu", torch.ones(shape[0], 5, shape[3], dtype=torch.float64))
        y_ref, grads_ref = _grads(reference.cheb_conv, L, x, w, b, "relu", torch.ones_like(y))
        torch.testing.assert_close(y, y_ref)
        for got, want in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(got, want)


@needs_native
def test_output_layout_and_model_flatten():
    """Outputs are (B, V, F) stored as (V, B, F); flatten(1), as TextEncoder does, still gives the right values."""
    L = knn_laplacian(40, dtype=torch.float64)
    x, w, b = _inputs(6, 40, 1, 1, 3)
    y = native.cheb_conv(L, x, w, b, "relu")
    assert y.shape == (6, 40, 1)
    assert y.permute(1, 0, 2).is_contiguous()
    torch.testing.assert_close(y.flatten(1), reference.cheb_conv(L, x, w, b, "relu").flatten(1), rtol=1e-12, atol=0)


@needs_native
def test_text_encoder_with_native_op_matches_eager(monkeypatch):
    """SCANet's TextEncoder (two ChebConv layers, FC) with ChebConv.op swapped for the native op."""
    from scanet.model import ChebConv, TextEncoder

    torch.manual_seed(0)
    V, B, N = 60, 5, 16
    L = knn_laplacian(V)
    enc = TextEncoder(V, N, channels=(1, 1), K=3, dropout=0.0)
    bow = torch.rand(B, V)
    out_ref = enc(bow, L)
    grads_ref = torch.autograd.grad(out_ref.square().sum(), list(enc.parameters()))
    monkeypatch.setattr(ChebConv, "op", staticmethod(native.cheb_conv))
    out = enc(bow, L)
    grads = torch.autograd.grad(out.square().sum(), list(enc.parameters()))
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------- cached basis
@needs_native
@pytest.mark.parametrize("kind", ["symmetric", "nonsymmetric", "empty_rows", "self_loops"])
@pytest.mark.parametrize("K", [1, 2, 3, 4])
def test_chebyshev_basis_matches_reference(kind, K):
    L = awkward_laplacian(21, kind)
    for x in (torch.randn(5, 21, 2, dtype=torch.float64), vb(torch.randn(3, 21, 1, dtype=torch.float64))):
        basis = native.chebyshev_basis(L, x, K)
        want = reference.chebyshev_basis(L, x, K)
        assert basis.shape == (K,) + tuple(x.shape)
        for k in range(K):
            torch.testing.assert_close(basis[k], want[k], rtol=1e-12, atol=1e-12)


@needs_native
@pytest.mark.parametrize("layout", ["rows", "runs", "other"])
@pytest.mark.parametrize(
    "shape", [(1, 1, 1, 1), (7, 70, 1, 1), (4, 9, 2, 3), (3, 130, 1, 2)], ids=lambda s: "B{}V{}Fi{}Fo{}".format(*s)
)
@pytest.mark.parametrize("activation", ["relu", None])
def test_cheb_conv_from_basis_matches_reference(layout, shape, activation):
    B, V, F_in, F_out = shape
    K = 3
    L = awkward_laplacian(V, "isolated")
    x, w, b = _inputs(B, V, F_in, F_out, K)
    basis = native.chebyshev_basis(L, x, K)  # "rows": each basis[k] stored as (V, B, F)
    if layout == "runs":  # a batch gathered from a per-text cache
        basis = basis.contiguous()  # (K, B, V, F) contiguous
    elif layout == "other":
        basis = basis.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
    w, b = w.requires_grad_(), b.requires_grad_()
    go = torch.randn(B, V, F_out, dtype=torch.float64)
    for g in (go, vb(go)):
        y = native.cheb_conv_from_basis(basis, w, b, activation)
        y_ref = reference.cheb_conv_from_basis(list(basis), w, b, activation)
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
        got = torch.autograd.grad(y, (w, b), g)
        want = torch.autograd.grad(y_ref, (w, b), g)
        for name, a, c in zip(("dW", "db"), got, want, strict=True):
            torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")


@needs_native
@pytest.mark.parametrize("F_in", [1, 2])
def test_cheb_conv_from_basis_with_index_reads_cache_rows(F_in):
    """index selects cached signals: in place for an (N, K, V) cache with F_in = 1, gathered otherwise."""
    K, N, V = 3, 9, 70
    L = awkward_laplacian(V, "symmetric")
    x, w, b = _inputs(N, V, F_in, 2, K)
    cache = native.chebyshev_basis(L, x, K).permute(1, 0, 2, 3).contiguous()  # (N, K, V, F): one row per text
    basis = cache.permute(1, 0, 2, 3)  # (K, N, V, F) view
    index = torch.tensor([4, 0, 4, 8, 2])  # repeats allowed
    w, b = w.requires_grad_(), b.requires_grad_()
    y = native.cheb_conv_from_basis(basis, w, b, "relu", index=index)
    y_ref = reference.cheb_conv_from_basis(list(basis[:, index]), w, b, "relu")
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    go = torch.randn_like(y_ref)
    for got, want in zip(torch.autograd.grad(y, (w, b), go), torch.autograd.grad(y_ref, (w, b), go), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="out of range"):
        native.cheb_conv_from_basis(basis, w, b, index=torch.tensor([0, N]))


@needs_native
def test_cached_basis_then_native_layer_equals_two_layers():
    """Layer 1 from the cached basis plus a native layer 2 is the two-layer GCN, forward and weights' grads."""
    V, B, K = 80, 6, 3
    L = knn_laplacian(V, dtype=torch.float64)
    bow = torch.rand(B, V, 1, dtype=torch.float64)
    w1, w2 = (torch.randn(K, 1, 1, dtype=torch.float64, requires_grad=True) for _ in range(2))
    b1, b2 = (torch.zeros(1, dtype=torch.float64, requires_grad=True) for _ in range(2))
    cache = native.chebyshev_basis(L, bow, K).squeeze(-1).permute(1, 0, 2).contiguous()  # (texts, K, V), once
    batch = torch.tensor([4, 0, 2])
    x1 = native.cheb_conv_from_basis(cache.permute(1, 0, 2).unsqueeze(-1), w1, b1, index=batch)
    y = native.cheb_conv(L, x1, w2, b2)
    y_ref = reference.cheb_conv(L, reference.cheb_conv(L, bow[[4, 0, 2]], w1, b1), w2, b2)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    got = torch.autograd.grad(y.sum(), (w1, b1, w2, b2))
    want = torch.autograd.grad(y_ref.sum(), (w1, b1, w2, b2))
    for a, c in zip(got, want, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------ determinism
def _run_all(threads: int, L, x, w, b, basis):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        xr, wr, br = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
        y = native.cheb_conv(L, xr, wr, br, "relu")
        grads = torch.autograd.grad(y, (xr, wr, br), torch.ones_like(y) - 2 * (y > 1).to(y.dtype))
        w1, b1 = w.clone().requires_grad_(), b.clone().requires_grad_()
        y1 = native.cheb_conv_from_basis(basis, w1, b1, "relu")
        g1 = torch.autograd.grad(y1.sum(), (w1, b1))
        return [y.detach(), *grads, y1.detach(), *g1, native.chebyshev_basis(L, x, 3)]
    finally:
        torch.set_num_threads(old)


@needs_native
def test_thread_count_does_not_change_results_bitwise():
    """Rows are computed by one thread each and the dW / db sums use fixed row blocks: 1 and 2 threads agree."""
    V, B = 700, 37  # 11 reduction blocks of 64 rows; B*F = 37 exercises every vector-tile size
    L = knn_laplacian(V)
    x, w, b = _inputs(B, V, 1, 1, 3, dtype=torch.float32, seed=5)
    x = x.abs()
    basis = native.chebyshev_basis(L, x, 3).contiguous()
    one = _run_all(1, L, x, w, b, basis)
    two = _run_all(2, L, x, w, b, basis)
    for a, c in zip(one, two, strict=True):
        assert torch.equal(a, c)
    assert one[2].abs().sum() > 0 and one[6].abs().sum() > 0  # the weight gradients are not trivially zero


# ----------------------------------------------------------------------------------------- torch.library
@needs_native
def test_opcheck_all_ops():
    torch.manual_seed(0)
    L = awkward_laplacian(9, "nonsymmetric")
    # Plain copies: opcheck's fake-tensor pass cannot follow views into a sparse tensor.
    crow, col, val = (t.clone() for t in (L.crow_indices(), L.col_indices(), L.values()))
    ops = torch.ops.scanet_native
    x, w, b = _inputs(4, 9, 2, 3, 3)
    for xx, relu in ((x, True), (vb(x), False)):  # x copied to the kernel layout or read in place
        torch.library.opcheck(
            ops.cheb_conv_forward,
            (crow, col, val, xx.requires_grad_(), w.requires_grad_(), b.requires_grad_(), relu, True),
        )
    y, saved = ops.cheb_conv_forward(crow, col, val, x.detach(), w.detach(), b.detach(), True, True)
    tr = ops.csr_transpose(crow, col, val)
    torch.library.opcheck(
        ops.cheb_conv_backward,
        (torch.randn_like(y), crow, col, val, *tr, x.detach(), saved, y, w.detach(), True, True, True, True, True),
    )
    torch.library.opcheck(ops.csr_transpose, (crow, col, val))
    torch.library.opcheck(ops.chebyshev_basis, (crow, col, val, x.detach(), 3))
    basis = ops.chebyshev_basis(crow, col, val, x.detach(), 3)
    torch.library.opcheck(
        ops.cheb_conv_from_basis_forward,
        (basis.contiguous(), w.detach().requires_grad_(), b.detach().requires_grad_(), True),
    )
    w1 = torch.randn(3, 1, 2, dtype=torch.float64, requires_grad=True)
    cache = ops.chebyshev_basis(crow, col, val, torch.randn(6, 9, 1, dtype=torch.float64), 3).contiguous()
    torch.library.opcheck(ops.cheb_conv_from_basis_forward, (cache, w1, None, True, torch.tensor([5, 1, 1])))


@needs_native
def test_csr_transpose_matches_dense():
    L = awkward_laplacian(17, "empty_rows")
    crow, col, val = torch.ops.scanet_native.csr_transpose(L.crow_indices(), L.col_indices(), L.values())
    Lt = torch.sparse_csr_tensor(crow, col, val, L.shape)
    torch.testing.assert_close(Lt.to_dense(), L.to_dense().T, rtol=0, atol=0)


@needs_native
def test_torch_compile_traces_the_ops():
    """fullgraph compile (aot_eager: the fake kernels and autograd, without codegen) gives the eager result."""
    L = knn_laplacian(30, dtype=torch.float64)
    crow, col, val = (t.clone() for t in (L.crow_indices(), L.col_indices(), L.values()))
    x, w, b = _inputs(4, 30, 1, 1, 3)

    def layer(x, w, b):
        y, _ = torch.ops.scanet_native.cheb_conv_forward(crow, col, val, x, w, b, True, True)
        return (y * y).sum()

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    w1, w2 = w.clone().requires_grad_(), w.clone().requires_grad_()
    out, out_ref = compiled(x, w1, b), layer(x, w2, b)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(torch.autograd.grad(out, w1)[0], torch.autograd.grad(out_ref, w2)[0])


# ------------------------------------------------------------------------------------------- bad input
@needs_native
def test_bad_input_raises_clear_value_error():
    L = knn_laplacian(10, dtype=torch.float32)
    x, w, b = _inputs(2, 10, 1, 1, 3, dtype=torch.float32)
    with pytest.raises(ValueError, match="weight expects F_in"):
        native.cheb_conv(L, x, torch.randn(3, 2, 1), b)
    with pytest.raises(ValueError, match="x has V=9"):
        native.cheb_conv(L, x[:, :9], w, b)
    with pytest.raises(ValueError, match="one floating dtype"):
        native.cheb_conv(L, x.double(), w, b)
    with pytest.raises(ValueError, match="float32, float64, bfloat16 and float16; x is torch.int32"):
        native.cheb_conv(L, x.to(torch.int32), w, b)  # (float16 and bfloat16 are supported: test_native_bf16)
    with pytest.raises(ValueError, match="x must be a torch.Tensor"):
        native.cheb_conv(L, x.tolist(), w, b)
    with pytest.raises(ValueError, match="dropout_p must be a number in"):
        native.cheb_conv(L, x, w, b, dropout_p=1.5)
    with pytest.raises(ValueError, match="symmetric must be"):
        native.cheb_conv(L, x, w, b, symmetric="yes")
    with pytest.raises(ValueError, match="activation"):
        native.cheb_conv(L, x, w, b, activation="tanh")
    with pytest.raises(ValueError, match="sparse_csr"):
        native.cheb_conv(L.to_dense(), x, w, b)
    bad_col = L.col_indices().clone()
    bad_col[3] = 10
    with pytest.raises(ValueError, match="column indices out of range"):
        native.cheb_conv(torch.sparse_csr_tensor(L.crow_indices(), bad_col, L.values(), (10, 10)), x, w, b)
    bad_crow = L.crow_indices().clone()
    bad_crow[5] = int(bad_crow[4]) - 1  # a decreasing row pointer
    with pytest.raises(ValueError, match="crow_indices"):
        native.cheb_conv(torch.sparse_csr_tensor(bad_crow, L.col_indices(), L.values(), (10, 10)), x, w, b)
    learnable = torch.sparse_csr_tensor(
        L.crow_indices(), L.col_indices(), L.values().clone().requires_grad_(), (10, 10)
    )
    with pytest.raises(ValueError, match="constant"):
        native.cheb_conv(learnable, x, w, b)
    basis = native.chebyshev_basis(L, x, 3)
    with pytest.raises(ValueError, match="does not match basis"):
        native.cheb_conv_from_basis(basis, torch.randn(2, 1, 1), b)
    with pytest.raises(ValueError, match="K must be"):
        native.chebyshev_basis(L, x, 0)


# ---------------------------------------------------------------------------------------------- loader
def _fake_library(path, torch_version, arch="-march=x86-64-v3"):
    path.write_bytes(
        b"\x7fELF not really" + f"SCANET_NATIVE_BUILD{{torch={torch_version};arch={arch}}}".encode() + b"\0" * 64
    )
    return path


def test_loader_refuses_other_torch_before_loading(tmp_path):
    lib = _fake_library(tmp_path / "_native.cpython-311-x86_64-linux-gnu.so", "2.11.0+cu128")
    path, info, reasons = native._select_library([lib], "2.13.0+cpu", None)
    assert path is None and info is None
    assert "built against torch 2.11.0+cu128 but torch 2.13.0+cpu" in reasons[0]


def test_loader_refuses_missing_cpu_features(tmp_path):
    lib = _fake_library(tmp_path / "_native.so", "2.13.0+cpu", arch="-march=x86-64-v4")
    path, _, reasons = native._select_library(
        [lib], "2.13.0+cpu", {"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe"}
    )
    assert path is None and "lacks avx512bw" in reasons[0]
    path, info, _ = native._select_library([lib], "2.13.0+cpu", None)  # flags unknown: trust the build
    assert path == lib and info == {"torch": "2.13.0+cpu", "arch": "x86-64-v4"}


def test_loader_reports_load_errors_instead_of_raising(tmp_path):
    _fake_library(tmp_path / "_native.so", str(torch.__version__), arch="")
    path, reason = native._load_from(tmp_path)
    assert path is None and "loading _native.so failed" in reason


def test_loader_reports_missing_library(tmp_path):
    path, reason = native._load_from(tmp_path)
    assert path is None and "not built" in reason


def test_unavailable_reason_is_consistent():
    assert (native.unavailable_reason() is None) == native.available()
    if not native.available():
        with pytest.raises(RuntimeError, match="not available"):
            native.cheb_conv(knn_laplacian(5), torch.rand(1, 5, 1), torch.rand(3, 1, 1))


@needs_native
def test_a_library_of_another_csrc_revision_is_reported_stale(monkeypatch):
    """csrc_revision() guards behaviour changes that keep the schema (the adjoint backward): a library built
    from older sources is named stale, with a rebuild hint, instead of failing inside backward."""
    from scanet import native_library

    assert native_library._stale_schema() == []
    assert torch.ops.scanet_native.csrc_revision() == native_library.CSRC_REVISION
    monkeypatch.setattr(native_library, "CSRC_REVISION", native_library.CSRC_REVISION + 1)
    assert native_library._stale_schema() == [
        f"csrc revision {native_library.CSRC_REVISION} (it is revision {native_library.CSRC_REVISION - 1})"
    ]
