"""NUS-WIDE: fixtures written here in the official release layout (and the XAll/YAll/LAll .mat bundle), prepared,
trained a few steps and evaluated; the subset selection checked against the real Groundtruth.zip when present."""

import json
import zipfile

import numpy as np
import pytest
import scipy.io

from scanet.config import ModelConfig, Preset, TrainConfig
from scanet.data import nuswide, prepare
from scanet.data.prepared import PreparedDataset

# 12 concepts; the fixture makes 'sky' the largest, then 'water', then 'person' (see _labels)
CONCEPTS = ["airport", "animal", "beach", "person", "sky", "water", "zebra", "tree", "snow", "road", "cat", "dog"]
TOP3 = ["sky", "water", "person"]
TOPIC_TAGS = {
    "sky": ["cloud", "blue", "sunset"],
    "water": ["sea", "lake", "river"],
    "person": ["portrait", "girl", "smile"],
}
COMPOUND = "bluesky"  # no vector of its own: mean of blue + sky
FILLERS = [f"zzfill{i:03d}" for i in range(1000 - 10)]  # TagList1k has 1,000 tags; these have no vector
TAGLIST = [t for ts in TOPIC_TAGS.values() for t in ts] + [COMPOUND] + FILLERS


def _quiet(_msg):
    pass


def _labels(n, rng):
    """(n, 12) 0/1: each image one of the top 3 (sky 50 %, water 30 %, person 20 %), every 7th image a second top
    concept too (not 'exactly one'), and random other concepts that do not count."""
    Y = np.zeros((n, len(CONCEPTS)), np.int64)
    for i in range(n):
        c = TOP3[int(rng.choice(3, p=[0.5, 0.3, 0.2]))]
        Y[i, CONCEPTS.index(c)] = 1
        if i % 7 == 3:
            Y[i, CONCEPTS.index(TOP3[(TOP3.index(c) + 1) % 3])] = 1
        Y[i, CONCEPTS.index("airport")] = int(rng.random() < 0.1)
    return Y


def write_release(root, n_train=60, n_test=40, seed=0):
    """The official layout, a few dozen images a split. Returns what was written, per split."""
    rng = np.random.default_rng(seed)
    truth = {}
    (root / "Groundtruth" / "TrainTestLabels").mkdir(parents=True)
    (root / "ConceptsList").mkdir()
    (root / "NUS_WID_Tags").mkdir()
    (root / "Low_Level_Features").mkdir()
    (root / "ImageList").mkdir()
    (root / "ConceptsList" / "Concepts81.txt").write_bytes("".join(c + "\r\n" for c in CONCEPTS).encode())
    (root / "NUS_WID_Tags" / "TagList1k.txt").write_text("".join(t + "\n" for t in TAGLIST))
    all_names, all_tag_lines = [], []
    for split, n in (("Train", n_train), ("Test", n_test)):
        Y = _labels(n, rng)
        for j, c in enumerate(CONCEPTS):
            (root / "Groundtruth" / "TrainTestLabels" / f"Labels_{c}_{split}.txt").write_text(
                "".join(f"{v}\n" for v in Y[:, j])
            )
        tags = np.zeros((n, 1000), np.int64)
        for i in range(n):
            if i % 11 == 5:
                continue  # an untagged image
            main = next(c for c in TOP3 if Y[i, CONCEPTS.index(c)])
            for t in rng.choice(TOPIC_TAGS[main], 2, replace=False):
                tags[i, TAGLIST.index(t)] = 1
            if i % 4 == 0:
                tags[i, TAGLIST.index(COMPOUND)] = 1
            tags[i, 10 + rng.integers(len(FILLERS))] = 1  # a tag without a vector
        # Tags1k.dat: tab separated, each line ending in a tab (as released)
        (root / "NUS_WID_Tags" / f"{split}_Tags1k.dat").write_text(
            "".join("\t".join(map(str, r)) + "\t\n" for r in tags)
        )
        bow = rng.integers(0, 9, size=(n, 500))
        end = " \n" if split == "Train" else "\n"  # with and without a trailing space
        (root / "Low_Level_Features" / f"BoW_{split}_int.dat").write_text(
            "".join(" ".join(map(str, r)) + end for r in bow)
        )
        names = [f"{TOP3[i % 3]}\\{i:04d}_{1000 + i + (0 if split == 'Train' else 500)}.jpg" for i in range(n)]
        (root / "ImageList" / f"{split}Imagelist.txt").write_bytes("".join(x + "\r\n" for x in names).encode())
        truth[split] = {"labels": Y, "tags": tags, "bow": bow, "names": [x.replace("\\", "/") for x in names]}
        all_names += names
        all_tag_lines += [
            f"{1000 + k}      " + " ".join(TAGLIST[j] for j in np.flatnonzero(r)) for k, r in enumerate(tags)
        ]
    # the 5,018-tag files (tags='all'): All_Tags.txt in Imagelist order, the test images first to check the mapping
    order = list(range(n_train, n_train + n_test)) + list(range(n_train))
    (root / "ImageList" / "Imagelist.txt").write_bytes("".join(all_names[k] + "\r\n" for k in order).encode())
    (root / "NUS_WID_Tags" / "All_Tags.txt").write_text("".join(all_tag_lines[k] + "\n" for k in order))
    (root / "NUS_WID_Tags" / "Final_Tag_List.txt").write_text("".join(t + "\n" for t in TAGLIST[:10] + ["unused"]))
    return truth


