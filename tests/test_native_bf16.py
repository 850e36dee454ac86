"""scanet.native in low precision, with the symmetric flag and with dropout fused into the epilogue.

Every result is compared with the float64 eager oracle (scanet.reference.cheb_conv) fed the SAME numbers the
op saw (a bf16 x is rounded once, then both sides use it), so the tolerances measure the op's own rounding:
one rounding of y (and of dx) to the storage dtype, relative finfo(dtype).eps / 2, plus float32 sums.
"""

from __future__ import annotations

import math

import pytest
import torch

from scanet import native, reference
from test_native import awkward_laplacian, knn_laplacian, vb

pytestmark = pytest.mark.skipif(
    not native.available(), reason=f"native extension unavailable: {native.unavailable_reason()}"
)


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _assert_close(got, want, dtype, what, compute_atol=1e-5):
    """|got - want| <= eps(dtype) |want| + compute_atol * max|want|: one rounding to dtype, float32 sums."""
    got, want = got.double(), want.double()
    scale = float(want.abs().max()) if want.numel() else 0.0
    rtol = torch.finfo(dtype).eps if dtype in (torch.bfloat16, torch.float16) else 1e-5
    torch.testing.assert_close(got, want, rtol=rtol, atol=compute_atol * scale + 1e-30, msg=lambda m: f"{what}: {m}")


def _case(B, V, F_in, F_out, K, x_dtype, seed=0, kind="symmetric"):
    g = torch.Generator().manual_seed(seed)
    L32 = awkward_laplacian(V, kind, dtype=torch.float32, seed=seed)
    x = torch.randn(B, V, F_in, generator=g).to(x_dtype)  # the numbers the op sees
    w = torch.randn(K, F_in, F_out, generator=g) / K  # float32 parameters
    b = torch.randn(F_out, generator=g)
    return L32, x, w, b


def _run(fn, L, x, w, b, act, go, **kw):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    b = b.detach().requires_grad_()
    y = fn(L, x, w, b, act, **kw)
    grads = torch.autograd.grad(y, (x, w, b), go.to(y.dtype))
    return y.detach(), grads


def _reference64(L32, x, w, b, act, go, mask=None, p=0.0):
    L64 = torch.sparse_csr_tensor(L32.crow_indices(), L32.col_indices(), L32.values().double(), L32.shape)

    def fn(L, x, w, b, act):
        y = reference.cheb_conv(L, x, w, b, act)
        return y if mask is None else y * mask / (1.0 - p)

    return _run(fn, L64, x.double(), w.double(), b.double(), act, go.double())


SHAPES = [(3, 7, 1, 1), (2, 13, 3, 2), (5, 33, 2, 3), (17, 70, 1, 1)]  # (B, V, F_in, F_out)


# ------------------------------------------------------------------------------------------- autocast
def _magnitudes(L32, x, w, b, go, K):
    """Elementwise bounds on the size of the terms that make up y, dx, dW and db (float64, dense).

    The op sums in float32, so its error is a few float32 eps of the terms' magnitudes, not of the result:
    with unnormalized test graphs T_2 is hundreds of times x and dW can cancel to far less. M_0 = |x|,
    M_1 = |L~| |x|, M_k = 2 |L~| M_{k-1} + M_{k-2} bounds |T_k x| (the same for L~^T and the gradient).
    """
    A = L32.to_dense().double().abs()
    xa, wa, ba, ga = x.double().abs(), w.double().abs(), b.double().abs(), go.double().abs()

    def terms(Aop, s):  # M_0..M_{K-1} of a (B, V, F) signal
        out = [s]
        if K > 1:
            out.append(torch.einsum("uv,bvf->buf", Aop, s))
        for _ in range(2, K):
            out.append(2 * torch.einsum("uv,bvf->buf", Aop, out[-1]) + out[-2])
        return out

    Mx = terms(A, xa)
    y_mag = sum(torch.einsum("bvi,io->bvo", Mx[k], wa[k]) for k in range(K)) + ba
    dw_mag = torch.stack([torch.einsum("bvi,bvo->io", Mx[k], ga) for k in range(K)])
    db_mag = ga.sum((0, 1))
    # dx = sum_k T_k(L~^T) (go W_k^T): bound each term by M_k(|L~|^T) applied to |go| |W_k|^T.
    dx_mag = sum(terms(A.T, torch.einsum("bvo,io->bvi", ga, wa[k]))[k] for k in range(K))
    return y_mag, dx_mag, dw_mag, db_mag


