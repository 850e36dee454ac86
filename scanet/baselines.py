"""Baselines scored with the same MAP code: CCA (unsupervised) and semantic matching (supervised).

CCA projects both modalities into a shared k-dimensional space fitted on the training pairs; a pair is scored by
the cosine of its two projections (centred), the usual protocol of the Wiki literature (Rasiwasia et al. 2010).
High-dimensional bag-of-words are first reduced by a truncated SVD fitted on the training texts, since CCA on
10k dimensions with 2k samples is singular.
"""
from __future__ import annotations

import numpy as np

from scanet.evaluate import retrieval_report


def _reduce(train: np.ndarray, test: np.ndarray, dim: int | None, seed: int):
    if dim is None or train.shape[1] <= dim:
        return train, test
    from sklearn.decomposition import TruncatedSVD

    svd = TruncatedSVD(dim, random_state=seed).fit(train)
    return svd.transform(train), svd.transform(test)


def cca_scores(text_train, image_train, text_test, image_test, n_components: int = 10,
               reduce_to: int | None = 100, seed: int = 0) -> np.ndarray:
    """(Nt, Ni) cosine similarities of test texts and images in the CCA space fitted on the training pairs."""
    from sklearn.cross_decomposition import CCA

    tt, tv = _reduce(np.asarray(text_train, np.float64), np.asarray(text_test, np.float64), reduce_to, seed)
    it, iv = _reduce(np.asarray(image_train, np.float64), np.asarray(image_test, np.float64), reduce_to, seed)
    k = min(n_components, tt.shape[1], it.shape[1])
    cca = CCA(n_components=k, max_iter=2000).fit(tt, it)
    a, b = cca.transform(tv, iv)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return a @ b.T


def cca_report(dataset, text_features: str = "bow", n_components: int = 10, seed: int = 0,
               lda=None) -> dict:
    """CCA on the dataset's own features. text_features: "bow" (the model's text input, SVD-reduced) or
    "lda" (pass ``lda=(train, test)`` matrices, e.g. Wiki's 10-d LDA of raw_features.mat)."""
    if text_features == "bow":
        t_tr, t_te = dataset.train.text_matrix(), dataset.test.text_matrix()
    elif text_features == "lda":
        if lda is None:
            raise ValueError("text_features='lda' needs lda=(train_matrix, test_matrix)")
        t_tr, t_te = lda
    else:
        raise ValueError(f"text_features must be 'bow' or 'lda', got {text_features!r}")
    scores = cca_scores(t_tr, dataset.train.images, t_te, dataset.test.images, n_components, seed=seed)
    return retrieval_report(scores, dataset.test.labels, dataset.test.labels)


def semantic_matching_scores(text_train, image_train, labels_train, text_test, image_test, C: float = 1.0):
    """(Nt, Ni) cosine of the class-probability vectors of two logistic regressions, one per modality.

    The idea of semantic matching (SM/SCM, Rasiwasia et al. 2010): map each modality to the simplex of class
    posteriors and compare there. A supervised reference that shows how much class information each
    modality's features carry (single-label data only).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    labels_train = np.asarray(labels_train)
    if labels_train.ndim != 1:
        raise ValueError("semantic matching needs single-label data (class indices)")
    scaler = StandardScaler().fit(image_train)
    text_clf = LogisticRegression(C=C, max_iter=2000).fit(text_train, labels_train)
    image_clf = LogisticRegression(C=C, max_iter=2000).fit(scaler.transform(image_train), labels_train)
    a = text_clf.predict_proba(text_test)
    b = image_clf.predict_proba(scaler.transform(image_test))
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T


def semantic_matching_report(dataset, C: float = 1.0) -> dict:
    scores = semantic_matching_scores(dataset.train.text_matrix(), dataset.train.images, dataset.train.labels,
                                      dataset.test.text_matrix(), dataset.test.images, C)
    return retrieval_report(scores, dataset.test.labels, dataset.test.labels)
