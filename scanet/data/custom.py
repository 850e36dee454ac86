"""A documented folder format for any image-text collection (docs/custom_format.md is the full description).

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

import numpy as np
import scipy.sparse as sp

from scanet.data.embeddings import GLOVE_50D, WordVectors, load_word_vectors
from scanet.data.graph import word_graph
from scanet.data.languages import LANGUAGES, embeddings_for, tokenizer_for, tokenizer_version, train_word2vec
from scanet.data.images import ImageChoice, index_images, resolve_image
from scanet.data.prepared import PreparedDataset, Split, cached, hash_files
from scanet.data.text import bag_of_words, build_vocabulary, read_stopwords
from scanet.features import features_for_images, get_image_model

REPORT_NAME = "preparation_report.json"
SETTINGS = {
    "name": None,               # dataset name (default: the folder's name)
    "language": "en",           # "en", "zh" or "whitespace" (see scanet.data.languages)
    "stopwords": None,          # a stop-word file relative to ROOT (one word a line)
    "embeddings": None,         # "glove-6b-50d", "word2vec", "cooccurrence" or a vector file (relative to ROOT)
    "vocab_size": 10_055,
    "knn": 8,
    "lmax": "exact",
    "multi_label": None,        # None: multi-label when any item has several labels
    "on_missing": "error",      # "error" or "exclude"
    "image_model": "efficientnet-lite0",
    "batch_size": 32,
    "word2vec": {},             # dim, epochs, min_count, window, seed (scanet.data.languages.train_word2vec)
}
_TEXT_MATRIX_NAMES = ("text_features.npz", "text_features.npy")


@dataclass
class Item:
    text_id: str
    image_id: str
    labels: list[int]           # 0-based class indices


# -------------------------------------------------------------------------------------------- settings
def read_settings(root: Path, overrides: dict) -> dict:
    s = {k: (dict(v) if isinstance(v, dict) else v) for k, v in SETTINGS.items()}
    f = root / "dataset.json"
    if f.is_file():
        try:
            given = json.loads(f.read_text(encoding="utf-8"))
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
    if s["language"] not in LANGUAGES:
        raise ValueError(f"language must be one of {LANGUAGES}, got {s['language']!r}")
    if s["on_missing"] not in ("error", "exclude"):
        raise ValueError(f"on_missing must be 'error' or 'exclude', got {s['on_missing']!r}")
    if not isinstance(s["word2vec"], dict):
        raise ValueError("word2vec settings must be an object, e.g. {\"dim\": 100, \"epochs\": 20}")
    return s


# ------------------------------------------------------------------------------------------------ lists
def read_classes(root: Path) -> list[str] | None:
    f = root / "classes.txt"
    if not f.is_file():
        return None
    names = [ln.strip() for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if len(set(names)) != len(names):
        raise ValueError(f"{f}: class names must be unique")
    bad = [n for n in names if "," in n]
    if bad:
        raise ValueError(f"{f}: class names cannot contain ',' (it separates labels): {bad[:3]}")
    return names


def read_items(path: Path) -> list[tuple[str, str, list[str], int]]:
    """(text_id, image_id, raw label strings, line number) of a list file."""
    if not path.is_file():
        raise FileNotFoundError(f"list file not found: {path}")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise ValueError(f"{path}:{n}: expected 'text_id<TAB>image_id<TAB>labels' (3 tab-separated fields), "
                             f"got {len(parts)}: {line!r}")
        tid, iid, lab = (p.strip() for p in parts)
        if n == 1 and (tid, iid) == ("text_id", "image_id"):
            continue                                                     # a header line
        if not tid or not iid:
            raise ValueError(f"{path}:{n}: empty text id or image id")
        rows.append((tid, iid, [x.strip() for x in lab.split(",") if x.strip()], n))
    if not rows:
        raise ValueError(f"list file {path} has no items")
    return rows


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
                    raise ValueError(f"{files[split]}:{n}: label {lab!r} is not a class of classes.txt "
                                     f"(and labels must be all numbers or all names)")
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


# ------------------------------------------------------------------------------------------- modalities
def _text_matrix_file(root: Path) -> Path | None:
    found = [root / n for n in _TEXT_MATRIX_NAMES if (root / n).is_file()]
    if len(found) > 1:
        raise ValueError(f"{root} has both {found[0].name} and {found[1].name}: keep one")
    return found[0] if found else None


def _read_ids(path: Path, n_rows: int, what: str) -> dict[str, int]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: it names the rows of the {what} matrix, one id a line")
    ids = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if len(ids) != n_rows:
        raise ValueError(f"{path} has {len(ids)} ids but the {what} matrix has {n_rows} rows")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: ids must be unique")
    return {x: i for i, x in enumerate(ids)}


def load_text_matrix(root: Path) -> tuple[sp.csr_matrix, dict[str, int], list[str]]:
    f = _text_matrix_file(root)
    try:
        m = sp.load_npz(f) if f.suffix == ".npz" else np.load(f)
    except Exception as e:  # numpy/scipy raise several types for a broken file
        raise ValueError(f"cannot read {f}: {e}") from e
    m = sp.csr_matrix(m, dtype=np.float32)
    if m.ndim != 2:
        raise ValueError(f"{f} must be a 2-D (texts, words) matrix")
    if m.nnz and (not np.isfinite(m.data).all() or (m.data < 0).any()):
        raise ValueError(f"{f} must hold finite non-negative counts or weights")
    vocab_file = root / "vocab.txt"
    if not vocab_file.is_file():
        raise FileNotFoundError(f"{vocab_file} is missing: it names the columns of {f.name}, one word a line")
    words = [ln.strip() for ln in vocab_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if len(words) != m.shape[1]:
        raise ValueError(f"{vocab_file} has {len(words)} words but {f.name} has {m.shape[1]} columns")
    if len(set(words)) != len(words):
        raise ValueError(f"{vocab_file}: words must be unique")
    return m, _read_ids(root / "text_ids.txt", m.shape[0], "text"), words


def cooccurrence_vectors(counts: sp.spmatrix, words: list[str], dim: int = 50, seed: int = 0) -> WordVectors:
    """Word vectors from the documents themselves when there are no texts to train word2vec on: rows of the
    positive PMI matrix of word co-occurrence in a document, reduced by SVD (Levy & Goldberg 2014)."""
    X = sp.csr_matrix(counts, dtype=np.float64)
    X.data[:] = 1.0
    C = (X.T @ X).tocsr()
    C.setdiag(0)
    C.eliminate_zeros()
    total = C.sum()
    if total == 0:
        raise ValueError("no two words ever occur in the same document: cannot build co-occurrence vectors")
    marg = np.asarray(C.sum(axis=1)).ravel()
    C = C.tocoo()
    pmi = np.log(C.data * total / (marg[C.row] * marg[C.col]))
    keep = pmi > 0
    P = sp.csr_matrix((pmi[keep], (C.row[keep], C.col[keep])), shape=C.shape)
    k = max(1, min(dim, P.shape[0] - 1))
    if P.shape[0] <= 2000:
        U, S, _ = np.linalg.svd(P.toarray())
        U, S = U[:, :k], S[:k]
    else:
        import scipy.sparse.linalg as spla

        U, S, _ = spla.svds(P, k=k, random_state=seed)
    vec = (U * np.sqrt(S)).astype(np.float32)
    vec *= np.sign(vec[np.abs(vec).argmax(axis=0), np.arange(vec.shape[1])])   # a deterministic sign per axis
    return WordVectors(list(words), vec, f"ppmi-svd(cooccurrence, dim={k})")


def _image_choices(root: Path, items: list[Item], classes: list[str]):
    images = root / "images"
    index = None
    choices = {}
    for it in items:
        if it.image_id in choices:
            continue
        direct = images / it.image_id
        if direct.is_file():
            choices[it.image_id] = ImageChoice(it.image_id, Path(it.image_id).as_posix())
            continue
        if index is None:
            index = index_images(images)
        preferred = classes[it.labels[0]] if it.labels else None
        choices[it.image_id] = resolve_image(index, it.image_id, images, preferred)
    return choices


# -------------------------------------------------------------------------------------------- prepare
def prepare(root: str | Path, out_dir: str | Path | None = None, *, vocab_size: int | None = None,
            knn: int | None = None, embeddings: str | None = None, lmax: str | float | None = None,
            language: str | None = None, progress=print) -> PreparedDataset:
    """Prepare a folder in the custom format (cached in ``out_dir``, default ``prepared/<name>``).

    Keyword arguments override dataset.json; dataset.json overrides the defaults of ``SETTINGS``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    s = read_settings(root, {"vocab_size": vocab_size, "knn": knn, "embeddings": embeddings, "lmax": lmax,
                             "language": language})
    list_files = {"train": root / "train.tsv", "test": root / "test.tsv"}
    for f in list_files.values():
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing (one 'text_id<TAB>image_id<TAB>labels' line per item; "
                                    "see docs/custom_format.md)")
    text_matrix = _text_matrix_file(root)
    if text_matrix is None and not (root / "texts").is_dir():
        raise FileNotFoundError(f"{root} has no texts/ folder and no {' or '.join(_TEXT_MATRIX_NAMES)}")
    image_matrix = root / "image_features.npy"
    if not image_matrix.is_file() and not (root / "images").is_dir():
        raise FileNotFoundError(f"{root} has no images/ folder and no image_features.npy")
    text_source = "matrix" if text_matrix is not None else "texts"
    image_source = "matrix" if image_matrix.is_file() else "images"
    emb = s["embeddings"] or ("cooccurrence" if text_source == "matrix" and s["language"] != "en" else
                              GLOVE_50D if s["language"] == "en" else "word2vec")
    if emb == GLOVE_50D and s["language"] not in ("en", "whitespace"):
        emb = "word2vec" if text_source == "texts" else "cooccurrence"
    if emb == "word2vec" and text_source == "matrix":
        raise ValueError("embeddings 'word2vec' needs raw texts (texts/); with a precomputed text matrix use "
                         "'cooccurrence', 'glove-6b-50d' or a vector file")
    out_dir = Path(out_dir or Path("prepared") / s["name"])

    files = [*list_files.values()] + [root / n for n in ("classes.txt", "dataset.json") if (root / n).is_file()]
    inputs = {"lists": hash_files(files)}
    if text_source == "texts":
        inputs["texts"] = hash_files([p for p in (root / "texts").rglob("*") if p.is_file()], root / "texts")
    else:
        inputs["texts"] = hash_files([text_matrix, root / "vocab.txt", root / "text_ids.txt"])
    if image_source == "images":
        inputs["images"] = hash_files([p for p in (root / "images").rglob("*") if p.is_file()], root / "images")
        inputs["image_model_weights"] = get_image_model(s["image_model"]).weights()
    else:
        inputs["images"] = hash_files([image_matrix, root / "image_ids.txt"])
    if s["stopwords"]:
        inputs["stopwords"] = hash_files([root / s["stopwords"]])
    if emb not in (GLOVE_50D, "word2vec", "cooccurrence"):
        inputs["embeddings"] = hash_files([root / emb])
    params = {"dataset": "custom", **{k: s[k] for k in ("name", "language", "vocab_size", "knn", "lmax",
                                                        "multi_label", "on_missing", "word2vec")},
              "embeddings": emb, "text_source": text_source, "image_source": image_source,
              "tokenizer": tokenizer_version(s["language"]) if text_source == "texts" else None,
              "image_model": s["image_model"] if image_source == "images" else None}
    report: dict = {}

    def build() -> PreparedDataset:
        classes, items = resolve_labels({k: read_items(f) for k, f in list_files.items()}, read_classes(root),
                                        list_files)
        multi = s["multi_label"]
        if multi is None:
            multi = any(len(it.labels) != 1 for its in items.values() for it in its)
        if not multi:
            bad = [(k, it.text_id) for k, its in items.items() for it in its if len(it.labels) != 1]
            if bad:
                raise ValueError(f"multi_label is false but {len(bad)} items have no or several labels, "
                                 f"e.g. {bad[:3]}")
        everything = items["train"] + items["test"]
        problems: dict[tuple[str, str], str] = {}            # (kind, id) -> reason
        notes: dict[str, list[str]] = {}

        # images
        if image_source == "images":
            choices = _image_choices(root, everything, classes)
            cache = out_dir.parent / f"{out_dir.name}.images-{s['image_model']}.npy"
            feats, img_problems = features_for_images(root / "images", list(choices.values()), cache,
                                                      s["image_model"], s["batch_size"], progress=True, log=progress)
            problems.update({("image", k): v for k, v in img_problems.items()})
            notes.update({c.image_id: c.notes for c in choices.values() if c.notes})
        else:
            m = np.load(image_matrix)
            if m.ndim != 2:
                raise ValueError(f"{image_matrix} must be a 2-D (images, features) matrix, got shape {m.shape}")
            rows = _read_ids(root / "image_ids.txt", m.shape[0], "image")
            feats = {iid: m[rows[iid]] for iid in {it.image_id for it in everything} if iid in rows}
            problems.update({("image", it.image_id): "not in image_ids.txt" for it in everything
                             if it.image_id not in rows})

        # texts
        if text_source == "texts":
            for it in everything:
                if not (root / "texts" / f"{it.text_id}.txt").is_file():
                    problems[("text", it.text_id)] = f"texts/{it.text_id}.txt is missing"
        else:
            tm, text_rows, all_words = load_text_matrix(root)
            for it in everything:
                if it.text_id not in text_rows:
                    problems[("text", it.text_id)] = "not in text_ids.txt"

        kept, excluded = {}, []
        for split, its in items.items():
            kept[split] = []
            for it in its:
                why = problems.get(("image", it.image_id)) or problems.get(("text", it.text_id))
                if why:
                    excluded.append({"split": split, "text_id": it.text_id, "image_id": it.image_id, "reason": why})
                else:
                    kept[split].append(it)
        if excluded and s["on_missing"] == "error":
            listing = "; ".join(f"{x['split']} {x['text_id']}/{x['image_id']}: {x['reason']}" for x in excluded[:5])
            raise ValueError(f"{len(excluded)} items have no usable text or image ({listing}"
                             f"{' ...' if len(excluded) > 5 else ''}); fix them, or set \"on_missing\": "
                             f"\"exclude\" in dataset.json to leave them out (they are then listed in the report)")
        for split in kept:
            if not kept[split]:
                raise ValueError(f"no usable item is left in the {split} split")

        # vocabulary, word vectors, bag-of-words
        w2v = dict(s["word2vec"])
        if text_source == "texts":
            stop = read_stopwords(root / s["stopwords"]) if s["stopwords"] else None
            tok = tokenizer_for(s["language"], stop)
            toks = {k: [tok((root / "texts" / f"{it.text_id}.txt").read_text(encoding="utf-8-sig"))
                        for it in v] for k, v in kept.items()}
            if emb == "cooccurrence":
                vocab = build_vocabulary(toks["train"], s["vocab_size"])
                bows = {k: bag_of_words(toks[k], vocab) for k in kept}
                wv = cooccurrence_vectors(bows["train"], vocab, w2v.get("dim", 50))
            else:
                wv = embeddings_for(s["language"], emb if emb in (GLOVE_50D, "word2vec") else root / emb,
                                    toks["train"], progress, **w2v)
                vocab = build_vocabulary(toks["train"], s["vocab_size"], keep=wv.__contains__)
                bows = {k: bag_of_words(toks[k], vocab) for k in kept}
        else:
            mats = {k: tm[[text_rows[it.text_id] for it in v]] for k, v in kept.items()}
            if emb == "cooccurrence":
                wv = cooccurrence_vectors(mats["train"], all_words, w2v.get("dim", 50))
            else:
                wv = load_word_vectors(emb if emb == GLOVE_50D else root / emb)
            totals = np.asarray(mats["train"].sum(axis=0)).ravel()
            ranked = sorted((i for i in range(len(all_words)) if totals[i] > 0 and all_words[i] in wv),
                            key=lambda i: (-totals[i], all_words[i]))[:s["vocab_size"]]
            if not ranked:
                raise ValueError("the vocabulary is empty: no column of the text matrix occurs in the training "
                                 f"texts with a vector in {wv.name}")
            vocab = [all_words[i] for i in ranked]
            bows = {k: sp.csr_matrix(m[:, ranked], dtype=np.float32) for k, m in mats.items()}
        progress(f"vocabulary: {len(vocab)} words with a vector in {wv.name}; building the {s['knn']}-NN word graph")
        lap, lm = word_graph(wv.lookup(vocab), s["knn"], s["lmax"])

        def split(k):
            its = kept[k]
            return Split([it.text_id for it in its], [it.image_id for it in its], bows[k],
                         np.ascontiguousarray(np.stack([feats[it.image_id] for it in its]), dtype=np.float32),
                         label_array(its, len(classes), multi))

        ds = PreparedDataset(s["name"], vocab, lap, lm, classes, split("train"), split("test"))
        report.update({"entries": {k: len(v) for k, v in items.items()}, "kept": {k: len(v) for k, v in kept.items()},
                       "excluded": excluded, "image_notes": notes, "multi_label": bool(multi),
                       "text_source": text_source, "image_source": image_source, "word_vectors": wv.name,
                       "vocab_size": len(vocab)})
        return ds

    ds = cached(out_dir, params, inputs, build, progress)
    if report:
        (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
        progress(f"kept train {report['kept']['train']} of {report['entries']['train']}, test "
                 f"{report['kept']['test']} of {report['entries']['test']}; {len(report['excluded'])} excluded, "
                 f"{len(report['image_notes'])} images needed a conversion; report: {out_dir / REPORT_NAME}")
    return ds


__all__ = ["prepare", "read_settings", "read_items", "resolve_labels", "cooccurrence_vectors", "train_word2vec",
           "SETTINGS"]
