"""Eng-Wiki's labelled .mat releases, for a Wiki folder without the list files.

    ROOT/wikiData.mat (or another single .mat with these keys)
        I_tr (2173 x D), I_te (693 x D)   image features (128-d SIFT BoVW in the common release)
        T_tr (2173 x d), T_te (693 x d)   text features (10-d LDA topic proportions in the common release)
        L_tr, L_te                        labels: one-hot (n x 10), or the variant with a label column
                                          (n x 1 or 1 x n class numbers, 1-based as in MATLAB; 0-based when
                                          the smallest over both splits is 0)

Without the list files the raw texts cannot be matched to the rows, so the text side is the text features
themselves: each of the d text dimensions is a graph vertex (named topic1..topicd), its "word vector" the column
of T_tr (how strongly each training text expresses it), and the graph the kNN graph of those columns. With 10 LDA
topics that is a 10-vertex graph: the model's graph path degenerates to a small feature graph, not the paper's
10,055-word graph, which needs texts/ and the list files (scanet.data.wiki).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from scanet.data.graph import word_graph
from scanet.data.prepared import PreparedDataset, Split, cached, hash_files
from scanet.io import read_text

KEYS = ("I_tr", "I_te", "T_tr", "T_te", "L_tr", "L_te")
DEFAULT_NAME = "wikiData.mat"
WIKI_CLASSES = ("art", "biology", "geography", "history", "literature", "media", "music", "royalty", "sport", "warfare")


def _variables(path: Path) -> set[str]:
    import scipy.io

    try:
        return {name for name, _, _ in scipy.io.whosmat(path)}
    except Exception:  # noqa: BLE001 - scipy raises many types for a file that is not MATLAB v5: not a candidate
        return set()


def find_labelled_mat(root: Path) -> Path | None:
    """wikiData.mat, else the one .mat in ROOT holding all of KEYS (None when there is none)."""
    root = Path(root)
    if (root / DEFAULT_NAME).is_file():
        return root / DEFAULT_NAME
    hits = [p for p in sorted(root.glob("*.mat")) if set(KEYS) <= _variables(p)]
    if len(hits) > 1:
        raise ValueError(f"{root}: several .mat files hold {', '.join(KEYS)}: {[p.name for p in hits]}; keep one")
    return hits[0] if hits else None


def read_labels(a: np.ndarray, n: int, key: str, path: Path) -> tuple[np.ndarray, bool]:
    """(class numbers, is_column): argmax of a one-hot matrix (0-based), or the values of a label column as given
    (their base is decided over both splits, see read_mat)."""
    a = np.asarray(a.toarray() if hasattr(a, "toarray") else a, dtype=np.float64)
    if a.ndim == 2 and 1 in a.shape and a.size == n:
        v = a.ravel()
        if (v != np.round(v)).any() or (v < 0).any():
            raise ValueError(f"{path}: {key} must hold non-negative whole class numbers")
        return v.astype(np.int64), True
    if a.ndim == 2 and a.shape[0] == n:
        bad_rows = ~np.isin(a, (0, 1)).all(axis=1) | (a.sum(axis=1) != 1)
        if bad_rows.any():
            raise ValueError(
                f"{path}: {key} row {int(np.flatnonzero(bad_rows)[0]) + 1} is not one-hot (one 1 per row, the rest 0)"
            )
        return a.argmax(axis=1).astype(np.int64), False
    raise ValueError(f"{path}: {key} has shape {a.shape}; expected {n} x C one-hot or a column of {n} labels")


def read_mat(path: Path) -> dict[str, np.ndarray]:
    import scipy.io

    try:
        mat = scipy.io.loadmat(path)
    except NotImplementedError:
        raise ValueError(f"{path} is a MATLAB v7.3 (HDF5) file, which is not read here; save it as v7") from None
    except Exception as e:  # scipy raises several types for a broken file
        raise ValueError(f"cannot read {path}: {e}") from e
    missing = [k for k in KEYS if k not in mat]
    if missing:
        raise ValueError(f"{path} lacks {missing} (has {sorted(k for k in mat if not k.startswith('__'))})")
    out, columns = {}, {}
    for split in ("tr", "te"):
        img, txt = (np.asarray(mat[f"{m}_{split}"], dtype=np.float32) for m in ("I", "T"))
        if img.ndim != 2 or txt.ndim != 2 or txt.shape[0] != img.shape[0]:
            raise ValueError(
                f"{path}: I_{split} {img.shape} and T_{split} {txt.shape} must be 2-D with one row per item"
            )
        for k, a in ((f"I_{split}", img), (f"T_{split}", txt)):
            if not np.isfinite(a).all():
                raise ValueError(f"{path}: {k} contains NaN or inf")
        if (txt < 0).any():
            raise ValueError(f"{path}: T_{split} must be non-negative (word counts, tf-idf or topic proportions)")
        out[f"I_{split}"], out[f"T_{split}"] = img, txt
        out[f"L_{split}"], columns[split] = read_labels(mat[f"L_{split}"], img.shape[0], f"L_{split}", path)
    if columns["tr"] != columns["te"]:
        raise ValueError(f"{path}: L_tr and L_te must both be one-hot or both label columns")
    if columns["tr"] and min(out["L_tr"].min(), out["L_te"].min()) >= 1:  # MATLAB's 1-based class numbers
        out["L_tr"], out["L_te"] = out["L_tr"] - 1, out["L_te"] - 1
    if out["I_tr"].shape[1] != out["I_te"].shape[1] or out["T_tr"].shape[1] != out["T_te"].shape[1]:
        raise ValueError(f"{path}: train and test features differ in dimension")
    return out


def prepare(
    root: str | Path,
    out_dir: str | Path | None = None,
    *,
    mat_file: str | Path | None = None,
    knn: int = 8,
    lmax: str | float = "exact",
    progress=print,
    **ignored,
) -> PreparedDataset:
    """Prepare Eng-Wiki from its labelled .mat (cached in ``out_dir``, default ``prepared/wiki``).

    Options of the list layout that have no meaning here (vocab_size, embeddings, image_features) are ignored
    with a message.
    """
    root = Path(root)
    path = Path(mat_file) if mat_file else find_labelled_mat(root)
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"{root}: no list files (trainset_txt_img_cat.list) and no labelled .mat "
            f"({DEFAULT_NAME} or a .mat with {', '.join(KEYS)})"
        )
    given = {k: v for k, v in ignored.items() if v is not None}
    if given:
        progress(f"note: {path.name} carries its own text and image features; ignoring {sorted(given)}")
    out_dir = Path(out_dir or Path("prepared") / "wiki")
    params = {"dataset": "wiki", "source": "labelled-mat", "knn": knn, "lmax": lmax, "text_graph": "feature-columns-v1"}
    inputs = {"mat": hash_files([path])}
    if (root / "categories.list").is_file():
        inputs["categories"] = hash_files([root / "categories.list"])
    report: dict = {}

    def build() -> PreparedDataset:
        m = read_mat(path)
        d = m["T_tr"].shape[1]
        vocab = [f"topic{j + 1}" for j in range(d)]
        # A text dimension's "embedding": its values over the training texts (centred, so that cosine measures
        # whether two dimensions rise and fall together rather than both being positive).
        profiles = (m["T_tr"] - m["T_tr"].mean(axis=0)).T
        lap, lm = word_graph(profiles, knn, lmax)
        n_classes = int(max(m["L_tr"].max(), m["L_te"].max())) + 1
        classes = _class_names(root, n_classes)

        def split(s):
            ids = [f"{s}{i + 1}" for i in range(m[f"I_{s}"].shape[0])]
            return Split(ids, ids, sp.csr_matrix(m[f"T_{s}"]), m[f"I_{s}"], m[f"L_{s}"])

        report.update(
            {
                "source": str(path),
                "n_train": int(len(m["L_tr"])),
                "n_test": int(len(m["L_te"])),
                "text_dim": d,
                "image_dim": int(m["I_tr"].shape[1]),
                "text_graph": f"kNN (k={min(knn, d - 1)}) of the {d} text-feature columns over the training texts",
                "classes": classes,
            }
        )
        return PreparedDataset("wiki", vocab, lap, lm, classes, split("tr"), split("te"))

    ds = cached(out_dir, params, inputs, build, progress)
    if report:
        (out_dir / "preparation_report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
        progress(
            f"Wiki from {path.name}: {report['n_train']} train / {report['n_test']} test, text features of "
            f"{report['text_dim']} dimensions as graph vertices (no list files, so no word graph)"
        )
    return ds


def _class_names(root: Path, n: int) -> list[str]:
    f = root / "categories.list"
    names = read_text(f, "category list").split() if f.is_file() else []
    if len(names) == n:
        return names
    return list(WIKI_CLASSES) if n == len(WIKI_CLASSES) else [str(i + 1) for i in range(n)]
