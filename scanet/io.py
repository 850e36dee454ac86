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
    safe_np_load(path, what)         np.load(allow_pickle=False) of a numeric .npy / .npz (every member read
                                     and CRC-checked); strings, objects, random bytes: a ValueError naming it
    read_text(path, what)            strict UTF-8 text; bad bytes are a ValueError naming the file, line, column
    remove_leftovers(folder)         the temporary files and folders of writers that died (kill -9)
    check_writable(folder)           create-and-remove a probe file: a read-only or full folder found up front

Temporary names carry the writer's pid (``last.pt.<pid>.<random>.tmp``, ``wiki.tmp-<pid>-<random>``), so a
later run can tell the leftovers of a dead writer from the file a live one is writing. A write that fails for
want of space (ENOSPC, or torch's ``enforce fail at inline_container.cc``) is an OSError naming the file and
saying "no space left on the device"; the old file is untouched and the temporary file removed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _write_failure(path: Path, e: BaseException) -> OSError | None:
    """The sentence for a write that failed for want of space or permission (None: not such a failure)."""
    text = str(e)
    try:
        free = shutil.disk_usage(path.parent).free
        free_text = f"; {free / 2**20:.1f} MiB free there"
    except OSError:
        free, free_text = None, ""
    # torch's writer reports a short write as "[enforce fail at inline_container.cc:...] ... unexpected pos"
    # or "file write failed", without errno: with (almost) nothing left free that is a full disk.
    torch_writer = "inline_container" in text or "PytorchStreamWriter" in text
    nospace = (
        (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT))
        or "No space left" in text
        or (torch_writer and free is not None and free < 64 * 2**20)
    )
    if torch_writer and not nospace:
        return OSError(errno.EIO, f"cannot write {path}: torch's writer failed ({text.strip()[:200]})")
    if nospace:
        return OSError(
            errno.ENOSPC,
            f"cannot write {path}: no space left on the device{free_text} (the previous file, if any, is untouched)",
        )
    if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return OSError(
            e.errno,
            f"cannot write {path}: {'read-only file system' if e.errno == errno.EROFS else 'permission denied'}",
        )
    return None


def atomic_write(path: str | Path, write: Callable) -> None:
    """Call ``write(fh)`` on a binary temporary file in ``path``'s folder, fsync, then rename it over ``path``:
    readers see the old file or the new one, never half of one."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise (_write_failure(path, e) or e) from e
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; the file gets the mode open() would give
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        failure = _write_failure(path, e) if isinstance(e, Exception) else None
        if failure is not None:
            raise failure from e
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
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-{os.getpid()}-", dir=out.parent))
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


# ------------------------------------------------------------------------------------------- leftovers
_TMP_FILE = re.compile(r"^(?P<name>.+)\.(?P<pid>\d+)\.[^.]+\.tmp$")  # atomic_write's names
_OLD_TMP_FILE = re.compile(r"^(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")  # before names carried the pid
_TMP_DIR = re.compile(r"^(?P<name>.+)\.tmp-(?P<pid>\d+)-[^-]+$")  # atomic_directory's


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (signal 0: no signal is sent)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_leftovers(folder: str | Path, log: Callable[[str], None] | None = None, locked: bool = False) -> list[Path]:
    """Remove the temporary files / folders of atomic_write / atomic_directory in ``folder`` whose writer is no
    longer running (its pid is in the name); returns what was removed. A live writer's file is left alone.
    ``locked``: the caller holds the folder's lock (a run folder), so the pid-less temporary files of older
    versions are leftovers too."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m: Any = (_TMP_FILE if p.is_file() else _TMP_DIR).match(p.name)  # a match, or the dict below
        if m is None and locked and p.is_file() and _OLD_TMP_FILE.match(p.name):
            m = {"pid": "0"}  # an old-style name in a folder we own
        if m is None or int(m["pid"]) == os.getpid() or pid_alive(int(m["pid"])):
            continue
        size = p.stat().st_size if p.is_file() else 0
        if p.is_file():
            p.unlink()
        else:
            shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
        if log is not None:
            who = f"process {m['pid']}, which is gone" if m["pid"] != "0" else "an interrupted write"
            log(f"removed {p} (left by {who}{f'; {size / 2**20:.1f} MiB' if size else ''})")
    return removed


