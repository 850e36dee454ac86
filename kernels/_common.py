"""What the three kernel files share: the precision vocabulary, the interpreter switch, a small description of
the GPU a plan is made for, the launch plan itself, and two @triton.jit helpers (index width, the GEMM step).

Plans. Every launcher is split in two: a pure planning function (shapes, dtypes, strides, precision and a
``GPU`` -> ``Plan``s: kernel, grid, arguments, constexprs, warps, stages) and the launch of those plans. The
ahead-of-time compile gate (bench/aot_compile.py) calls the same planning functions on meta tensors and compiles
exactly what they return, so the code that runs and the code that is checked are one.

Precisions ("fp32", "tf32", "bf16", "fp16") name the GEMM operands; accumulation and every output are fp32:
  fp32  tl.dot(input_precision="ieee"): fp32 FMAs on CUDA cores, any GPU.
  tf32  tensor cores with 10-bit mantissa operands: sm_80 and newer.
  bf16  operand tiles cast to bf16 (8-bit mantissas): sm_80 and newer (V100 has no bf16 units: ptxas emulates
        it with FMAs and spills, measured by the gate).
  fp16  operand tiles cast to fp16 (11-bit mantissas, range +-65504): tensor cores on sm_80 and newer.
        Features, attention maps and weights of the model are O(1) to O(N) (scale = N), far inside fp16's
        range; inputs beyond 65504 become inf.
V100 (sm_70) runs fp32 only. Its tensor cores take fp16, but Triton 3.x (3.6 and 3.9 checked) has no Volta
MMA path: tl.dot compiles to FMAs on sm_70 whatever the operand type (no mma in the PTX, no HMMA in the SASS),
and the fp16 conversions then cost registers: the compile gate finds 4.4 KB (forward GEMM) and 9.5 KB
(backward matmul) of spill stores a thread in fp16 on sm_70 against none in fp32 (bench/results/aot-*.json).
So ``check_precision`` refuses tf32, bf16 and fp16 there with that reason, and ``default_precision(70)`` is
"fp32".
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import triton
import triton.language as tl

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")

# Triton chooses interpreter or compiler when @triton.jit runs, i.e. when a kernel module is imported.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

TRITON_VERSION = tuple(int(p) for p in triton.__version__.split(".")[:2])


# ------------------------------------------------------------------------------------------------------- GPUs
@dataclass(frozen=True)
class GPU:
    """What a plan needs to know about the GPU: compute capability (major * 10 + minor), SM count, and the
    per-block (opt-in) and per-SM shared memory in bytes. ``known(cc)`` gives the data-sheet values of V100,
    A100 and H100/H200 (SXM); ``of(device)`` reads the real device."""

    capability: int
    sm_count: int
    shared_per_block: int
    shared_per_sm: int
    registers_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    name: str = ""

    @staticmethod
    def known(capability: int) -> GPU:
        if capability not in KNOWN_GPUS:
            raise ValueError(
                f"no data-sheet values for compute capability {capability}: known are "
                f"{sorted(KNOWN_GPUS)}; describe the GPU with kernels._common.GPU(...)"
            )
        return KNOWN_GPUS[capability]

    @staticmethod
    def of(device) -> GPU:
        import torch

        props = torch.cuda.get_device_properties(device)
        cc = props.major * 10 + props.minor
        base = KNOWN_GPUS.get(cc)
        per_block = getattr(props, "shared_memory_per_block_optin", None) or (
            base.shared_per_block if base else 48 * 1024
        )
        per_sm = getattr(props, "shared_memory_per_multiprocessor", None) or (base.shared_per_sm if base else per_block)
        return GPU(cc, props.multi_processor_count, int(per_block), int(per_sm), name=props.name)


KNOWN_GPUS = {
    70: GPU(70, 80, 98304, 98304, max_warps_per_sm=64, name="V100 (data sheet)"),
    80: GPU(80, 108, 166912, 167936, max_warps_per_sm=64, name="A100 (data sheet)"),
    90: GPU(90, 132, 232448, 233472, max_warps_per_sm=64, name="H100/H200 SXM (data sheet)"),
}


def gpu_for(device, gpu: GPU | None = None) -> GPU | None:
    """The GPU description a plan uses: ``gpu`` if given, the device's own on CUDA, None (the interpreter's
    plans) on CPU. Meta tensors need an explicit ``gpu``."""
    if gpu is not None:
        return gpu
    if device.type == "cuda":
        return GPU.of(device)
    if device.type == "cpu":
        return None
    raise ValueError(f"planning for a {device.type} tensor needs an explicit gpu=GPU(...) description")


# -------------------------------------------------------------------------------------------------- precision
def default_precision(capability: int | None) -> str:
    """The GEMM precision a model should use when none is asked for: "tf32" on sm_80 and newer (tensor cores,
    fp32 range, ~1e-3 relative error), "fp32" below (V100: see the module docstring) and on CPU (None)."""
    if capability is not None and capability >= 80:
        return "tf32"
    return "fp32"


def check_precision(precision, capability: int | None = None) -> None:
    """ValueError unless ``precision`` is one of PRECISIONS and, on a GPU of ``capability`` (major * 10 +
    minor), reaches tensor cores there: tf32, bf16 and fp16 need sm_80 or newer with Triton 3.x. capability
    None (CPU, the interpreter): any precision."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if capability is None or precision == "fp32" or capability >= 80:
        return
    units = {
        "tf32": "has no tf32 tensor cores",
        "bf16": "has no bf16 tensor cores",
        "fp16": "has fp16 tensor cores, but Triton 3.x compiles tl.dot to FMAs there (no Volta MMA path; "
        "the fp16 conversions spill)",
    }[precision]
    raise ValueError(
        f"precision {precision!r} is not available on sm_{capability}: the GPU {units}; use "
        f"precision='fp32' (kernels._common.default_precision({capability}) = 'fp32')"
    )