def _assert_close_terms(got, want, mag, dtype, what):
    """|got - want| <= eps(dtype) |want| (one rounding to dtype) + 1e-5 * (size of the terms summed)."""
    got, want = got.double(), want.double()
    store = torch.finfo(dtype).eps if dtype in (torch.bfloat16, torch.float16) else 0.0
    bound = store * want.abs() + 1e-5 * mag + 1e-30
    err = (got - want).abs()
    worst = int(torch.argmax(err - bound)) if err.numel() else 0
    assert bool((err <= bound).all()), (
        f"{what}: |got - want| = {err.flatten()[worst]:.3g} > bound "
        f"{bound.flatten()[worst]:.3g} at flat index {worst} "
        f"(got {got.flatten()[worst]:.6g}, want {want.flatten()[worst]:.6g})"
    )


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["x_fp32", "x_bf16"])
@pytest.mark.parametrize("kind", ["symmetric", "nonsymmetric", "empty_rows", "self_loops"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}V{}Fi{}Fo{}".format(*s))
@pytest.mark.parametrize("K", [1, 2, 3, 5])
def test_autocast_matches_float64_reference(amp_dtype, x_dtype, kind, shape, K):
    B, V, F_in, F_out = shape
    L, x, w, b = _case(B, V, F_in, F_out, K, x_dtype, seed=K + V, kind=kind)
    if amp_dtype == torch.float16:
        # float16 ends at 65504: the unnormalized test graphs (spectral radius ~15) drive T_5 x past it, where
        # y is inf exactly as autocast's own fp16 ops would be. Scaled to ||L~||_inf <= 1, like SCANet's L~.
        norm = float(L.to_dense().abs().sum(1).max().clamp(min=1.0))
        L = torch.sparse_csr_tensor(L.crow_indices(), L.col_indices(), L.values() / norm, L.shape)
    g = torch.Generator().manual_seed(K * V)
    for act, x_layout in (("relu", "bv"), (None, "vb")):
        xx = vb(x) if x_layout == "vb" else x
        go = torch.randn(B, V, F_out, generator=g).to(amp_dtype)
        with torch.autocast("cpu", dtype=amp_dtype):
            y, (dx, dw, db) = _run(native.cheb_conv, L, xx, w, b, act, go)
        assert y.dtype == amp_dtype and dx.dtype == x_dtype and dw.dtype == db.dtype == torch.float32
        assert y.permute(1, 0, 2).is_contiguous()
        y_ref, (dx_ref, dw_ref, db_ref) = _reference64(L, xx, w, b, act, go)
        y_mag, dx_mag, dw_mag, db_mag = _magnitudes(L, xx, w, b, go, K)
        _assert_close_terms(y, y_ref, y_mag, amp_dtype, "y")
        _assert_close_terms(dx, dx_ref, dx_mag, x_dtype, "dx")
        _assert_close_terms(dw, dw_ref, dw_mag, torch.float32, "dW")
        _assert_close_terms(db, db_ref, db_mag, torch.float32, "db")


def test_low_precision_outside_autocast_follows_promotion():
    """All-bf16 inputs give a bf16 y; a bf16 x with float32 parameters gives float32 (type promotion)."""
    L, x, w, b = _case(6, 40, 1, 1, 3, torch.bfloat16, kind="isolated")
    go = torch.randn(6, 40, 1, generator=torch.Generator().manual_seed(1)).bfloat16()
    Lb = L.to(torch.bfloat16)
    Lbf = Lb.to(torch.float32)
    wb, bb = w.bfloat16(), b.bfloat16()
    y, grads = _run(native.cheb_conv, Lb, x, wb, bb, "relu", go)
    assert y.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
    y_ref, grads_ref = _reference64(Lbf, x, wb.float(), bb.float(), "relu", go)
    mags = _magnitudes(Lbf, x, wb, bb, go, 3)
    for name, got, want, mag in zip(("y", "dx", "dW", "db"), (y, *grads), (y_ref, *grads_ref), mags, strict=True):
        _assert_close_terms(got, want, mag, torch.bfloat16, name)
    y32, _ = _run(native.cheb_conv, L, x, w, b, "relu", go)
    assert y32.dtype == torch.float32
    y32_ref, _ = _reference64(L, x, w, b, "relu", go)
    _assert_close_terms(y32, y32_ref, _magnitudes(L, x, w, b, go, 3)[0], torch.float32, "y (float32 out)")


def test_autocast_kernel_keeps_weights_and_laplacian_in_float32():
    """The raw op rejects a bf16 weight; under autocast its AutocastCPU kernel widens it and emits bf16."""
    L, x, w, b = _case(4, 21, 2, 3, 3, torch.float32, kind="nonsymmetric")
    crow, col, val = (t.clone() for t in (L.crow_indices(), L.col_indices(), L.values()))
    op = torch.ops.scanet_native.cheb_conv_forward
    with pytest.raises(RuntimeError, match="weight and the Laplacian values must be Float"):
        op(crow, col, val, x, w.bfloat16(), b, True, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = op(crow, col, val.bfloat16(), x, w.bfloat16(), b.bfloat16(), True, False)
    assert y.dtype == torch.bfloat16
    want = reference.cheb_conv(
        torch.sparse_csr_tensor(crow, col, val.bfloat16().double(), L.shape),
        x.double(),
        w.bfloat16().double(),
        b.bfloat16().double(),
        "relu",
    )
    _assert_close(y, want, torch.bfloat16, "y")


def test_float64_is_untouched_by_autocast():
    L, x, w, b = _case(3, 15, 1, 2, 3, torch.float64)
    L64 = L.to(torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = native.cheb_conv(L64, x, w.double(), b.double())
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, reference.cheb_conv(L64, x, w.double(), b.double()), rtol=1e-12, atol=1e-12)


def test_text_encoder_under_autocast_matches_float64(monkeypatch):
    """TextEncoder (two native ChebConvs, FC) under bf16 autocast against the float64 eager encoder."""
    from scanet.model import ChebConv, TextEncoder

    torch.manual_seed(0)
    V, B, N = 80, 6, 16
    L = knn_laplacian(V)
    enc = TextEncoder(V, N, channels=(1, 1), K=3, dropout=0.0)
    bow = torch.rand(B, V)
    enc64 = TextEncoder(V, N, channels=(1, 1), K=3, dropout=0.0).double()
    enc64.load_state_dict({k: v.double() for k, v in enc.state_dict().items()})
    L64 = torch.sparse_csr_tensor(L.crow_indices(), L.col_indices(), L.values().double(), L.shape)
    out_ref = enc64(bow.double(), L64)
    grads_ref = torch.autograd.grad(out_ref.square().sum(), list(enc64.parameters()))
    monkeypatch.setattr(ChebConv, "op", staticmethod(native.cheb_conv))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = enc(bow, L)
    assert out.dtype == torch.bfloat16
    grads = torch.autograd.grad(out.float().square().sum(), list(enc.parameters()))
    # The FC is a bf16 GEMM (inputs rounded to 8 bits): a few bf16 eps of the output scale.
    torch.testing.assert_close(
        out.double(), out_ref.detach(), rtol=3e-2, atol=3e-2 * float(out_ref.detach().abs().max())
    )
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=5e-2, atol=5e-2 * float(want.abs().max()))


# ------------------------------------------------------------------------------------------ symmetric
def _op_calls(fn, name="scanet_native::csr_transpose") -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == name)


