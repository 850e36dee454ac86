"""Baselines scored with the same MAP code: CCA (unsupervised) and semantic matching (supervised).

CCA projects both modalities into a shared k-dimensional space fitted on the training pairs; a pair is scored by
the cosine of its two projections (centred), the usual protocol of the Wiki literature (Rasiwasia et al. 2010).
High-dimensional bag-of-words are first reduced by a truncated SVD fitted on the training texts, since CCA on
10k dimensions with 2k samples is singular.
"""

from __future__ import annotations

import numpy as np

from scanet.evaluate import retrieval_report


class _Reducer:
    """Truncated SVD fitted on the training rows (identity when the features are already small)."""

    def __init__(self, train: np.ndarray, dim: int | None, seed: int):
        self.svd = None
        if dim is not None and train.shape[1] > dim:
            from sklearn.decomposition import TruncatedSVD

            self.svd = TruncatedSVD(dim, random_state=seed).fit(train)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return x if self.svd is None else self.svd.transform(x)


def _unit_rows(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


class CCAScorer:
    """CCA fitted on training pairs; ``(texts, images) -> (Nt, Ni)`` cosine similarities in the CCA space."""

    def __init__(self, text_train, image_train, n_components: int = 10, reduce_to: int | None = 100, seed: int = 0):
        from sklearn.cross_decomposition import CCA

        text_train, image_train = np.asarray(text_train, np.float64), np.asarray(image_train, np.float64)
        self.reduce_text = _Reducer(text_train, reduce_to, seed)
        self.reduce_image = _Reducer(image_train, reduce_to, seed)
        tt, it = self.reduce_text(text_train), self.reduce_image(image_train)
        k = min(n_components, tt.shape[1], it.shape[1])
        self.cca = CCA(n_components=k, max_iter=2000).fit(tt, it)

    def __call__(self, texts, images) -> np.ndarray:
        texts, images = np.asarray(texts, np.float64), np.asarray(images, np.float64)
        a, b = self.cca.transform(self.reduce_text(texts), self.reduce_image(images))
        return _unit_rows(a) @ _unit_rows(b).T


def cca_scores(
    text_train, image_train, text_test, image_test, n_components: int = 10, reduce_to: int | None = 100, seed: int = 0
) -> np.ndarray:
    """(Nt, Ni) cosine similarities of test texts and images in the CCA space fitted on the training pairs."""
    return CCAScorer(text_train, image_train, n_components, reduce_to, seed)(text_test, image_test)


def _text_inputs(dataset, text_features: str, lda):
    """split -> the text matrix the baseline uses for it."""
    if text_features == "bow":
        return lambda split: split.text_matrix()
    if text_features == "lda":
        if lda is None:
            raise ValueError("text_features='lda' needs lda=(train_matrix, test_matrix)")
        by_split = {id(dataset.train): lda[0], id(dataset.test): lda[1]}
        return lambda split: by_split[id(split)]
    raise ValueError(f"text_features must be 'bow' or 'lda', got {text_features!r}")


def cca_split_scorer(dataset, text_features: str = "bow", n_components: int = 10, seed: int = 0, lda=None):
    """``score_fn(text_split, image_split)`` for scanet.evaluate.evaluate_protocols: CCA on the dataset's own
    features. text_features: "bow" (the model's text input, SVD-reduced) or "lda" (pass ``lda=(train, test)``
    matrices, e.g. Wiki's 10-d LDA of raw_features.mat)."""
    text_of = _text_inputs(dataset, text_features, lda)
    scorer = CCAScorer(text_of(dataset.train), dataset.train.images, n_components, seed=seed)
    return lambda text_split, image_split: scorer(text_of(text_split), image_split.images)


def cca_report(dataset, text_features: str = "bow", n_components: int = 10, seed: int = 0, lda=None) -> dict:
    """Standard-protocol retrieval_report of CCA (test texts vs test images); see cca_split_scorer."""
    score = cca_split_scorer(dataset, text_features, n_components, seed, lda)
    return retrieval_report(score(dataset.test, dataset.test), dataset.test.labels, dataset.test.labels)


class SemanticMatchingScorer:
    """Cosine of the class-probability vectors of two logistic regressions, one per modality.

    The idea of semantic matching (SM/SCM, Rasiwasia et al. 2010): map each modality to the simplex of class
    posteriors and compare there. A supervised reference that shows how much class information each
    modality's features carry (single-label data only).
    """

    def __init__(self, text_train, image_train, labels_train, C: float = 1.0):
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        labels_train = np.asarray(labels_train)
        if labels_train.ndim != 1:
            raise ValueError("semantic matching needs single-label data (class indices)")
        self.scaler = StandardScaler().fit(image_train)
        self.text_clf = LogisticRegression(C=C, max_iter=2000).fit(text_train, labels_train)
        self.image_clf = LogisticRegression(C=C, max_iter=2000).fit(self.scaler.transform(image_train), labels_train)

    def __call__(self, texts, images) -> np.ndarray:
        a = _unit_rows(self.text_clf.predict_proba(texts))
        b = _unit_rows(self.image_clf.predict_proba(self.scaler.transform(images)))
        return a @ b.T


def semantic_matching_scores(text_train, image_train, labels_train, text_test, image_test, C: float = 1.0):
    """(Nt, Ni) semantic-matching similarities of test texts and images (see SemanticMatchingScorer)."""
    return SemanticMatchingScorer(text_train, image_train, labels_train, C)(text_test, image_test)


def semantic_matching_split_scorer(dataset, C: float = 1.0):
    """``score_fn(text_split, image_split)`` for scanet.evaluate.evaluate_protocols."""
    scorer = SemanticMatchingScorer(dataset.train.text_matrix(), dataset.train.images, dataset.train.labels, C)
    return lambda text_split, image_split: scorer(text_split.text_matrix(), image_split.images)


def semantic_matching_report(dataset, C: float = 1.0) -> dict:
    score = semantic_matching_split_scorer(dataset, C)
    return retrieval_report(score(dataset.test, dataset.test), dataset.test.labels, dataset.test.labels)
