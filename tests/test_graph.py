"""Word-graph invariants: kNN symmetry, normalized Laplacian, rescaled spectrum in [-1, 1]."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scanet.data.graph import (
    knn_graph,
    largest_eigenvalue,
    normalized_laplacian,
    rescale_laplacian,
    to_torch_csr,
    word_graph,
)


@pytest.fixture
def embeddings():
    return np.random.default_rng(0).normal(size=(60, 12)).astype(np.float32)


def test_knn_graph_is_symmetric_without_self_loops(embeddings):
    W = knn_graph(embeddings, k=8)
    assert abs(W - W.T).max() == 0
    assert W.diagonal().sum() == 0
    # every vertex keeps at least its own k neighbours after symmetrization
    assert (np.diff(W.indptr) >= 8).all()
    assert (W.data > 0).all() and (W.data <= 1).all()


def test_knn_neighbours_are_the_most_cosine_similar(embeddings):
    W = knn_graph(embeddings, k=3)
    Xn = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    sim = Xn @ Xn.T
    np.fill_diagonal(sim, -np.inf)
    for i in range(len(embeddings)):
        top = set(np.argsort(-sim[i])[:3])
        assert top <= set(W[i].indices)


def test_rescaled_laplacian_spectrum_in_unit_interval(embeddings):
    Lt, lmax = word_graph(embeddings, k=8, lmax="exact")
    ev = np.linalg.eigvalsh(Lt.toarray().astype(np.float64))
    assert ev.min() >= -1 - 1e-5 and ev.max() <= 1 + 1e-5
    assert ev.max() == pytest.approx(1.0, abs=1e-4)  # exact lmax maps the top eigenvalue to 1
    assert 0 < lmax <= 2 + 1e-9
    assert abs(Lt - Lt.T).max() < 1e-6


def test_normalized_laplacian_properties():
    W = sp.csr_matrix(np.array([[0, 1, 0, 0], [1, 0, 2, 0], [0, 2, 0, 0], [0, 0, 0, 0]], dtype=float))
    L = normalized_laplacian(W).toarray()
    d = np.array([1, 3, 2, 0.0])
    expect = np.eye(4)
    for i, j in [(0, 1), (1, 0), (1, 2), (2, 1)]:
        expect[i, j] = -W[i, j] / np.sqrt(d[i] * d[j])
    np.testing.assert_allclose(L, expect, atol=1e-12)  # the isolated vertex 3 keeps L_33 = 1
    ev = np.linalg.eigvalsh(L)
    assert ev.min() > -1e-12 and ev.max() <= 2 + 1e-12
    assert largest_eigenvalue(sp.csr_matrix(L)) == pytest.approx(ev.max(), abs=1e-6)


def test_fixed_lmax_two_and_torch_conversion(embeddings):
    Lt, lmax = word_graph(embeddings, k=4, lmax=2.0)
    assert lmax == 2.0
    T = to_torch_csr(Lt)
    assert T.layout == torch.sparse_csr
    np.testing.assert_allclose(T.to_dense().numpy(), Lt.toarray())
    with pytest.raises(ValueError, match="lmax"):
        rescale_laplacian(normalized_laplacian(knn_graph(embeddings, 4)), 0.0)
