"""scanet.adam_bf16 / scanet_native::adam_bf16_step: the one-pass Adam / AdamW step from bf16 gradients.

Compared with torch's fused AdamW / Adam on the same inputs (bitwise, except exp_avg_sq's rounding in a tensor's
last numel % 16 elements, which torch's kernel computes in its scalar remainder loop), with a float64 reference
of the update, over awkward sizes, several parameters and steps, weight decay off and on, decoupled and coupled,
with and without an extra float32 gradient; the bf16 copy against master.to(bfloat16); 1 vs 2 threads.
"""

from __future__ import annotations

import pytest
import torch

from scanet import native
from scanet.adam_bf16 import adam_reference, native_unsupported, step_with_bf16_grads

pytestmark = pytest.mark.skipif(
    not native.available(), reason=f"native extension unavailable: {native.unavailable_reason()}"
)
BF16 = torch.bfloat16
SIZES = ((1,), (17,), (4, 16), (1000003,))


def _pair(sizes, decoupled: bool, weight_decay: float, seed: int, lr: float = 2e-3):
    """Two identical optimizers (torch's fused one, and one the native op steps) on identical parameters."""
    g = torch.Generator().manual_seed(seed)
    start = [torch.randn(s, generator=g) for s in sizes]
    adam = torch.optim.AdamW if decoupled else torch.optim.Adam
    made = []
    for _ in range(2):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        made.append((params, adam(params, lr=lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay, fused=True)))
    return made, g


def _grads(params, g, with_extra: bool):
    bf16 = [torch.randn(p.shape, generator=g).to(BF16) for p in params]
    extra = [
        torch.randn(p.shape, generator=g) * 0.1 if with_extra and i % 2 == 0 else None for i, p in enumerate(params)
    ]
    return bf16, extra


