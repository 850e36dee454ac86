"""What the three fused ops share: whether the Triton kernels can run on a device, the kernels module (imported
lazily: ``import scanet.fused`` works without triton, e.g. on the native CPU path), and the precision vocabulary.

    kernels_can_run(device)   CUDA, or CPU under Triton's interpreter (TRITON_INTERPRET=1, read at call time)
    kernels(name)             scanet.kernels.<name>, checked to be interpreted when running on CPU
    PRECISIONS, check_precision   the GEMM operand precisions of the kernels ("fp32", "tf32", "bf16", "fp16"),
                              checked against the GPU's compute capability on CUDA (V100: fp32 only)
    default_precision(device) the precision the kernels use when none is asked for
"""

from __future__ import annotations

import importlib
import os

import torch

# The kernels' vocabulary (scanet.kernels._common.PRECISIONS), written here so that checking an argument needs
# no triton; tests/test_layout.py checks the two agree.
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


def _capability(device) -> int | None:
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def check_precision(precision, device=None) -> None:
    """ValueError unless ``precision`` is known and, on a CUDA ``device``, reaches its tensor cores there
    (kernels._common.check_precision: tf32/bf16/fp16 need sm_80+, since Triton 3.x has no Volta MMA path)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    cc = _capability(device)
    if cc is not None:
        from scanet.kernels._common import check_precision as check_for_capability

        check_for_capability(precision, cc)


def default_precision(device=None) -> str:
    """fp32 everywhere it is exact; kernels._common.default_precision decides per GPU."""
    cc = _capability(device)
    if cc is None:
        return "fp32"
    from scanet.kernels._common import default_precision as for_capability

    return for_capability(cc)


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernels_can_run(device) -> bool:
    """Can the Triton kernels run on tensors of this device (CUDA, or CPU under TRITON_INTERPRET=1)?"""
    device = torch.device(device)
    return device.type == "cuda" or (device.type == "cpu" and interpreter_on())


def interpreted_kernels(name: str):
    """scanet.kernels.<name>, verifying that its kernels were built for the interpreter (CPU runs)."""
    from triton.runtime.interpreter import InterpretedFunction

    mod = importlib.import_module(f"scanet.kernels.{name}")
    jitted = [v for v in vars(mod).values() if type(v).__name__ in ("JITFunction", "InterpretedFunction")]
    if jitted and not all(isinstance(v, InterpretedFunction) for v in jitted):
        raise RuntimeError(
            f"TRITON_INTERPRET=1 is set but scanet.kernels.{name} was imported before it was: "
            "set TRITON_INTERPRET=1 before anything imports the kernels"
        )
    return mod


def kernels(name: str, device):
    """scanet.kernels.<name> for tensors on ``device`` (the interpreted build on CPU)."""
    if torch.device(device).type == "cpu":
        return interpreted_kernels(name)
    return importlib.import_module(f"scanet.kernels.{name}")
