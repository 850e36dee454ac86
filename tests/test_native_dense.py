"""scanet.native_dense (csrc/dense_epilogues.cpp): the co-attention epilogue and the similarity head on CPU.

Each op against a float64 oracle on fresh random inputs and awkward shapes, forward and backward, in float32,
bfloat16 and float16 (and mixed, as autocast hands them over); the dropout mask regenerated exactly, its keep
rate, reproducibility by seed; thread-count independence; the registrations (torch.library.opcheck); the
drop-ins (scanet.fused.coattention's CPU path, scanet.fused.SimilarityHead) against the eager layers; errors.
"""

from __future__ import annotations

import pytest
import torch

from scanet import fused, layers, native_dense, reference

pytestmark = pytest.mark.skipif(
    not native_dense.available(), reason=f"native epilogues unavailable: {native_dense.unavailable_reason()}"
)
SHAPES = ((1, 1), (3, 17), (37, 301), (64, 1024))
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Error bound relative to the largest |value|, per storage dtype: float32 ~ a few ulp of the float32 compute;
# bf16 / fp16 one rounding of inputs and outputs (2^-9 / 2^-12 relative) compounded through a few products.
TOL = {torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _err(got: torch.Tensor, want: torch.Tensor, scale: float | None = None) -> float:
    """max |got - want| relative to max |want| (or to ``scale``, the size of the terms that cancel in want)."""
    denom = want.abs().max().item() if scale is None else max(scale, want.abs().max().item())
    return (got.double() - want).abs().max().item() / max(denom, 1e-30)


def _seed(*key) -> int:
    return sum((i + 1) * 7919 * int(k) for i, k in enumerate(key)) % 2**31


def _leaf(t: torch.Tensor, dtype) -> torch.Tensor:
    return t.to(dtype).requires_grad_()


def _as64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double().requires_grad_()


# ------------------------------------------------------------------------------------ co-attention epilogue
def epilogue64(z, g, scale, bias=None):
    return torch.softmax(torch.relu(z if bias is None else z + bias), dim=-1) * g * scale


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_epilogue_matches_float64_forward_and_backward(shape, dtype):
    M, N = shape
    gen = torch.Generator().manual_seed(_seed(M, N, DTYPES.index(dtype)))
    z = _leaf(torch.randn(M, N, generator=gen) * 3, dtype)
    g = _leaf(torch.randn(M, N, generator=gen), dtype)
    scale = float(N)
    out = native_dense.coattention_epilogue(z, g, scale)
    z64, g64 = _as64(z), _as64(g)
    want = epilogue64(z64, g64, scale)
    assert out.dtype == dtype and out.shape == (M, N)
    assert _err(out, want) < TOL[dtype]
    dout = torch.randn(M, N, generator=gen).to(dtype)
    dz, dg = torch.autograd.grad(out, (z, g), dout)
    dz64, dg64 = torch.autograd.grad(want, (z64, g64), dout.double())
    assert dz.dtype == dtype and dg.dtype == dtype
    # dz = p (dp - sum dp p): a difference of terms of size |p dp| (a one-column row's dz is exactly 0)
    terms = (torch.softmax(torch.relu(z64.detach()), -1) * dout.double() * g64.detach() * scale).abs().max().item()
    assert _err(dz, dz64, terms) < TOL[dtype] * 4
    assert _err(dg, dg64) < TOL[dtype]


def test_epilogue_mixed_dtypes_and_out_dtype():
    gen = torch.Generator().manual_seed(1)
    z = _leaf(torch.randn(9, 130, generator=gen), torch.bfloat16)
    g = _leaf(torch.randn(9, 130, generator=gen), torch.float32)
    out = native_dense.coattention_epilogue(z, g, 2.0, out_dtype=torch.float32)
    assert out.dtype == torch.float32
    want = epilogue64(_as64(z), _as64(g), 2.0)
    assert _err(out, want) < 1e-6  # z exact in bf16: only float32 rounding remains
    dz, dg = torch.autograd.grad(out.sum(), (z, g))
    assert dz.dtype == torch.bfloat16 and dg.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert native_dense.coattention_epilogue(z, g, 2.0).dtype == torch.bfloat16  # the autocast dtype


def test_epilogue_edge_rows():
    z = torch.tensor([[-1.0, -2.0, -3.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1e4, 0.0, -1e4, 3.0], [88.0, 0.0, 0.0, 0.0]])
    g = torch.ones_like(z)
    out = native_dense.coattention_epilogue(z, g, 1.0)
    want = epilogue64(z.double(), g.double(), 1.0)
    assert torch.allclose(out.double(), want, rtol=1e-6, atol=1e-30)
    assert torch.equal(out[0], torch.full((4,), 0.25))  # relu zeroes everything: a uniform map
    # ReLU's gradient at z == 0 is 0 (as F.relu / threshold_backward), also where z < 0
    zl = z.clone().requires_grad_()
    dz = torch.autograd.grad(native_dense.coattention_epilogue(zl, g, 1.0), zl, torch.randn(4, 4))[0]
    assert torch.all(dz[z <= 0] == 0)
    nan = torch.tensor([[0.5, float("nan"), 1.0]])
    assert torch.isnan(native_dense.coattention_epilogue(nan, torch.ones(1, 3), 1.0)).all()  # as torch.softmax


def _same_bits_for_1_and_2_threads(run) -> None:
    """run() -> tensors; they must be bitwise equal with 1 and with 2 threads."""
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(run())
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_epilogue_thread_count_does_not_change_the_bits():
    gen = torch.Generator().manual_seed(2)
    z, g, d = (torch.randn(300, 1024, generator=gen) for _ in range(3))

    bias = torch.randn(1024, generator=gen)

    def run():
        zl, gl, bl = z.clone().requires_grad_(), g.clone().requires_grad_(), bias.clone().requires_grad_()
        out = native_dense.coattention_epilogue(zl, gl, 1024.0, bias=bl)
        return (out, *torch.autograd.grad(out, (zl, gl, bl), d))

    _same_bits_for_1_and_2_threads(run)


@pytest.mark.parametrize("shape", [(1, 7), (37, 301), (64, 1024)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_epilogue_with_bias_matches_float64(shape, dtype):
    M, N = shape
    gen = torch.Generator().manual_seed(_seed(M, N, DTYPES.index(dtype), 7))
    z = _leaf(torch.randn(M, N, generator=gen) * 2, dtype)
    g = _leaf(torch.randn(M, N, generator=gen), dtype)
    b = (torch.randn(N, generator=gen)).requires_grad_()  # a float32 parameter beside bf16 activations
    out = native_dense.coattention_epilogue(z, g, 4.0, bias=b)
    z64, g64, b64 = _as64(z), _as64(g), _as64(b)
    want = epilogue64(z64, g64, 4.0, b64)
    assert _err(out, want) < TOL[dtype]
    dout = torch.randn(M, N, generator=gen).to(dtype)
    dz, dg, db = torch.autograd.grad(out, (z, g, b), dout)
    dz64, dg64, db64 = torch.autograd.grad(want, (z64, g64, b64), dout.double())
    terms = (torch.softmax(torch.relu(z64 + b64).detach(), -1) * dout.double() * g64.detach() * 4.0).abs()
    assert db.dtype == torch.float32 and db.shape == (N,)
    assert _err(dz, dz64, terms.max().item()) < TOL[dtype] * 4
    assert _err(dg, dg64) < TOL[dtype]
    assert _err(db, db64, terms.sum(0).max().item()) < TOL[dtype] * 4  # a sum over M rows of dz


def test_epilogue_registration_opcheck():
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(5, 33, generator=gen).requires_grad_()
    g = torch.randn(5, 33, generator=gen).requires_grad_()
    b = torch.randn(33, generator=gen).requires_grad_()
    torch.library.opcheck(torch.ops.scanet_native.coattention_epilogue_forward, (z, g, 3.0, True, None))
    torch.library.opcheck(torch.ops.scanet_native.coattention_epilogue_forward, (z, g, 3.0, True, None, b))


# --------------------------------------------------------------------------------------------- similarity head
def head64(f_t, f_i, w, b, keep, p):
    return (f_t * f_i * keep / (1.0 - p)) @ w.reshape(-1) + b


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_head_matches_float64_with_the_regenerated_mask(shape, dtype, p):
    M, N = shape
    gen = torch.Generator().manual_seed(_seed(M, N, DTYPES.index(dtype), p * 10))
    f_t, f_i = (_leaf(torch.randn(M, N, generator=gen), dtype) for _ in range(2))
    w = _leaf(torch.randn(1, N, generator=gen) / N**0.5, dtype)
    b = _leaf(torch.randn(1, generator=gen), dtype)
    seed = 1234 + M
    logit = native_dense.similarity_head(f_t, f_i, w, b, p, seed=seed)
    assert logit.dtype == torch.float32 and logit.shape == (M,)
    keep = native_dense.head_keep_mask(seed, (M, N), p).double() if p > 0 else torch.ones(M, N, dtype=torch.float64)
    leaves64 = [_as64(t) for t in (f_t, f_i, w, b)]
    want = head64(*leaves64, keep, p)
    assert _err(logit, want) < max(TOL[torch.float32], 1e-5)  # float32 compute from exact inputs
    dl = torch.randn(M, generator=gen)
    grads = torch.autograd.grad(logit, (f_t, f_i, w, b), dl)
    grads64 = torch.autograd.grad(want, leaves64, dl.double())
    for got, ref, t in zip(grads, grads64, (f_t, f_i, w, b), strict=True):
        assert got.dtype == t.dtype and got.shape == t.shape
        assert _err(got, ref) < TOL[dtype] + 1e-6


def test_head_dropout_is_reproducible_by_seed_and_keeps_one_minus_p():
    f = torch.ones(512, 1024)
    w = torch.ones(1024)
    torch.manual_seed(7)
    a = native_dense.similarity_head(f, f, w, None, 0.2)
    torch.manual_seed(7)
    b = native_dense.similarity_head(f, f, w, None, 0.2)
    c = native_dense.similarity_head(f, f, w, None, 0.2)  # the next draw: another mask
    assert torch.equal(a, b) and not torch.equal(a, c)
    # each logit = (kept count) / 0.8: over 512 x 1024 Bernoulli(0.8) draws the kept share is 0.8 +- 5 sigma
    share = (a * 0.8).sum().item() / (512 * 1024)
    assert abs(share - 0.8) < 5 * (0.8 * 0.2 / (512 * 1024)) ** 0.5
    # eval (training=False) and p = 0 apply no mask
    assert torch.equal(native_dense.similarity_head(f, f, w, None, 0.2, training=False), torch.full((512,), 1024.0))


def test_head_under_autocast_rounds_its_fc_like_autocast_and_matches_float64():
    gen = torch.Generator().manual_seed(9)
    f_t, f_i = (_leaf(torch.randn(33, 200, generator=gen), torch.bfloat16) for _ in range(2))
    w = torch.randn(1, 200, generator=gen).requires_grad_()  # float32 parameters, as nn.Linear's
    b = torch.randn(1, generator=gen).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logit = native_dense.similarity_head(f_t, f_i, w, b, 0.0)
    assert logit.dtype == torch.float32
    # autocast hands an FC bf16 weights: the oracle uses w and b rounded to bf16, as the op's autocast kernel does
    w16, b16 = w.detach().bfloat16().double(), b.detach().bfloat16().double()
    want = head64(f_t.detach().double(), f_i.detach().double(), w16, b16, 1.0, 0.0)
    assert _err(logit, want) < 1e-5
    dw, db = torch.autograd.grad(logit.sum(), (w, b))
    assert dw.dtype == torch.float32 and db.dtype == torch.float32  # widened back, as autocast's cast does
    assert torch.allclose(dw.double(), (f_t.detach().double() * f_i.detach().double()).sum(0, keepdim=True), rtol=2e-2)
    assert db.item() == 33.0


def test_head_thread_count_does_not_change_the_bits():
    gen = torch.Generator().manual_seed(4)
    f_t, f_i = (torch.randn(300, 1000, generator=gen) for _ in range(2))
    w, b = torch.randn(1, 1000, generator=gen), torch.randn(1, generator=gen)
    dl = torch.randn(300, generator=gen)

    def run():
        leaves = [t.clone().requires_grad_() for t in (f_t, f_i, w, b)]
        logit = native_dense.similarity_head(*leaves, 0.25, seed=99)
        return (logit, *torch.autograd.grad(logit, leaves, dl))

    _same_bits_for_1_and_2_threads(run)


def test_head_registration_opcheck():
    gen = torch.Generator().manual_seed(5)
    f_t, f_i = (torch.randn(6, 40, generator=gen).requires_grad_() for _ in range(2))
    w = torch.randn(40, generator=gen).requires_grad_()
    b = torch.randn(1, generator=gen).requires_grad_()
    torch.library.opcheck(torch.ops.scanet_native.similarity_head_forward, (f_t, f_i, w, b, 0.3, 11))


# ------------------------------------------------------------------------------------------------- drop-ins
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fused_coattention_on_cpu_runs_the_epilogue_and_matches_float64(precision, monkeypatch):
    from scanet.precision import autocast_context

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the tests' default runs the Triton kernels interpreted on CPU
    calls = []
    real = native_dense.coattention_epilogue
    monkeypatch.setattr(native_dense, "coattention_epilogue", lambda *a, **k: calls.append(1) or real(*a, **k))
    gen = torch.Generator().manual_seed(6)
    M, N = 19, 96
    f, g = (torch.randn(M, N, generator=gen).requires_grad_() for _ in range(2))
    W = (torch.randn(N, N, generator=gen) / N**0.5).requires_grad_()
    b = (torch.randn(N, generator=gen) * 0.1).requires_grad_()
    with autocast_context("cpu", precision):
        out = fused.coattention(f, g, W, b, scale=float(N))
    assert calls and out.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    leaves64 = [_as64(t) for t in (f, g, W, b)]
    want = reference.coattention(*leaves64, scale=float(N))
    tol = 2e-2 if precision == "bf16" else 2e-6
    assert _err(out, want) < tol
    d = torch.randn(M, N, generator=gen)
    for got, ref in zip(
        torch.autograd.grad(out, (f, g, W, b), d.to(out.dtype)),
        torch.autograd.grad(want, leaves64, d.to(out.dtype).double()),
        strict=True,
    ):
        assert _err(got, ref) < tol * 4
    calls.clear()
    fused.coattention(f, g, W, b, scale=float(N), native=False)
    assert not calls  # native=False: the eager reference
    fused.coattention(*(t.double() for t in (f, g, W, b)), scale=float(N))
    assert not calls  # float64: the eager reference


def test_fused_head_is_a_drop_in():
    torch.manual_seed(8)
    eager = layers.SimilarityHead(64, 0.2)
    native = fused.SimilarityHead(64, 0.2)
    native.load_state_dict(eager.state_dict())
    assert native.state_dict().keys() == eager.state_dict().keys()
    f_t, f_i = torch.randn(10, 64), torch.randn(10, 64)
    eager.eval(), native.eval()
    assert torch.allclose(native(f_t, f_i), eager(f_t, f_i), rtol=1e-5, atol=1e-6)
    native.native = False
    assert torch.equal(native(f_t, f_i), eager(f_t, f_i))
    native.native = True
    native.train()
    torch.manual_seed(3)
    a = native(f_t, f_i)
    torch.manual_seed(3)
    assert torch.equal(a, native(f_t, f_i))  # training mode: the mask comes from torch's generator


def test_fused_model_uses_the_native_head_and_image_encoder():
    from scanet.data.graph import random_graph_laplacian
    from scanet.model import SCANet

    model = SCANet(30, 8, random_graph_laplacian(30, k=3), fused=True)
    assert isinstance(model.head, fused.SimilarityHead) and isinstance(model.image_encoder, fused.ImageEncoder)
    eager = SCANet(30, 8, random_graph_laplacian(30, k=3))
    assert type(eager.head) is layers.SimilarityHead and type(eager.image_encoder) is layers.ImageEncoder


# ----------------------------------------------------------------------------------------- standardization
@pytest.mark.parametrize("shape", [(1, 1), (7, 129), (256, 4096)])
@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16, torch.float16])
def test_standardize_rows_is_the_eager_computation_bit_for_bit(shape, out_dtype):
    B, D = shape
    gen = torch.Generator().manual_seed(B + D)
    x = torch.rand(B, D, generator=gen)
    mean, std = torch.rand(D, generator=gen), torch.rand(D, generator=gen) + 0.01
    want = (x - mean) / std
    got = native_dense.standardize_rows(x, mean, std, out_dtype)
    assert got.dtype == (out_dtype or torch.float32)
    assert torch.equal(got, want if out_dtype is None else want.to(out_dtype))
    assert _err(got, (x.double() - mean.double()) / std.double()) < TOL[out_dtype or torch.float32]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert native_dense.standardize_rows(x, mean, std).dtype == torch.bfloat16


def test_standardize_rows_registration_and_errors():
    x, m, s = torch.rand(3, 5), torch.rand(5), torch.rand(5) + 0.5
    torch.library.opcheck(torch.ops.scanet_native.standardize_rows, (x, m, s, None))
    with pytest.raises(ValueError, match=r"mean must have shape \(5,\)"):
        native_dense.standardize_rows(x, torch.rand(4), s)
    with pytest.raises(ValueError, match="x must be a float32 CPU tensor"):
        native_dense.standardize_rows(x.double(), m, s)
    with pytest.raises(ValueError, match="x requires grad"):
        native_dense.standardize_rows(x.requires_grad_(), m, s)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fused_image_encoder_equals_the_eager_one_bitwise(precision):
    from scanet.precision import autocast_context

    torch.manual_seed(10)
    eager = layers.ImageEncoder(40, 16)
    native = fused.ImageEncoder(40, 16)
    images = torch.rand(50, 40)
    eager.set_input_statistics(images)
    native.load_state_dict(eager.state_dict())
    assert native.state_dict().keys() == eager.state_dict().keys()
    calls = []
    real = native_dense.standardize_rows
    try:
        native_dense.standardize_rows = lambda *a, **k: calls.append(1) or real(*a, **k)
        with autocast_context("cpu", precision):
            a, b = native(images[:9]), eager(images[:9])
    finally:
        native_dense.standardize_rows = real
    assert calls and torch.equal(a, b)  # the same bits into the same GEMM
    ga = torch.autograd.grad(a.float().sum(), native.fc.weight)[0]
    gb = torch.autograd.grad(b.float().sum(), eager.fc.weight)[0]
    assert torch.equal(ga, gb)
    leaf = images[:4].clone().requires_grad_()  # features that require grad: the eager encoder
    assert torch.equal(native(leaf), eager(leaf))


# ------------------------------------------------------------------------------------------------------ errors
def test_bad_inputs_raise_clear_errors():
    z = torch.randn(4, 8)
    with pytest.raises(ValueError, match="z must be a 2-D"):
        native_dense.coattention_epilogue(torch.randn(8), z)
    with pytest.raises(ValueError, match=r"g must have shape \(4, 8\)"):
        native_dense.coattention_epilogue(z, torch.randn(4, 9))
    with pytest.raises(ValueError, match="z must be float32, bfloat16 or float16"):
        native_dense.coattention_epilogue(z.double(), z.double())
    with pytest.raises(ValueError, match="out_dtype must be"):
        native_dense.coattention_epilogue(z, z, out_dtype=torch.int32)
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        native_dense.coattention_epilogue(z, z, bias=torch.randn(4))
    with pytest.raises(ValueError, match=r"weight must have shape \(1, 8\) or \(8,\)"):
        native_dense.similarity_head(z, z, torch.randn(7))
    with pytest.raises(ValueError, match="bias must have one element"):
        native_dense.similarity_head(z, z, torch.randn(8), torch.randn(2))
    with pytest.raises(ValueError, match="dropout_p must be a number in"):
        native_dense.similarity_head(z, z, torch.randn(8), dropout_p=1.5)
    with pytest.raises(ValueError, match="f_i must be a torch.Tensor"):
        native_dense.similarity_head(z, [1.0], torch.randn(8))
