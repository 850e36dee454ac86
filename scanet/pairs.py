"""Training pairs: ``make_pairs`` draws (text i, image j) pairs of the same class (sharing a label, for
multi-label data) and pairs of different classes from the training split, once, with the run's seed (the
paper: 40k + 40k)."""

from __future__ import annotations

import numpy as np


def make_pairs(labels: np.ndarray, n_pos: int, n_neg: int, seed: int, include_ground_truth: bool = False):
    """(text_index, image_index, target) arrays: n_pos matching and n_neg non-matching pairs, shuffled.

    ``include_ground_truth``: the positives start with every ground-truth pair (text i with its own image i,
    as the authors' group's code builds its Wiki pairs), and random same-class pairs fill up to n_pos.
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    n = labels.shape[0]
    n_truth = min(n, n_pos) if include_ground_truth else 0
    n_random = n_pos - n_truth
    if labels.ndim == 1:
        by_class = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
        ti = rng.integers(0, n, n_random)
        ii = np.array([rng.choice(by_class[labels[t]]) for t in ti], dtype=np.int64)
    else:
        rel = (labels.astype(np.float32) @ labels.astype(np.float32).T) > 0
        ti = rng.integers(0, n, n_random)
        ii = np.array([rng.choice(np.flatnonzero(rel[t])) if rel[t].any() else t for t in ti], dtype=np.int64)
    if n_truth:
        ti = np.concatenate([np.arange(n_truth), ti]).astype(np.int64)
        ii = np.concatenate([np.arange(n_truth), ii]).astype(np.int64)

    def matches(a, b):
        return (labels[a] == labels[b]) if labels.ndim == 1 else (labels[a] & labels[b]).any(axis=-1)

    nt, ni = rng.integers(0, n, n_neg), rng.integers(0, n, n_neg)
    for _ in range(1000):  # redraw the pairs that happen to match
        bad = np.flatnonzero(matches(nt, ni))
        if bad.size == 0:
            break
        nt[bad] = rng.integers(0, n, bad.size)  # redraw both: an item may share a label with every other
        ni[bad] = rng.integers(0, n, bad.size)
    else:
        raise ValueError("could not draw non-matching pairs: does every training item share a class?")
    text = np.concatenate([ti, nt]).astype(np.int64)
    image = np.concatenate([ii, ni]).astype(np.int64)
    target = np.concatenate([np.ones(n_pos), np.zeros(n_neg)]).astype(np.float32)
    order = rng.permutation(len(text))
    return text[order], image[order], target[order]
