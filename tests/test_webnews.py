"""The WebNews loader on the real data (skipped when /work/shared/data/webnews_zh is absent).

The listing and quirk logic runs on all 2,200 entries; the full preparation (jieba, word2vec, CNN) runs on a
small subset that holds one of each quirk, so the CNN sees about a dozen images, not 2,200.
"""

from pathlib import Path

import numpy as np
import pytest

from scanet.data.wiki import read_list

MISSING = {"72", "162", "1106", "1180", "1729", "1730", "1784"}
DUPLICATED = {"745", "935", "941", "1125", "1732", "1733", "1781"}
SPACE_NAMED = {"22", "444", "1138"}


def _require(module: str, reason: str) -> None:
    """Skip (with the reason) when an optional package is missing or fails to import."""
    try:
        __import__(module)
    except ImportError as e:
        pytest.skip(f"{reason} ({e})")


@pytest.fixture(scope="module")
def webnews_root(shared_data) -> Path:
    root = shared_data / "webnews_zh"
    if not (root / "trainset_txt_img_cat.list").is_file():
        pytest.skip(f"WebNews data not found at {root} (set SCANET_SHARED_DATA)")
    return root


@pytest.fixture(scope="module")
def entries(webnews_root):
    from scanet.data.webnews import LISTS, read_categories

    train, test = read_list(webnews_root / LISTS[0]), read_list(webnews_root / LISTS[1])
    return train, test, read_categories(webnews_root, train + test)


def test_lists_and_classes(entries):
    train, test, classes = entries
    assert len(train) == 1700 and len(test) == 500  # the last line without a newline is read
    assert classes[0] == "culture" and classes[6] == "people's_livelihood" and len(classes) == 10
    assert np.bincount([e.label for e in test])[1:].tolist() == [90, 70, 40, 30, 60, 20, 90, 30, 40, 30]


def test_every_listed_quirk_is_handled(webnews_root, entries):
    from scanet.data.webnews import resolve_entries

    train, test, classes = entries
    choices = resolve_entries(webnews_root, train + test, classes)
    assert {k for k, c in choices.items() if c.path is None} == MISSING
    dup = {k for k, c in choices.items() if any("places" in n for n in c.notes)}
    assert dup == DUPLICATED
    assert all("identical copy" in choices[k].notes[0] for k in dup)
    assert {k for k, c in choices.items() if any("spaces" in n for n in c.notes)} == SPACE_NAMED
    label = {e.image_id: classes[e.label - 1] for e in train + test}
    for k, c in choices.items():  # always the copy in the item's class folder
        if c.path is not None:
            assert Path(c.path).parent.name == label[k], (k, c.path)
    assert sum(c.path is not None for c in choices.values()) == 2193


def _quirky_files(images: Path) -> dict[str, list[str]]:
    """Relative paths of the real files whose content is not plain RGB JPEG (header reads only: fast)."""
    from PIL import Image

    found: dict[str, list[str]] = {}
    for p in sorted(images.rglob("*.jpg")):
        with Image.open(p) as im:
            kind = im.format if im.format != "JPEG" else im.mode if im.mode != "RGB" else None
        if kind:
            found.setdefault(kind, []).append(p.relative_to(images).as_posix())
    return found


def test_real_image_formats_decode_with_notes(webnews_root):
    import scanet.features as sf

    images = webnews_root / "images"
    quirky = _quirky_files(images)
    assert len(quirky["PNG"]) == 36 and len(quirky["BMP"]) == 1 and len(quirky["CMYK"]) == 2
    for kind, want in (
        ("PNG", "PNG content behind"),
        ("BMP", "BMP content behind"),
        ("CMYK", "CMYK"),
        ("L", "grayscale"),
    ):
        for rel in quirky[kind][:2]:
            img, notes = sf.load_rgb(images / rel)
            assert img.mode == "RGB" and any(want in n for n in notes), (rel, notes)
    rgba_pngs = [r for r in quirky["PNG"] if sf.load_rgb(images / r)[1][-1].startswith("RGBA")]
    assert rgba_pngs  # RGBA hides among the PNGs


def test_chinese_tokenizer_on_real_text(webnews_root):
    _require("jieba", "the Chinese tokenizer needs jieba")
    from scanet.data.languages import chinese_tokenizer

    text = (webnews_root / "texts" / "1.txt").read_text(encoding="utf-8")
    toks = chinese_tokenizer()(text)
    assert "建设者" in toks and "施工" in toks
    assert not any(c.isdigit() for t in toks for c in t)  # "10月6日" leaves no number behind
    assert all(len(t) >= 2 for t in toks) and "，" not in "".join(toks) and "的" not in toks


