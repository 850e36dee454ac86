"""The word graph: kNN by cosine of word embeddings -> weights -> normalized Laplacian -> L~.

Prepared once per dataset (PyG's ChebConv and cnn_graph do the same): the propagation only ever sees L~ in CSR.
Two constructions (``word_graph(..., graph=)``), read side by side:

    "symmetric" (default)  cnn_graph's ``adjacency()``: k nearest neighbours by cosine distance, weights
                           exp(-d^2 / sigma^2), no self loops, symmetrized by max(W, W^T); L = I - D^-1/2 W D^-1/2
                           (D the degree, row sums = column sums); lmax exact (ARPACK) or a given number.
    "paper"                the SCANet authors' group's code (SCKR: an adjacency list of gensim ``most_similar``
                           neighbours read by ``load_adjmat`` into a 0/1 matrix, then cnn_graph's ``laplacian()``):
                           row i holds word i itself and its k most cosine-similar words, weight 1, NOT symmetrized
                           (exactly k + 1 entries a row); L = I - D^-1/2 W D^-1/2 with D the COLUMN sums of W
                           (cnn_graph's ``laplacian`` takes ``d = W.sum(axis=0)``: for a symmetric W that is the
                           degree, for this directed W the in-degree, >= 1 thanks to the self loop; the row sums
                           are k + 1 for every word); lmax = 2 as cnn_graph's ``lmax(normalized=True)`` returns,
                           so L~ = L - I = -D^-1/2 W D^-1/2, with the same k + 1 entries a row and not symmetric.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch

GRAPHS = ("symmetric", "paper")  # the values of the preparers' ``graph`` option


def check_graph(graph: str, lmax) -> None:
    """A clear error for an unknown ``graph`` or an lmax the construction cannot use (naming the key)."""
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {', '.join(GRAPHS)}, got {graph!r}")
    if graph == "paper" and lmax == "exact":
        raise ValueError(
            "graph='paper' builds a directed (non-symmetric) Laplacian, whose lmax ARPACK's eigsh cannot compute; "
            "it uses lmax = 2 (cnn_graph's bound for a normalized Laplacian): leave lmax unset or give a number"
        )


def nearest_neighbours(embeddings: np.ndarray, k: int, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """(V, k) indices and cosine distances of each row's k most cosine-similar other rows, nearest first
    (what gensim's ``most_similar(word, topn=k)`` returns within the vocabulary)."""
    X = np.asarray(embeddings, dtype=np.float32)
    V = X.shape[0]
    Xn = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    cols = np.empty((V, k), np.int64)
    dist = np.empty((V, k), np.float32)
    for s in range(0, V, chunk):  # chunks bound memory at chunk x V similarities
        sim = Xn[s : s + chunk] @ Xn.T
        np.fill_diagonal(sim[:, s : s + chunk], -np.inf)  # no self neighbour
        nn_idx = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        nn_sim = np.take_along_axis(sim, nn_idx, axis=1)
        order = np.argsort(-nn_sim, axis=1, kind="stable")
        cols[s : s + len(sim)] = np.take_along_axis(nn_idx, order, axis=1)
        dist[s : s + len(sim)] = np.clip(1.0 - np.take_along_axis(nn_sim, order, axis=1), 0, 2)
    return cols, dist


def knn_graph(embeddings: np.ndarray, k: int = 8, chunk: int = 2048) -> sp.csr_matrix:
    """Symmetric weighted adjacency of the k nearest neighbours by cosine distance.

    Weights follow cnn_graph (Defferrard et al.): w_ij = exp(-d_ij^2 / sigma^2), d the cosine distance and
    sigma the mean distance to the k-th neighbour. Symmetrized by max(W, W^T): j in kNN(i) or i in kNN(j).
    """
    V = np.asarray(embeddings).shape[0]
    if V < 2:
        return sp.csr_matrix((V, V), dtype=np.float32)
    k = min(k, V - 1)
    cols, dist = nearest_neighbours(embeddings, k, chunk)
    sigma = float(dist[:, -1].mean()) or 1.0
    w = np.exp(-((dist.ravel() / sigma) ** 2)).astype(np.float32)
    W = sp.csr_matrix((w, (np.repeat(np.arange(V), k), cols.ravel())), shape=(V, V))
    W = W.maximum(W.T).tocsr()
    W.sort_indices()
    return W


def directed_knn_graph(embeddings: np.ndarray, k: int = 8, chunk: int = 2048) -> sp.csr_matrix:
    """The paper group's adjacency: W_ii = 1 and W_ij = 1 for the k most cosine-similar words j of word i;
    not symmetrized, so row i has exactly min(k, V - 1) + 1 entries (column j: whoever lists j)."""
    V = np.asarray(embeddings).shape[0]
    k = min(k, max(V - 1, 0))
    cols = nearest_neighbours(embeddings, k, chunk)[0] if k else np.empty((V, 0), np.int64)
    rows = np.repeat(np.arange(V), k + 1)
    cols = np.concatenate([np.arange(V)[:, None], cols], axis=1).ravel()
    W = sp.csr_matrix((np.ones(V * (k + 1), np.float32), (rows, cols)), shape=(V, V))
    W.sort_indices()
    return W


def normalized_laplacian(adjacency: sp.spmatrix, degree: str = "row") -> sp.csr_matrix:
    """L = I - D^{-1/2} W D^{-1/2}. An isolated vertex gets L_ii = 1 (its D^{-1/2} is taken as 0).

    degree: "row" (D_ii = sum_j W_ij) or "column" (D_jj = sum_i W_ij, cnn_graph's ``W.sum(axis=0)``); the same
    for a symmetric W, the in-degree for a directed one (see the module docstring)."""
    if degree not in ("row", "column"):
        raise ValueError(f"degree must be 'row' or 'column', got {degree!r}")
    W = sp.csr_matrix(adjacency, dtype=np.float64)
    d = np.asarray(W.sum(axis=1 if degree == "row" else 0)).ravel()
    inv_sqrt = np.zeros_like(d)
    inv_sqrt[d > 0] = 1.0 / np.sqrt(d[d > 0])
    Dm = sp.diags(inv_sqrt)
    L = sp.identity(W.shape[0], format="csr") - Dm @ W @ Dm
    L = sp.csr_matrix(L)
    L.sort_indices()
    return L


def largest_eigenvalue(laplacian: sp.spmatrix) -> float:
    """lmax of a symmetric Laplacian, exactly (ARPACK); <= 2 for a normalized Laplacian."""
    L = sp.csr_matrix(laplacian, dtype=np.float64)
    if L.shape[0] <= 2:
        return float(np.linalg.eigvalsh(L.toarray()).max())
    return float(spla.eigsh(L, k=1, which="LA", return_eigenvectors=False, tol=1e-6)[0])


def rescale_laplacian(laplacian: sp.spmatrix, lmax: float) -> sp.csr_matrix:
    """L~ = 2 L / lmax - I, whose spectrum lies in [-1, 1] (the Chebyshev polynomials' domain)."""
    if not lmax > 0:
        raise ValueError(f"lmax must be positive, got {lmax}")
    L = sp.csr_matrix(laplacian, dtype=np.float64)
    Lt = sp.csr_matrix((2.0 / lmax) * L - sp.identity(L.shape[0], format="csr"))
    Lt.eliminate_zeros()
    Lt.sort_indices()
    return Lt.astype(np.float32)


def to_torch_csr(csr: sp.spmatrix, dtype=torch.float32, device=None) -> torch.Tensor:
    csr = sp.csr_matrix(csr)
    csr.sort_indices()
    return torch.sparse_csr_tensor(
        torch.from_numpy(csr.indptr.astype(np.int64)),
        torch.from_numpy(csr.indices.astype(np.int64)),
        torch.from_numpy(csr.data).to(dtype),
        csr.shape,
        device=device,
        check_invariants=False,
    )


def word_graph(
    embeddings: np.ndarray, k: int = 8, lmax: float | str | None = "exact", graph: str = "symmetric"
) -> tuple[sp.csr_matrix, float]:
    """The whole preparation: rescaled Laplacian L~ (float32 CSR) and the lmax used.

    graph: "symmetric" or "paper" (see the module docstring). lmax="exact" computes the largest eigenvalue
    (symmetric only); a number (2.0, as PyG and cnn_graph default to) is used as is; None: the graph's own
    default (exact for "symmetric", 2 for "paper").
    """
    check_graph(graph, lmax)
    if graph == "paper":
        lm = 2.0 if lmax is None else float(lmax)
        return rescale_laplacian(normalized_laplacian(directed_knn_graph(embeddings, k), degree="column"), lm), lm
    L = normalized_laplacian(knn_graph(embeddings, k))
    lm = largest_eigenvalue(L) if lmax in ("exact", None) else float(lmax)
    return rescale_laplacian(L, lm), lm


def random_graph(V: int, k: int = 8, seed: int = 0) -> sp.csr_matrix:
    """A random symmetric graph, k random neighbours a vertex (no self loops), weights in [0.1, 1].

    About 2 k V non-zeros, the size of a k-NN word graph: what tests and benchmarks use when the graph's
    structure does not matter (V = 10,055, k = 8 gives about 160k non-zeros, like the Wiki graph).
    """
    rng = np.random.default_rng(seed)
    rows = np.repeat(np.arange(V), k)
    cols = (rows + rng.integers(1, max(V, 2), size=V * k)) % max(V, 1)
    A = sp.csr_matrix((rng.uniform(0.1, 1.0, V * k).astype(np.float32), (rows, cols)), shape=(V, V))
    A.setdiag(0)
    A.eliminate_zeros()
    A = A.maximum(A.T).tocsr()
    A.sort_indices()
    return A


def random_graph_laplacian(V: int, k: int = 8, seed: int = 0) -> sp.csr_matrix:
    """L~ of ``random_graph`` with lmax = 2 (float32 CSR)."""
    return rescale_laplacian(normalized_laplacian(random_graph(V, k, seed)), 2.0)