@pytest.mark.parametrize("kind", ["symmetric", "nonsymmetric", "empty_rows"])
@pytest.mark.parametrize("symmetric", [None, False, True])
def test_symmetric_flag(kind, symmetric):
    native.clear_laplacian_cache()
    L = awkward_laplacian(23, kind)
    is_sym = bool(torch.equal(L.to_dense(), L.to_dense().T))
    x = torch.randn(4, 23, 2, dtype=torch.float64)
    w = torch.randn(3, 2, 2, dtype=torch.float64)
    go = torch.randn(4, 23, 2, dtype=torch.float64)
    _, grads_ref = _run(reference.cheb_conv, L, x, w, torch.zeros(2, dtype=torch.float64), "relu", go)

    def step():
        return _run(native.cheb_conv, L, x, w, torch.zeros(2, dtype=torch.float64), "relu", go, symmetric=symmetric)

    grads = []

    calls_first = _op_calls(lambda: grads.extend(step()[1]))  # the first step: checks or transposes once
    assert calls_first == (0 if symmetric is True else 1)
    if symmetric is True and not is_sym:  # the caller's promise is used as given: dx is then L~'s, not L~^T's
        assert not torch.allclose(grads[0], grads_ref[0])
    else:
        for got, want in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # Per step after the first: no transpose at all (symmetric: none ever; otherwise the cached one).
    assert _op_calls(step) == 0
    if symmetric is None:
        info = native._laplacian_info(L.crow_indices(), L.col_indices(), L.values())
        assert info.symmetric == is_sym


