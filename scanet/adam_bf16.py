"""One fused pass per parameter for bf16 training with float32 master weights: Adam / AdamW on the master from
the bf16 gradient, writing the bf16 copy the next forward reads (``scanet_native::adam_bf16_step``,
csrc/adam_bf16.cpp).

Bytes per parameter: 2 (bf16 grad) + 3 x 4 read (master, exp_avg, exp_avg_sq) + 3 x 4 + 2 written = 28 B in one
pass, against 40 B in three passes on the unfused path of scanet/master_weights.py (widen the grad into a float32
buffer, torch's fused AdamW, round the master into the copy); for the Wiki FCs (18.7 M weights) that is 0.52 GB
instead of 0.75 GB a step, and one sweep from DRAM instead of three.

``native_unsupported(optimizer)``  why the op cannot step this optimizer's parameters (None when it can): it
                                   implements exactly torch.optim.Adam / AdamW with fused=True, amsgrad=False,
                                   maximize=False, capturable=False, differentiable=False and a float lr.
``step_with_bf16_grads(optimizer, work)``  the step for a list of (master, bf16 grad, extra float32 grad or
                                   None, bf16 copy): in place on the optimizer's own state (state[p]["step"],
                                   ["exp_avg"], ["exp_avg_sq"], lazily created as torch creates them), so
                                   state_dict(), checkpoints and resume are unchanged.
``adam_reference``                 the same update in float64 (the oracle of tests/test_adam_bf16.py).

Numerics: torch's fused CPU kernel, bit for bit, except in the last ``numel % 16`` elements of a tensor, which
torch's kernel computes in its scalar remainder loop, whose exp_avg_sq may differ by one float32 rounding
(tests/test_adam_bf16.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from scanet import native


def native_unsupported(optimizer: torch.optim.Optimizer) -> str | None:
    """Why ``step_with_bf16_grads`` cannot stand in for ``optimizer``'s step, or None when it can."""
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        return f"optimizer {type(optimizer).__name__} (torch.optim.Adam or AdamW only)"
    for i, group in enumerate(optimizer.param_groups):
        for key, want in (("fused", True), ("amsgrad", False), ("maximize", False), ("capturable", False)):
            if bool(group.get(key)) != want:
                return f"param group {i}: {key}={group.get(key)} (the native step implements {key}={want})"
        if group.get("differentiable"):
            return f"param group {i}: differentiable=True"
        if isinstance(group["lr"], torch.Tensor):
            return f"param group {i}: lr is a Tensor (a float only)"
    if not native.available():
        return f"the native extension is unavailable: {native.unavailable_reason()}"
    if not hasattr(torch.ops.scanet_native, "adam_bf16_step"):
        return (
            "the native library lacks adam_bf16_step (built from older csrc/); rebuild it with "
            "`python setup.py build_ext --inplace`"
        )
    return None


def _state(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> dict:
    """The optimizer's state of ``p``, created on first use as torch's fused Adam creates it."""
    state = optimizer.state[p]
    if len(state) == 0:
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state


@torch.no_grad()
def step_with_bf16_grads(
    optimizer: torch.optim.Optimizer,
    work: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]],
    groups: dict[int, dict],
) -> None:
    """Step each master of ``work`` = [(master, bf16 grad, extra float32 grad or None, bf16 copy), ...] as
    ``optimizer`` would with grad = widened bf16 grad (+ extra), and write the master rounded to bf16 into the
    copy. ``groups`` maps id(master) to its param group (hyperparameters are read at every call: schedulers)."""
    if not native.available():  # loads the library once (cached)
        raise RuntimeError(f"scanet.adam_bf16 needs the native extension: {native.unavailable_reason()}")
    for master, grad, extra, copy in work:
        group = groups[id(master)]
        state = _state(optimizer, master)
        state["step"] += 1  # torch's _foreach_add_(state_steps, 1), before the kernel reads it
        beta1, beta2 = group["betas"]
        torch.ops.scanet_native.adam_bf16_step(
            master,
            _laid_out_as(grad, master),  # no copy: autograd lays a leaf's grad out as its parameter
            _laid_out_as(extra, master) if extra is not None else None,
            state["exp_avg"],
            state["exp_avg_sq"],
            copy,
            float(state["step"]),
            float(group["lr"]),
            float(beta1),
            float(beta2),
            float(group["eps"]),
            float(group["weight_decay"]),
            bool(group["decoupled_weight_decay"]),
        )


def is_dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill its memory exactly (no gaps, no overlap) in some order of its dimensions:
    contiguous or a permutation of contiguous (the transposed text FC weight)."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride(), strict=True) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _laid_out_as(t: torch.Tensor, master: torch.Tensor) -> torch.Tensor:
    """``t`` with ``master``'s strides (the op runs elementwise over memory): itself when it has them already
    (a size-1 dimension's stride is never used, so it may differ)."""
    if all(size == 1 or a == b for size, a, b in zip(master.shape, t.stride(), master.stride(), strict=True)):
        return t
    return torch.empty_like(master, dtype=t.dtype).copy_(t)


def adam_reference(
    param: torch.Tensor,
    grad: torch.Tensor,
    extra: torch.Tensor | None,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    decoupled: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(param, exp_avg, exp_avg_sq) after one Adam (decoupled=False: L2 added to the grad) or AdamW step, in
    float64 on float64 copies of the inputs; ``step`` counts this step (>= 1)."""
    if step < 1:
        raise ValueError(f"adam_reference: step must be >= 1 (this step's count), got {step}")
    p, m, v = (t.detach().double().clone() for t in (param, exp_avg, exp_avg_sq))
    g = grad.detach().double() + (extra.detach().double() if extra is not None else 0.0)
    beta1, beta2 = betas
    if weight_decay != 0:
        if decoupled:
            p = p * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * p
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    denom = v.sqrt() / math.sqrt(1 - beta2**step) + eps
    p = p - lr / (1 - beta1**step) * m / denom
    return p, m, v
