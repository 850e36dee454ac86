"""precision="fp16" (fp16 GEMM operands, fp32 accumulation, fp32 outputs) against the float64 oracle.

The interpreter computes fp16 faithfully: it casts the tiles to numpy float16 and multiplies them with fp32
accumulation (np.matmul(..., dtype=float32)), which is what a tensor core does with fp16 operands, so these
errors are the GPU's up to the accumulation order. (Its bf16 arithmetic is wrong, and tf32 is computed in fp32:
only fp16 can be measured on CPU.) The tolerances are about 4x the errors measured here (3 seeds); the figures
in the kernels' docstrings come from ``test_fp16_errors_figures`` (run with -s).
"""

import pytest
import torch

from scanet.kernels import coattention as kernels  # tests/conftest.py set TRITON_INTERPRET=1 first
from scanet.kernels import pair_scores as pair_kernels

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's fp16 path is what is measured")

OUT_TOL = 4e-3
GRAD_TOL = 8e-3


def rel_err(actual, expected):
    actual, expected = actual.detach().double(), expected.detach().double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-300)).item()


def coattention64(f, g, w, b, scale):
    return torch.softmax(torch.relu(f @ w.T + b), dim=-1) * g * scale


def inputs(M, N, seed):
    gen = torch.Generator().manual_seed(seed)
    f, g = torch.randn(M, N, generator=gen), torch.randn(M, N, generator=gen)
    w = torch.randn(N, N, generator=gen) / N**0.5
    b = 0.1 * torch.randn(N, generator=gen)
    return f, g, w, b


def coattention_errors(M, N, seed):
    f, g, w, b = inputs(M, N, seed)
    leaves = [t.clone().requires_grad_() for t in (f, g, w, b)]
    out = kernels.CoAttentionFunction.apply(*leaves, float(N), "fp16")
    dout = torch.randn(M, N, generator=torch.Generator().manual_seed(seed + 1))
    out.backward(dout)
    ref_leaves = [t.double().requires_grad_() for t in (f, g, w, b)]
    ref = coattention64(*ref_leaves, float(N))
    ref.backward(dout.double())
    return rel_err(out, ref), [rel_err(x.grad, y.grad) for x, y in zip(leaves, ref_leaves, strict=True)]


@pytest.mark.parametrize("M,N", [(70, 7), (5, 256), (4, 500)])  # N = 1024: test_fp16_errors_figures
def test_coattention_fp16_matches_float64(M, N):
    out_err, grad_errs = coattention_errors(M, N, seed=M + N)
    assert out_err < OUT_TOL, out_err
    for name, err in zip(("f", "g", "weight", "bias"), grad_errs, strict=True):
        assert err < GRAD_TOL, f"d{name}: {err:.2e}"
    assert out_err > 1e-6, "fp16 rounding must show: the fp16 path did not run (fp32 is ~1e-7)"


def test_matmul_fp16_matches_float64_and_rounds():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(70, 300, generator=gen), torch.randn(300, 40, generator=gen)
    got = kernels.matmul(a.t().contiguous().t(), b, "fp16")  # strided left operand, split K
    want = a.double() @ b.double()
    err = rel_err(got, want)
    assert 1e-5 < err < 2e-3, err
    rounded = a.half().double() @ b.half().double()  # the same product of fp16 operands
    assert rel_err(got, rounded) < 1e-6, "fp16 operands, fp32 accumulation"


def test_pair_scores_fp16_matches_float64():
    gen = torch.Generator().manual_seed(3)
    nq, nc, N = 9, 21, 64
    f_t, f_i = torch.randn(nq, N, generator=gen), torch.randn(nc, N, generator=gen)
    w2_t, w2_i = (torch.randn(N, N, generator=gen) / N**0.5 for _ in range(2))
    b2_t, b2_i = (0.1 * torch.randn(N, generator=gen) for _ in range(2))
    w1_t, w1_i = (torch.randn(N, N, generator=gen) / N**0.5 for _ in range(2))
    head_w, head_b, scale = torch.randn(N, generator=gen) / N**0.5, 0.3, float(N)
    a1_t = torch.softmax(torch.relu(f_t @ w1_t.T), -1) * scale
    a1_i = torch.softmax(torch.relu(f_i @ w1_i.T), -1) * scale
    got = pair_kernels.pair_scores_layer2(
        f_t, f_i, a1_t, a1_i, w2_t, b2_t, w2_i, b2_i, head_w, head_b, scale, precision="fp16"
    )
    d = [t.double() for t in (f_t, f_i, a1_t, a1_i, w2_t, b2_t, w2_i, b2_i, head_w)]
    ft, fi, at, ai, wt, bt, wi, bi, hw = d
    xt = ai[None, :, :] * ft[:, None, :]  # (nq, nc, N): x_T = a1_I[j] * f_t[i]
    xi = at[:, None, :] * fi[None, :, :]
    pt = torch.softmax(torch.relu(xt @ wt.T + bt), -1) * scale
    pi = torch.softmax(torch.relu(xi @ wi.T + bi), -1) * scale
    want = ((pt * xt) * (pi * xi) * hw).sum(-1) + head_b
    err = ((got.double() - want).abs().max() / (want - head_b).abs().max()).item()
    assert 1e-6 < err < 1e-2, err


def test_fp16_errors_figures(capsys):
    """The docstring figures: max over 3 seeds of the relative errors at the paper's N = 1024."""
    worst_out, worst_grad = 0.0, 0.0
    for seed in range(3):
        out_err, grad_errs = coattention_errors(3, 1024, seed)
        worst_out, worst_grad = max(worst_out, out_err), max(worst_grad, *grad_errs)
    with capsys.disabled():
        print(f"\nfp16 co-attention, M=3, N=1024, 3 seeds: out {worst_out:.1e}, gradients {worst_grad:.1e}")
    assert worst_out < OUT_TOL and worst_grad < GRAD_TOL