# -------------------------------------------------------------------------------------------- dropout
@pytest.mark.parametrize("p", [0.1, 0.2, 0.5, 0.9])
def test_dropout_mask_statistics(p):
    n = 1 << 20
    keep = native.dropout_keep_mask(12345, (n,), p).double()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(float(keep.mean()) - (1 - p)) < 5 * sigma
    # Neighbouring elements (same vertex, next signal; next vertex) are independent: E[k_i k_j] = (1-p)^2.
    for lag in (1, 7, 10_055):
        pair = float((keep[:-lag] * keep[lag:]).mean())
        assert abs(pair - (1 - p) ** 2) < 5 * math.sqrt((1 - p) ** 2 * (1 - (1 - p) ** 2) / (n - lag))
    other = native.dropout_keep_mask(12346, (n,), p).double()
    agree = float((keep == other).double().mean())
    assert abs(agree - (p * p + (1 - p) ** 2)) < 5 * math.sqrt(0.25 / n)  # another seed: another mask
    assert native.dropout_keep_mask(7, (1000,), 0.0).all()
    assert not native.dropout_keep_mask(7, (1000,), 1.0).any()


@pytest.mark.parametrize("act", ["relu", None])
@pytest.mark.parametrize(
    "shape", [(3, 7, 1, 1), (5, 33, 2, 3), (64, 70, 1, 1)], ids=lambda s: "B{}V{}Fi{}Fo{}".format(*s)
)
@pytest.mark.parametrize("x_layout", ["bv", "vb"])
def test_dropout_in_epilogue_matches_eager_with_the_same_mask(act, shape, x_layout):
    B, V, F_in, F_out = shape
    p = 0.2
    L = awkward_laplacian(V, "nonsymmetric")
    g = torch.Generator().manual_seed(V)
    x = torch.randn(B, V, F_in, generator=g, dtype=torch.float64)
    x = vb(x) if x_layout == "vb" else x
    w = torch.randn(3, F_in, F_out, generator=g, dtype=torch.float64)
    b = torch.randn(F_out, generator=g, dtype=torch.float64)
    go = torch.randn(B, V, F_out, generator=g, dtype=torch.float64)
    torch.manual_seed(11)
    y, grads = _run(native.cheb_conv, L, x, w, b, act, go, dropout_p=p)
    torch.manual_seed(11)
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))  # the wrapper's draw, reproduced
    mask = native.dropout_keep_mask(seed, y.shape, p).double()
    y_plain = reference.cheb_conv(L, x, w, b, act)
    if act is None:  # y_plain has no zeros: the mask can also be read off the output itself
        assert torch.equal((y != 0).double(), mask)
    torch.testing.assert_close(y, y_plain * mask / (1 - p), rtol=1e-12, atol=1e-12)
    _, grads_ref = _run(lambda *a: reference.cheb_conv(*a) * mask / (1 - p), L, x, w, b, act, go)
    for name, got, want in zip(("dx", "dW", "db"), grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")
    # The mask keeps about 1 - p of the elements.
    n = mask.numel()
    assert abs(float(mask.mean()) - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n) + 1e-12


def test_dropout_reproducible_by_seed_and_off_when_not_training():
    L = knn_laplacian(50, dtype=torch.float32)
    x = torch.rand(8, 50, 1)
    w, b = torch.randn(3, 1, 1), torch.zeros(1)
    torch.manual_seed(3)
    y1 = native.cheb_conv(L, x, w, b, None, dropout_p=0.3)
    y2 = native.cheb_conv(L, x, w, b, None, dropout_p=0.3)  # the generator moved on: another mask
    torch.manual_seed(3)
    y3 = native.cheb_conv(L, x, w, b, None, dropout_p=0.3)
    assert torch.equal(y1, y3) and not torch.equal(y1, y2)
    plain = native.cheb_conv(L, x, w, b, None)
    state = torch.get_rng_state()
    assert torch.equal(native.cheb_conv(L, x, w, b, None, dropout_p=0.3, training=False), plain)
    assert torch.equal(native.cheb_conv(L, x, w, b, None, dropout_p=0.0), plain)
    assert torch.equal(torch.get_rng_state(), state)  # no draw without dropout
    assert torch.equal(native.cheb_conv(L, x, w, b, None, dropout_p=1.0), torch.zeros_like(plain))


def test_dropout_under_autocast_matches_float64():
    """bf16 output with the fused dropout: the float64 oracle with the mask recovered from the output."""
    B, V, p = 9, 70, 0.2
    L, x, w, b = _case(B, V, 1, 1, 3, torch.bfloat16, kind="self_loops")
    go = torch.randn(B, V, 1, generator=torch.Generator().manual_seed(2)).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, grads = _run(native.cheb_conv, L, x, w, b, None, go, dropout_p=p)
    mask = (y != 0).double()
    assert 0.6 < float(mask.mean()) < 0.95
    y_ref, grads_ref = _reference64(L, x, w, b, None, go, mask=mask, p=p)
    mags = [m / (1 - p) for m in _magnitudes(L, x, w, b, go, 3)]  # the kept terms are scaled by 1/(1-p)
    for name, got, want, mag, dt in zip(
        ("y", "dx", "dW", "db"),
        (y, *grads),
        (y_ref, *grads_ref),
        mags,
        (torch.bfloat16, torch.bfloat16, torch.float32, torch.float32),
        strict=True,
    ):
        _assert_close_terms(got, want, mag, dt, name)


def test_thread_count_does_not_change_results_bitwise_bf16_dropout():
    V, B = 700, 37
    L = knn_laplacian(V)
    x = torch.rand(B, V, 1).bfloat16()
    w, b = torch.randn(3, 1, 1), torch.randn(1)
    go = torch.randn(B, V, 1).bfloat16()
    out = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out.append(_run(native.cheb_conv, L, x, w, b, "relu", go, dropout_p=0.2))
    (y1, g1), (y2, g2) = out
    assert torch.equal(y1, y2) and all(torch.equal(a, c) for a, c in zip(g1, g2, strict=True))


def test_opcheck_low_precision_and_dropout():
    L = awkward_laplacian(9, "nonsymmetric", dtype=torch.float32)
    crow, col, val = (t.clone() for t in (L.crow_indices(), L.col_indices(), L.values()))
    ops = torch.ops.scanet_native
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 2, 3, generator=g, requires_grad=True)
    b = torch.randn(3, generator=g, requires_grad=True)
    for x, out_dtype, sym in (
        (torch.randn(4, 9, 2, generator=g).bfloat16(), torch.bfloat16, False),
        (vb(torch.randn(4, 9, 2, generator=g)), torch.bfloat16, True),
        (torch.randn(4, 9, 2, generator=g).half(), torch.float32, False),
    ):
        torch.library.opcheck(
            ops.cheb_conv_forward, (crow, col, val, x.requires_grad_(), w, b, True, True, sym, 0.25, 99, out_dtype)
        )


