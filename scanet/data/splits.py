"""A seeded, stratified validation split carved from a training split.

Model selection (best epoch, early stopping) must never look at the test split. Wiki, WebNews and the synthetic
data ship only train and test, so ``carve_validation`` takes a fraction of the training items out, class by
class: each class keeps round(fraction * its count) validation items (at least one where the class has two or
more), so every class is represented on both sides. Multi-label data are stratified by each item's first label.
The carve depends only on (labels, fraction, seed), so a resumed run and a rerun get the same split.
"""

from __future__ import annotations

import numpy as np

from scanet.data.prepared import Split


def stratified_indices(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(keep, held_out) sorted index arrays: ``fraction`` of each class held out."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction!r}")
    labels = np.asarray(labels)
    strata = labels if labels.ndim == 1 else np.argmax(labels, axis=1)
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(strata):
        members = np.flatnonzero(strata == c)
        n = int(round(fraction * members.size))
        if members.size >= 2:
            n = min(max(n, 1), members.size - 1)  # both sides keep at least one item of the class
        else:
            n = 0
        held.append(rng.choice(members, n, replace=False))
    held_out = np.sort(np.concatenate(held)).astype(np.int64) if held else np.zeros(0, np.int64)
    keep = np.setdiff1d(np.arange(labels.shape[0]), held_out)
    if held_out.size == 0:
        raise ValueError(
            f"a validation fraction of {fraction} leaves no validation item ({labels.shape[0]} training items)"
        )
    return keep, held_out


def subset(split: Split, index: np.ndarray) -> Split:
    """The rows ``index`` of a split, as a new Split (token sequences and pixels included)."""
    return split.subset(index)


def carve_validation(train: Split, fraction: float = 0.1, seed: int = 0) -> tuple[Split, Split]:
    """(smaller training split, validation split), stratified by class; see the module docstring."""
    keep, held = stratified_indices(train.labels, fraction, seed)
    return subset(train, keep), subset(train, held)
