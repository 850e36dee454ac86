"""Find, check and load the native library file (scanet/_native*.so) without trusting it first.

Decided from the file's bytes before loading: a library built against another torch has another C++ ABI and can
crash the process instead of raising, one built for a wider ISA would die on SIGILL, and one built from older
csrc/ (the .so is not in git, so a checkout can carry a stale one) lacks ops or arguments the Python side calls.
scanet.native owns the once-per-process load and the op wrappers; this file only answers "which file, and why not".
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

PKG_DIR = Path(__file__).resolve().parent
# Where setup.py records why the last build was skipped or failed (pip hides build output unless -v).
BUILD_STATUS_FILE = PKG_DIR.parent / "build" / "native" / "status.txt"
_MARKER = re.compile(rb"SCANET_NATIVE_BUILD\{torch=([^;]*);arch=([^}]*)\}")
# CPU flags each -march level of the build needs (Linux /proc/cpuinfo names).
_ARCH_FLAGS = {
    "x86-64-v3": {"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe"},
    "x86-64-v4": {
        "avx",
        "avx2",
        "fma",
        "bmi1",
        "bmi2",
        "f16c",
        "movbe",
        "avx512f",
        "avx512bw",
        "avx512cd",
        "avx512dq",
        "avx512vl",
    },
}


# ------------------------------------------------------------------------------------------------ loading
def _disabled() -> bool:
    return os.environ.get("SCANET_NO_NATIVE", "").strip().lower() in ("1", "true", "yes", "on")


def _read_build_info(path: Path) -> dict | None:
    try:
        m = _MARKER.search(path.read_bytes())
    except OSError:
        return None
    if m is None:
        return None
    return {"torch": m.group(1).decode(), "arch": m.group(2).decode().replace("-march=", "")}


def _cpu_flags() -> set[str] | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    m = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    return set(m.group(1).split()) if m else None


def _not_built_reason() -> str:
    msg = (
        "the native extension is not built (no scanet/_native*.so); build it with "
        "`pip install --no-build-isolation -e .` (needs cmake, a C++ compiler with OpenMP, and torch)"
    )
    try:
        status = BUILD_STATUS_FILE.read_text().strip()
    except OSError:
        status = ""
    return f"{msg}; last build: {status}" if status else msg


def _select_library(candidates, running_torch: str, cpu_flags: set[str] | None):
    """Pick the library built for this torch and CPU among ``candidates``: (path, info, reasons for the rest).

    Decided from the file's bytes BEFORE loading: a library built against another torch has another C++ ABI
    and can crash the process instead of raising, and one built for a wider ISA would die on SIGILL.
    """
    reasons = []
    for path in candidates:
        path = Path(path)
        info = _read_build_info(path)
        if info is None:
            reasons.append(f"{path.name} carries no build record (not built by this setup.py)")
            continue
        if info["torch"] != running_torch:
            reasons.append(
                f"{path.name} was built against torch {info['torch']} but torch {running_torch} is "
                "running; rebuild with `pip install --no-build-isolation -e .`"
            )
            continue
        need = _ARCH_FLAGS.get(info["arch"], set())
        if cpu_flags is not None and not need <= cpu_flags:
            reasons.append(
                f"{path.name} was built for {info['arch']} but this CPU lacks "
                f"{', '.join(sorted(need - cpu_flags))}; rebuild on this machine"
            )
            continue
        return path, info, reasons
    return None, None, reasons


def _load_from(pkg_dir: Path):
    """Find, check and load the library in ``pkg_dir``: (path, info) or (None, reason)."""
    if _disabled():
        return None, "disabled by the environment variable SCANET_NO_NATIVE"
    candidates = sorted(Path(pkg_dir).glob("_native*.so"))
    if not candidates:
        return None, _not_built_reason()
    path, info, reasons = _select_library(candidates, str(torch.__version__), _cpu_flags())
    if path is None:
        return None, "; ".join(reasons)
    try:
        torch.ops.load_library(str(path))
    except (OSError, ImportError, RuntimeError) as e:
        return None, f"loading {path.name} failed: {type(e).__name__}: {e}"
    return path, info


# What this Python side calls: a library built from older csrc/ (the .so is not in git, so a checkout can
# carry a stale one) lacks some of it; it is refused with a reason instead of failing at the first call.
_REQUIRED_SCHEMA = {
    "cheb_conv_forward": ("symmetric", "dropout_p", "seed", "out_dtype"),
    "cheb_conv_backward": ("dropout_p", "seed"),
    "dropout_keep_mask": (),
    "csrc_revision": (),
}
# What csrc_revision() must return: csrc/cheb_conv.cpp says when it is bumped (behaviour changed, schema not).
CSRC_REVISION = 2


def _stale_schema() -> list[str]:
    """The ops or arguments of _REQUIRED_SCHEMA that the loaded library does not have."""
    missing = []
    for name, args in _REQUIRED_SCHEMA.items():
        try:
            schema = getattr(torch.ops.scanet_native, name).default._schema
        except (AttributeError, RuntimeError):
            missing.append(name)
            continue
        have = {a.name for a in schema.arguments}
        missing += [f"{name}({a}=)" for a in args if a not in have]
    if "csrc_revision" not in missing:
        revision = int(torch.ops.scanet_native.csrc_revision())
        if revision != CSRC_REVISION:
            missing.append(f"csrc revision {CSRC_REVISION} (it is revision {revision})")
    return missing
