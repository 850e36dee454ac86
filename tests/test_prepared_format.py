"""Prepared format 2 (scanet.data.prepared): token sequences, word vectors and pixels survive save/load; a format-1
cache is rebuilt, a format-1 folder given directly still loads (gcn/fixed) and names its format when lstm/cnn/cnn5
ask for more; a newer format and bad arrays are refused."""

import dataclasses
import json

import numpy as np
import pytest

from scanet.data import synthetic
from scanet.data.prepared import FORMAT_VERSION, PreparedDataset, Split
from scanet.data.tokens import TokenSequences


@pytest.fixture()
def prepared(tmp_path):
    out = tmp_path / "syn"
    ds = synthetic.prepare(out, progress=lambda s: None, n_train=60, n_test=30, vocab_size=40, pixel_size=32)
    return out, ds


def test_format_2_round_trip_of_tokens_vectors_and_pixels(prepared):
    out, ds = prepared
    assert FORMAT_VERSION == 2
    back = PreparedDataset.load(out)
    for s in ("train", "test"):
        a, b = getattr(ds, s), getattr(back, s)
        np.testing.assert_array_equal(a.tokens.indptr, b.tokens.indptr)
        np.testing.assert_array_equal(a.tokens.ids, b.tokens.ids)
        assert b.tokens.vocab_size == ds.vocab_size == 40
        np.testing.assert_array_equal(a.pixels, b.pixels)
        assert b.pixels.dtype == np.uint8 and b.pixels.shape == (len(a), 3, 32, 32)
        # the token sequences hold the bag-of-words' words: per text, the counts agree
        counts = np.stack([np.bincount(b.tokens.sequence(r) - 1, minlength=40) for r in range(len(b))])
        np.testing.assert_array_equal(counts, b.bow.toarray())
    np.testing.assert_array_equal(back.word_vectors, ds.word_vectors)
    assert back.word_vectors.dtype == np.float32 and back.word_vectors.shape == (40, 16)


def _write_format_1(out, monkeypatch, **params):
    """A folder as the previous version wrote it: no tokens, vectors or pixels, manifest format_version 1."""
    import scanet.data.prepared as prepared_module

    ds = synthetic.generate(**params)
    bare = dataclasses.replace(
        ds,
        train=dataclasses.replace(ds.train, tokens=None, pixels=None),
        test=dataclasses.replace(ds.test, tokens=None, pixels=None),
        word_vectors=None,
    )
    defaults = dict(
        n_train=600, n_test=200, n_classes=6, vocab_size=200, image_dim=32, text_len=60, text_signal=0.35,
        image_noise=1.0, twin_shift=0.6, knn=8, seed=0, pixel_size=0,
    )  # fmt: skip
    with monkeypatch.context() as m:
        m.setattr(prepared_module, "FORMAT_VERSION", 1)
        prepared_module.cached(
            out, dict(defaults, **params, dataset="synthetic"), {"generator": "synthetic-v1"}, lambda: bare, print
        )
    assert json.loads((out / "manifest.json").read_text())["format_version"] == 1


def test_format_1_folder_loads_for_gcn_and_names_its_format_for_lstm(tmp_path, monkeypatch):
    out = tmp_path / "v1"
    _write_format_1(out, monkeypatch, n_train=60, n_test=30, vocab_size=40)
    old = PreparedDataset.load(out)  # format 1 = format 2 without the new arrays: checkpoints on it still evaluate
    assert not old.has_tokens and not old.has_pixels and old.fingerprint
    from scanet.config import apply_overrides, get_preset

    with pytest.raises(ValueError, match="has no token sequences.*prepared in format 1.*prepare it again"):
        old.require_inputs(apply_overrides(get_preset("synthetic"), ["text_encoder=lstm"]).model)
    with pytest.raises(ValueError, match="has no raw pixels.*prepared in format 1"):
        old.require_inputs(apply_overrides(get_preset("synthetic"), ["image_encoder=cnn5"]).model)
    old.require_inputs(get_preset("synthetic").model)  # gcn + fixed: nothing missing


