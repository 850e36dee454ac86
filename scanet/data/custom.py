"""A documented folder format for any image-text collection (docs/custom_format.md is the full description).

Why a little over 400 lines: the documented custom format's reader (settings, items, labels, images or
features) in small functions; its matrix inputs already live in custom_inputs.py.

    ROOT/dataset.json        optional settings: name, language, embeddings, vocab_size, multi_label, ...
    ROOT/train.tsv           text_id <TAB> image_id <TAB> labels     (labels: "3", "cat", "1,4" or "cat,dog")
    ROOT/test.tsv            same
    ROOT/classes.txt         optional: class names, one a line (line k is class k for numeric labels)
    texts:  ROOT/texts/<text_id>.txt                                  raw text, tokenized per ``language``
       or   ROOT/text_features.npy|.npz + text_ids.txt + vocab.txt    precomputed counts (rows: text ids,
                                                                       columns: the words of vocab.txt)
    images: ROOT/images/...  (<image_id> as a relative path, or any file whose name without extension is the id)
       or   ROOT/image_features.npy + image_ids.txt                   precomputed features (rows: image ids)

``prepare(root)`` turns it into a PreparedDataset: single-label (labels (n,) int64) or multi-label (labels (n, C)
bool multi-hot, relevance = sharing a label, as scanet.evaluate and scanet.train support). A missing text or
image is an error naming the entries, unless ``"on_missing": "exclude"`` (then the entries are left out and listed
in ``<out>/preparation_report.json``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from scanet.config import check_setting
from scanet.data.assemble import REPORT_NAME, assemble, counts, partition, write_report  # noqa: F401
from scanet.data.custom_inputs import (
    _TEXT_MATRIX_NAMES,
    _image_choices,
    _read_ids,
    _text_matrix_file,
    cooccurrence_vectors,
    load_text_matrix,
)
from scanet.data.embeddings import GLOVE_50D, load_word_vectors
from scanet.data.languages import LANGUAGES, embeddings_for, tokenizer_for, tokenizer_version, train_word2vec
from scanet.data.lists import read_rows
from scanet.data.pixels import pixels_for, stack_pixels
from scanet.data.prepared import PreparedDataset, cached, hash_files
from scanet.data.text import bag_of_words, build_vocabulary, read_stopwords
from scanet.features import features_for_images, get_image_model
from scanet.io import read_text, safe_np_load

SETTINGS: dict[str, Any] = {
    "name": None,  # dataset name (default: the folder's name)
    "language": "en",  # "en", "zh" or "whitespace" (see scanet.data.languages)
    "stopwords": None,  # a stop-word file relative to ROOT (one word a line)
    "embeddings": None,  # "glove-6b-50d", "word2vec", "cooccurrence" or a vector file (relative to ROOT)
    "vocab_size": 10_055,
    "knn": 8,
    "lmax": "exact",
    "multi_label": None,  # None: multi-label when any item has several labels
    "on_missing": "error",  # "error" or "exclude"
    "image_model": "efficientnet-lite0",
    "batch_size": 32,
    "word2vec": {},  # dim, epochs, min_count, window, seed (scanet.data.languages.train_word2vec)
}


# The numeric settings' types and bounds (checked by scanet.config.check_setting, the checker of --set).
SETTING_BOUNDS = {"vocab_size": (int, {"lo": 1}), "knn": (int, {"lo": 1}), "batch_size": (int, {"lo": 1})}


@dataclass
class Item:
    text_id: str
    image_id: str
    labels: list[int]  # 0-based class indices


# -------------------------------------------------------------------------------------------- settings
def read_settings(root: Path, overrides: dict) -> dict:
    s = {k: (dict(v) if isinstance(v, dict) else v) for k, v in SETTINGS.items()}
    f = root / "dataset.json"
    if f.is_file():
        try:
            given = json.loads(read_text(f, "settings"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{f} is not valid JSON: {e}") from None
        if not isinstance(given, dict):
            raise ValueError(f"{f} must hold a JSON object of settings")
        unknown = set(given) - set(SETTINGS)
        if unknown:
            raise ValueError(f"{f}: unknown settings {sorted(unknown)}; known: {sorted(SETTINGS)}")
        s.update(given)
    s.update({k: v for k, v in overrides.items() if v is not None})
    s["name"] = s["name"] or root.name
    for key, (kind, bounds) in SETTING_BOUNDS.items():  # the one checker of scanet.config
        s[key] = check_setting(key, s[key], kind, where=f"{f}: " if f.is_file() else "", **bounds)
    if s["language"] not in LANGUAGES:
        raise ValueError(f"language must be one of {LANGUAGES}, got {s['language']!r}")
    if s["on_missing"] not in ("error", "exclude"):
        raise ValueError(f"on_missing must be 'error' or 'exclude', got {s['on_missing']!r}")
    if not isinstance(s["word2vec"], dict):
        raise ValueError('word2vec settings must be an object, e.g. {"dim": 100, "epochs": 20}')
    return s


# ------------------------------------------------------------------------------------------------ lists
def read_classes(root: Path) -> list[str] | None:
    f = root / "classes.txt"
    if not f.is_file():
        return None
    names = [ln.strip() for ln in read_text(f, "class list").splitlines() if ln.strip()]
    if len(set(names)) != len(names):
        raise ValueError(f"{f}: class names must be unique")
    bad = [n for n in names if "," in n]
    if bad:
        raise ValueError(f"{f}: class names cannot contain ',' (it separates labels): {bad[:3]}")
    return names


def read_items(path: Path) -> list[tuple[str, str, list[str], int]]:
    """(text_id, image_id, raw label strings, line number) of a list file."""
    rows = read_rows(
        path, "text_id<TAB>image_id<TAB>labels", comments=True, header=("text_id", "image_id"), encoding="utf-8-sig"
    )
    return [(tid, iid, [x.strip() for x in lab.split(",") if x.strip()], n) for n, (tid, iid, lab) in rows]


def resolve_labels(raw: dict[str, list], classes: list[str] | None, files: dict[str, Path]):
    """Class names and 0-based label lists; labels are 1-based numbers or class names (not mixed in one file)."""
    every = [lab for rows in raw.values() for r in rows for lab in r[2]]
    numeric = all(lab.isdigit() for lab in every) and bool(every)
    if numeric:
        top = max(int(x) for x in every)
        if classes is None:
            classes = [str(i + 1) for i in range(top)]
        elif top > len(classes):
            raise ValueError(f"label {top} is used but classes.txt names only {len(classes)} classes")
    elif classes is None:
        classes = sorted(set(every))
    index = {c: i for i, c in enumerate(classes)}
    out = {}
    for split, rows in raw.items():
        items = []
        for tid, iid, labs, n in rows:
            idx = []
            for lab in labs:
                if numeric:
                    if int(lab) < 1:
                        raise ValueError(f"{files[split]}:{n}: numeric labels are 1-based, got {lab}")
                    idx.append(int(lab) - 1)
                elif lab in index:
                    idx.append(index[lab])
                else:
                    raise ValueError(
                        f"{files[split]}:{n}: label {lab!r} is not a class of classes.txt "
                        f"(and labels must be all numbers or all names)"
                    )
            items.append(Item(tid, iid, sorted(set(idx))))
        out[split] = items
    return classes, out


def label_array(items: list[Item], n_classes: int, multi: bool) -> np.ndarray:
    if multi:
        y = np.zeros((len(items), n_classes), dtype=bool)
        for i, it in enumerate(items):
            y[i, it.labels] = True
        return y
    return np.asarray([it.labels[0] for it in items], dtype=np.int64)


# -------------------------------------------------------------------------------------------- prepare
@dataclass
class Sources:
    """Where a custom folder's texts and images come from, and the word vectors chosen for them."""

    list_files: dict[str, Path]
    text_matrix: Path | None  # text_features.npz|.npy, or None: texts/
    image_matrix: Path | None  # image_features.npy, or None: images/
    embeddings: str

    @property
    def text_source(self) -> str:
        return "matrix" if self.text_matrix is not None else "texts"

    @property
    def image_source(self) -> str:
        return "matrix" if self.image_matrix is not None else "images"


