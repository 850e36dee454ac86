"""The prepared format every dataset is turned into, and its on-disk cache with a manifest.

A prepared dataset is a folder:
    manifest.json   format version, dataset name, parameters, sha256 of every input, what was made
    arrays.npz      the Laplacian L~ (CSR), and per split: bag-of-words counts (CSR), image features, labels
    vocab.txt       one word per line, row order of the graph
    meta.json       class names, item ids, lmax

Preparation is cached: ``cached(out_dir, params, inputs, build)`` returns the saved dataset when the manifest's
parameters and input hashes match, and rebuilds (atomically) otherwise. The manifest also records the sha256 of
each output file (``outputs``); ``load`` checks them, so a truncated, emptied or bit-flipped arrays.npz or a
deleted vocab.txt is never trusted: ``cached`` rebuilds it, ``load`` of a given folder refuses it.

A ``PreparedDataset`` checks itself when made (``__post_init__``): train and test image features of one width,
bag-of-words rows as wide as the vocabulary, a square Laplacian of that size, labels of one kind within the
classes. A dataset that cannot be trained on is refused at preparation, not an epoch later.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from scanet.data.text import text_features
from scanet.io import (  # noqa: F401
    atomic_directory,
    hash_files,
    json_hash,
    read_text,
    remove_leftovers,
    safe_np_load,  # (hash_files: public here)
    sha256_file,
)

FORMAT_VERSION = 1
OUTPUT_FILES = ("arrays.npz", "vocab.txt", "meta.json")  # hashed into the manifest's "outputs"


@dataclass
class Split:
    text_ids: list[str]
    image_ids: list[str]
    bow: sp.csr_matrix  # (n, V) float32 word counts
    images: np.ndarray  # (n, D) float32 image features
    labels: np.ndarray  # (n,) int64 class index, or (n, C) bool multi-hot

    def __post_init__(self):
        n = len(self.text_ids)
        for name, size in (
            ("image_ids", len(self.image_ids)),
            ("bow", self.bow.shape[0]),
            ("images", self.images.shape[0]),
            ("labels", self.labels.shape[0]),
        ):
            if size != n:
                raise ValueError(f"split has {n} text ids but {name} has {size} rows")
        if self.images.ndim != 2:
            raise ValueError(f"image features must be 2-D (n, D), got shape {self.images.shape}")
        if self.images.dtype.kind not in "biuf":
            raise ValueError(f"image features must be numbers, got dtype {self.images.dtype}")
        if self.labels.ndim not in (1, 2):
            raise ValueError(f"labels must be (n,) class indices or (n, C) multi-hot, got shape {self.labels.shape}")
        if not np.isfinite(self.images).all():
            bad = int((~np.isfinite(self.images)).any(axis=1).sum())
            raise ValueError(f"image features contain NaN or inf in {bad} rows")

    def __len__(self):
        return len(self.text_ids)

    def text_matrix(self) -> np.ndarray:
        """Dense model input for the texts (see scanet.data.text.text_features)."""
        return text_features(self.bow)


@dataclass
class PreparedDataset:
    name: str
    vocab: list[str]
    laplacian: sp.csr_matrix  # (V, V) float32, rescaled: L~ = 2L/lmax - I
    lmax: float
    classes: list[str]
    train: Split
    test: Split
    manifest: dict = field(default_factory=dict)

    def __post_init__(self):
        """What training and evaluation need of the two splits together (each Split checked itself)."""
        V = len(self.vocab)
        problems = []
        if self.train.images.shape[1] != self.test.images.shape[1]:
            problems.append(
                f"train image features are {self.train.images.shape[1]}-d but test image features are "
                f"{self.test.images.shape[1]}-d (one feature extractor for both splits)"
            )
        if tuple(self.laplacian.shape) != (V, V):
            problems.append(f"the Laplacian is {tuple(self.laplacian.shape)} for a vocabulary of {V} words")
        for sname in ("train", "test"):
            sp_ = getattr(self, sname)
            if sp_.bow.shape[1] != V:
                problems.append(f"{sname} bag-of-words has {sp_.bow.shape[1]} columns for {V} words")
            labels = sp_.labels
            if labels.ndim == 1 and len(labels) and (labels.min() < 0 or labels.max() >= len(self.classes)):
                problems.append(
                    f"{sname} labels lie in [{labels.min()}, {labels.max()}] but there are {len(self.classes)} classes"
                )
            if labels.ndim == 2 and labels.shape[1] != len(self.classes):
                problems.append(
                    f"{sname} multi-hot labels have {labels.shape[1]} columns for {len(self.classes)} classes"
                )
        if self.train.labels.ndim != self.test.labels.ndim:
            problems.append("train and test labels are of different kinds (class indices vs multi-hot)")
        if len(self.train) == 0 or len(self.test) == 0:
            problems.append(f"a split is empty ({len(self.train)} train, {len(self.test)} test items)")
        if not np.isfinite(self.lmax) or self.lmax <= 0:
            problems.append(f"lmax must be a finite positive number, got {self.lmax}")
        if problems:
            raise ValueError(f"dataset {self.name!r} cannot be trained on: " + "; ".join(problems))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def image_dim(self) -> int:
        return self.train.images.shape[1]

    @property
    def fingerprint(self) -> str:
        """Identifies the prepared data (its manifest), so checkpoints can refuse a mismatched dataset."""
        return self.manifest.get("fingerprint", "")

    def save(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        arrays = {
            "lap_indptr": self.laplacian.indptr,
            "lap_indices": self.laplacian.indices,
            "lap_data": self.laplacian.data,
        }
        for sname in ("train", "test"):
            s: Split = getattr(self, sname)
            arrays.update(
                {
                    f"{sname}_bow_indptr": s.bow.indptr,
                    f"{sname}_bow_indices": s.bow.indices,
                    f"{sname}_bow_data": s.bow.data,
                    f"{sname}_images": s.images,
                    f"{sname}_labels": s.labels,
                }
            )
        np.savez(out / "arrays.npz", **arrays)
        (out / "vocab.txt").write_text("\n".join(self.vocab) + "\n", encoding="utf-8")
        meta = {
            "name": self.name,
            "classes": self.classes,
            "lmax": self.lmax,
            "train_text_ids": self.train.text_ids,
            "train_image_ids": self.train.image_ids,
            "test_text_ids": self.test.text_ids,
            "test_image_ids": self.test.image_ids,
        }
        (out / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
        self.manifest = dict(self.manifest, outputs={f: sha256_file(out / f) for f in OUTPUT_FILES})
        (out / "manifest.json").write_text(json.dumps(self.manifest, indent=1), encoding="utf-8")  # last

    @classmethod
    def load(cls, out_dir: str | Path) -> PreparedDataset:
        """The dataset saved at ``out_dir``, each output file checked against the manifest's sha256 first.
        A missing file is a FileNotFoundError, a damaged one (or a manifest without hashes) a ValueError."""
        out = Path(out_dir)
        for f in ("manifest.json",) + OUTPUT_FILES:
            if not (out / f).is_file():
                raise FileNotFoundError(
                    f"{out} is not a complete prepared dataset: {f} is missing (`scanet prepare ...` rebuilds it)"
                )
        try:
            manifest = json.loads(read_text(out / "manifest.json", "prepared-data manifest"))
            recorded = manifest.get("outputs") if isinstance(manifest, dict) else None
            if not isinstance(recorded, dict) or set(recorded) != set(OUTPUT_FILES):
                raise ValueError("its manifest records no output hashes (written by an older version)")
            bad = [f for f in OUTPUT_FILES if sha256_file(out / f) != recorded[f]]
            if bad:
                raise ValueError(
                    f"{', '.join(bad)} differ from the sha256 recorded in manifest.json "
                    "(truncated, emptied or changed after preparation)"
                )
            meta = json.loads(read_text(out / "meta.json", "prepared-data meta"))
            a = safe_np_load(out / "arrays.npz", "prepared arrays")
            vocab = read_text(out / "vocab.txt", "vocabulary").split("\n")[:-1]
            V = len(vocab)
            lap = sp.csr_matrix((a["lap_data"], a["lap_indices"], a["lap_indptr"]), shape=(V, V))
            splits = {}
            for sname in ("train", "test"):
                bow = sp.csr_matrix(
                    (a[f"{sname}_bow_data"], a[f"{sname}_bow_indices"], a[f"{sname}_bow_indptr"]),
                    shape=(len(meta[f"{sname}_text_ids"]), V),
                )
                splits[sname] = Split(
                    meta[f"{sname}_text_ids"],
                    meta[f"{sname}_image_ids"],
                    bow,
                    a[f"{sname}_images"],
                    a[f"{sname}_labels"],
                )
            return cls(
                meta["name"],
                vocab,
                lap,
                float(meta["lmax"]),
                meta["classes"],
                splits["train"],
                splits["test"],
                manifest,
            )
        except (KeyError, TypeError, ValueError, OSError, json.JSONDecodeError) as e:
            raise ValueError(
                f"prepared dataset at {out} is corrupt: {e}; `scanet prepare` (or the training command) rebuilds it"
            ) from e


# --------------------------------------------------------------------------------------------------- caching
def cached(
    out_dir: str | Path,
    params: dict,
    inputs: dict[str, str],
    build: Callable[[], PreparedDataset],
    progress: Callable[[str], None] = print,
) -> PreparedDataset:
    """Load the dataset at ``out_dir`` if its manifest has these params and input hashes; else build and save.

    ``inputs`` maps a name to a content hash (see scanet.io.hash_files). The folder is replaced atomically, so an
    interrupted preparation never leaves a half-written dataset behind.
    """
    out = Path(out_dir)
    remove_leftovers(out.parent, progress)  # the temporary folders of a preparation that was killed
    want = {"format_version": FORMAT_VERSION, "params": params, "inputs": inputs}
    if (out / "manifest.json").is_file():
        try:
            have = json.loads(read_text(out / "manifest.json", "prepared-data manifest"))
            if all(have.get(k) == v for k, v in want.items()):
                return PreparedDataset.load(out)
            progress(f"prepared data at {out} is stale (inputs or parameters changed): rebuilding")
        except (ValueError, FileNotFoundError, json.JSONDecodeError, AttributeError) as e:
            progress(f"prepared data at {out} is unusable ({e}): rebuilding")
    ds = build()
    fingerprint = json_hash(want)[:16]
    ds.manifest = dict(
        want,
        fingerprint=fingerprint,
        name=ds.name,
        vocab_size=ds.vocab_size,
        image_dim=ds.image_dim,
        n_train=len(ds.train),
        n_test=len(ds.test),
        laplacian_nnz=int(ds.laplacian.nnz),
        lmax=ds.lmax,
    )
    with atomic_directory(out) as tmp:
        ds.save(tmp)
    return ds