@pytest.fixture
def vectors_file(tmp_path):
    """8-d vectors, one cluster per concept's tags; 'blue' and 'sky' for the compound tag."""
    rng = np.random.default_rng(1)
    rows = []
    for k, ts in enumerate(TOPIC_TAGS.values()):
        for t in ts:
            rows.append((t, rng.normal(size=8) + 4 * np.eye(8)[k]))
    rows += [("sky", rng.normal(size=8)), ("unused", rng.normal(size=8))]
    path = tmp_path / "vectors.txt"
    path.write_text("\n".join(w + " " + " ".join(f"{v:.4f}" for v in vec) for w, vec in rows))
    return path


def _tiny_preset():
    return Preset(
        "t",
        "nuswide",
        ModelConfig(common_dim=16, dropout=0.0),
        TrainConfig(epochs=1, batch_size=32, lr=1e-3, positive_pairs=64, negative_pairs=64, eval_every=0),
    )


def _row_of(ds_split, truth, split):
    return [truth[split]["names"].index(i) for i in ds_split.text_ids]


def test_official_layout_single_concept_end_to_end(tmp_path, vectors_file):
    root = tmp_path / "NUS-WIDE"
    truth = write_release(root)
    out = tmp_path / "prepared" / "nuswide"
    ds = prepare(
        "nuswide",
        root,
        out,
        n_concepts=3,
        n_train=20,
        n_test=10,
        tags="1k",
        knn=3,
        embeddings=str(vectors_file),
        progress=_quiet,
    )
    assert ds.classes == TOP3 and (len(ds.train), len(ds.test)) == (20, 10)
    assert ds.image_dim == 500 and ds.train.labels.dtype == np.int64
    assert set(ds.vocab) == {t for ts in TOPIC_TAGS.values() for t in ts} | {COMPOUND}
    for split, s in (("Train", ds.train), ("Test", ds.test)):
        rows = _row_of(s, truth, split)
        Y = truth[split]["labels"][rows][:, [CONCEPTS.index(c) for c in TOP3]]
        assert (Y.sum(axis=1) == 1).all()  # exactly one of the selected concepts
        assert (Y.argmax(axis=1) == s.labels).all()
        np.testing.assert_array_equal(s.images, truth[split]["bow"][rows])
        for k, r in enumerate(rows):  # bag of words = the row's tags that have a vector
            want = {TAGLIST[j] for j in np.flatnonzero(truth[split]["tags"][r]) if TAGLIST[j] in ds.vocab}
            got = {ds.vocab[j] for j in s.bow[k].indices}
            assert want == got and want, (split, r)
    assert len(set(ds.train.text_ids)) == 20
    logs = []
    again = nuswide.prepare(
        root,
        out,
        n_concepts=3,
        n_train=20,
        n_test=10,
        tags="1k",
        knn=3,
        embeddings=str(vectors_file),
        progress=logs.append,
    )
    assert again.fingerprint == ds.fingerprint and not any("vocabulary" in m for m in logs)  # cache hit
    other = nuswide.prepare(
        root,
        out,
        n_concepts=3,
        n_train=20,
        n_test=10,
        tags="1k",
        knn=3,
        seed=1,
        embeddings=str(vectors_file),
        progress=logs.append,
    )
    assert other.train.text_ids != ds.train.text_ids and any("stale" in m for m in logs)

    from scanet.train import train

    result = train(_tiny_preset(), PreparedDataset.load(out), tmp_path / "run", progress=False, log=_quiet)
    rep = result["report"]
    assert 0.0 < rep["text2image"]["map"] <= 1.0 and 0.0 < rep["image2text"]["map"] <= 1.0
    assert (tmp_path / "run" / "evaluation.json").is_file()