def find_sources(root: Path, s: dict) -> Sources:
    list_files = {"train": root / "train.tsv", "test": root / "test.tsv"}
    for f in list_files.values():
        if not f.is_file():
            raise FileNotFoundError(
                f"{f} is missing (one 'text_id<TAB>image_id<TAB>labels' line per item; see docs/custom_format.md)"
            )
    text_matrix = _text_matrix_file(root)
    if text_matrix is None and not (root / "texts").is_dir():
        raise FileNotFoundError(f"{root} has no texts/ folder and no {' or '.join(_TEXT_MATRIX_NAMES)}")
    image_matrix = root / "image_features.npy"
    if not image_matrix.is_file() and not (root / "images").is_dir():
        raise FileNotFoundError(f"{root} has no images/ folder and no image_features.npy")
    matrix = text_matrix is not None
    emb = s["embeddings"] or (
        "cooccurrence" if matrix and s["language"] != "en" else GLOVE_50D if s["language"] == "en" else "word2vec"
    )
    if emb == GLOVE_50D and s["language"] not in ("en", "whitespace"):
        emb = "cooccurrence" if matrix else "word2vec"
    if emb == "word2vec" and matrix:
        raise ValueError(
            "embeddings 'word2vec' needs raw texts (texts/); with a precomputed text matrix use "
            "'cooccurrence', 'glove-6b-50d' or a vector file"
        )
    return Sources(list_files, text_matrix, image_matrix if image_matrix.is_file() else None, emb)