def _subset_root(src: Path, dst: Path, entries) -> set[str]:
    """A WebNews-layout folder of symlinks to the real files: a few entries plus every kind of quirk."""
    train, test, classes = entries
    quirky = _quirky_files(src / "images")
    want = {"72", "1729", "745", "1732", "22", "444"} | {Path(quirky[k][0]).stem.strip() for k in ("BMP", "CMYK")}
    pick = {"train": [], "test": []}
    for name, es in (("train", train), ("test", test)):
        for e in es:
            if e.text_id in want or len(pick[name]) < (8 if name == "train" else 4) and e.label in (1, 2, 3, 7, 10):
                pick[name].append(e)
    for sub in ("texts", "images"):
        (dst / sub).mkdir(parents=True)
    (dst / "categories.list").symlink_to(src / "categories.list")
    for name, fname in (("train", "trainset_txt_img_cat.list"), ("test", "testset_txt_img_cat.list")):
        (dst / fname).write_text("\n".join(f"{e.text_id}\t{e.image_id}\t{e.label}" for e in pick[name]))
    ids = {e.image_id for es in pick.values() for e in es}
    for e in pick["train"] + pick["test"]:
        (dst / "texts" / f"{e.text_id}.txt").symlink_to(src / "texts" / f"{e.text_id}.txt")
    for p in (src / "images").rglob("*.jpg"):
        if p.stem.strip() in ids:
            (dst / "images" / p.parent.name).mkdir(exist_ok=True)
            (dst / "images" / p.parent.name / p.name).symlink_to(p)
    return ids


def test_prepare_on_a_subset_end_to_end(webnews_root, entries, tmp_path):
    _require("jieba", "WebNews needs jieba")
    _require("gensim", "WebNews word vectors need gensim")
    import scanet.features as sf

    try:
        sf.efficientnet_lite0_weights_path()
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(f"EfficientNet-Lite0 weights not installed ({e})")
    import json

    from scanet.data import prepare

    root = tmp_path / "webnews"
    ids = _subset_root(webnews_root, root, entries)
    logs = []
    out = tmp_path / "prepared" / "webnews"
    ds = prepare(
        "webnews", root, out, vocab_size=300, knn=4, w2v_dim=16, w2v_epochs=5, w2v_min_count=1, progress=logs.append
    )
    kept = set(ds.train.image_ids) | set(ds.test.image_ids)
    assert kept == ids - MISSING and "72" not in kept and "1729" not in kept
    assert ds.image_dim == 1280 and ds.classes[0] == "culture" and 0 < ds.vocab_size <= 300
    assert ds.train.bow.shape == (len(ds.train), ds.vocab_size) and ds.train.bow.sum() > 0
    # prepared format 2: token sequences over the vocabulary, its word2vec rows, 64 x 64 pixels (CNN-5)
    assert ds.train.tokens is not None and len(ds.test.tokens) == len(ds.test)
    assert ds.train.tokens.ids.size == int(ds.train.bow.sum())  # the same words as the bag-of-words
    assert ds.word_vectors.shape == (ds.vocab_size, 16)
    assert ds.train.pixels.shape == (len(ds.train), 3, 64, 64) and ds.train.pixels.dtype == np.uint8
    assert ds.train.pixels.std() > 10  # real images, not a constant
    report = json.loads((out / "preparation_report.json").read_text(encoding="utf-8"))
    assert {x["text_id"] for x in report["excluded"]} == {"72", "1729"}
    assert all(x["reason"] == "no image file with this id" for x in report["excluded"])
    notes = " ".join(n for ns in report["image_notes"].values() for n in ns)
    for needle in ("BMP content", "CMYK", "spaces around", "identical copy"):
        assert needle in notes, needle
    assert any("excluded train 72" in m for m in logs)
    # a second call is a cache hit: no CNN, no word2vec, the same arrays
    logs.clear()
    again = prepare(
        "webnews", root, out, vocab_size=300, knn=4, w2v_dim=16, w2v_epochs=5, w2v_min_count=1, progress=logs.append
    )
    assert any("cache hit" in m for m in logs)
    np.testing.assert_array_equal(again.train.images, ds.train.images)
    assert again.vocab == ds.vocab