def test_multi_label_and_all_tags(tmp_path, vectors_file):
    root = tmp_path / "NUS-WIDE"
    truth = write_release(root)
    ds = nuswide.prepare(
        root,
        tmp_path / "p",
        n_concepts=3,
        exactly_one=False,
        n_train=None,
        n_test=None,
        tags="auto",
        knn=3,
        embeddings=str(vectors_file),
        progress=_quiet,
    )
    # all images have a top concept; untagged ones are dropped: i % 11 == 5
    assert len(ds.train) == sum(1 for i in range(60) if i % 11 != 5)
    assert ds.train.labels.dtype == bool and ds.train.labels.shape == (len(ds.train), 3)
    rows = _row_of(ds.train, truth, "Train")
    np.testing.assert_array_equal(
        ds.train.labels, truth["Train"]["labels"][rows][:, [CONCEPTS.index(c) for c in TOP3]].astype(bool)
    )
    assert ds.train.labels.sum(axis=1).max() == 2  # the images with two concepts are in
    # tags='auto' took All_Tags.txt (Imagelist order differs from the splits'); 'unused' never occurs
    assert "unused" not in ds.vocab and COMPOUND in ds.vocab
    test_rows = _row_of(ds.test, truth, "Test")
    for k, r in enumerate(test_rows):
        want = {TAGLIST[j] for j in np.flatnonzero(truth["Test"]["tags"][r]) if TAGLIST[j] in ds.vocab}
        assert {ds.vocab[j] for j in ds.test.bow[k].indices} == want
    from scanet.train import train

    result = train(_tiny_preset(), ds, tmp_path / "run", progress=False, log=_quiet)  # multi-hot relevance
    assert 0.0 < result["report"]["mean_map"] <= 1.0


def test_mat_bundle(tmp_path, vectors_file):
    root = tmp_path / "NUS-WIDE-TC10"
    root.mkdir()
    rng = np.random.default_rng(2)
    n = 50
    L = np.zeros((n, 3), np.uint8)
    L[np.arange(n), np.arange(n) % 3] = 1
    L[::10, (np.arange(0, n, 10) + 1) % 3] = 1  # 5 items with two labels
    Y = np.zeros((n, 1000), np.uint8)
    for i in range(n):
        Y[i, [TAGLIST.index(t) for t in TOPIC_TAGS[TOP3[i % 3]][:2]]] = 1
    Y[7] = 0  # untagged
    X = rng.normal(size=(n, 64)).astype(np.float32)
    scipy.io.savemat(root / "nus-wide-tc10-xall-vgg.mat", {"XAll": X})
    scipy.io.savemat(root / "nus-wide-tc10-yall.mat", {"YAll": Y.T})  # transposed, as some copies are
    scipy.io.savemat(root / "nus-wide-tc10-lall.mat", {"LAll": L})
    (root / "TagList1k.txt").write_text("\n".join(TAGLIST))
    ds = prepare(
        "nuswide", root, tmp_path / "p", n_train=30, n_test=10, knn=3, embeddings=str(vectors_file), progress=_quiet
    )
    assert (len(ds.train), len(ds.test), ds.image_dim) == (30, 10, 64)
    used = [int(i) - 1 for i in ds.train.text_ids + ds.test.text_ids]
    assert len(set(used)) == 40 and 7 not in used and not any(i % 10 == 0 for i in used)
    np.testing.assert_array_equal(ds.train.labels, np.asarray(used[:30]) % 3)
    np.testing.assert_allclose(ds.test.images, X[used[30:]])
    with pytest.raises(ValueError, match="41 asked for|usable items"):
        nuswide.prepare(
            root, tmp_path / "q", n_train=40, n_test=10, knn=3, embeddings=str(vectors_file), progress=_quiet
        )


