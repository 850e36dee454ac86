"""The custom dataset format (docs/custom_format.md) end to end on tests/fixtures/custom_small, its precomputed
variants and errors, and multi-label MAP against hand-computed cases."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

import scanet.features as sf
from scanet.data import custom, prepare
from scanet.evaluate import average_precisions, mean_average_precision, retrieval_report

FIXTURE = Path(__file__).parent / "fixtures" / "custom_small"


def _require(module: str, reason: str) -> None:
    """Skip (with the reason) when an optional package is missing or fails to import."""
    try:
        __import__(module)
    except ImportError as e:
        pytest.skip(f"{reason} ({e})")


def _quiet(_msg):
    pass


@pytest.fixture
def meancolour(monkeypatch):
    """A 3-d mean-colour stand-in for the CNN (the CNN itself is tested in test_features.py)."""
    spec = sf.ImageModelSpec(
        "meancolour",
        3,
        "test stand-in",
        8,
        1.0,
        "bilinear",
        (0.0,) * 3,
        (255.0,) * 3,
        lambda: (lambda x: x.mean(dim=(2, 3)), None),
        lambda: "stand-in-1",
    )
    monkeypatch.setitem(sf.IMAGE_MODELS, spec.name, spec)
    return spec


def _copy_fixture(tmp_path, **settings) -> Path:
    root = tmp_path / "custom_small"
    shutil.copytree(FIXTURE, root)
    if settings:
        s = json.loads((root / "dataset.json").read_text())
        s.update(settings)
        (root / "dataset.json").write_text(json.dumps(s))
    return root


# ---------------------------------------------------------------------------------------------- end to end
def test_fixture_end_to_end_with_the_cnn_and_training(tmp_path):
    """The fixture as shipped: raw English texts, word2vec, EfficientNet-Lite0 on PNG images, multi-label;
    then a short training run and evaluation on it."""
    _require("gensim", "the fixture's word vectors are word2vec (gensim)")
    try:
        sf.efficientnet_lite0_weights_path()
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(f"EfficientNet-Lite0 weights not installed ({e})")
    out = tmp_path / "prepared" / "custom_small"
    ds = prepare("custom", FIXTURE, out, progress=_quiet)
    assert ds.name == "custom_small" and ds.classes == ["animal", "vehicle", "food"]
    assert ds.train.labels.shape == (10, 3) and ds.train.labels.dtype == bool
    assert ds.train.labels[ds.train.text_ids.index("m1")].tolist() == [True, False, True]
    assert ds.test.labels[ds.test.text_ids.index("m3")].tolist() == [True, True, False]
    assert ds.image_dim == 1280 and np.isfinite(ds.train.images).all()
    assert "cat" in ds.vocab and "the" not in ds.vocab  # the fixture's stop-word file applies
    row = ds.train.bow[ds.train.text_ids.index("a2")].toarray().ravel()
    assert row[ds.vocab.index("cat")] == 1 and row[ds.vocab.index("dog")] == 1
    report = json.loads((out / "preparation_report.json").read_text())
    assert report["multi_label"] and report["excluded"] == []
    assert "PNG content behind a .jpg name" in report["image_notes"]["a2"][0]
    assert "grayscale" in report["image_notes"]["v2"][0]
    # prepared format 2: raw texts give token sequences and word vectors, raw images 64 x 64 pixels
    a2 = ds.train.text_ids.index("a2")
    assert sorted(ds.vocab[i - 1] for i in ds.train.tokens.sequence(a2)) == sorted(
        w for w, c in zip(ds.vocab, row, strict=True) for _ in range(int(c))
    )
    assert ds.word_vectors.shape[0] == ds.vocab_size
    assert ds.train.pixels.shape == (10, 3, 64, 64) and ds.train.pixels.dtype == np.uint8

    from scanet.config import ModelConfig, Preset, TrainConfig
    from scanet.data.prepared import PreparedDataset
    from scanet.train import train

    loaded = PreparedDataset.load(out)  # the saved form round-trips multi-hot labels
    assert loaded.train.labels.dtype == bool and (loaded.train.labels == ds.train.labels).all()
    preset = Preset(
        "custom",
        "custom",
        ModelConfig(common_dim=16, dropout=0.0),
        TrainConfig(epochs=2, batch_size=32, lr=1e-3, positive_pairs=64, negative_pairs=64, eval_every=0),
    )
    result = train(preset, loaded, tmp_path / "run", progress=False, log=_quiet)
    rep = result["report"]
    assert 0.0 < rep["text2image"]["map"] <= 1.0 and 0.0 < rep["image2text"]["map"] <= 1.0


def test_fixture_with_cooccurrence_vectors_and_cache(tmp_path, meancolour):
    root = _copy_fixture(tmp_path, embeddings="cooccurrence", image_model="meancolour", word2vec={"dim": 8})
    out = tmp_path / "prepared" / "small"
    ds = custom.prepare(root, out, progress=_quiet)
    assert ds.image_dim == 3 and ds.vocab_size <= 40 and ds.laplacian.shape == (ds.vocab_size,) * 2
    logs = []
    again = custom.prepare(root, out, progress=logs.append)  # cached
    assert again.fingerprint == ds.fingerprint and not any("vocabulary" in m for m in logs)
    (root / "texts" / "a1.txt").write_text("a brand new text about a cat\n")
    changed = custom.prepare(root, out, progress=logs.append)  # an input changed: rebuilt
    assert changed.fingerprint != ds.fingerprint and any("stale" in m for m in logs)


def test_keyword_options_override_dataset_json(tmp_path, meancolour):
    root = _copy_fixture(tmp_path, embeddings="cooccurrence", image_model="meancolour", vocab_size=40)
    ds = custom.prepare(root, tmp_path / "p", vocab_size=5, progress=_quiet)
    assert ds.vocab_size == 5


def test_precomputed_text_and_image_matrices(tmp_path):
    """NUS-WIDE style: a tag-count matrix with its vocabulary, image features, numeric multi-labels."""
    root = tmp_path / "tags"
    root.mkdir()
    rng = np.random.default_rng(0)
    words = ["sky", "sea", "beach", "car", "road", "city", "tree", "grass", "unused"]
    topics = [[0, 1, 2], [3, 4, 5], [6, 7, 0]]
    n = 30
    labels = [sorted({i % 3} | ({(i + 1) % 3} if i % 5 == 0 else set())) for i in range(n)]
    counts = np.zeros((n, len(words)), np.float32)
    for i, labs in enumerate(labels):
        for c in labs:
            counts[i, rng.choice(topics[c], 2)] += 1
    order = rng.permutation(n)  # matrix rows in another order than lists
    sp.save_npz(root / "text_features.npz", sp.csr_matrix(counts[order]))
    (root / "text_ids.txt").write_text("\n".join(f"doc{i}" for i in order))
    (root / "vocab.txt").write_text("\n".join(words))
    feats = rng.normal(size=(n, 6)).astype(np.float32)
    np.save(root / "image_features.npy", feats[order])
    (root / "image_ids.txt").write_text("\n".join(f"img{i}" for i in order))
    lines = [f"doc{i}\timg{i}\t{','.join(str(c + 1) for c in labels[i])}" for i in range(n)]
    (root / "train.tsv").write_text("\n".join(lines[:20]))
    (root / "test.tsv").write_text("\n".join(lines[20:]))
    (root / "dataset.json").write_text(json.dumps({"language": "whitespace", "knn": 3, "vocab_size": 6}))
    ds = custom.prepare(root, tmp_path / "prepared", progress=_quiet)
    assert ds.classes == ["1", "2", "3"] and ds.train.labels.shape == (20, 3)
    assert ds.train.labels[0].tolist() == [True, True, False]  # doc0: labels "1,2"
    assert ds.vocab_size == 6 and "unused" not in ds.vocab
    np.testing.assert_array_equal(ds.train.images[3], feats[3])  # rows follow the ids, not file order
    col = {w: j for j, w in enumerate(ds.vocab)}
    for i in (0, 7, 13):
        for w in ds.vocab:
            assert ds.train.bow[i, col[w]] == counts[i, words.index(w)]
    assert json.loads((tmp_path / "prepared" / "preparation_report.json").read_text())["word_vectors"].startswith(
        "ppmi-svd"
    )


def test_single_label_names_without_classes_file(tmp_path):
    root = tmp_path / "named"
    root.mkdir()
    rng = np.random.default_rng(1)
    (root / "texts").mkdir()
    names = ["zebra", "apple"]
    lines = []
    for i in range(12):
        (root / "texts" / f"t{i}.txt").write_text(f"{names[i % 2]} word{i % 2} common")
        lines.append(f"t{i}\ti{i}\t{names[i % 2]}")
    np.save(root / "image_features.npy", rng.normal(size=(12, 4)).astype(np.float32))
    (root / "image_ids.txt").write_text("\n".join(f"i{i}" for i in range(12)))
    (root / "train.tsv").write_text("\n".join(lines[:8]))
    (root / "test.tsv").write_text("\n".join(lines[8:]))
    ds = custom.prepare(root, tmp_path / "p", embeddings="cooccurrence", knn=2, language="whitespace", progress=_quiet)
    assert ds.classes == ["apple", "zebra"]  # sorted names
    assert ds.train.labels.dtype == np.int64 and ds.train.labels.tolist() == [1, 0] * 4


# --------------------------------------------------------------------------------------------- errors
def test_missing_image_is_an_error_unless_excluded(tmp_path, meancolour):
    root = _copy_fixture(tmp_path, embeddings="cooccurrence", image_model="meancolour")
    (root / "images" / "food" / "f3.png").unlink()
    (root / "images" / "vehicle" / "v1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ValueError, match=r"2 items have no usable text or image.*f3.*on_missing"):
        custom.prepare(root, tmp_path / "p", progress=_quiet)
    s = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps(dict(s, on_missing="exclude")))
    ds = custom.prepare(root, tmp_path / "p", progress=_quiet)
    assert len(ds.train) == 8 and "f3" not in ds.train.text_ids and "v1" not in ds.train.text_ids
    report = json.loads((tmp_path / "p" / "preparation_report.json").read_text())
    reasons = {x["text_id"]: x["reason"] for x in report["excluded"]}
    assert reasons["f3"] == "no image file with this id" and "truncated or corrupt" in reasons["v1"]


@pytest.mark.parametrize(
    "line,match",
    [
        ("x1\tx1", r"train.tsv:2: expected 'text_id<TAB>image_id<TAB>labels'"),
        ("x1\tx1\tplanet", r"label 'planet' is not a class"),
        ("x1\tx1\t0", r"1-based"),
    ],
)
def test_bad_list_lines_name_the_file_and_line(tmp_path, meancolour, line, match):
    root = _copy_fixture(tmp_path, image_model="meancolour")
    (root / "train.tsv").write_text("text_id\timage_id\tlabels\n" + line + "\n")
    if line.endswith("\t0"):
        (root / "train.tsv").write_text("x1\tx1\t0\n")
        (root / "test.tsv").write_text("a4\ta4\t1\n")
    with pytest.raises(ValueError, match=match):
        custom.prepare(root, tmp_path / "p", progress=_quiet)


def test_bad_settings_are_refused(tmp_path, meancolour):
    root = _copy_fixture(tmp_path, colour="blue")
    with pytest.raises(ValueError, match="unknown settings.*colour"):
        custom.prepare(root, tmp_path / "p", progress=_quiet)
    root2 = _copy_fixture(tmp_path / "b", language="klingon")
    with pytest.raises(ValueError, match="language must be one of"):
        custom.prepare(root2, tmp_path / "p", progress=_quiet)
    root3 = _copy_fixture(tmp_path / "c", multi_label=False, image_model="meancolour")
    with pytest.raises(ValueError, match="multi_label is false but 3 items"):
        custom.prepare(root3, tmp_path / "p", progress=_quiet)
    with pytest.raises(FileNotFoundError, match="train.tsv is missing"):
        custom.prepare(tmp_path / "c" / "custom_small" / "texts", tmp_path / "p", progress=_quiet)


# ------------------------------------------------------------------------------------ multi-label MAP
def test_multilabel_map_hand_computed():
    # queries: q0 = {0}, q1 = {1, 2}; candidates: c0 = {0, 1}, c1 = {2}, c2 = {}, c3 = {1}
    q = np.array([[1, 0, 0], [0, 1, 1]], dtype=bool)
    c = np.array([[1, 1, 0], [0, 0, 1], [0, 0, 0], [0, 1, 0]], dtype=bool)
    scores = np.array(
        [
            [0.1, 0.9, 0.5, 0.3],  # q0 ranks c1, c2, c3, c0: relevant c0 only, at rank 4
            [0.8, 0.2, 0.9, 0.1],
        ]
    )  # q1 ranks c2, c0, c1, c3: relevant c0, c1, c3 at ranks 2, 3, 4
    ap = average_precisions(scores, q, c)
    assert ap[0] == pytest.approx(1 / 4)
    assert ap[1] == pytest.approx((1 / 2 + 2 / 3 + 3 / 4) / 3)
    assert mean_average_precision(scores, q, c) == pytest.approx((1 / 4 + (1 / 2 + 2 / 3 + 3 / 4) / 3) / 2)
    # MAP@2 (normalized by min(R, k)): q0 finds nothing in its top 2; q1 finds c0 at rank 2 -> (1/2) / 2
    assert mean_average_precision(scores, q, c, k=2) == pytest.approx((0 + 0.25) / 2)


def test_multilabel_item_without_labels_is_left_out_as_a_query():
    q = np.array([[0, 0], [1, 0]], dtype=bool)
    c = np.array([[1, 0], [0, 1], [1, 1]], dtype=bool)
    scores = np.array([[0.3, 0.2, 0.1], [0.1, 0.9, 0.5]])  # q1 ranks c1, c2, c0: relevant c2, c0 at ranks 2, 3
    ap = average_precisions(scores, q, c)
    assert np.isnan(ap[0]) and ap[1] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert mean_average_precision(scores, q, c) == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_multilabel_report_both_directions():
    labels = np.array([[1, 0], [0, 1], [1, 1]], dtype=bool)  # item 2 shares a label with everyone
    scores = np.array(
        [
            [0.9, 0.1, 0.5],  # text0: images 0, 2 relevant at ranks 1, 2
            [0.2, 0.3, 0.8],  # text1: images 2, 1 relevant at ranks 1, 2
            [0.1, 0.7, 0.4],
        ]
    )  # text2: all relevant
    rep = retrieval_report(scores, labels, labels)
    assert rep["text2image"]["map"] == pytest.approx(1.0)
    # image->text uses columns: image0 ranks texts 0 (0.9), 1 (0.2), 2 (0.1): relevant 0, 2 at ranks 1, 3
    # image1 ranks texts 2 (0.7), 1 (0.3), 0 (0.1): relevant 2, 1 at ranks 1, 2; image2: all relevant
    assert rep["image2text"]["map"] == pytest.approx(((1 + 2 / 3) / 2 + 1 + 1) / 3)
