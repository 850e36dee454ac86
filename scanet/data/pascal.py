"""PASCAL VOC 2007 with the tags of Hwang & Grauman (2010/2012), as their .mat files are released.

    ROOT/train.mat, ROOT/test.mat   MATLAB v5 files, each holding the struct arrays D1 and D2 (the split stored in
                                    two halves, used as [D1 D2]), one element per image, with the fields
                                        filename      char, the VOC image file name ('000005.jpg')
                                        objectcount   1x20, objects of each VOC class in the image
                                        taglist       1xk, the image's tags in the order people gave them: 1-based
                                                      indices into voc.mat (may be empty)
                                        gist          1x512 GIST descriptor
                                        color         colour histogram (HSV)
                                        bow           bag of visual words (SIFT)
    ROOT/voc.mat                    ``voc``, a 399x1 cell of the tag words ('person', 'tree', ..., 'sneaker')

The paper's split keeps single-object images (``single_object``): exactly one class with objectcount > 0 (19 of
the 20 counts zero, as the public loaders test), 2,808 train / 2,841 test images, 20 classes; the label is that
class. ``single_object=False`` keeps every image with any object, with multi-hot labels.

Text side: tag counts (a tag said twice counts twice) over the voc.mat words, on a kNN graph of their word vectors.
39 of the 399 tags are compounds without a GloVe vector ('pottedplant', 'tvmonitor'); they take the mean vector of
their parts (scanet.data.tag_words), so all 399 tags are graph vertices. Image side: ``image_features`` names the
fields concatenated, "gist" (512-d, default), "gist+color+bow", ...
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from scanet.data.embeddings import GLOVE_50D, load_word_vectors
from scanet.data.graph import word_graph
from scanet.data.prepared import PreparedDataset, Split, cached, hash_files
from scanet.data.tag_words import tag_word_vectors
from scanet.data.text import bag_of_words, build_vocabulary

VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
FIELDS = ("filename", "objectcount", "taglist", "gist", "color", "bow")
FEATURE_FIELDS = ("gist", "color", "bow")
REPORT_NAME = "preparation_report.json"


def _loadmat(path: Path, **kw) -> dict:
    import scipy.io

    if not path.is_file():
        raise FileNotFoundError(f"Pascal VOC (Hwang & Grauman) file missing: {path}")
    try:
        return scipy.io.loadmat(path, **kw)
    except NotImplementedError:
        raise ValueError(f"{path} is a MATLAB v7.3 (HDF5) file, which is not read here; save it as v7") from None
    except Exception as e:  # scipy raises several types for a broken file
        raise ValueError(f"cannot read {path}: {e}") from e


def read_vocabulary(path: Path) -> list[str]:
    """The tag words of voc.mat (``voc``, an n x 1 cell of strings)."""
    mat = _loadmat(Path(path))
    if "voc" not in mat:
        raise ValueError(f"{path} has no variable 'voc' (has {sorted(k for k in mat if not k.startswith('__'))})")
    cells = np.asarray(mat["voc"], dtype=object).ravel()
    words = []
    for i, c in enumerate(cells):
        a = np.asarray(c).ravel()
        if a.size != 1 or not isinstance(a[0], str) or not a[0].strip():
            raise ValueError(f"{path}: voc{{{i + 1}}} is not a non-empty string")
        words.append(a[0].strip())
    if len(set(words)) != len(words):
        raise ValueError(f"{path}: tag words repeat")
    return words


def _field(elem, name: str, where: str) -> np.ndarray:
    try:
        return np.asarray(elem[name])
    except (ValueError, KeyError, IndexError):
        raise ValueError(f"{where} has no field {name!r}") from None


def read_split(path: Path, n_words: int, features: tuple[str, ...]) -> dict:
    """Items of train.mat / test.mat: filenames, (n, 20) object counts, tag index lists, (n, D) features."""
    path = Path(path)
    mat = _loadmat(path)
    parts = [k for k in ("D1", "D2") if k in mat]
    if not parts:
        raise ValueError(
            f"{path} has no struct array D1 or D2 (has {sorted(k for k in mat if not k.startswith('__'))})"
        )
    out: dict[str, Any] = {"filenames": [], "objectcount": [], "taglists": [], "features": []}
    for key in parts:
        D = mat[key]
        if D.dtype.names is None:
            raise ValueError(f"{path}: {key} is not a struct array")
        missing = [
            f for f in FIELDS if f in ("filename", "objectcount", "taglist", *features) and f not in D.dtype.names
        ]
        if missing:
            raise ValueError(f"{path}: struct {key} lacks the fields {missing} (has {list(D.dtype.names)})")
        for i, elem in enumerate(D.ravel()):
            where = f"{path}: {key}({i + 1})"
            name = np.asarray(elem["filename"]).ravel()
            if name.size != 1 or not isinstance(name[0], str):
                raise ValueError(f"{where}.filename is not a string")
            oc = np.asarray(elem["objectcount"], dtype=np.float64).ravel()
            if oc.size != len(VOC_CLASSES) or (oc < 0).any() or not np.isfinite(oc).all():
                raise ValueError(f"{where}.objectcount must be 1x20 non-negative counts, got {oc.size} values")
            tl = np.asarray(elem["taglist"], dtype=np.float64).ravel()
            if tl.size and ((tl != np.round(tl)).any() or tl.min() < 1 or tl.max() > n_words):
                raise ValueError(
                    f"{where}.taglist must hold 1-based indices into the {n_words} voc.mat words, "
                    f"got values in [{tl.min():g}, {tl.max():g}]"
                )
            vec = []
            for f in features:
                v = np.asarray(elem[f], dtype=np.float64).ravel()
                if not np.isfinite(v).all():
                    raise ValueError(f"{where}.{f} contains NaN or inf")
                vec.append(v)
            out["filenames"].append(name[0].strip())
            out["objectcount"].append(oc)
            out["taglists"].append(tl.astype(np.int64) - 1)
            out["features"].append(np.concatenate(vec) if vec else np.zeros(0))
    dims = {len(v) for v in out["features"]}
    if len(dims) > 1:
        raise ValueError(f"{path}: the {'+'.join(features)} features differ in length between images: {sorted(dims)}")
    out["objectcount"] = np.stack(out["objectcount"])
    out["features"] = np.stack(out["features"]).astype(np.float32)
    return out


def prepare(
    root: str | Path,
    out_dir: str | Path | None = None,
    *,
    single_object: bool = True,
    image_features: str = "gist",
    vocab_size: int = 399,
    knn: int = 8,
    embeddings: str = GLOVE_50D,
    lmax: str | float = "exact",
    progress=print,
) -> PreparedDataset:
    """Prepare Pascal VOC 2007 with Hwang & Grauman's tags (cached in ``out_dir``, default ``prepared/pascal``)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Pascal VOC (Hwang & Grauman) data directory not found: {root}")
    features = tuple(f.strip() for f in str(image_features).split("+"))
    bad = [f for f in features if f not in FEATURE_FIELDS]
    if bad or not features:
        raise ValueError(f"image_features must name fields of {FEATURE_FIELDS} joined by '+', got {image_features!r}")
    files = [root / "train.mat", root / "test.mat", root / "voc.mat"]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{root} does not look like the Hwang & Grauman Pascal layout: {f.name} is missing")
    out_dir = Path(out_dir or Path("prepared") / "pascal")
    inputs = {"mat_files": hash_files(files)}
    if embeddings != GLOVE_50D:
        inputs["embeddings"] = hash_files([Path(embeddings)])
    params = {
        "dataset": "pascal",
        "single_object": single_object,
        "image_features": "+".join(features),
        "vocab_size": vocab_size,
        "knn": knn,
        "embeddings": str(embeddings),
        "lmax": lmax,
        "tag_vectors": "compound-mean-v1",
    }
    report: dict = {}

    def build() -> PreparedDataset:
        words = read_vocabulary(root / "voc.mat")
        wv, how = tag_word_vectors(words, load_word_vectors(embeddings))
        have = set(wv.words)
        progress(
            f"{len(wv.words)} of {len(words)} tags have a vector "
            f"({sum(h.startswith('mean') for h in how.values())} as the mean of their parts)"
        )
        splits, counts = {}, {}
        for sname in ("train", "test"):
            d = read_split(root / f"{sname}.mat", len(words), features)
            present = d["objectcount"] > 0
            keep = np.flatnonzero(present.sum(axis=1) == 1) if single_object else np.flatnonzero(present.any(axis=1))
            toks = [[words[j] for j in d["taglists"][i] if words[j] in have] for i in keep]
            labels = present[keep].argmax(axis=1).astype(np.int64) if single_object else present[keep]
            splits[sname] = (keep, toks, labels, d)
            counts[sname] = {
                "images": int(len(d["filenames"])),
                "kept": int(len(keep)),
                "without_tags": int(sum(not t for t in toks)),
            }
        vocab = build_vocabulary(splits["train"][1], vocab_size)
        progress(f"vocabulary: {len(vocab)} tags; building the {knn}-NN tag graph")
        lap, lm = word_graph(wv.lookup(vocab), knn, lmax)

        def split(sname):
            keep, toks, labels, d = splits[sname]
            ids = [d["filenames"][i] for i in keep]
            return Split(ids, ids, bag_of_words(toks, vocab), d["features"][keep], labels)

        ds = PreparedDataset("pascal", vocab, lap, lm, list(VOC_CLASSES), split("train"), split("test"))
        report.update(
            {
                "splits": counts,
                "vocab_size": len(vocab),
                "image_features": "+".join(features),
                "image_dim": ds.image_dim,
                "tag_vectors": {t: h for t, h in how.items() if h != "own vector"},
            }
        )
        return ds

    ds = cached(out_dir, params, inputs, build, progress)
    if report:
        (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=1), encoding="utf-8")
        c = report["splits"]
        progress(
            f"Pascal VOC: kept {c['train']['kept']} of {c['train']['images']} train and {c['test']['kept']} of "
            f"{c['test']['images']} test images; report: {out_dir / REPORT_NAME}"
        )
    return ds
