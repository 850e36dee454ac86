"""The inputs of a custom folder (scanet.data.custom) other than its lists: precomputed text and image
matrices with their id files, word vectors from the documents' own co-occurrence, and which image file stands
for each image id."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp

from scanet.data.embeddings import WordVectors
from scanet.data.images import ImageChoice, index_images, resolve_image
from scanet.io import read_text, safe_np_load

_TEXT_MATRIX_NAMES = ("text_features.npz", "text_features.npy")


def _text_matrix_file(root: Path) -> Path | None:
    found = [root / n for n in _TEXT_MATRIX_NAMES if (root / n).is_file()]
    if len(found) > 1:
        raise ValueError(f"{root} has both {found[0].name} and {found[1].name}: keep one")
    return found[0] if found else None


def _read_ids(path: Path, n_rows: int, what: str) -> dict[str, int]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: it names the rows of the {what} matrix, one id a line")
    ids = [ln.strip() for ln in read_text(path, "id list").splitlines() if ln.strip()]
    if len(ids) != n_rows:
        raise ValueError(f"{path} has {len(ids)} ids but the {what} matrix has {n_rows} rows")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: ids must be unique")
    return {x: i for i, x in enumerate(ids)}


def load_text_matrix(root: Path) -> tuple[sp.csr_matrix, dict[str, int], list[str]]:
    f = _text_matrix_file(root)
    if f is None:
        raise FileNotFoundError(f"{root} has no text matrix (one of {', '.join(_TEXT_MATRIX_NAMES)})")
    if f.suffix == ".npz":
        try:
            m = sp.load_npz(f)  # allow_pickle=False inside
        except Exception as e:  # numpy/scipy raise several types for a broken file
            raise ValueError(f"{f} (text matrix) cannot be read as a scipy sparse .npz: {e}") from e
    else:
        m = safe_np_load(f, "text matrix")
    m = sp.csr_matrix(m, dtype=np.float32)
    if m.ndim != 2:
        raise ValueError(f"{f} must be a 2-D (texts, words) matrix")
    if m.nnz and (not np.isfinite(m.data).all() or (m.data < 0).any()):
        raise ValueError(f"{f} must hold finite non-negative counts or weights")
    vocab_file = root / "vocab.txt"
    if not vocab_file.is_file():
        raise FileNotFoundError(f"{vocab_file} is missing: it names the columns of {f.name}, one word a line")
    words = [ln.strip() for ln in read_text(vocab_file, "vocabulary").splitlines() if ln.strip()]
    if len(words) != m.shape[1]:
        raise ValueError(f"{vocab_file} has {len(words)} words but {f.name} has {m.shape[1]} columns")
    if len(set(words)) != len(words):
        raise ValueError(f"{vocab_file}: words must be unique")
    return m, _read_ids(root / "text_ids.txt", m.shape[0], "text"), words


def cooccurrence_vectors(counts: sp.spmatrix, words: list[str], dim: int = 50, seed: int = 0) -> WordVectors:
    """Word vectors from the documents themselves when there are no texts to train word2vec on: rows of the
    positive PMI matrix of word co-occurrence in a document, reduced by SVD (Levy & Goldberg 2014)."""
    X = sp.csr_matrix(counts, dtype=np.float64)
    X.data[:] = 1.0
    C = (X.T @ X).tocsr()
    C.setdiag(0)
    C.eliminate_zeros()
    total = C.sum()
    if total == 0:
        raise ValueError("no two words ever occur in the same document: cannot build co-occurrence vectors")
    marg = np.asarray(C.sum(axis=1)).ravel()
    C = C.tocoo()
    pmi = np.log(C.data * total / (marg[C.row] * marg[C.col]))
    keep = pmi > 0
    P = sp.csr_matrix((pmi[keep], (C.row[keep], C.col[keep])), shape=C.shape)
    k = max(1, min(dim, P.shape[0] - 1))
    if P.shape[0] <= 2000:
        U, S, _ = np.linalg.svd(P.toarray())
        U, S = U[:, :k], S[:k]
    else:
        import scipy.sparse.linalg as spla

        U, S, _ = spla.svds(P, k=k, random_state=seed)
    vec = (U * np.sqrt(S)).astype(np.float32)
    vec *= np.sign(vec[np.abs(vec).argmax(axis=0), np.arange(vec.shape[1])])  # a deterministic sign per axis
    return WordVectors(list(words), vec, f"ppmi-svd(cooccurrence, dim={k})")


def _image_choices(root: Path, items: list, classes: list[str]):
    images = root / "images"
    index = None
    choices = {}
    for it in items:
        if it.image_id in choices:
            continue
        direct = images / it.image_id
        if direct.is_file():
            choices[it.image_id] = ImageChoice(it.image_id, Path(it.image_id).as_posix())
            continue
        if index is None:
            index = index_images(images)
        preferred = classes[it.labels[0]] if it.labels else None
        choices[it.image_id] = resolve_image(index, it.image_id, images, preferred)
    return choices
