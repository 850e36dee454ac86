"""The prepared format every dataset is turned into, and its on-disk cache with a manifest.

A prepared dataset is a folder:
    manifest.json   format version, dataset name, parameters, sha256 of every input, what was made
    arrays.npz      the Laplacian L~ (CSR), and per split: bag-of-words counts (CSR), image features, labels;
                    since format 2, where the dataset has them: per split the token-id sequences
                    (``{split}_tok_indptr``/``_tok_ids``, scanet.data.tokens) and raw pixels (``{split}_pixels``,
                    (n, 3, S, S) uint8), and the vocabulary's word vectors (``word_vectors``, (V, d) float32)
    vocab.txt       one word per line, row order of the graph
    meta.json       class names, item ids, lmax

Preparation is cached: ``cached(out_dir, params, inputs, build)`` returns the saved dataset when the manifest's
parameters and input hashes match, and rebuilds (atomically) otherwise. The manifest also records the sha256 of
each output file (``outputs``); ``load`` checks them, so a truncated, emptied or bit-flipped arrays.npz or a
deleted vocab.txt is never trusted: ``cached`` rebuilds it, ``load`` of a given folder refuses it.

A ``PreparedDataset`` checks itself when made (``__post_init__``): train and test image features of one width,
bag-of-words rows as wide as the vocabulary, a square Laplacian of that size, labels of one kind within the
classes. A dataset that cannot be trained on is refused at preparation, not an epoch later.

Format 2 adds what Table 3's encoders read (scanet.encoders): token sequences plus word vectors for the LSTM/CNN
text encoders, pixels for CNN-5. Both are optional (the .mat LDA release has no token order, most datasets no
raw images); ``require_inputs(model_config)`` names the dataset and what is missing when an encoder asks for them.
Eng-Wiki's tokens take 2.6 MB (int32), its 10,055 x 50 GloVe rows 2 MB; WebNews' 2,193 images at 64 x 64: 27 MB.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from scanet.data.text import text_features
from scanet.data.tokens import TokenSequences
from scanet.io import (  # noqa: F401
    atomic_directory,
    hash_files,
    json_hash,
    read_text,
    remove_leftovers,
    safe_np_load,  # (hash_files: public here)
    sha256_file,
)

FORMAT_VERSION = 2  # 2: token sequences, word vectors, pixels (`cached` rebuilds v1 caches; `load` still reads v1)
OUTPUT_FILES = ("arrays.npz", "vocab.txt", "meta.json")  # hashed into the manifest's "outputs"


class _OtherFormat(ValueError):
    """A folder of a newer prepared-format version: not corrupt, only unknown here (its own message)."""


@dataclass
class Split:
    text_ids: list[str]
    image_ids: list[str]
    bow: sp.csr_matrix  # (n, V) float32 word counts
    images: np.ndarray  # (n, D) float32 image features
    labels: np.ndarray  # (n,) int64 class index, or (n, C) bool multi-hot
    tokens: TokenSequences | None = None  # the texts' vocabulary ids in order (LSTM/CNN text encoders)
    pixels: np.ndarray | None = None  # (n, 3, S, S) uint8 RGB of the raw images (CNN-5)

    def __post_init__(self):
        n = len(self.text_ids)
        if self.tokens is not None and len(self.tokens) != n:
            raise ValueError(f"split has {n} text ids but {len(self.tokens)} token sequences")
        if self.pixels is not None:
            px = self.pixels = np.asarray(self.pixels)
            if px.dtype != np.uint8 or px.ndim != 4 or px.shape[0] != n or px.shape[1] != 3:
                raise ValueError(
                    f"pixels must be ({n}, 3, S, S) uint8 (one RGB image per item), got {px.shape} {px.dtype}"
                )
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

    def subset(self, index) -> Split:
        """The rows ``index`` (any order) as a new Split, tokens and pixels included."""
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        return Split(
            [self.text_ids[i] for i in index],
            [self.image_ids[i] for i in index],
            self.bow[index],
            self.images[index],
            self.labels[index],
            None if self.tokens is None else self.tokens.subset(index),
            None if self.pixels is None else self.pixels[index],
        )

    @classmethod
    def concatenate(cls, a: Split, b: Split) -> Split:
        """``a``'s items then ``b``'s (e.g. train + test for a search index); tokens and pixels are kept where
        both have them."""
        both_tok = a.tokens is not None and b.tokens is not None
        both_px = a.pixels is not None and b.pixels is not None and a.pixels.shape[1:] == b.pixels.shape[1:]
        return cls(
            a.text_ids + b.text_ids,
            a.image_ids + b.image_ids,
            sp.vstack([a.bow, b.bow]).tocsr(),
            np.concatenate([a.images, b.images]),
            np.concatenate([a.labels, b.labels]),
            TokenSequences.concatenate([a.tokens, b.tokens]) if both_tok else None,  # type: ignore[list-item]
            np.concatenate([a.pixels, b.pixels]) if both_px else None,
        )


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
    word_vectors: np.ndarray | None = None  # (V, d) float32, row i = vocab[i] (the LSTM/CNN embeddings' start)

    def __post_init__(self):
        """What training and evaluation need of the two splits together (each Split checked itself)."""
        V = len(self.vocab)
        problems = []
        if self.word_vectors is not None:
            wv = self.word_vectors = np.asarray(self.word_vectors, dtype=np.float32)
            if wv.ndim != 2 or wv.shape[0] != V:
                problems.append(f"word vectors are {wv.shape} for a vocabulary of {V} words (want (V, d))")
            elif not np.isfinite(wv).all():
                problems.append("word vectors contain NaN or inf")
        has_tok = [s.tokens is not None for s in (self.train, self.test)]
        if any(has_tok) and not all(has_tok):
            problems.append("only one split has token sequences (both or neither)")
        if all(has_tok):
            if self.word_vectors is None:
                problems.append("token sequences without word vectors (the LSTM/CNN encoders start from them)")
            sizes = {s.tokens.vocab_size for s in (self.train, self.test) if s.tokens is not None}
            if sizes != {V}:
                problems.append(f"token sequences are over {sorted(sizes)} words, the vocabulary has {V}")
        has_px = [s.pixels is not None for s in (self.train, self.test)]
        if any(has_px) and not all(has_px):
            problems.append("only one split has pixels (both or neither)")
        if all(has_px) and self.train.pixels.shape[1:] != self.test.pixels.shape[1:]:  # type: ignore[union-attr]
            problems.append(
                f"train pixels are {self.train.pixels.shape[1:]} but test pixels {self.test.pixels.shape[1:]}"  # type: ignore[union-attr]
            )
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
    def has_tokens(self) -> bool:
        return self.train.tokens is not None and self.test.tokens is not None

    @property
    def has_pixels(self) -> bool:
        return self.train.pixels is not None and self.test.pixels is not None

    def require_inputs(self, model_config) -> None:
        """ValueError naming this dataset when the configured encoders need inputs it lacks (scanet.inputs)."""
        te, ie = model_config.text_encoder, model_config.image_encoder
        version = self.manifest.get("format_version", FORMAT_VERSION) if self.manifest else FORMAT_VERSION
        old = (
            f"; it was prepared in format {version}, before token sequences, word vectors and pixels were kept: "
            "prepare it again (`scanet prepare ...`, or the training command with --root)"
            if isinstance(version, int) and version < 2
            else ""
        )
        if te not in ("gcn", "lstm", "cnn"):
            raise ValueError(f"unknown text_encoder {te!r}; choose gcn, lstm or cnn")
        if ie not in ("fixed", "cnn5"):
            raise ValueError(f"unknown image_encoder {ie!r}; choose fixed or cnn5")
        if te != "gcn" and not self.has_tokens:
            raise ValueError(
                f"dataset {self.name!r} has no token sequences, so text_encoder={te!r} cannot run on it (its texts "
                f"come without word order{old}); use text_encoder=gcn"
            )
        if ie == "cnn5" and not self.has_pixels:
            raise ValueError(
                f"dataset {self.name!r} has no raw pixels, so image_encoder='cnn5' cannot run on it (only datasets "
                f"prepared from raw images carry them: WebNews, custom folders with images/{old}); use "
                "image_encoder=fixed"
            )

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
            if s.tokens is not None:
                arrays.update(s.tokens.to_arrays(sname))
            if s.pixels is not None:
                arrays[f"{sname}_pixels"] = s.pixels
        if self.word_vectors is not None:
            arrays["word_vectors"] = self.word_vectors
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
            version = manifest.get("format_version")
            if isinstance(version, int) and version > FORMAT_VERSION:
                raise _OtherFormat(
                    f"prepared dataset at {out} was written in prepared format {version}, newer than this version "
                    f"reads ({FORMAT_VERSION}); prepare it again with this version"
                )
            # Format 1 is format 2 without tokens, vectors and pixels: it loads (its fingerprint, hence the
            # checkpoints trained on it, unchanged); require_inputs names the format when an encoder needs more.
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
            files = set(a)
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
                    TokenSequences.from_arrays(a, sname, V) if f"{sname}_tok_ids" in files else None,
                    a[f"{sname}_pixels"] if f"{sname}_pixels" in files else None,
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
                a["word_vectors"] if "word_vectors" in files else None,
            )
        except _OtherFormat:
            raise
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
            why = (
                f"prepared format {have.get('format_version')}, this version writes {FORMAT_VERSION}"
                if have.get("format_version") != FORMAT_VERSION
                else "inputs or parameters changed"
            )
            progress(f"prepared data at {out} is stale ({why}): rebuilding")
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
