"""The validation split: disjoint from test and from the remaining training items, stratified, seeded."""

import numpy as np
import pytest

from scanet.data.splits import carve_validation, stratified_indices
from scanet.data.synthetic import generate


def test_validation_split_is_disjoint_stratified_and_seeded():
    ds = generate(n_train=300, n_test=60, vocab_size=60, image_dim=8, seed=1)
    tr, val = carve_validation(ds.train, 0.1, seed=5)
    assert len(tr) + len(val) == len(ds.train)
    assert not set(tr.text_ids) & set(val.text_ids)
    assert not set(val.text_ids) & set(ds.test.text_ids)
    counts = np.bincount(ds.train.labels)
    val_counts = np.bincount(val.labels, minlength=len(counts))
    assert np.all(np.abs(val_counts - 0.1 * counts) <= 1)  # every class, its share
    tr2, val2 = carve_validation(ds.train, 0.1, seed=5)
    assert val2.text_ids == val.text_ids  # same seed, same split
    _, val3 = carve_validation(ds.train, 0.1, seed=6)
    assert val3.text_ids != val.text_ids
    # rows travel together: the image of each validation item is the one it had in the training split
    pos = {t: i for i, t in enumerate(ds.train.text_ids)}
    for j, t in enumerate(val.text_ids):
        np.testing.assert_array_equal(val.images[j], ds.train.images[pos[t]])
        assert val.labels[j] == ds.train.labels[pos[t]]


def test_small_classes_keep_an_item_on_both_sides():
    labels = np.array([0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2])
    keep, held = stratified_indices(labels, 0.1, 0)
    assert set(labels[held]) == {0, 1}  # class 0 (2 items) gives one; class 2 (1 item) stays in training
    assert set(labels[keep]) == {0, 1, 2}


def test_multilabel_and_bad_fraction():
    labels = np.zeros((20, 3), bool)
    labels[np.arange(20), np.arange(20) % 3] = True
    labels[::4, 0] = True
    keep, held = stratified_indices(labels, 0.25, 0)
    assert len(keep) + len(held) == 20 and len(held) >= 3
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="validation fraction"):
            stratified_indices(labels, bad, 0)
