"""bench/wiki_side_accuracy.py: class profiles by hand, and the diagnosis of scorers whose answer is known."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location(
    "wiki_side_accuracy", Path(__file__).resolve().parents[1] / "bench" / "wiki_side_accuracy.py"
)
side = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(side)


def test_class_profiles_are_per_class_means_of_the_candidates():
    scores = np.array([[1.0, 3.0, 5.0, 0.0], [2.0, 2.0, -4.0, 4.0]])
    labels = np.array([0, 0, 1, 2])
    np.testing.assert_allclose(side.class_profiles(scores, labels, 3), [[2.0, 5.0, 0.0], [2.0, -4.0, 4.0]])


def _dataset(n_classes=4, per_class=6, seed=0):
    rng = np.random.default_rng(seed)

    def split(n):
        labels = rng.permutation(np.repeat(np.arange(n_classes), n))
        return SimpleNamespace(labels=labels)

    return SimpleNamespace(train=split(per_class), test=split(per_class // 2))


@pytest.mark.parametrize("shift, accuracy", [(0, 1.0), (1, 0.0)])
def test_a_scorer_that_knows_the_classes_or_mistakes_each_one(shift, accuracy):
    ds = _dataset()
    rng = np.random.default_rng(1)

    def score(text_split, image_split):  # high where the image's class is the text's (shifted by `shift`)
        same = (text_split.labels[:, None] + shift) % 4 == image_split.labels[None, :]
        return same + 0.01 * rng.random(same.shape)

    out = side.diagnose(score, ds)
    assert out["text_side_accuracy"] == accuracy
    assert out["image_side_accuracy"] == (1.0 if shift == 0 else 0.0)
    if shift == 0:
        assert out["direct_scores"]["mean"] == pytest.approx(1.0)
        assert out["class_profiles_z"]["mean"] == pytest.approx(1.0)
    else:  # every query's first-ranked class is another one
        assert out["direct_scores"]["mean"] < 0.5