def input_hashes(root: Path, s: dict, src: Sources) -> dict[str, str]:
    """Content hashes of everything the preparation reads (the cache key, with the parameters)."""
    files = [*src.list_files.values()] + [root / n for n in ("classes.txt", "dataset.json") if (root / n).is_file()]
    inputs = {"lists": hash_files(files)}
    if src.text_matrix is None:
        inputs["texts"] = hash_files([p for p in (root / "texts").rglob("*") if p.is_file()], root / "texts")
    else:
        inputs["texts"] = hash_files([src.text_matrix, root / "vocab.txt", root / "text_ids.txt"])
    if src.image_matrix is None:
        inputs["images"] = hash_files([p for p in (root / "images").rglob("*") if p.is_file()], root / "images")
        inputs["image_model_weights"] = get_image_model(s["image_model"]).weights()
    else:
        inputs["images"] = hash_files([src.image_matrix, root / "image_ids.txt"])
    if s["stopwords"]:
        inputs["stopwords"] = hash_files([root / s["stopwords"]])
    if src.embeddings not in (GLOVE_50D, "word2vec", "cooccurrence"):
        inputs["embeddings"] = hash_files([root / src.embeddings])
    return inputs


def labelled_items(root: Path, s: dict, src: Sources):
    """(class names, items per split, multi_label) with the settings' multi_label rule applied."""
    classes, items = resolve_labels(
        {k: read_items(f) for k, f in src.list_files.items()}, read_classes(root), src.list_files
    )
    multi = s["multi_label"]
    if multi is None:
        multi = any(len(it.labels) != 1 for its in items.values() for it in its)
    if not multi:
        bad = [(k, it.text_id) for k, its in items.items() for it in its if len(it.labels) != 1]
        if bad:
            raise ValueError(f"multi_label is false but {len(bad)} items have no or several labels, e.g. {bad[:3]}")
    return classes, items, bool(multi)


