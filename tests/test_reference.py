"""The eager oracles: gradcheck in float64, agreement with a dense computation, clear input errors."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scanet import reference
from scanet.data.graph import to_torch_csr


def _laplacian(V, seed=0, dtype=torch.float64):
    rng = np.random.default_rng(seed)
    A = sp.random(V, V, density=0.3, random_state=rng)
    A = A + A.T
    return to_torch_csr(0.3 * A - 0.1 * sp.identity(V), dtype=dtype)


def test_cheb_conv_matches_dense_chebyshev():
    L = _laplacian(9)
    Ld = L.to_dense()
    x = torch.randn(2, 9, 3, dtype=torch.float64)
    w = torch.randn(3, 3, 4, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64)
    T0, T1 = x, Ld @ x
    T2 = 2 * Ld @ T1 - T0
    expect = torch.relu(T0 @ w[0] + T1 @ w[1] + T2 @ w[2] + b)
    torch.testing.assert_close(reference.cheb_conv(L, x, w, b), expect)
    torch.testing.assert_close(reference.cheb_conv(L, x, w[:1], None, None), x @ w[0])


@pytest.mark.parametrize("K", [1, 2, 3])
def test_cheb_conv_gradcheck(K):
    L = _laplacian(6, seed=K)
    x = torch.randn(2, 6, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(K, 2, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: reference.cheb_conv(L, x, w, b, None), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: reference.cheb_conv(L, x, w, b, "relu"), (x, w, b))


def test_coattention_matches_formula_and_gradcheck():
    f, g = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    W, b = torch.randn(7, 7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    h = torch.clamp(f @ W.T + b, min=0)
    p = torch.exp(h) / torch.exp(h).sum(-1, keepdim=True)
    torch.testing.assert_close(reference.coattention(f, g, W, b), p * g)
    torch.testing.assert_close(reference.coattention(f, g, W, b, scale=7.0), 7 * p * g)
    args = tuple(t.clone().requires_grad_() for t in (f, g, W, b))
    assert torch.autograd.gradcheck(reference.coattention, args)


def test_clear_errors():
    L = _laplacian(5, dtype=torch.float32)
    x = torch.randn(1, 5, 1)
    w = torch.randn(3, 1, 1)
    with pytest.raises(ValueError, match="sparse_csr"):
        reference.check_cheb_inputs(L.to_dense(), x, w)
    with pytest.raises(ValueError, match="V=4"):
        reference.check_cheb_inputs(L, torch.randn(1, 4, 1), w)
    with pytest.raises(ValueError, match="dtype"):
        reference.check_cheb_inputs(L, x.double(), w)
    bad = torch.sparse_csr_tensor(torch.tensor([0, 2, 2]), torch.tensor([1, 0]), torch.ones(2), (2, 2))
    with pytest.raises(ValueError, match="unsorted"):
        reference.check_laplacian(bad)
    oob = torch.sparse_csr_tensor(
        torch.tensor([0, 1, 1]), torch.tensor([5]), torch.ones(1), (2, 2), check_invariants=False
    )
    with pytest.raises(ValueError, match="out of range"):
        reference.check_laplacian(oob)
    with pytest.raises(ValueError, match="shape of f"):
        reference.coattention(torch.randn(2, 3), torch.randn(3, 3), torch.randn(3, 3), torch.randn(3))
    with pytest.raises(ValueError, match="weight"):
        reference.coattention(torch.randn(2, 3), torch.randn(2, 3), torch.randn(3, 4), torch.randn(3))