def check_writable(folder: str | Path, what: str = "output folder") -> Path:
    """Create ``folder`` if needed and write-and-remove a small probe file there, so that a read-only or full
    folder is an error now, not after an epoch of training."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".write-probe.{os.getpid()}.", suffix=".tmp", dir=folder)
        try:
            os.write(fd, b"x" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        reason = {
            errno.EROFS: "it is on a read-only file system",
            errno.EACCES: "permission denied",
            errno.EPERM: "permission denied",
            errno.ENOSPC: "no space left on the device",
            errno.EDQUOT: "disk quota exceeded",
        }.get(e.errno or 0, e.strerror or str(e))
        raise OSError(e.errno, f"the {what} {folder} is not writable: {reason}") from e
    return folder


# ----------------------------------------------------------------------------------------------- reading
def read_text(path: str | Path, what: str = "text file", encoding: str = "utf-8-sig") -> str:
    """The file's text, decoded strictly (a UTF-8 byte-order mark is dropped); bytes that are not UTF-8 are a
    ValueError naming the file, the line and column, and the byte."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise ValueError(
            f"{path} ({what}) is not UTF-8 text: byte 0x{raw[e.start]:02x} at line {line}, column "
            f"{col} cannot be decoded; save the file as UTF-8"
        ) from None


def _check_numeric(path: Path, name: str, a, what: str):
    import numpy as np

    if not isinstance(a, np.ndarray):
        raise ValueError(f"{path} ({what}): {name} is a {type(a).__name__}, not an array")
    if a.dtype.kind not in "biuf":
        kind = {
            "U": "strings",
            "S": "byte strings",
            "O": "Python objects",
            "V": "records",
            "c": "complex numbers",
            "M": "dates",
            "m": "time deltas",
        }.get(a.dtype.kind, a.dtype.kind)
        raise ValueError(f"{path} ({what}): {name} holds {kind} (dtype {a.dtype}); numbers are expected")
    return a


def safe_np_load(path: str | Path, what: str = "numeric array file", mmap_mode=None):
    """np.load(allow_pickle=False): a numeric ndarray for .npy, a dict of numeric arrays for .npz (each member
    read now, so a truncated or bit-flipped member fails here, CRC-checked, not later). Anything else (random
    bytes, strings, a pickled object array, an empty or truncated file) is a ValueError naming ``path``."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    with path.open("rb") as fh:
        magic = fh.read(6)
    if magic != b"\x93NUMPY" and magic[:2] != b"PK":
        raise ValueError(
            f"{path} ({what}) is not a NumPy .npy/.npz file "
            f"({'empty' if not magic else 'no NumPy header'}); save the matrix with numpy.save"
        )
    try:
        loaded = np.load(path, allow_pickle=False, mmap_mode=mmap_mode)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                return {k: _check_numeric(path, k, loaded[k], what) for k in loaded.files}
        return _check_numeric(path, "the array", loaded, what)
    except ValueError as e:
        if str(e).startswith(str(path)):
            raise
        if "allow_pickle" in str(e):
            raise ValueError(
                f"{path} ({what}) cannot be read: it holds Python objects (a pickle), which are "
                "never loaded; save a numeric array"
            ) from None
        raise ValueError(f"{path} ({what}) is truncated or damaged ({e})") from None
    except Exception as e:  # noqa: BLE001 - BadZipFile, EOFError, zlib.error, OSError: a truncated or damaged file
        raise ValueError(f"{path} ({what}) is truncated or damaged ({type(e).__name__}: {e})") from None


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
