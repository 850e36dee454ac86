"""Files: ONE atomic write, ONE content hash, ONE safe torch load. Used by checkpoints (scanet.checkpoint), the
search index (scanet.index), the image-feature cache (scanet.features.cache) and prepared data
(scanet.data.prepared).

    atomic_write(path, write)        write(fh) into a temporary file beside ``path``, fsync, rename over it
    atomic_torch_save(path, obj)     the same with torch.save
    atomic_directory(out)            build a folder in a temporary sibling, then swap it in (prepared data)
    sha256_file / hash_files         sha256 of one file's content / of (relative name, content) of many
    json_hash(obj)                   sha256 of a JSON object, keys sorted
    tensor_hash(state)               sha256 of named tensors: names, dtypes, shapes and bytes
    safe_torch_load(path, what)      torch.load(weights_only=True): tensors and plain containers only, never
                                     code; a truncated or foreign file is a ValueError naming ``path``
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path


def atomic_write(path: str | Path, write: Callable) -> None:
    """Call ``write(fh)`` on a binary temporary file in ``path``'s folder, fsync, then rename it over ``path``:
    readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(path: str | Path, obj) -> None:
    import torch

    atomic_write(path, lambda fh: torch.save(obj, fh))


@contextlib.contextmanager
def atomic_directory(out: str | Path):
    """Yield a temporary folder beside ``out``; when the block succeeds it replaces ``out`` (the old one is
    removed), when it fails it is removed and ``out`` is untouched."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(out.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ hashing
def _feed_file(h, path: Path) -> None:
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)


def sha256_file(path: str | Path) -> str:
    """sha256 of one file's content."""
    h = hashlib.sha256()
    _feed_file(h, Path(path))
    return h.hexdigest()


def hash_files(paths: Iterable[Path], root: Path | None = None) -> str:
    """sha256 over (relative name, content) of the files, in sorted order."""
    h = hashlib.sha256()
    for p in sorted(Path(p) for p in paths):
        h.update(str(p.relative_to(root) if root else p.name).encode())
        h.update(b"\0")
        _feed_file(h, p)
    return h.hexdigest()


def json_hash(obj) -> str:
    """sha256 (hex) of a JSON-serializable object, keys sorted (a prepared dataset's fingerprint)."""
    import json

    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def tensor_hash(tensors: dict) -> str:
    """sha256 (hex) of named tensors: names, dtypes, shapes and bytes, in sorted name order."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(tensors.items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- safe load
def _numpy_array_globals() -> list:
    """What unpickling a plain numeric numpy array needs (files written before labels were stored as tensors)."""
    import numpy as np

    out = [np.ndarray, np.dtype] + [type(np.dtype(t)) for t in (np.int64, np.int32, np.float32, np.float64, bool)]
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            out.append(__import__(mod, fromlist=["_reconstruct"])._reconstruct)
        except (ImportError, AttributeError):
            pass
    return out


def safe_torch_load(path: str | Path, what: str, map_location="cpu"):
    """torch.load with weights_only=True (tensors, numbers, strings, lists, dicts, numeric numpy arrays)."""
    import torch

    path = Path(path)
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for a truncated, foreign or code-carrying file
        raise ValueError(f"{path} is corrupt or not a {what} ({type(e).__name__}: {e})") from e
