"""The prepared format every dataset is turned into, and its on-disk cache with a manifest.

A prepared dataset is a folder:
    manifest.json   format version, dataset name, parameters, sha256 of every input, what was made
    arrays.npz      the Laplacian L~ (CSR), and per split: bag-of-words counts (CSR), image features, labels
    vocab.txt       one word per line, row order of the graph
    meta.json       class names, item ids, lmax

Preparation is cached: ``cached(out_dir, params, inputs, build)`` returns the saved dataset when the manifest's
parameters and input hashes match, and rebuilds (atomically) otherwise.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from scanet.data.text import text_features
from scanet.io import atomic_directory, hash_files, json_hash, sha256_file  # noqa: F401  (hash_files, sha256_file: public here)

FORMAT_VERSION = 1


@dataclass
class Split:
    text_ids: list[str]
    image_ids: list[str]
    bow: sp.csr_matrix                 # (n, V) float32 word counts
    images: np.ndarray                 # (n, D) float32 image features
    labels: np.ndarray                 # (n,) int64 class index, or (n, C) bool multi-hot

    def __post_init__(self):
        n = len(self.text_ids)
        for name, size in (("image_ids", len(self.image_ids)), ("bow", self.bow.shape[0]),
                           ("images", self.images.shape[0]), ("labels", self.labels.shape[0])):
            if size != n:
                raise ValueError(f"split has {n} text ids but {name} has {size} rows")
        if self.images.ndim != 2:
            raise ValueError(f"image features must be 2-D (n, D), got shape {self.images.shape}")
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
    laplacian: sp.csr_matrix           # (V, V) float32, rescaled: L~ = 2L/lmax - I
    lmax: float
    classes: list[str]
    train: Split
    test: Split
    manifest: dict = field(default_factory=dict)

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
        arrays = {"lap_indptr": self.laplacian.indptr, "lap_indices": self.laplacian.indices,
                  "lap_data": self.laplacian.data}
        for sname in ("train", "test"):
            s: Split = getattr(self, sname)
            arrays.update({f"{sname}_bow_indptr": s.bow.indptr, f"{sname}_bow_indices": s.bow.indices,
                           f"{sname}_bow_data": s.bow.data, f"{sname}_images": s.images,
                           f"{sname}_labels": s.labels})
        np.savez(out / "arrays.npz", **arrays)
        (out / "vocab.txt").write_text("\n".join(self.vocab) + "\n", encoding="utf-8")
        meta = {"name": self.name, "classes": self.classes, "lmax": self.lmax,
                "train_text_ids": self.train.text_ids, "train_image_ids": self.train.image_ids,
                "test_text_ids": self.test.text_ids, "test_image_ids": self.test.image_ids}
        (out / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
        (out / "manifest.json").write_text(json.dumps(self.manifest, indent=1), encoding="utf-8")

    @classmethod
    def load(cls, out_dir: str | Path) -> PreparedDataset:
        out = Path(out_dir)
        for f in ("manifest.json", "arrays.npz", "vocab.txt", "meta.json"):
            if not (out / f).is_file():
                raise FileNotFoundError(f"{out} is not a prepared dataset: {f} is missing "
                                        "(run `scanet prepare ...` first)")
        try:
            manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
            meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
            a = np.load(out / "arrays.npz")
            vocab = (out / "vocab.txt").read_text(encoding="utf-8").split("\n")[:-1]
            V = len(vocab)
            lap = sp.csr_matrix((a["lap_data"], a["lap_indices"], a["lap_indptr"]), shape=(V, V))
            splits = {}
            for sname in ("train", "test"):
                bow = sp.csr_matrix((a[f"{sname}_bow_data"], a[f"{sname}_bow_indices"], a[f"{sname}_bow_indptr"]),
                                    shape=(len(meta[f"{sname}_text_ids"]), V))
                splits[sname] = Split(meta[f"{sname}_text_ids"], meta[f"{sname}_image_ids"], bow,
                                      a[f"{sname}_images"], a[f"{sname}_labels"])
        except (KeyError, ValueError, OSError, json.JSONDecodeError) as e:
            raise ValueError(f"prepared dataset at {out} is corrupt ({type(e).__name__}: {e}); "
                             "delete the folder and prepare again") from e
        return cls(meta["name"], vocab, lap, float(meta["lmax"]), meta["classes"], splits["train"], splits["test"],
                   manifest)


# --------------------------------------------------------------------------------------------------- caching
def cached(out_dir: str | Path, params: dict, inputs: dict[str, str],
           build: Callable[[], PreparedDataset], progress: Callable[[str], None] = print) -> PreparedDataset:
    """Load the dataset at ``out_dir`` if its manifest has these params and input hashes; else build and save.

    ``inputs`` maps a name to a content hash (see scanet.io.hash_files). The folder is replaced atomically, so an
    interrupted preparation never leaves a half-written dataset behind.
    """
    out = Path(out_dir)
    want = {"format_version": FORMAT_VERSION, "params": params, "inputs": inputs}
    if (out / "manifest.json").is_file():
        try:
            have = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
            if all(have.get(k) == v for k, v in want.items()):
                return PreparedDataset.load(out)
            progress(f"prepared data at {out} is stale (inputs or parameters changed): rebuilding")
        except (ValueError, json.JSONDecodeError):
            progress(f"prepared data at {out} is unreadable: rebuilding")
    ds = build()
    fingerprint = json_hash(want)[:16]
    ds.manifest = dict(want, fingerprint=fingerprint, name=ds.name, vocab_size=ds.vocab_size,
                       image_dim=ds.image_dim, n_train=len(ds.train), n_test=len(ds.test),
                       laplacian_nnz=int(ds.laplacian.nnz), lmax=ds.lmax)
    with atomic_directory(out) as tmp:
        ds.save(tmp)
    return ds