def image_features(root: Path, s: dict, src: Sources, items: list[Item], classes, cache: Path, progress):
    """(image id -> feature row, image id -> why it has none, image id -> conversion notes)."""
    if src.image_matrix is None:
        choices = _image_choices(root, items, classes)
        feats, problems = features_for_images(
            root / "images",
            list(choices.values()),
            cache,
            s["image_model"],
            s["batch_size"],
            progress=True,
            log=progress,
        )
        return feats, problems, {c.image_id: c.notes for c in choices.values() if c.notes}
    m = safe_np_load(src.image_matrix, "image feature matrix")
    if m.ndim != 2:
        raise ValueError(f"{src.image_matrix} must be a 2-D (images, features) matrix, got shape {m.shape}")
    rows = _read_ids(root / "image_ids.txt", m.shape[0], "image")
    feats = {iid: m[rows[iid]] for iid in {it.image_id for it in items} if iid in rows}
    return feats, {it.image_id: "not in image_ids.txt" for it in items if it.image_id not in rows}, {}


def text_problems(root: Path, src: Sources, items: list[Item]) -> dict[str, str]:
    """text id -> why it has no usable text."""
    if src.text_matrix is None:
        return {
            it.text_id: f"texts/{it.text_id}.txt is missing"
            for it in items
            if not (root / "texts" / f"{it.text_id}.txt").is_file()
        }
    _, text_rows, _ = load_text_matrix(root)
    return {it.text_id: "not in text_ids.txt" for it in items if it.text_id not in text_rows}


def check_missing(excluded: list[dict], kept: dict, on_missing: str) -> None:
    if excluded and on_missing == "error":
        listing = "; ".join(f"{x['split']} {x['text_id']}/{x['image_id']}: {x['reason']}" for x in excluded[:5])
        raise ValueError(
            f"{len(excluded)} items have no usable text or image ({listing}"
            f'{" ..." if len(excluded) > 5 else ""}); fix them, or set "on_missing": '
            f'"exclude" in dataset.json to leave them out (they are then listed in the report)'
        )
    for split in kept:
        if not kept[split]:
            raise ValueError(f"no usable item is left in the {split} split")


def vocabulary_and_counts(root: Path, s: dict, src: Sources, kept: dict, progress):
    """(vocabulary, word vectors, bag-of-words per split, tokenized texts per split or None) from the raw texts
    or the precomputed matrix (which has no word order, hence no token sequences)."""
    w2v, emb = dict(s["word2vec"]), src.embeddings
    if src.text_matrix is None:
        stop = read_stopwords(root / s["stopwords"]) if s["stopwords"] else None
        tok = tokenizer_for(s["language"], stop)
        toks = {k: [tok(read_text(root / "texts" / f"{it.text_id}.txt", "text")) for it in v] for k, v in kept.items()}
        if emb == "cooccurrence":
            vocab = build_vocabulary(toks["train"], s["vocab_size"])
            bows = {k: bag_of_words(toks[k], vocab) for k in kept}
            return vocab, cooccurrence_vectors(bows["train"], vocab, w2v.get("dim", 50)), bows, toks
        wv = embeddings_for(
            s["language"], emb if emb in (GLOVE_50D, "word2vec") else root / emb, toks["train"], progress, **w2v
        )
        vocab = build_vocabulary(toks["train"], s["vocab_size"], keep=wv.__contains__)
        return vocab, wv, {k: bag_of_words(toks[k], vocab) for k in kept}, toks
    tm, text_rows, all_words = load_text_matrix(root)
    mats = {k: tm[[text_rows[it.text_id] for it in v]] for k, v in kept.items()}
    if emb == "cooccurrence":
        wv = cooccurrence_vectors(mats["train"], all_words, w2v.get("dim", 50))
    else:
        wv = load_word_vectors(emb if emb == GLOVE_50D else root / emb)
    totals = np.asarray(mats["train"].sum(axis=0)).ravel()
    ranked = sorted(
        (i for i in range(len(all_words)) if totals[i] > 0 and all_words[i] in wv),
        key=lambda i: (-totals[i], all_words[i]),
    )[: s["vocab_size"]]
    if not ranked:
        raise ValueError(
            "the vocabulary is empty: no column of the text matrix occurs in the training "
            f"texts with a vector in {wv.name}"
        )
    return (
        [all_words[i] for i in ranked],
        wv,
        {k: sp.csr_matrix(m[:, ranked], dtype=np.float32) for k, m in mats.items()},
        None,
    )


