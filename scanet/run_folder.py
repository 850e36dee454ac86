"""Who owns a run folder, and what ``scanet train --out DIR`` may do with the work already in it.

``claim(out, preset, fingerprint, resume=, force=)`` runs before any training, in this order:

1. **Writable**: the folder is created and a probe file written and removed (scanet.io.check_writable), so a
   read-only or full folder is an error now, not after an epoch.
2. **One process**: ``DIR/.lock`` is held with ``fcntl.flock`` for the life of the returned ``RunFolder`` and
   names its holder's pid. The kernel drops a flock when its process dies (kill -9 included), so a dead
   process never leaves the folder stuck: its lock file is found unheld, reported as stale and taken over.
   A second live process (or a second claim in this one) is refused, naming the holder.
3. **Leftovers**: temporary files of a write that was killed (``last.pt.<pid>.<random>.tmp``) are removed; with
   the lock held nothing else can be writing there.
4. **Saved work**: a folder that holds a run (last.pt, metrics.json, results.json, ...) is never overwritten
   silently. Without ``--resume`` it is refused (``--force`` replaces it: the old run's files are removed
   first, so a crash cannot mix the two runs). With ``--resume``: no checkpoint -> said, and a fresh run
   (refused when other run files are there, unless ``--force``);
   a checkpoint -> its configuration is compared key by key with this one: equal, or only ``train.epochs``
   larger than the epochs done (extending a finished run), resumes; any other difference is refused naming
   the keys, their saved and given values; other prepared data (fingerprint) is refused.

The decision is returned (``RunFolder.resume``: whether to load last.pt); scanet.train.train calls ``claim`` at
its start and holds the RunFolder until it returns. In distributed training (``RANK`` set) only rank 0 claims.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

from scanet.io import check_writable, pid_alive, remove_leftovers

LOCK_NAME = ".lock"
# What a training run writes into its folder (removed by --force before the new run starts).
RUN_FILES = (
    "last.pt",
    "best.pt",
    "metrics.json",
    "evaluation.json",
    "results.json",
    "training_curve.png",
    "pr_curves.png",
)


class RunFolder:
    """A claimed run folder: the lock is held until ``release()`` (or until the object is freed)."""

    def __init__(self, out: Path, fd: int | None, resume: bool):
        self.out, self._fd, self.resume = out, fd, resume

    def release(self) -> None:
        # The lock file stays (unlinking it would let a process that opened it just before hold a lock on a
        # file no one else sees); emptied, it names no holder.
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __del__(self):
        self.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _acquire_lock(out: Path, log: Callable[[str], None]) -> int | None:
    """Hold out/.lock (flock, non-blocking) and write our pid into it; refuse when a live process holds it."""
    import fcntl

    path = out / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holder = _lock_holder(path)
        raise ValueError(
            f"run folder {out} is in use by process {holder or '?'} (lock file {path}); wait for it "
            "to finish or choose another --out"
        ) from None
    except OSError:  # a file system without flock: fall back to the pid in the file
        holder = _lock_holder(path)
        if holder and holder != os.getpid() and pid_alive(holder):
            os.close(fd)
            raise ValueError(f"run folder {out} is in use by process {holder} (lock file {path})") from None
    holder = _lock_holder(path)
    if holder and holder != os.getpid():
        log(f"run folder {out}: stale lock of process {holder} (no longer running) taken over")
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    os.fsync(fd)
    return fd


def _lock_holder(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
    return out


def config_differences(saved: dict, preset) -> dict:
    """{key: (saved, given)} for every configuration key that differs (``train.epochs``, ``model.dropout``)."""
    a, b = _flat(saved), _flat(dataclasses.asdict(preset))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def resume_allowed(state: dict, preset, fingerprint: str, ckpt: Path) -> None:
    """Refuse (ValueError) to resume ``state`` with ``preset``: other data, fewer epochs than done, or any other
    configuration change (named). Only a larger ``epochs`` (extending the run) may differ."""
    if state.get("dataset_fingerprint") != fingerprint:
        raise ValueError(
            f"{ckpt} was trained on other prepared data ({state.get('dataset_fingerprint')}, now "
            f"{fingerprint}); resume needs the same data"
        )
    diff = config_differences(state["preset"], preset)
    epochs = diff.pop("train.epochs", None)
    if diff:
        listed = ", ".join(f"{k} (saved {s!r}, given {g!r})" for k, (s, g) in diff.items())
        raise ValueError(
            f"{ckpt} was trained with another configuration: {listed}. Resume with the saved "
            "configuration (only a larger epochs may change), or train into another --out"
        )
    if epochs is not None and epochs[1] < state["epoch"]:
        raise ValueError(f"{ckpt} has done {state['epoch']} epochs; epochs={epochs[1]} is fewer (nothing to resume)")


def claim(
    out: str | Path,
    preset,
    fingerprint: str,
    *,
    resume: bool = False,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> RunFolder:
    """Check, lock and decide about the run folder ``out`` (see the module docstring); returns the RunFolder."""
    from scanet.checkpoint import load_checkpoint

    out = Path(out)
    if int(os.environ.get("RANK", "0") or 0) != 0:
        # Distributed training: rank 0 owns the folder (checks, lock, leftovers, --force); the other ranks follow
        # the same rule for resuming without touching the folder.
        return RunFolder(out, None, resume=resume and (out / "last.pt").is_file())
    out = check_writable(out, "run folder")
    fd = _acquire_lock(out, log)
    folder = RunFolder(out, fd, resume=False)
    try:
        remove_leftovers(out, log, locked=True)
        ckpt = out / "last.pt"
        existing = [f for f in RUN_FILES if (out / f).exists()]
        if not resume:
            if existing and not force:
                raise ValueError(
                    f"run folder {out} already holds a run ({', '.join(existing)}); --resume "
                    "continues it, --force replaces it, or choose another --out"
                )
            if existing:
                log(f"--force: replacing the run in {out} (removing {', '.join(existing)})")
                for f in existing:
                    (out / f).unlink()
            return folder
        if not ckpt.is_file():
            if existing and not force:
                raise ValueError(
                    f"--resume: run folder {out} holds {', '.join(existing)} but no checkpoint "
                    f"({ckpt}) to resume from; --force replaces them with a fresh run"
                )
            for f in existing:
                (out / f).unlink()
            log(f"--resume: no checkpoint at {ckpt}; starting a fresh run")
            return folder
        state = load_checkpoint(ckpt)
        resume_allowed(state, preset, fingerprint, ckpt)
        done, want = state["epoch"], preset.train.epochs
        if want > state["preset"]["train"]["epochs"]:
            log(f"--resume: extending the run in {out} from {state['preset']['train']['epochs']} to {want} epochs")
        elif done >= want:
            log(f"--resume: the run in {out} has already done all {want} epochs; nothing to train")
        folder.resume = True
        return folder
    except BaseException:
        folder.release()
        raise
