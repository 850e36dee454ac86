"""The loss of eq. 10 against its formula."""

import pytest
import torch

from scanet.loss import scanet_loss


def test_loss_matches_formula():
    g = torch.Generator().manual_seed(0)
    sim = torch.rand(50, generator=g, dtype=torch.float64)
    target = (torch.rand(50, generator=g) > 0.5).double()
    pos, neg = sim[target == 1], sim[target == 0]
    m, lam = 0.6, 0.35
    expect = pos.var(unbiased=False) + neg.var(unbiased=False) + lam * max(0.0, m - (pos.mean() - neg.mean()))
    loss, parts = scanet_loss(sim, target, m, lam)
    assert loss.item() == pytest.approx(float(expect), rel=1e-12)
    assert parts["mean_pos"].item() == pytest.approx(pos.mean().item())


def test_hinge_inactive_when_gap_exceeds_margin():
    sim = torch.tensor([0.95, 0.9, 0.1, 0.05], dtype=torch.float64)
    target = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    loss, parts = scanet_loss(sim, target, 0.6, 0.35)
    assert parts["hinge"].item() == 0.0
    assert loss.item() == pytest.approx(2 * 0.025**2)


def test_batch_with_one_group_drops_the_gap_term_and_grad_flows():
    sim = torch.tensor([0.2, 0.4, 0.6], dtype=torch.float64, requires_grad=True)
    loss, parts = scanet_loss(sim, torch.ones(3, dtype=torch.float64))
    assert parts["hinge"].item() == 0.0
    assert loss.item() == pytest.approx(sim.detach().var(unbiased=False).item())
    loss.backward()
    assert torch.isfinite(sim.grad).all()


def test_gradcheck_loss():
    sim = torch.rand(12, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1.0, 0.0] * 6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: scanet_loss(s, target)[0], (sim,))


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="target"):
        scanet_loss(torch.rand(4), torch.rand(5))
