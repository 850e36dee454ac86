"""Token-id sequences (scanet.data.tokens): ids, dropped unknown words, padding/truncation, the on-disk arrays."""

import numpy as np
import pytest

from scanet.data.tokens import PAD_ID, TokenSequences, token_ids

VOCAB = ["apple", "banana", "cherry", "date"]
DOCS = [["banana", "kiwi", "apple", "banana"], [], ["kiwi"], ["date", "cherry", "apple", "date", "banana"]]


def test_ids_are_vocabulary_rows_plus_one_and_unknown_words_are_dropped():
    t = token_ids(DOCS, VOCAB)
    assert len(t) == 4 and t.vocab_size == 4 and PAD_ID == 0
    assert [t.sequence(r).tolist() for r in range(4)] == [[2, 1, 2], [], [], [4, 3, 1, 4, 2]]
    assert t.lengths.tolist() == [3, 0, 0, 5]
    assert t.indptr.dtype == np.int64 and t.ids.dtype == np.int32


def test_padded_batches_truncate_to_the_first_tokens():
    t = token_ids(DOCS, VOCAB)
    ids, lengths = t.padded()
    assert ids.shape == (4, 5) and ids.dtype == np.int64
    assert ids.tolist() == [[2, 1, 2, 0, 0], [0] * 5, [0] * 5, [4, 3, 1, 4, 2]]
    assert lengths.tolist() == [3, 0, 0, 5]
    ids, lengths = t.padded([3, 0], max_length=2)
    assert ids.tolist() == [[4, 3], [2, 1]] and lengths.tolist() == [2, 2]
    ids, lengths = t.padded([1, 2])  # all empty: one column of padding
    assert ids.shape == (2, 1) and not ids.any() and lengths.tolist() == [0, 0]
    ids, _ = t.padded([0], pad_to=10)
    assert ids.shape == (1, 10) and ids[0, :3].tolist() == [2, 1, 2] and not ids[0, 3:].any()
    assert ((ids != PAD_ID).sum(1) == t.lengths[[0]]).all()  # lengths follow from the ids
    with pytest.raises(ValueError, match="pad_to=4 is shorter"):
        t.padded(pad_to=4)
    with pytest.raises(ValueError, match="max_length"):
        t.padded(max_length=0)
    with pytest.raises(ValueError, match="out of range"):
        t.padded([4])


def test_subset_and_arrays_round_trip_through_npz(tmp_path):
    t = token_ids(DOCS, VOCAB)
    s = t.subset([3, 3, 0])
    assert [s.sequence(r).tolist() for r in range(3)] == [[4, 3, 1, 4, 2], [4, 3, 1, 4, 2], [2, 1, 2]]
    both = TokenSequences.concatenate([t, s])
    assert len(both) == 7 and [both.sequence(r).tolist() for r in (3, 4, 6)] == [[4, 3, 1, 4, 2]] * 2 + [[2, 1, 2]]
    with pytest.raises(ValueError, match="different vocabularies"):
        TokenSequences.concatenate([t, token_ids(DOCS, VOCAB[:3])])
    np.savez(tmp_path / "a.npz", **t.to_arrays("train"))
    with np.load(tmp_path / "a.npz") as a:
        back = TokenSequences.from_arrays(a, "train", len(VOCAB))
        with pytest.raises(ValueError, match="no token sequences for 'test'"):
            TokenSequences.from_arrays(a, "test", len(VOCAB))
    assert np.array_equal(back.indptr, t.indptr) and np.array_equal(back.ids, t.ids)


def test_inconsistent_arrays_are_value_errors():
    with pytest.raises(ValueError, match="1..4"):
        TokenSequences(np.array([0, 2]), np.array([1, 5]), 4)  # id beyond the vocabulary
    with pytest.raises(ValueError, match="1..4"):
        TokenSequences(np.array([0, 2]), np.array([0, 1]), 4)  # padding stored as a token
    with pytest.raises(ValueError, match="end at len"):
        TokenSequences(np.array([0, 3]), np.array([1, 2]), 4)
    with pytest.raises(ValueError, match="never decrease"):
        TokenSequences(np.array([0, 2, 1, 2]), np.array([1, 2]), 4)
    with pytest.raises(ValueError, match="integer"):
        TokenSequences(np.array([0.0, 1.0]), np.array([1]), 4)
    with pytest.raises(ValueError, match="tokenized"):
        token_ids(["apple banana"], VOCAB)
    with pytest.raises(ValueError, match="repeated"):
        token_ids(DOCS, ["apple", "apple"])