def test_bad_files_name_the_file_and_line(tmp_path, vectors_file):
    kw = dict(n_concepts=3, n_train=10, n_test=5, tags="1k", knn=3, embeddings=str(vectors_file), progress=_quiet)
    root = tmp_path / "a"
    write_release(root)
    f = root / "Groundtruth" / "TrainTestLabels" / "Labels_sky_Test.txt"
    lines = f.read_text().splitlines()
    lines[4] = "1x"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"Labels_sky_Test.txt:5: expected 0 or 1, got '1x'"):
        nuswide.prepare(root, tmp_path / "p", **kw)
    lines[4] = "-1130179"  # an integer other than 0/1 (the release has one)
    f.write_text("\n".join(lines) + "\n")
    nuswide.prepare(root, tmp_path / "p", **kw)
    report = json.loads((tmp_path / "p" / "preparation_report.json").read_text())
    assert report["label_anomalies"] == [
        {"file": "Groundtruth/TrainTestLabels/Labels_sky_Test.txt", "line": 5, "value": -1130179, "read_as": 0}
    ]
    f.write_text("\n".join(lines[:4] + ["1"] + lines[5:-1]) + "\n")  # one line short
    with pytest.raises(ValueError, match=r"Labels_sky_Test.txt has 39 lines, expected 40"):
        nuswide.prepare(root, tmp_path / "p", **kw)

    root = tmp_path / "b"
    write_release(root)
    f = root / "NUS_WID_Tags" / "Train_Tags1k.dat"
    lines = f.read_text().splitlines()
    lines = [ln + "\t1" for ln in lines]  # 1,001 values a line
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"Train_Tags1k.dat:\d+: expected 1000 values, got 1001"):
        nuswide.prepare(root, tmp_path / "p", **kw)

    root = tmp_path / "c"
    write_release(root)
    (root / "Low_Level_Features" / "BoW_int").mkdir()  # a subfolder, as some archives unpack
    for s in ("Train", "Test"):
        (root / "Low_Level_Features" / f"BoW_{s}_int.dat").rename(
            root / "Low_Level_Features" / "BoW_int" / f"BoW_{s}_int.dat"
        )
    assert nuswide.prepare(root, tmp_path / "p", **kw).image_dim == 500
    (root / "Low_Level_Features" / "BoW_int" / "BoW_Test_int.dat").unlink()
    with pytest.raises(FileNotFoundError, match="BoW_Test_int.dat"):
        nuswide.prepare(root, tmp_path / "p", **kw)
    with pytest.raises(FileNotFoundError, match="neither the official NUS-WIDE layout"):
        nuswide.prepare(root / "ImageList", tmp_path / "p", **kw)
    with pytest.raises(ValueError, match=r"not in Concepts81.txt"):
        nuswide.prepare(tmp_path / "a", tmp_path / "p", **dict(kw, concepts=["sky", "volcano"]))


# ---------------------------------------------------------------------------------- the real ground truth
@pytest.fixture(scope="module")
def groundtruth(shared_data):
    root = shared_data / "nuswide" / "partial_labels_only"
    if not (root / "Groundtruth.zip").is_file():
        pytest.skip(f"real NUS-WIDE ground truth not found at {root} (set SCANET_SHARED_DATA)")
    return root


def test_real_groundtruth_subset_selection(groundtruth):
    """The selection read through the released zips, against an independent count over the same files."""
    rel = nuswide.Release(groundtruth)
    sel = nuswide.select_candidates(rel, n_concepts=10)
    z = zipfile.ZipFile(groundtruth / "Groundtruth.zip")
    concepts = [
        c.strip()
        for c in zipfile.ZipFile(groundtruth / "ConceptsList.zip").read("Concepts81.txt").decode().splitlines()
        if c.strip()
    ]
    assert len(concepts) == 81
    cols = {}
    for c in concepts:  # 0/1 as text; anything else is not a '1'
        cols[c] = [np.array(z.read(f"TrainTestLabels/Labels_{c}_{s}.txt").split()) == b"1" for s in ("Train", "Test")]
    total = {c: int(a.sum() + b.sum()) for c, (a, b) in cols.items()}
    top = sorted(concepts, key=lambda c: (-total[c], c))[:10]
    assert sel["concepts"] == top
    assert top == ["sky", "clouds", "person", "water", "animal", "grass", "buildings", "window", "plants", "lake"]
    assert sel["n_rows"] == {"Train": 161_789, "Test": 107_859}
    # the one value in the release that is not 0/1, read as 0, as AllLabels/Labels_lake.txt has it
    assert sel["label_anomalies"] == [
        {"file": "Groundtruth/TrainTestLabels/Labels_lake_Train.txt", "line": 78_373, "value": -1_130_179, "read_as": 0}
    ]
    assert int((np.array(z.read("AllLabels/Labels_lake.txt").split()) == b"1").sum()) == total["lake"] == 13_392
    any_top = sum(int((np.stack([cols[c][k] for c in top], axis=1).sum(axis=1) >= 1).sum()) for k in (0, 1))
    assert any_top == 186_577  # the literature's NUS-WIDE-TC10 size
    for k, s in enumerate(("Train", "Test")):
        M = np.stack([cols[c][k] for c in top], axis=1)
        one = np.flatnonzero(M.sum(axis=1) == 1)
        np.testing.assert_array_equal(sel["rows"][s], one)
        np.testing.assert_array_equal(sel["labels"][s].sum(axis=0), M[one].sum(axis=0))
    # the paper's sizes can be drawn from these pools (58,620 and 38,955 single-concept images)
    assert len(sel["rows"]["Train"]) >= 40_000 and len(sel["rows"]["Test"]) >= 1_000
    rng = np.random.default_rng(0)
    drawn = nuswide._draw(rng, sel["rows"]["Train"], 40_000, lambda r: np.ones(len(r), bool), "train")
    assert len(np.unique(drawn)) == 40_000 and np.isin(drawn, sel["rows"]["Train"]).all()