def test_out_dtype_keeps_a_hidden_layer_in_float32_under_autocast():
    L, x, w, b = _case(5, 30, 1, 1, 3, torch.float32, kind="self_loops")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = native.cheb_conv(L, x, w, b, out_dtype=torch.float32)
        y = native.cheb_conv(L, h, w, b)
    assert h.dtype == torch.float32 and y.dtype == torch.bfloat16
    want = reference.cheb_conv(L, reference.cheb_conv(L, x, w, b), w, b)
    _assert_close(y, want, torch.bfloat16, "y")
    with pytest.raises(ValueError, match="out_dtype must be"):
        native.cheb_conv(L, x, w, b, out_dtype=torch.float64)


def test_torch_compile_under_autocast_with_dropout():
    """fullgraph aot_eager compile of the raw op under autocast (the AutocastCPU kernel's py_impl, the fake
    kernel's dtypes, the autograd with dropout) gives the eager result and gradient."""
    L = knn_laplacian(30)
    crow, col, val = (t.clone() for t in (L.crow_indices(), L.col_indices(), L.values()))
    x = torch.rand(4, 30, 1)
    w = torch.randn(3, 1, 1, requires_grad=True)
    b = torch.zeros(1, requires_grad=True)

    def f(x, w, b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, _ = torch.ops.scanet_native.cheb_conv_forward(crow, col, val, x, w, b, True, True, True, 0.2, 5, None)
        assert y.dtype == torch.bfloat16
        return y.float().square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out, out_ref = compiled(x, w, b), f(x, w, b)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(torch.autograd.grad(out, w)[0], torch.autograd.grad(out_ref, w)[0])


def test_loaded_library_has_the_schema_this_python_side_calls():
    assert native._stale_schema() == []