def dot_flags(precision: str, gpu: GPU | None) -> tuple[str, str]:
    """(DOT_PRECISION, DOT_CAST) constexprs of ``dot_step``. On the interpreter (gpu None) tf32 and bf16 compute
    in fp32 (its bf16 arithmetic is wrong), fp16 casts the tiles as on a GPU: numpy's fp16 is exact, so its
    error is measured on CPU."""
    if precision == "fp16":
        return "ieee", "fp16"
    if gpu is None or precision == "fp32":
        return "ieee", "none"
    return ("tf32", "none") if precision == "tf32" else ("ieee", "bf16")


def index_64(*tensors) -> bool:
    """Whether some element of these tensors lies 2^31 or more elements from its base pointer."""
    reach = max(
        sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride(), strict=True)) if t.numel() else 0 for t in tensors
    )
    return reach >= 2**31 - 1


# ---------------------------------------------------------------------------------------------- jit helpers
@triton.jit
def index(offsets, INDEX_64: tl.constexpr):
    """Offsets in int64 only when some element lies 2^31 or more from its base (the planner decides): int32
    address arithmetic saves registers, and the big GEMM tiles are short of them. One assignment per branch
    and one return: two returns of different int widths fail Triton's type check even under a constexpr if."""
    if INDEX_64:
        out = offsets.to(tl.int64)
    else:
        out = offsets
    return out


@triton.jit
def dot_step(a, b, acc, DOT_PRECISION: tl.constexpr, DOT_CAST: tl.constexpr):
    """acc += a @ b with the operands as the precision asks (fp32 accumulation always)."""
    if DOT_CAST == "bf16":
        acc = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    elif DOT_CAST == "fp16":
        acc = tl.dot(a.to(tl.float16), b.to(tl.float16), acc)
    else:
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc


# ------------------------------------------------------------------------------------------------------ plans
@dataclass
class Plan:
    """One kernel launch, fully decided: what the launcher runs and what the compile gate compiles."""

    kernel: Any
    grid: tuple
    args: tuple
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    label: str = ""
    meta: dict = field(default_factory=dict)  # shapes etc. for reports; not passed to the kernel

    def launch(self):
        return self.kernel[self.grid](
            *self.args, **self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages
        )

    def describe(self) -> dict:
        """JSON-friendly: constexprs (dtypes as strings), warps, stages, grid."""
        cx = {k: (v if isinstance(v, (bool, int, float, str)) else str(v)) for k, v in self.constexprs.items()}
        return dict(
            kernel=self.kernel.__name__ if hasattr(self.kernel, "__name__") else str(self.kernel),
            label=self.label,
            grid=list(self.grid),
            num_warps=self.num_warps,
            num_stages=self.num_stages,
            constexprs=cx,
            **self.meta,
        )
