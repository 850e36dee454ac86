"""The fused co-attention step (scanet.fused.coattention, scanet.kernels.coattention) against the float64 oracle.

CPU runs the Triton kernels under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so shapes stay
small; CUDA, when present, runs the same tests plus larger shapes and the tf32/bf16 precisions.
"""

import numpy as np
import pytest
import torch

import scanet.fused as fused
from conftest import devices
from scanet import model as eager_model
from scanet import reference
from scanet.config import ModelConfig
from scanet.data.graph import random_graph_laplacian
from scanet.fused import _coattention as fused_impl
from scanet.kernels import coattention as kernels

CUDA = torch.cuda.is_available()

# Tolerances in max |actual - float64| / max |float64|. Measured on CPU (interpreter, fp32, these cases and
# more, 3 seeds): out <= 1.1e-6, gradients <= 1.3e-6; the bounds leave room for other GEMM orders (cuBLAS).
OUT_TOL = 2e-5
GRAD_TOL = 1e-4


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    denom = expected.abs().max().item()
    return (actual - expected).abs().max().item() / (denom if denom > 0 else 1.0)


def make_inputs(M, N, device, *, seed, f_scale=1.0, bias_shift=0.0):
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(M, N, generator=gen) * f_scale
    g = torch.randn(M, N, generator=gen)
    weight = torch.randn(N, N, generator=gen) / N**0.5
    bias = 0.1 * torch.randn(N, generator=gen) + bias_shift
    return [t.to(device) for t in (f, g, weight, bias)]


def run_both(inputs, scale, dout, precision="fp32"):
    """(out, grads) of the fused op and of the float64 reference on the same inputs."""
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = fused.coattention(*leaves, scale=scale, precision=precision)
    out.backward(dout)
    ref_leaves = [t.detach().double().requires_grad_() for t in inputs]
    ref = reference.coattention(*ref_leaves, scale=scale)
    ref.backward(dout.double())
    return out, [t.grad for t in leaves], ref, [t.grad for t in ref_leaves]


# (M, N, scale): M = 1; M not a multiple of the block (CPU BLOCK_M = 64, so 70 is two blocks, one ragged);
# N of one tile (1, 7, 256) and of several column tiles (500: ragged last tile; 1024); small M for big N.
CASES = [
    (1, 1, 1.0),
    (1, 7, 1.0),
    (70, 7, 7.0),
    (5, 256, 256.0),
    (3, 500, 1.0),
    (4, 500, 500.0),
    (70, 300, 300.0),
    (2, 1024, 1024.0),
]
CUDA_CASES = [(1000, 1024, 1024.0), (513, 4096, 4096.0), (4099, 256, 1.0), (300, 1, 1.0)]


def _cases():
    out = [pytest.param("cpu", *c, id=f"cpu-M{c[0]}-N{c[1]}-s{c[2]:g}") for c in CASES]
    if CUDA:
        out += [pytest.param("cuda", *c, id=f"cuda-M{c[0]}-N{c[1]}-s{c[2]:g}") for c in CASES + CUDA_CASES]
    return out


@pytest.mark.parametrize("device,M,N,scale", _cases())
def test_forward_and_gradients_match_float64(device, M, N, scale):
    assert fused_impl.uses_kernels(torch.empty(1, 1, device=device)), "the kernels must run in this test"
    inputs = make_inputs(M, N, device, seed=M * 7919 + N)
    dout = torch.randn(M, N, generator=torch.Generator().manual_seed(N)).to(device)
    out, grads, ref, ref_grads = run_both(inputs, scale, dout)
    assert out.shape == (M, N) and out.dtype == torch.float32
    assert rel_err(out, ref) < OUT_TOL
    for name, got, want in zip(("f", "g", "weight", "bias"), grads, ref_grads, strict=True):
        assert got.shape == want.shape, name
        assert rel_err(got, want) < GRAD_TOL, f"d{name}: {rel_err(got, want):.2e}"


