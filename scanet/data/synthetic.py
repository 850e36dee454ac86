"""A synthetic image-text dataset in the prepared format, with a documented generative model.

Generative model (all draws from one seeded numpy Generator):

    classes c = 0..C-1, balanced; classes come in "twin" pairs (2j, 2j+1).
    words:  V words, split evenly into C topic blocks plus a shared background block. A word's embedding
            (dim 16) is its block's centre plus small noise, so the kNN word graph links words of one topic.
    text:   L ~ Poisson(text_len) tokens; each token is a word of the class topic with probability
            ``text_signal`` (default 0.35), else a background word. Twins get DIFFERENT topics, so the text
            tells twins apart.
    image:  D-dim feature = mu[c // 2] + noise * N(0, I) + twin_shift * s_c * e, with mu the twin pair's
            mean (shared by the twins) and s_c = +-1 the twin's side: the image alone tells the pair
            (strongly) but the twin only weakly, while the texts of twins differ but topics are noisy.

Token sequences (for the LSTM/CNN text encoders): a text's tokens in the order they were drawn. The draws are
independent, so the order carries no information (an LSTM/CNN can only learn which words occur, as the GCN does);
the word vectors are the 16-d embeddings above, the ones the word graph is built from.

Pixels (``pixel_size`` S > 0, for the CNN-5 encoder): each image feature x is rendered as an S x S RGB picture,
uint8(255 * sigmoid(P x)), with P a fixed random map from the D features onto 3 * 4 * 4 coarse cells, each cell
upsampled to an (S/4) x (S/4) block: the pixels carry exactly the feature's information, spread out in space.

So each modality carries information the other lacks, as the paper argues, and retrieval has to combine
them to reach a high MAP. Everything is exact and fast, so the tests and the default main job use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from scanet.data.graph import word_graph
from scanet.data.prepared import PreparedDataset, Split, cached
from scanet.data.text import bag_of_words
from scanet.data.tokens import token_ids


def generate(
    n_train: int = 600,
    n_test: int = 200,
    n_classes: int = 6,
    vocab_size: int = 200,
    image_dim: int = 32,
    text_len: int = 60,
    text_signal: float = 0.35,
    image_noise: float = 1.0,
    twin_shift: float = 0.6,
    knn: int = 8,
    seed: int = 0,
    pixel_size: int = 0,
) -> PreparedDataset:
    if n_classes < 2 or n_classes % 2:
        raise ValueError(f"n_classes must be even and >= 2 (classes come in twin pairs), got {n_classes}")
    if vocab_size < 2 * (n_classes + 1):
        raise ValueError(f"vocab_size must be at least 2 * (n_classes + 1) = {2 * (n_classes + 1)}")
    rng = np.random.default_rng(seed)
    blocks = n_classes + 1  # topics + background
    block_of_word = np.arange(vocab_size) % blocks
    centres = rng.normal(size=(blocks, 16))
    emb = centres[block_of_word] + 0.3 * rng.normal(size=(vocab_size, 16))
    vocab = [f"w{i:04d}_{'bg' if b == n_classes else f't{b}'}" for i, b in enumerate(block_of_word)]
    topic_words = [np.flatnonzero(block_of_word == b) for b in range(blocks)]

    pair_means = 2.0 * rng.normal(size=(n_classes // 2, image_dim))
    twin_dir = rng.normal(size=(n_classes // 2, image_dim))
    twin_dir /= np.linalg.norm(twin_dir, axis=1, keepdims=True)

    def make(n):
        labels = np.arange(n) % n_classes
        rng.shuffle(labels)
        docs = []
        for c in labels:
            L = max(5, rng.poisson(text_len))
            from_topic = rng.random(L) < text_signal
            words = np.where(from_topic, rng.choice(topic_words[c], L), rng.choice(topic_words[-1], L))
            docs.append([vocab[w] for w in words])
        side = np.where(labels % 2 == 0, 1.0, -1.0)[:, None]
        imgs = (
            pair_means[labels // 2]
            + twin_shift * side * twin_dir[labels // 2]
            + image_noise * rng.normal(size=(n, image_dim))
        )
        return docs, imgs.astype(np.float32), labels.astype(np.int64)

    tr_docs, tr_img, tr_lab = make(n_train)
    te_docs, te_img, te_lab = make(n_test)
    lap, lmax = word_graph(emb, knn, "exact")
    if pixel_size and (pixel_size < 32 or pixel_size % 4):
        raise ValueError(f"pixel_size must be 0 or a multiple of 4 >= 32, got {pixel_size}")
    render = np.random.default_rng(seed + 1).normal(size=(image_dim, 3 * 4 * 4)) / np.sqrt(image_dim)

    def pixels(imgs):
        if not pixel_size:
            return None
        cells = (255.0 / (1.0 + np.exp(-2.0 * imgs @ render))).reshape(-1, 3, 4, 4)
        block = pixel_size // 4
        return np.repeat(np.repeat(cells, block, axis=2), block, axis=3).astype(np.uint8)

    def split(prefix, docs, imgs, labels):
        ids = [f"{prefix}{i}" for i in range(len(docs))]
        return Split(ids, ids, bag_of_words(docs, vocab), imgs, labels, token_ids(docs, vocab), pixels(imgs))

    return PreparedDataset(
        "synthetic",
        vocab,
        sp.csr_matrix(lap),
        lmax,
        [f"class{c}" for c in range(n_classes)],
        split("tr", tr_docs, tr_img, tr_lab),
        split("te", te_docs, te_img, te_lab),
        word_vectors=emb.astype(np.float32),
    )


def prepare(out_dir: str | Path | None = None, progress=print, **params) -> PreparedDataset:
    """Generate (cached in ``out_dir``, default ``prepared/synthetic``) with the given parameters."""
    defaults: dict[str, Any] = dict(
        n_train=600,
        n_test=200,
        n_classes=6,
        vocab_size=200,
        image_dim=32,
        text_len=60,
        text_signal=0.35,
        image_noise=1.0,
        twin_shift=0.6,
        knn=8,
        seed=0,
        pixel_size=0,
    )
    unknown = set(params) - set(defaults)
    if unknown:
        raise ValueError(f"unknown synthetic parameters {sorted(unknown)}; known: {sorted(defaults)}")
    defaults.update(params)
    return cached(
        Path(out_dir or Path("prepared") / "synthetic"),
        dict(defaults, dataset="synthetic"),
        {"generator": "synthetic-v1"},
        lambda: generate(**defaults),
        progress,
    )