def test_format_1_cache_is_rebuilt(tmp_path, monkeypatch):
    out = tmp_path / "syn"
    _write_format_1(out, monkeypatch, n_train=60, n_test=30, vocab_size=40)
    said = []
    ds = synthetic.prepare(out, progress=said.append, n_train=60, n_test=30, vocab_size=40)
    assert any("prepared format 1, this version writes 2" in s and "rebuilding" in s for s in said), said
    assert ds.train.tokens is not None and ds.word_vectors is not None
    assert json.loads((out / "manifest.json").read_text())["format_version"] == 2
    assert PreparedDataset.load(out).has_tokens


def test_newer_format_is_refused_with_a_sentence(prepared):
    out, _ = prepared
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps(dict(manifest, format_version=3)))
    with pytest.raises(ValueError, match="written in prepared format 3, newer than this version reads"):
        PreparedDataset.load(out)


def test_datasets_without_tokens_or_pixels_still_save_and_load(tmp_path):
    ds = synthetic.generate(n_train=30, n_test=20, vocab_size=40)
    bare = dataclasses.replace(
        ds,
        train=dataclasses.replace(ds.train, tokens=None),
        test=dataclasses.replace(ds.test, tokens=None),
        word_vectors=None,
    )
    from scanet.data.prepared import cached

    cached(tmp_path / "bare", {"x": 1}, {}, lambda: bare, progress=lambda s: None)
    back = PreparedDataset.load(tmp_path / "bare")
    assert back.train.tokens is None and back.train.pixels is None and back.word_vectors is None
    assert not back.has_tokens and not back.has_pixels


def test_bad_tokens_vectors_and_pixels_are_refused():
    ds = synthetic.generate(n_train=30, n_test=20, vocab_size=40, pixel_size=32)
    tr = ds.train
    with pytest.raises(ValueError, match="30 text ids but 29 token sequences"):
        dataclasses.replace(tr, tokens=tr.tokens.subset(np.arange(29)))
    with pytest.raises(ValueError, match=r"pixels must be \(30, 3, S, S\) uint8"):
        dataclasses.replace(tr, pixels=tr.pixels.astype(np.float32))
    with pytest.raises(ValueError, match="only one split has token sequences"):
        dataclasses.replace(ds, test=dataclasses.replace(ds.test, tokens=None))
    with pytest.raises(ValueError, match="token sequences without word vectors"):
        dataclasses.replace(ds, word_vectors=None)
    with pytest.raises(ValueError, match=r"word vectors are \(39, 16\) for a vocabulary of 40"):
        dataclasses.replace(ds, word_vectors=ds.word_vectors[:39])
    with pytest.raises(ValueError, match="only one split has pixels"):
        dataclasses.replace(ds, test=dataclasses.replace(ds.test, pixels=None))
    other = TokenSequences(tr.tokens.indptr, np.minimum(tr.tokens.ids, 30), 30)
    with pytest.raises(ValueError, match=r"token sequences are over \[30, 40\] words"):
        dataclasses.replace(ds, train=dataclasses.replace(tr, tokens=other))


def test_subset_and_concatenate_carry_tokens_and_pixels():
    ds = synthetic.generate(n_train=30, n_test=20, vocab_size=40, pixel_size=32)
    sub = ds.train.subset([4, 2])
    np.testing.assert_array_equal(sub.tokens.sequence(0), ds.train.tokens.sequence(4))
    np.testing.assert_array_equal(sub.pixels[1], ds.train.pixels[2])
    both = Split.concatenate(ds.train, ds.test)
    assert len(both.tokens) == 50 and both.pixels.shape[0] == 50
    np.testing.assert_array_equal(both.tokens.sequence(30), ds.test.tokens.sequence(0))


def test_cli_data_folder_of_format_1_with_lstm_is_one_sentence(tmp_path, monkeypatch, capsys):
    from scanet.cli import main

    out = tmp_path / "v1"
    _write_format_1(out, monkeypatch, n_train=60, n_test=30, vocab_size=40)
    capsys.readouterr()
    argv = ["train", "--preset", "synthetic", "--data", str(out), "--out", str(tmp_path / "run")]
    rc = main(argv + ["--set", "epochs=1", "--set", "text_encoder=lstm"])
    err = capsys.readouterr().err
    assert rc != 0
    assert "has no token sequences" in err and "prepared in format 1" in err and "Traceback" not in err
