"""Baselines on the synthetic data: both beat chance, and the supervised one uses the labels."""

import numpy as np
import pytest

from scanet.baselines import cca_report, cca_scores, semantic_matching_report, semantic_matching_scores
from scanet.data import synthetic
from scanet.evaluate import mean_average_precision


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return synthetic.prepare(tmp_path_factory.mktemp("b") / "syn", progress=lambda s: None)


def test_cca_beats_chance(dataset):
    chance = 1 / len(dataset.classes)
    rep = cca_report(dataset, "bow")
    assert rep["text2image"]["map"] > chance + 0.05 and rep["image2text"]["map"] > chance + 0.05
    s = cca_scores(
        dataset.train.text_matrix(), dataset.train.images, dataset.test.text_matrix()[:3], dataset.test.images[:4]
    )
    assert s.shape == (3, 4) and np.all(np.abs(s) <= 1 + 1e-9)


def test_semantic_matching_beats_chance_and_needs_single_labels(dataset):
    rep = semantic_matching_report(dataset)
    assert rep["mean_map"] > 1 / len(dataset.classes) + 0.1
    shuffled = np.random.default_rng(0).permutation(dataset.train.labels)
    s = semantic_matching_scores(
        dataset.train.text_matrix(), dataset.train.images, shuffled, dataset.test.text_matrix(), dataset.test.images
    )
    assert mean_average_precision(s, dataset.test.labels, dataset.test.labels) < rep["text2image"]["map"]
    with pytest.raises(ValueError, match="single-label"):
        semantic_matching_scores(
            dataset.train.text_matrix(),
            dataset.train.images,
            np.eye(6, dtype=bool)[dataset.train.labels],
            dataset.test.text_matrix(),
            dataset.test.images,
        )