def build(root: Path, s: dict, src: Sources, out_dir: Path, report: dict, progress=print) -> PreparedDataset:
    """The whole preparation of a custom folder (``prepare`` caches it); fills ``report``."""
    classes, items, multi = labelled_items(root, s, src)
    everything = items["train"] + items["test"]
    cache = out_dir.parent / f"{out_dir.name}.images-{s['image_model']}.npy"
    feats, image_problems, notes = image_features(root, s, src, everything, classes, cache, progress)
    missing_text = text_problems(root, src, everything)
    kept, excluded = partition(items, lambda it: image_problems.get(it.image_id) or missing_text.get(it.text_id))
    check_missing(excluded, kept, s["on_missing"])
    vocab, wv, bows, docs = vocabulary_and_counts(root, s, src, kept, progress)
    pixels = None
    if src.image_matrix is None:  # raw images: their pixels for the CNN-5 encoder too (scanet.data.pixels)
        px = pixels_for(root / "images", _image_choices(root, everything, classes).values(), progress=True)
        pixels = {k: stack_pixels(px, [it.image_id for it in v], f"{k}: ") for k, v in kept.items()}
    parts = {
        k: (
            [it.text_id for it in v],
            [it.image_id for it in v],
            bows[k],
            np.stack([feats[it.image_id] for it in v]),
            label_array(v, len(classes), multi),
        )
        for k, v in kept.items()
    }
    ds = assemble(s["name"], vocab, wv, classes, parts, s["knn"], s["lmax"], progress, docs=docs, pixels=pixels)
    report.update(
        {
            **counts(items, kept),
            "excluded": excluded,
            "image_notes": notes,
            "multi_label": multi,
            "text_source": src.text_source,
            "image_source": src.image_source,
            "word_vectors": wv.name,
            "vocab_size": len(vocab),
        }
    )
    return ds


def prepare(
    root: str | Path,
    out_dir: str | Path | None = None,
    *,
    vocab_size: int | None = None,
    knn: int | None = None,
    embeddings: str | None = None,
    lmax: str | float | None = None,
    language: str | None = None,
    progress=print,
) -> PreparedDataset:
    """Prepare a folder in the custom format (cached in ``out_dir``, default ``prepared/<name>``).

    Keyword arguments override dataset.json; dataset.json overrides the defaults of ``SETTINGS``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    s = read_settings(
        root, {"vocab_size": vocab_size, "knn": knn, "embeddings": embeddings, "lmax": lmax, "language": language}
    )
    src = find_sources(root, s)
    out_dir = Path(out_dir or Path("prepared") / s["name"])
    params = {
        "dataset": "custom",
        **{k: s[k] for k in ("name", "language", "vocab_size", "knn", "lmax", "multi_label", "on_missing", "word2vec")},
        "embeddings": src.embeddings,
        "text_source": src.text_source,
        "image_source": src.image_source,
        "tokenizer": tokenizer_version(s["language"]) if src.text_matrix is None else None,
        "image_model": s["image_model"] if src.image_matrix is None else None,
    }
    report: dict = {}
    ds = cached(
        out_dir, params, input_hashes(root, s, src), lambda: build(root, s, src, out_dir, report, progress), progress
    )
    if report:
        progress(
            f"kept train {report['kept']['train']} of {report['entries']['train']}, test "
            f"{report['kept']['test']} of {report['entries']['test']}; {len(report['excluded'])} excluded, "
            f"{len(report['image_notes'])} images needed a conversion"
        )
    write_report(out_dir, report, progress)
    return ds


__all__ = [
    "prepare",
    "read_settings",
    "read_items",
    "resolve_labels",
    "cooccurrence_vectors",
    "train_word2vec",
    "SETTINGS",
]