def _body(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the elements torch's kernel computes in its vector loop, its scalar remainder)."""
    flat = t.reshape(-1)
    cut = flat.numel() - flat.numel() % 16
    return flat[:cut], flat[cut:]


@pytest.mark.parametrize("decoupled", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("with_extra", [False, True])
def test_the_native_step_equals_torch_fused_adam(decoupled, weight_decay, with_extra):
    (theirs, opt_t), (ours, opt_o) = _pair(SIZES, decoupled, weight_decay, seed=int(decoupled) + 7)[0]
    copies = [p.detach().to(BF16) for p in ours]
    groups = {id(p): opt_o.param_groups[0] for p in ours}
    assert native_unsupported(opt_o) is None
    g = torch.Generator().manual_seed(3)
    for step in range(1, 5):
        bf16, extra = _grads(ours, g, with_extra)
        for p, gb, ge in zip(theirs, bf16, extra, strict=True):
            p.grad = gb.float() + ge if ge is not None else gb.float()  # what the unfused path hands torch
        opt_t.step()
        step_with_bf16_grads(opt_o, list(zip(ours, bf16, extra, copies, strict=True)), groups)
        for i, (a, b, c) in enumerate(zip(theirs, ours, copies, strict=True)):
            sa, sb = opt_t.state[a], opt_o.state[b]
            assert sorted(sa) == sorted(sb) and sb["step"].dtype == sa["step"].dtype and float(sb["step"]) == step
            for name, x, y in (("param", a, b), ("exp_avg", sa["exp_avg"], sb["exp_avg"])):
                assert torch.equal(x, y), (step, i, name)
            body_t, tail_t = _body(sa["exp_avg_sq"])
            body_o, tail_o = _body(sb["exp_avg_sq"])
            assert torch.equal(body_t, body_o), (step, i)
            torch.testing.assert_close(tail_o, tail_t, rtol=2.5e-7, atol=0)  # one float32 rounding
            assert c.dtype == BF16 and torch.equal(c, b.detach().to(BF16)), (step, i)  # round to nearest even


@pytest.mark.parametrize("decoupled", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_the_native_step_matches_a_float64_reference(decoupled, weight_decay):
    (_, _), (ours, opt) = _pair(SIZES, decoupled, weight_decay, seed=11, lr=1e-2)[0]
    copies = [p.detach().to(BF16) for p in ours]
    groups = {id(p): opt.param_groups[0] for p in ours}
    g = torch.Generator().manual_seed(5)
    for step in range(1, 4):
        bf16, extra = _grads(ours, g, with_extra=True)
        before = []
        for p in ours:
            st = opt.state.get(p) or {}
            zeros = torch.zeros_like(p)
            before.append((p.detach().clone(), st.get("exp_avg", zeros).clone(), st.get("exp_avg_sq", zeros).clone()))
        step_with_bf16_grads(opt, list(zip(ours, bf16, extra, copies, strict=True)), groups)
        for p, gb, ge, (p0, m0, v0) in zip(ours, bf16, extra, before, strict=True):
            ref = adam_reference(p0, gb, ge, m0, v0, step, 1e-2, (0.9, 0.99), 1e-8, weight_decay, decoupled)
            st = opt.state[p]
            # Bounds of a few float32 roundings of the terms each result sums (cancellation makes a relative
            # bound on the result meaningless): exp_avg = 0.9 m + 0.1 g, exp_avg_sq = 0.99 v + 0.01 g^2, and the
            # parameter: its own rounding plus the update (~lr, 100 x smaller than it) to 1e-4 of itself.
            # (the gradient's terms by magnitude: the bf16 grad, the extra one, the coupled L2 term)
            grad = gb.double().abs() + (ge.double().abs() if ge is not None else 0.0)
            grad = grad + (0.0 if decoupled else weight_decay * p0.double().abs())
            m_scale = 0.9 * m0.double().abs() + 0.1 * grad
            v_scale = 0.99 * v0.double() + 0.01 * grad.square()
            # the update lr/bc1 * m/denom, with m's own error bound in place of m (m may be a cancellation)
            denom = ref[2].sqrt() / (1 - 0.99**step) ** 0.5 + 1e-8
            update_scale = 1e-2 / (1 - 0.9**step) * m_scale / denom
            p_scale = 2.0 * ref[0].abs() + 1e-4 * 2**22 * update_scale
            for got, want, scale, name in zip(
                (p, st["exp_avg"], st["exp_avg_sq"]),
                ref,
                (p_scale, m_scale, v_scale),
                ("param", "exp_avg", "sq"),
                strict=True,
            ):
                err = (got.double() - want).abs()
                assert (err <= 2.0**-22 * scale + 1e-30).all(), (name, step, (err / (2.0**-22 * scale)).max())


def test_thread_counts_give_the_same_bits():
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            (_, _), (ours, opt) = _pair([(1000003,), (33,)], True, 0.01, seed=2)[0]
            copies = [p.detach().to(BF16) for p in ours]
            groups = {id(p): opt.param_groups[0] for p in ours}
            g = torch.Generator().manual_seed(9)
            for _ in range(3):
                bf16, extra = _grads(ours, g, with_extra=True)
                step_with_bf16_grads(opt, list(zip(ours, bf16, extra, copies, strict=True)), groups)
            results.append([t.clone() for p in ours for t in (p.detach(), *opt.state[p].values())] + copies)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_a_transposed_master_steps_as_the_contiguous_one_bitwise():
    """The pass is elementwise over memory: a master stored transposed (strides (1, rows), as MasterWeights
    keeps the FC weights) with its moments, grad and copy laid out alike gives the same numbers, element for
    element, as the contiguous layout; both against the float64 reference."""
    g = torch.Generator().manual_seed(11)
    shape = (37, 53)  # numel % 16 != 0: the scalar tail too
    p0, m0 = torch.randn(shape, generator=g), torch.randn(shape, generator=g) * 0.1
    v0 = torch.rand(shape, generator=g) * 0.01
    grad, extra = torch.randn(shape, generator=g).to(BF16), torch.randn(shape, generator=g) * 0.01
    results = []
    for lay in (lambda t: t.clone(), lambda t: t.t().contiguous().t()):
        p, m, v, gr, ex = (lay(t) for t in (p0, m0, v0, grad, extra))
        copy = lay(torch.zeros(shape, dtype=BF16))
        torch.ops.scanet_native.adam_bf16_step(p, gr, ex, m, v, copy, 3.0, 1e-2, 0.9, 0.999, 1e-8, 0.01, True)
        results.append((p, m, v, copy))
    assert results[1][0].stride() == (1, 37)
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
    want_p, want_m, want_v = adam_reference(p0, grad, extra, m0, v0, 3, 1e-2, (0.9, 0.999), 1e-8, 0.01, True)
    for got, want in zip(results[1][:3], (want_p, want_m, want_v), strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert torch.equal(results[1][3], results[1][0].to(BF16))
    # a size-1 dimension's stride is never used: a (1, n) grad with strides (1, 1) steps a (1, n) master as is
    row, grad_row = p0[:1].clone(), torch.empty(53, 1, dtype=BF16).t().copy_(grad[:1])
    assert grad_row.stride() != row.stride()
    m1, v1, c1 = m0[:1].clone(), v0[:1].clone(), torch.zeros(row.shape, dtype=BF16)
    torch.ops.scanet_native.adam_bf16_step(row, grad_row, None, m1, v1, c1, 3.0, 1e-2, 0.9, 0.999, 1e-8, 0.01, True)
    want_row = adam_reference(p0[:1], grad[:1], None, m0[:1], v0[:1], 3, 1e-2, (0.9, 0.999), 1e-8, 0.01, True)[0]
    torch.testing.assert_close(row.double(), want_row, rtol=1e-5, atol=1e-6)


def test_what_the_native_step_refuses():
    p = [torch.nn.Parameter(torch.zeros(3))]
    assert "SGD" in native_unsupported(torch.optim.SGD(p, lr=0.1))
    assert "fused=False" in native_unsupported(torch.optim.AdamW(p, fused=False))
    assert "amsgrad=True" in native_unsupported(torch.optim.AdamW(p, amsgrad=True, fused=True))
    assert "maximize=True" in native_unsupported(torch.optim.Adam(p, maximize=True, fused=True))
    assert "lr is a Tensor" in native_unsupported(torch.optim.Adam(p, lr=torch.tensor(0.1), fused=True))
    op = torch.ops.scanet_native.adam_bf16_step
    f, b = torch.zeros(4), torch.zeros(4, dtype=BF16)
    with pytest.raises(RuntimeError, match="grad must be BFloat16"):
        op(f, f, None, f.clone(), f.clone(), b, 1.0, 1e-3, 0.9, 0.999, 1e-8, 0.0, True)
    with pytest.raises(RuntimeError, match=r"exp_avg has shape \[3\], the master \[4\]"):
        op(f, b, None, torch.zeros(3), f.clone(), b.clone(), 1.0, 1e-3, 0.9, 0.999, 1e-8, 0.0, True)
    f2, b2 = torch.zeros(4, 6), torch.zeros(4, 6, dtype=BF16)
    with pytest.raises(RuntimeError, match=r"exp_avg_sq has strides \[1, 4\], the master \[6, 1\]"):
        op(f2, b2, None, f2.clone(), f2.t().contiguous().t(), b2.clone(), 1.0, 1e-3, 0.9, 0.999, 1e-8, 0.0, True)
    with pytest.raises(RuntimeError, match="param must be dense"):
        op(f2[:, :3], b2[:, :3], None, f2[:, :3], f2[:, :3], b2[:, :3], 1.0, 1e-3, 0.9, 0.999, 1e-8, 0.0, True)
    with pytest.raises(RuntimeError, match="step must be >= 1"):
        op(f, b, None, f.clone(), f.clone(), b.clone(), 0.0, 1e-3, 0.9, 0.999, 1e-8, 0.0, True)
    with pytest.raises(ValueError, match="step must be >= 1"):
        adam_reference(f, b, None, f, f, 0, 1e-3, (0.9, 0.999), 1e-8, 0.0, True)


def test_master_weights_falls_back_and_says_why():
    from scanet.master_weights import MasterWeights

    model = torch.nn.Sequential(torch.nn.Linear(5, 3))
    on = MasterWeights(model, torch.optim.AdamW(model.parameters(), fused=True))
    assert on.native and on.native_off_reason is None
    off = MasterWeights(model, torch.optim.AdamW(model.parameters(), amsgrad=True, fused=True))
    assert not off.native and "amsgrad=True" in off.native_off_reason
    assert MasterWeights(model, torch.optim.AdamW(model.parameters(), fused=True), native=False).native_off_reason