@pytest.mark.parametrize("device", devices())
def test_autograd_function_matches_float64(device):
    """The torch.library-free autograd.Function over the same launchers."""
    inputs = make_inputs(9, 300, device, seed=3)
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = kernels.CoAttentionFunction.apply(*leaves, 300.0)
    dout = torch.randn_like(out)
    out.backward(dout)
    ref_leaves = [t.detach().double().requires_grad_() for t in inputs]
    ref = reference.coattention(*ref_leaves, scale=300.0)
    ref.backward(dout.double())
    assert rel_err(out, ref) < OUT_TOL
    for got, want in zip(leaves, ref_leaves, strict=True):
        assert rel_err(got.grad, want.grad) < GRAD_TOL


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("N", [7, 500])
def test_no_grad_forward_skips_saving_and_matches(device, N):
    inputs = make_inputs(6, N, device, seed=N)
    with torch.no_grad():
        out = fused.coattention(*inputs, scale=2.0)
        _, a, lse = fused_impl._forward_op(*inputs, 2.0, "fp32", False)
    assert a.numel() == 0 and lse.numel() == 0
    ref = reference.coattention(*[t.double() for t in inputs], scale=2.0)
    assert rel_err(out, ref) < OUT_TOL


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("N", [7, 500])
def test_large_logits_do_not_overflow(device, N):
    # |h| reaches ~1e3-1e4: exp(h) overflows fp32 (and float64 beyond ~710) unless the max is subtracted.
    inputs = make_inputs(5, N, device, seed=11, f_scale=3000.0)
    dout = torch.randn(5, N).to(device)
    out, grads, ref, ref_grads = run_both(inputs, float(N), dout)
    h = inputs[0].double() @ inputs[2].double().T + inputs[3].double()
    assert h.max() > 1e3
    assert torch.isfinite(out).all() and all(torch.isfinite(t).all() for t in grads)
    # An absolute error e on h is a relative error e on p; with |h| ~ 1e3-1e4 fp32 gives e ~ 1e-4-1e-3.
    assert rel_err(out, ref) < 1e-2
    assert rel_err(grads[1], ref_grads[1]) < 1e-2
    # With p nearly one-hot, dh = p * (dp - sum(p * dp)) is a cancellation: its true value is tiny (the
    # float64 reference even underflows to 0), and fp32 leaves an absolute error of a few ulps of
    # |dp| <= scale * max|dout * g|. Bound the error of dh by 4 such ulps and carry it through the GEMMs.
    f, g, weight, _ = (t.double().cpu() for t in inputs)
    dh_err = 4 * 2.0**-24 * N * (dout.double().cpu() * g).abs().max().item()
    bounds = (
        dh_err * weight.abs().sum(0).max().item(),  # df = dh @ W
        dh_err * f.abs().sum(0).max().item(),  # dW = dh.T @ f
        dh_err * f.shape[0],
    )  # db = sum over rows of dh
    for got, want, bound in zip(
        (grads[0], grads[2], grads[3]), (ref_grads[0], ref_grads[2], ref_grads[3]), bounds, strict=True
    ):
        assert (got.double().cpu() - want.cpu()).abs().max().item() <= bound


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("N", [7, 500])
def test_all_negative_preactivations_give_uniform_attention(device, N):
    M, scale = 4, 3.0
    inputs = make_inputs(M, N, device, seed=5, bias_shift=-1e3)  # h < 0 everywhere: relu(h) = 0
    dout = torch.randn(M, N).to(device)
    out, (df, dg, dweight, dbias), _, _ = run_both(inputs, scale, dout)
    g = inputs[1]
    torch.testing.assert_close(out, g * (scale / N), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dg, dout * (scale / N), rtol=1e-5, atol=1e-7)
    # The ReLU blocks every gradient to h: exactly zero, not merely small.
    assert (df == 0).all() and (dweight == 0).all() and (dbias == 0).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, in the interpreter, on NaN arithmetic
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("N", [7, 500])
def test_nan_propagates_to_the_output(device, N):
    f, g, weight, bias = make_inputs(5, N, device, seed=9)
    f[1, 3] = float("nan")  # row 1 of h is NaN -> its softmax, hence row 1 of out, is all NaN
    g[2, 4] = float("nan")  # one element of g -> that element of out only
    out = fused.coattention(f, g, weight, bias, scale=2.0)
    ref = reference.coattention(*[t.double() for t in (f, g, weight, bias)], scale=2.0)
    assert torch.equal(torch.isnan(out).cpu(), torch.isnan(ref).cpu())
    assert torch.isnan(out[1]).all()
    assert torch.isnan(out[2, 4]) and torch.isfinite(out[2, :4]).all()
    finite = torch.isfinite(ref)
    assert rel_err(out[finite], ref[finite]) < OUT_TOL


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("N", [7, 500])
def test_non_contiguous_inputs_are_taken_as_they_are(device, N):
    M = 6
    f0, g0, w0, b0 = make_inputs(M, N, device, seed=21)
    f = torch.stack([f0, f0], 2)[:, :, 0]  # strides (2N, 2)
    g = g0.t().contiguous().t()  # column-major
    weight = w0.t().contiguous().t()  # column-major (N, N)
    bias = torch.stack([b0, b0], 1)[:, 0]  # stride 2
    assert not (f.is_contiguous() or g.is_contiguous() or weight.is_contiguous() or bias.is_contiguous())
    leaves = [t.detach().requires_grad_() for t in (f, g, weight, bias)]
    out = fused.coattention(*leaves, scale=float(N))
    out.sum().backward()  # dout is an expanded (stride 0) tensor
    ref_leaves = [t.detach().double().requires_grad_() for t in (f0, g0, w0, b0)]
    ref = reference.coattention(*ref_leaves, scale=float(N))
    ref.sum().backward()
    assert rel_err(out, ref) < OUT_TOL
    for got, want in zip(leaves, ref_leaves, strict=True):
        assert rel_err(got.grad, want.grad) < GRAD_TOL


