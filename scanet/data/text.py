"""Texts -> tokens -> vocabulary -> bag-of-words counts.

English tokenization follows the Wiki literature: lowercase, runs of letters, stop words and one-letter tokens
removed. Other languages plug in their own tokenizer (a callable str -> list[str]).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from scanet.io import read_text

_WORD = re.compile(r"[a-z]+")


def read_stopwords(path: str | Path) -> set[str]:
    return {w.strip().lower() for w in read_text(path, "stop-word list").splitlines() if w.strip()}


def english_tokenizer(stopwords: Iterable[str] = ()) -> Callable[[str], list[str]]:
    stop = frozenset(stopwords)

    def tokenize(text: str) -> list[str]:
        return [w for w in _WORD.findall(text.lower()) if len(w) > 1 and w not in stop]

    return tokenize


def build_vocabulary(docs: Sequence[Sequence[str]], size: int, keep: Callable[[str], bool] | None = None) -> list[str]:
    """The ``size`` most frequent words (total count, ties by word) among those ``keep`` accepts.

    Pass the TRAINING documents only, so that the vocabulary does not peek at the test split.
    """
    counts = Counter(w for doc in docs for w in doc)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    vocab = [w for w, _ in ranked if keep is None or keep(w)][:size]
    if not vocab:
        raise ValueError(
            "the vocabulary is empty: no token of the training texts passed the filter "
            "(wrong tokenizer for the language, or no word has an embedding?)"
        )
    return vocab


def bag_of_words(docs: Sequence[Sequence[str]], vocab: Sequence[str]) -> sp.csr_matrix:
    """(n_docs, V) float32 CSR of raw counts; words outside the vocabulary are dropped."""
    index = {w: i for i, w in enumerate(vocab)}
    indptr: list[int] = [0]
    indices: list[int] = []
    data: list[float] = []
    for doc in docs:
        c = Counter(index[w] for w in doc if w in index)
        cols = sorted(c)
        indices.extend(cols)
        data.extend(c[j] for j in cols)
        indptr.append(len(indices))
    return sp.csr_matrix(
        (np.asarray(data, np.float32), np.asarray(indices, np.int64), np.asarray(indptr, np.int64)),
        shape=(len(docs), len(vocab)),
    )


def text_features(counts: sp.csr_matrix) -> np.ndarray:
    """The model's text input: log(1 + count), scaled so that each text's non-zero entries have RMS 1.

    Log damping keeps a few frequent words from dominating. The RMS scaling makes long and short texts
    comparable (Wiki sections run from 115 to 1,221 content words) while keeping each word's entry O(1), so
    that the text FC layer (fan-in V = 10,055) starts with outputs of the same order as the image path's.
    A unit-L2 row would make every entry about 1/sqrt(200) and the common-space features 100x smaller than
    the image ones, a start from which the co-attention head learns very slowly.
    """
    x = counts.astype(np.float32).toarray()
    np.log1p(x, out=x)
    nnz = np.maximum((x > 0).sum(axis=1, keepdims=True), 1)
    rms = np.sqrt((x * x).sum(axis=1, keepdims=True) / nnz)
    return (x / np.maximum(rms, 1e-12)).astype(np.float32)
