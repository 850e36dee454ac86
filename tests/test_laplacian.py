"""scanet.laplacian.Laplacian: built and checked once, accepted by every cheb_conv, owned by SCANet."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scanet import fused, native, reference
from scanet.config import ModelConfig
from scanet.data.graph import random_graph_laplacian, to_torch_csr
from scanet.laplacian import Laplacian
from scanet.model import SCANet


def _asymmetric(V=7, seed=0):
    rng = np.random.default_rng(seed)
    return sp.csr_matrix(sp.random(V, V, density=0.4, random_state=rng, dtype=np.float32))


def test_forms_agree_and_flags():
    Ls = random_graph_laplacian(30, 3, 2)
    a, b = Laplacian(Ls), Laplacian(to_torch_csr(Ls))
    c = Laplacian.from_arrays(a.crow, a.col, a.values)
    for lap in (a, b, c):
        assert lap.symmetric and lap.crow_t is None and lap.size == 30 and lap.nnz == Ls.nnz
        assert torch.equal(lap.csr().to_dense(), torch.as_tensor(Ls.toarray()))
    n = Laplacian(_asymmetric())
    assert not n.symmetric
    assert torch.equal(torch.sparse_csr_tensor(*n.transpose(), (7, 7)).to_dense(), n.csr().to_dense().T)


def test_bad_input_is_refused_at_construction():
    with pytest.raises(ValueError, match="square"):
        Laplacian(sp.csr_matrix((3, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="scipy sparse matrix, a torch sparse CSR"):
        Laplacian(np.eye(3))
    with pytest.raises(ValueError, match="sparse_csr"):
        Laplacian(torch.eye(3))
    with pytest.raises(ValueError, match="out of range"):
        Laplacian.from_arrays(torch.tensor([0, 1, 2]), torch.tensor([0, 5]), torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="unsorted"):
        Laplacian.from_arrays(torch.tensor([0, 2, 2]), torch.tensor([1, 0]), torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="crow_indices"):
        Laplacian.from_arrays(torch.tensor([0, 3, 2]), torch.tensor([0, 1]), torch.tensor([1.0, 1.0]))


@pytest.mark.parametrize("symmetric", [True, False])
def test_every_cheb_conv_takes_it(symmetric):
    M = random_graph_laplacian(20, 3, 4) if symmetric else _asymmetric(20, 4)
    lap, csr = Laplacian(M), to_torch_csr(M)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(3, 20, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, generator=gen, dtype=torch.float64)
    ref = reference.cheb_conv(csr.to(torch.float64), x, w, b)  # float64 oracle on the raw CSR
    (gx,) = torch.autograd.grad(ref.sum(), x)
    ops = [reference.cheb_conv, fused.cheb_conv] + ([native.cheb_conv] if native.available() else [])
    for op in ops:
        y = op(lap, x, w, b)  # the float32 buffers are used in x's dtype
        torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(torch.autograd.grad(y.sum(), x)[0], gx, rtol=1e-6, atol=1e-6)


def test_model_owns_it_and_moves_it():
    lap = Laplacian(random_graph_laplacian(12, 3, 0))
    model = SCANet(12, 4, lap, ModelConfig(common_dim=8))
    assert model.laplacian is lap and {"laplacian.crow", "laplacian.col", "laplacian.values"} <= set(model.state_dict())
    model.double()
    assert model.laplacian.values.dtype == torch.float64 and model.laplacian().dtype == torch.float64
    with pytest.raises(ValueError, match="12x12 but vocab_size is 13"):
        SCANet(13, 4, lap, ModelConfig(common_dim=8))
