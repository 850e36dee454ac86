"""Token-id sequences: each text as the ids of its vocabulary words, in order (the input of the LSTM and CNN
text encoders, scanet.encoders).

Ids: 0 is padding; word ``vocab[i]`` has id ``i + 1``. Words outside the vocabulary are DROPPED, not mapped to an
UNK id, for three reasons: the bag-of-words the GCN reads drops them too (scanet.data.text.bag_of_words), so all
three text encoders see the same words; the vocabulary is the V most frequent training words that have a
pretrained vector, so an UNK row would have no pretrained vector and be trained only on rare training words;
and with id 0 reserved for padding alone, a text's length is ``(ids != 0).sum()``, so a padded (B, T) batch
carries its own lengths and can be passed through the model as one tensor, like the bag-of-words.

On disk (``TokenSequences``), CSR-like: ``indptr`` (n + 1,) int64 and ``ids`` (total tokens,) int32, text r
being ``ids[indptr[r]:indptr[r + 1]]``. Eng-Wiki's 2,866 texts hold 637,599 vocabulary tokens (10,055 words;
lengths 74..1,092, median 198 in training): 2.6 MB as int32, where a dense (2,866, 1,092) int64 matrix would
take 25 MB (measured: bench/encoders_cost.py). ``padded`` makes the (B, T) batch a model reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PAD_ID = 0


@dataclass
class TokenSequences:
    """n texts as token-id sequences over a vocabulary of ``vocab_size`` words (ids 1..vocab_size)."""

    indptr: np.ndarray  # (n + 1,) int64, indptr[0] = 0, non-decreasing
    ids: np.ndarray  # (indptr[-1],) int32 in 1..vocab_size
    vocab_size: int

    def __post_init__(self):
        self.indptr = np.asarray(self.indptr)
        self.ids = np.asarray(self.ids)
        if self.indptr.ndim != 1 or self.indptr.size < 1 or not np.issubdtype(self.indptr.dtype, np.integer):
            raise ValueError(
                f"token indptr must be a 1-D integer array of n + 1 offsets, got shape "
                f"{self.indptr.shape} dtype {self.indptr.dtype}"
            )
        if self.ids.ndim != 1 or not np.issubdtype(self.ids.dtype, np.integer):
            raise ValueError(
                f"token ids must be a 1-D integer array, got shape {self.ids.shape} dtype {self.ids.dtype}"
            )
        if self.indptr[0] != 0 or self.indptr[-1] != self.ids.size or (np.diff(self.indptr) < 0).any():
            raise ValueError(
                f"token indptr must start at 0, never decrease and end at len(ids) = {self.ids.size}; "
                f"got start {int(self.indptr[0])}, end {int(self.indptr[-1])}"
            )
        if self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {self.vocab_size}")
        if self.ids.size and (self.ids.min() < 1 or self.ids.max() > self.vocab_size):
            raise ValueError(
                f"token ids must lie in 1..{self.vocab_size} (0 is padding and never stored), got "
                f"{int(self.ids.min())}..{int(self.ids.max())}"
            )
        self.indptr = self.indptr.astype(np.int64, copy=False)
        self.ids = self.ids.astype(np.int32, copy=False)

    def __len__(self) -> int:
        return self.indptr.size - 1

    @property
    def lengths(self) -> np.ndarray:
        """(n,) int64 tokens per text (before any truncation)."""
        return np.diff(self.indptr)

    def sequence(self, r: int) -> np.ndarray:
        return self.ids[self.indptr[r] : self.indptr[r + 1]]

    def subset(self, rows) -> TokenSequences:
        """The texts ``rows`` (any order, repeats allowed) as a new TokenSequences."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < -len(self) or rows.max() >= len(self)):
            raise ValueError(f"row index out of range for {len(self)} texts")
        seqs = [self.sequence(r) for r in rows]
        indptr = np.zeros(rows.size + 1, np.int64)
        np.cumsum([s.size for s in seqs], out=indptr[1:])
        return TokenSequences(indptr, np.concatenate(seqs) if seqs else np.zeros(0, np.int32), self.vocab_size)

    @classmethod
    def concatenate(cls, parts: Sequence[TokenSequences]) -> TokenSequences:
        """The texts of ``parts`` one after another (e.g. train + test for a retrieval index)."""
        if not parts:
            raise ValueError("concatenate needs at least one TokenSequences")
        sizes = {p.vocab_size for p in parts}
        if len(sizes) != 1:
            raise ValueError(f"cannot concatenate token sequences over different vocabularies (sizes {sorted(sizes)})")
        offsets = np.cumsum([0] + [p.ids.size for p in parts[:-1]])
        indptr = np.concatenate([[0]] + [p.indptr[1:] + o for p, o in zip(parts, offsets, strict=True)])
        return cls(indptr, np.concatenate([p.ids for p in parts]), sizes.pop())

    def padded(self, rows=None, max_length: int | None = None, pad_to: int | None = None):
        """(ids (B, T) int64, lengths (B,) int64) for the texts ``rows`` (default: all), ids padded with 0.

        A text longer than ``max_length`` keeps its FIRST ``max_length`` tokens (a Wiki section states its
        subject first). T is the longest kept length in the batch, at least 1 (an all-empty batch is one
        column of padding), or exactly ``pad_to`` when given (>= every kept length).
        """
        rows = np.arange(len(self)) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if rows.size and (rows.min() < -len(self) or rows.max() >= len(self)):
            raise ValueError(f"row index out of range for {len(self)} texts")
        lengths = self.lengths[rows]
        if max_length is not None:
            lengths = np.minimum(lengths, max_length)
        longest = int(lengths.max()) if lengths.size else 0
        if pad_to is not None:
            if pad_to < longest:
                raise ValueError(f"pad_to={pad_to} is shorter than the longest text in the batch ({longest} tokens)")
            T = pad_to
        else:
            T = max(longest, 1)
        out = np.zeros((rows.size, T), np.int64)
        for b, (r, L) in enumerate(zip(rows, lengths, strict=True)):
            out[b, :L] = self.ids[self.indptr[r] : self.indptr[r] + L]
        return out, lengths.astype(np.int64)

    # -- the prepared format ------------------------------------------------------------------------------
    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        """``{prefix}_tok_indptr``, ``{prefix}_tok_ids``: what PreparedDataset.save puts into arrays.npz."""
        return {f"{prefix}_tok_indptr": self.indptr, f"{prefix}_tok_ids": self.ids}

    @classmethod
    def from_arrays(cls, arrays, prefix: str, vocab_size: int) -> TokenSequences:
        """Inverse of ``to_arrays``; ``arrays`` is a mapping such as an open .npz. Bad arrays: ValueError."""
        try:
            indptr, ids = arrays[f"{prefix}_tok_indptr"], arrays[f"{prefix}_tok_ids"]
        except KeyError as e:
            raise ValueError(f"no token sequences for {prefix!r}: array {e} is missing") from None
        return cls(indptr, ids, vocab_size)


def token_ids(docs: Sequence[Sequence[str]], vocab: Sequence[str]) -> TokenSequences:
    """Tokenized documents -> TokenSequences over ``vocab`` (id = vocabulary row + 1, unknown words dropped)."""
    index = {w: i + 1 for i, w in enumerate(vocab)}
    if len(index) != len(vocab):
        raise ValueError(f"the vocabulary has {len(vocab) - len(index)} repeated words")
    indptr = np.zeros(len(docs) + 1, np.int64)
    chunks = []
    for r, doc in enumerate(docs):
        if isinstance(doc, str):
            raise ValueError(f"document {r} is a string; pass tokenized documents (lists of words)")
        seq = np.fromiter((index[w] for w in doc if w in index), dtype=np.int32)
        chunks.append(seq)
        indptr[r + 1] = indptr[r] + seq.size
    ids = np.concatenate(chunks) if chunks else np.zeros(0, np.int32)
    return TokenSequences(indptr, ids, len(vocab))
