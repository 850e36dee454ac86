"""Eng-Wiki's labelled .mat (wikiData.mat: I_tr, I_te, T_tr, T_te, L_tr, L_te) where the list files are missing:
fixtures with one-hot labels and with a label column, written here with scipy.io.savemat; and the real features
assembled into that layout (when present), prepared, trained a few steps and evaluated."""

import json

import numpy as np
import pytest
import scipy.io

from scanet.config import ModelConfig, Preset, TrainConfig
from scanet.data import prepare, wiki, wiki_mat


def _quiet(_msg):
    pass


def write_wikidata(path, n_tr=30, n_te=12, n_classes=3, label_form="onehot", seed=0):
    rng = np.random.default_rng(seed)
    y_tr, y_te = np.arange(n_tr) % n_classes, np.arange(n_te) % n_classes
    topics = rng.dirichlet(np.ones(6), size=n_classes)

    def text(y):  # topic proportions, class-dependent
        return np.stack([rng.dirichlet(20 * topics[c] + 0.1) for c in y])

    def labels(y):
        if label_form == "onehot":
            return np.eye(n_classes)[y]
        if label_form == "column":
            return (y + 1)[:, None].astype(np.float64)  # 1-based, as MATLAB writes class numbers
        if label_form == "row0":
            return y[None, :].astype(np.float64)  # a 1 x n row of 0-based labels
        raise ValueError(label_form)

    mat = {
        "I_tr": rng.random((n_tr, 16)),
        "I_te": rng.random((n_te, 16)),
        "T_tr": text(y_tr),
        "T_te": text(y_te),
        "L_tr": labels(y_tr),
        "L_te": labels(y_te),
    }
    scipy.io.savemat(path, mat)
    return mat, y_tr, y_te


@pytest.mark.parametrize("label_form", ["onehot", "column", "row0"])
def test_wikidata_mat_without_list_files(tmp_path, label_form):
    root = tmp_path / "wiki"
    root.mkdir()
    mat, y_tr, y_te = write_wikidata(root / "wikiData.mat", label_form=label_form)
    out = tmp_path / "prepared" / "wiki"
    ds = prepare("wiki", root, out, knn=3, progress=_quiet)  # wiki.prepare hands over to wiki_mat
    assert (len(ds.train), len(ds.test), ds.image_dim) == (30, 12, 16)
    assert ds.vocab == [f"topic{j + 1}" for j in range(6)] and ds.classes == ["1", "2", "3"]
    assert ds.train.labels.tolist() == y_tr.tolist() and ds.test.labels.tolist() == y_te.tolist()
    np.testing.assert_allclose(ds.test.images, mat["I_te"], rtol=1e-6)
    np.testing.assert_allclose(ds.train.bow.toarray(), mat["T_tr"], rtol=1e-6)
    L = ds.laplacian
    assert L.shape == (6, 6) and abs(L - L.T).max() < 1e-6
    report = json.loads((out / "preparation_report.json").read_text())
    assert report["text_dim"] == 6 and report["source"].endswith("wikiData.mat")
    logs = []
    assert wiki.prepare(root, out, knn=3, progress=logs.append).fingerprint == ds.fingerprint and logs == []
    with pytest.raises(ValueError, match=r"labelled .mat release.*image_features='sift-sqrt' does not apply"):
        wiki.prepare(root, out, knn=3, image_features="sift-sqrt", progress=_quiet)

    from scanet.train import train

    preset = Preset(
        "t",
        "wiki",
        ModelConfig(common_dim=16, dropout=0.0),
        TrainConfig(epochs=2, batch_size=32, lr=1e-3, positive_pairs=64, negative_pairs=64, eval_every=0),
    )
    rep = train(preset, ds, tmp_path / "run", progress=False, log=_quiet)["report"]
    assert 0.0 < rep["text2image"]["map"] <= 1.0 and 0.0 < rep["image2text"]["map"] <= 1.0


def test_another_mat_name_and_bad_contents(tmp_path):
    root = tmp_path / "wiki"
    root.mkdir()
    mat, _, _ = write_wikidata(root / "wiki_labelled.mat")
    (root / "categories.list").write_text("art biology geography\n")
    ds = wiki.prepare(root, tmp_path / "p", knn=3, progress=_quiet)  # any one .mat with all six keys
    assert ds.classes == ["art", "biology", "geography"]
    bad = dict(mat, L_te=np.eye(3)[np.arange(12) % 3] + np.eye(3)[(np.arange(12) + 1) % 3])
    scipy.io.savemat(root / "wiki_labelled.mat", bad)
    with pytest.raises(ValueError, match=r"L_te row 1 is not one-hot"):
        wiki.prepare(root, tmp_path / "p", knn=3, progress=_quiet)
    scipy.io.savemat(root / "wiki_labelled.mat", dict(mat, I_te=np.full((12, 16), np.nan)))
    with pytest.raises(ValueError, match="I_te contains NaN"):
        wiki.prepare(root, tmp_path / "p", knn=3, progress=_quiet)
    scipy.io.savemat(root / "wiki_labelled.mat", dict(mat, T_tr=mat["T_tr"][:5]))
    with pytest.raises(ValueError, match=r"I_tr \(30, 16\) and T_tr \(5, 6\)"):
        wiki.prepare(root, tmp_path / "p", knn=3, progress=_quiet)
    with pytest.raises(ValueError, match=r"lacks \['L_te'\]"):
        wiki_mat.prepare(
            root,
            tmp_path / "p",
            mat_file=_save(root / "x.mat", {k: v for k, v in mat.items() if k != "L_te"}),
            progress=_quiet,
        )
    (root / "wiki_labelled.mat").unlink()
    (root / "x.mat").unlink()
    with pytest.raises(FileNotFoundError, match="trainset_txt_img_cat.list is missing"):  # neither layout
        wiki.prepare(root, tmp_path / "p", progress=_quiet)


def _save(path, d):
    scipy.io.savemat(path, d)
    return path


def test_real_features_in_the_wikidata_layout(wiki_root, tmp_path):
    """The real raw_features.mat and list-file labels, assembled here into wikiData.mat (one-hot L_tr/L_te): the
    labelled-.mat path on real features."""
    feats = wiki.read_raw_features(wiki_root / "raw_features.mat", 2173, 693)
    y = {
        s: np.asarray([e.label - 1 for e in wiki.read_list(wiki_root / f"{s}set_txt_img_cat.list")])
        for s in ("train", "test")
    }
    root = tmp_path / "wiki"
    root.mkdir()
    scipy.io.savemat(
        root / "wikiData.mat",
        {
            **{k: feats[k].astype(np.float64) for k in feats},
            "L_tr": np.eye(10)[y["train"]],
            "L_te": np.eye(10)[y["test"]],
        },
    )
    (root / "categories.list").write_text((wiki_root / "categories.list").read_text())
    ds = wiki.prepare(root, tmp_path / "p", progress=_quiet)
    assert (len(ds.train), len(ds.test), ds.image_dim, ds.vocab_size) == (2173, 693, 128, 10)
    assert ds.classes[0] == "art" and (ds.test.labels == y["test"]).all()
    from scanet.train import train

    preset = Preset(
        "t",
        "wiki",
        ModelConfig(common_dim=32, dropout=0.0),
        TrainConfig(epochs=1, batch_size=128, lr=1e-3, positive_pairs=1024, negative_pairs=1024, eval_every=0),
    )
    rep = train(preset, ds, tmp_path / "run", progress=False, log=_quiet)["report"]
    assert 0.0 < rep["mean_map"] <= 1.0
