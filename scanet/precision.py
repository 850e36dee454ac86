"""The training/scoring precision setting: "fp32", "bf16" or "fp16", and the autocast context it means.

    PRECISIONS                      the vocabulary of ``TrainConfig.precision`` and ``--precision``
    check_precision(precision)      ValueError naming the value unless it is one of PRECISIONS
    autocast_dtype(precision)       None for "fp32", else torch.bfloat16 / torch.float16
    autocast_context(device, p)     contextlib.nullcontext() for "fp32", else torch.autocast(device type, dtype)

What runs in low precision under autocast, and what stays float32 (every op's docstring says it for itself):
  * the GEMMs (text FC 10,055 -> N, image FC, the co-attention FCs N x N, the head): bf16/fp16 operands,
    float32 accumulation (oneDNN on the CPU's AMX / avx512_bf16, tensor cores on CUDA): most of the FLOPs;
  * the Chebyshev recursion T_k = 2 L~ T_{k-1} - T_{k-2} stays float32: each step doubles the previous term's
    rounding error, so bf16 terms would lose the signal after K = 3; only its input and output may be bf16;
  * softmax statistics (max, sum of exponentials) stay float32: a sum of N = 1024 terms in bf16 carries
    ~8 bits, so the attention map would be off by ~1% before it multiplies anything;
  * the loss (eq. 10: means over the batch of squared distances) is computed in float32 on float32
    similarities (SCANet.forward's sigmoid runs on float32 logits);
  * the master weights (the model's parameters: what the optimizer steps, checkpoints save and evaluation
    reads), their gradients and the optimizer state (Adam's moments) stay float32: an update of lr * g ~ 1e-4
    relative would vanish in a bf16 weight (eps 2^-8). The forward's GEMMs read bf16 weights: autocast casts
    a copy per op, or, in CPU bf16 training (scanet.master_weights), the FC layers hold bf16 copies that each
    optimizer step writes from the masters (the native Adam pass reads the bf16 gradients directly; within
    float32 rounding of autocast's step, bitwise on the unfused path);
  * all-pairs logits are float32 (a bf16 logit has 8 bits: rankings would tie).

fp16 on CUDA is accepted but trains without loss scaling (no GradScaler in the loop): prefer bf16, whose
exponent range is float32's. This vocabulary is not ``scanet.fused.PRECISIONS`` ("fp32", "tf32", "bf16"): that
one names the GEMM operand format inside the Triton kernels; the fused ops map the autocast dtype onto it.
"""

from __future__ import annotations

import contextlib

PRECISIONS = ("fp32", "bf16", "fp16")  # torch is imported inside the functions: the CLI's --help needs none


def check_precision(precision) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def autocast_dtype(precision: str):
    """None for "fp32", else the torch dtype (torch.bfloat16 / torch.float16)."""
    import torch

    check_precision(precision)
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast_context(device, precision: str = "fp32"):
    """``with autocast_context(device, precision):`` around a forward pass (and nothing else: the loss and the
    optimizer step run outside, in float32). ``device``: a torch.device or string ("cpu", "cuda:0")."""
    import torch

    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)
