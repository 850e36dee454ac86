"""Word vectors for tag vocabularies, where many tags are compounds written as one word.

Tag vocabularies glue words together: 39 of the 399 Hwang & Grauman Pascal tags ('pottedplant', 'tvmonitor',
'trafficlight', ...) and many NUS-WIDE tags ('blackandwhite', 'nikond80') have no GloVe vector of their own. A
tag without a vector would have no place in the word graph, so ``tag_vectors`` gives such a tag the mean vector
of its parts when it splits into words that do have vectors (fewest parts, each of 2+ letters, at most
``max_parts``; among equal splits the one whose rarest part is most frequent), and leaves it out otherwise. How
each tag got its vector is returned for the preparation report.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from scanet.data.embeddings import WordVectors


def split_compound(word: str, rank: dict[str, int], max_parts: int = 3) -> list[str] | None:
    """The split of ``word`` into the fewest words of ``rank`` (2+ letters each), and among those the one whose
    rarest part is most frequent (``rank``: word -> frequency rank, 0 the most frequent; GloVe's rows are in
    frequency order): "cardoor" is car+door, not cardo+or. None when there is none within ``max_parts``."""
    n = len(word)

    def splits(i: int, left: int) -> Iterator[tuple[str, ...]]:
        if i == n:
            yield ()
            return
        if left == 0:
            return
        for j in range(i + 2, n + 1):
            if word[i:j] in rank:
                for rest in splits(j, left - 1):
                    yield (word[i:j],) + rest

    options: list[tuple[str, ...]] = [p for p in splits(0, max_parts) if len(p) > 1]
    if not options:
        return None
    best = min(options, key=lambda p: (len(p), max(rank[w] for w in p), p))
    return list(best)


def tag_vectors(tags, wv: WordVectors, max_parts: int = 3) -> tuple[list[str], np.ndarray, dict[str, str]]:
    """(tags that have a vector, their (n, dim) vectors, {tag: how}) with how "own vector", "mean of a+b" or
    "no vector" (those tags are left out of the first two results)."""
    kept, rows, how = [], [], {}
    for t in tags:
        if t in wv:
            kept.append(t)
            rows.append(wv.vectors[wv.index[t]])
            how[t] = "own vector"
            continue
        parts = split_compound(t, wv.index, max_parts)
        if parts is None:
            how[t] = "no vector"
            continue
        kept.append(t)
        rows.append(wv.lookup(parts).mean(axis=0))
        how[t] = "mean of " + "+".join(parts)
    dim = wv.vectors.shape[1]
    return kept, (np.stack(rows).astype(np.float32) if rows else np.zeros((0, dim), np.float32)), how


def tag_word_vectors(tags, wv: WordVectors, max_parts: int = 3) -> tuple[WordVectors, dict[str, str]]:
    """``tag_vectors`` as a WordVectors over the tags that got one (for build_vocabulary and word_graph)."""
    kept, vec, how = tag_vectors(tags, wv, max_parts)
    return WordVectors(kept, vec, f"{wv.name} (+ compound tags as the mean of their parts)"), how