def test_other_dtypes_and_empty_inputs_use_the_reference():
    f, g, weight, bias = (t.double() for t in make_inputs(3, 5, "cpu", seed=1))
    assert not fused_impl.uses_kernels(f)
    assert torch.equal(
        fused.coattention(f, g, weight, bias, scale=5.0), reference.coattention(f, g, weight, bias, scale=5.0)
    )
    empty = torch.empty(0, 5)
    assert fused.coattention(empty, empty, weight.float(), bias.float()).shape == (0, 5)


def test_precision_on_cpu_computes_fp32():
    inputs = make_inputs(4, 33, "cpu", seed=2)
    with torch.no_grad():
        base = fused.coattention(*inputs, scale=3.0)
        for precision in ("tf32", "bf16"):
            torch.testing.assert_close(fused.coattention(*inputs, scale=3.0, precision=precision), base, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------- errors
def test_bad_inputs_raise_clear_errors():
    f, g, weight, bias = make_inputs(4, 6, "cpu", seed=0)
    cases = [
        ((f, g[:3], weight, bias), "g must have the shape of f"),
        ((f, g, weight[:5], bias), r"weight must have shape \(6, 6\)"),
        ((f, g, weight, bias[:5]), r"bias must have shape \(6,\)"),
        ((f[0], g, weight, bias), r"f must have shape \(M, N\)"),
        ((f, g.double(), weight, bias), "one floating dtype"),
        ((f, g, weight, bias.to("meta")), "one device"),
        ((f, g, weight.numpy(), bias), "weight must be a torch.Tensor"),
        ((f.long(), g.long(), weight.long(), bias.long()), "floating dtype"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            fused.coattention(*args)
    with pytest.raises(ValueError, match="precision must be one of"):
        fused.coattention(f, g, weight, bias, precision="fp8")
    with pytest.raises(ValueError, match="precision must be one of"):
        fused.StackedCoAttention(6, precision="int8")


def test_backward_without_saved_tensors_fails_clearly():
    f, g, weight, bias = make_inputs(3, 7, "cpu", seed=0)
    out, a, lse = fused_impl._forward_op(f, g, weight, bias, 1.0, "fp32", False)
    with pytest.raises(RuntimeError, match="save_for_backward=False"):
        kernels.coattention_backward(torch.ones_like(out), out, a, lse, f, g, weight)


# ------------------------------------------------------------------------------------------ Triton GEMM
@pytest.mark.parametrize("device", devices())
def test_triton_matmul_with_split_k_and_strides(device):
    """The GEMM that backward uses for tf32/bf16 (and for fp32 with BACKWARD_GEMM = "triton")."""
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(300, 70, generator=gen).to(device).t()  # (70, 300), column-major
    b = torch.randn(300, 100, generator=gen).to(device)
    got = kernels.matmul(a, b, "fp32")
    assert rel_err(got, a.double() @ b.double()) < 1e-5
    with pytest.raises(ValueError, match="inner dimensions"):
        kernels.matmul(a, b[:10])


# ------------------------------------------------------------------------------------------------- module
def _coattention_pair(N, layers=2, scale=None):
    torch.manual_seed(N)
    eager = eager_model.StackedCoAttention(N, layers, scale=float(N) if scale is None else scale)
    drop_in = fused.StackedCoAttention(N, layers, scale=float(N) if scale is None else scale)
    missing = drop_in.load_state_dict(eager.state_dict())
    assert not missing.missing_keys and not missing.unexpected_keys
    assert drop_in.state_dict().keys() == eager.state_dict().keys()
    return eager, drop_in


@pytest.mark.parametrize("device", devices())
def test_stacked_coattention_is_a_drop_in(device):
    N, M = 24, 10
    eager, drop_in = _coattention_pair(N)
    eager, drop_in = eager.to(device), drop_in.to(device)
    assert isinstance(drop_in, eager_model.StackedCoAttention) and type(drop_in).op is fused.coattention
    f_t, f_i = torch.randn(M, N, device=device), torch.randn(M, N, device=device)
    outs = []
    for module in (eager, drop_in):
        ft, fi = f_t.clone().requires_grad_(), f_i.clone().requires_grad_()
        t, i = module(ft, fi)
        (t * i).sum().backward()
        outs.append((t, i, ft.grad, fi.grad, [p.grad for p in module.parameters()]))
    (t0, i0, gt0, gi0, p0), (t1, i1, gt1, gi1, p1) = outs
    for x, y in [(t1, t0), (i1, i0), (gt1, gt0), (gi1, gi0)] + list(zip(p1, p0, strict=True)):
        assert rel_err(x, y) < GRAD_TOL
    # attention() (used by score_all) is inherited unchanged.
    torch.testing.assert_close(drop_in.attention(1, "image", f_i), eager.attention(1, "image", f_i))


def _train_losses(net, bow, image, labels, steps=3):
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy(net(bow, image), labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _tiny_problem(seed=0):
    V, D, B, N = 30, 12, 8, 16
    gen = torch.Generator().manual_seed(seed)
    lap = random_graph_laplacian(V, 3, seed)
    bow = (torch.rand(B, V, generator=gen) < 0.3).float()
    image = torch.randn(B, D, generator=gen)
    labels = (torch.rand(B, generator=gen) < 0.5).float()
    return V, D, N, lap, bow, image, labels


# 3 Adam steps in fp32 from identical weights: the fused and eager losses differ by GEMM rounding only
# (~1e-7 relative), which Adam's first steps amplify at most modestly; 1e-4 relative is a wide margin that
# still catches a wrong gradient (those change the second loss in its first digits).
TRAIN_TOL = 1e-4


def test_training_with_the_drop_in_coattention_matches_eager():
    V, D, N, lap, bow, image, labels = _tiny_problem()
    cfg = ModelConfig(common_dim=N, dropout=0.0)
    torch.manual_seed(0)
    eager = eager_model.SCANet(V, D, lap, cfg)
    mixed = eager_model.SCANet(V, D, lap, cfg)
    mixed.load_state_dict(eager.state_dict())
    drop_in = fused.StackedCoAttention(N, cfg.coattention_layers, float(N))
    drop_in.load_state_dict(mixed.coattention.state_dict())
    mixed.coattention = drop_in
    want = _train_losses(eager, bow, image, labels)
    got = _train_losses(mixed, bow, image, labels)
    assert want[-1] != want[0]  # the steps changed the model
    np.testing.assert_allclose(got, want, rtol=TRAIN_TOL)


def test_training_scanet_fused_matches_eager():
    if not hasattr(fused, "ChebConv"):
        pytest.skip("SCANet(fused=True) needs scanet.fused.ChebConv, which is not in scanet.fused yet")
    V, D, N, lap, bow, image, labels = _tiny_problem(1)
    cfg = ModelConfig(common_dim=N, dropout=0.0)
    torch.manual_seed(1)
    eager = eager_model.SCANet(V, D, lap, cfg)
    net = eager_model.SCANet(V, D, lap, cfg, fused=True)
    net.load_state_dict(eager.state_dict())
    assert isinstance(net.coattention, fused.StackedCoAttention)
    want = _train_losses(eager, bow, image, labels)
    got = _train_losses(net, bow, image, labels)
    np.testing.assert_allclose(got, want, rtol=TRAIN_TOL)


# ------------------------------------------------------------------------------ reference, compile, opcheck
def test_reference_gradcheck_float64():
    gen = torch.Generator().manual_seed(0)
    args = [
        torch.randn(*s, generator=gen, dtype=torch.float64).requires_grad_() for s in ((3, 5), (3, 5), (5, 5), (5,))
    ]
    assert torch.autograd.gradcheck(lambda *a: reference.coattention(*a, scale=2.5), args)


def test_opcheck_forward_and_backward_ops():
    f, g, weight, bias = make_inputs(5, 7, "cpu", seed=3)
    leaves = [t.requires_grad_() for t in (f, g, weight, bias)]
    torch.library.opcheck(fused_impl._forward_op, (*leaves, 2.0, "fp32", True))
    out, a, lse = fused_impl._forward_op(f.detach(), g.detach(), weight.detach(), bias.detach(), 2.0, "fp32", True)
    for need_df, need_dw in ((True, True), (False, True), (True, False)):
        torch.library.opcheck(
            fused_impl._backward_op,
            (torch.randn(5, 7), out, a, lse, f.detach(), g.detach(), weight.detach(), 2.0, "fp32", need_df, need_dw),
        )


def test_torch_compile_fullgraph_keeps_the_op_in_the_graph():
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def step(f, g, weight, bias):
        return (fused.coattention(f, g, weight, bias, scale=3.0) ** 2).sum()

    f, g, weight, bias = make_inputs(6, 300, "cpu", seed=8)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=recording_backend)
    got_leaves = [t.clone().requires_grad_() for t in (f, g, weight, bias)]
    got = compiled(*got_leaves)
    got.backward()
    want_leaves = [t.clone().requires_grad_() for t in (f, g, weight, bias)]
    want = step(*want_leaves)
    want.backward()
    assert len(graphs) == 1
    assert "scanet.coattention_forward" in graphs[0].code
    torch.testing.assert_close(got, want)
    for x, y in zip(got_leaves, want_leaves, strict=True):
        torch.testing.assert_close(x.grad, y.grad)


def test_torch_compile_inductor_runs_the_op():
    """Inductor (CPU C++ codegen here) with the custom op as an extern call, forward and backward."""

    def step(f, g, weight, bias):
        return (fused.coattention(f, g, weight, bias, scale=2.0) * g).sum()

    f, g, weight, bias = make_inputs(4, 7, "cpu", seed=12)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (f, g, weight, bias)]
    got = compiled(*leaves)
    got.backward()
    ref_leaves = [t.double().requires_grad_() for t in (f, g, weight, bias)]
    want = (reference.coattention(*ref_leaves, scale=2.0) * ref_leaves[1]).sum()
    want.backward()
    assert rel_err(got, want) < OUT_TOL
    for x, y in zip(leaves, ref_leaves, strict=True):
        assert rel_err(x.grad, y.grad) < GRAD_TOL


# --------------------------------------------------------------------------------------------- CUDA only
@pytest.mark.parametrize("precision,tol", [("tf32", 1e-2), ("bf16", 4e-2)])
@pytest.mark.parametrize("M,N", [(300, 256), (1000, 1024)])
def test_reduced_precision_on_cuda(precision, tol, M, N):
    if not CUDA:
        pytest.skip("tf32/bf16 GEMMs need CUDA (the interpreter computes fp32, and its bf16 is wrong)")
    inputs = make_inputs(M, N, "cuda", seed=M + N)
    dout = torch.randn(M, N, device="cuda")
    out, grads, ref, ref_grads = run_both(inputs, float(N), dout, precision=precision)
    assert rel_err(out, ref) < tol
    for got, want in zip(grads, ref_grads, strict=True):
        assert rel_err(got, want) < tol


def test_fp32_backward_with_triton_gemms_on_cuda(monkeypatch):
    if not CUDA:
        pytest.skip("BACKWARD_GEMM only switches CUDA GEMMs (CPU backward always uses torch.matmul)")
    monkeypatch.setattr(kernels, "BACKWARD_GEMM", "triton")
    inputs = make_inputs(777, 1024, "cuda", seed=1)
    dout = torch.randn(777, 1024, device="cuda")
    out, grads, ref, ref_grads = run_both(inputs, 1024.0, dout)
    for got, want in zip(grads, ref_grads, strict=True):
        assert rel_err(got, want) < GRAD_TOL


def test_precision_default_and_capability_checks(monkeypatch):
    """precision=None resolves per device; tf32/bf16/fp16 on a V100 (sm_70) are refused with a reason."""
    from scanet.fused import _dispatch

    assert _dispatch.default_precision("cpu") == "fp32"
    monkeypatch.setattr(_dispatch, "_capability", lambda device: 70)
    pytest.importorskip("triton")
    assert _dispatch.default_precision("cuda") == "fp32"
    _dispatch.check_precision("fp32", "cuda")
    for p in ("tf32", "bf16", "fp16"):
        with pytest.raises(ValueError, match="not available on sm_70"):
            _dispatch.check_precision(p, "cuda")
    monkeypatch.setattr(_dispatch, "_capability", lambda device: 90)
    assert _dispatch.default_precision("cuda") == "tf32"
    for p in ("tf32", "bf16", "fp16"):
        _dispatch.check_precision(p, "cuda")
