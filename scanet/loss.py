"""The SCANet loss (eq. 10): variance of both groups plus a margin on the gap between their means.

    L = (var+ + var-) + lambda * max(0, m - (mean+ - mean-))

over the similarities of matching (same class) and non-matching pairs in a batch; m = 0.6, lambda = 0.35.
Written with masks rather than boolean indexing so that the step never synchronizes with the host (a batch
without one of the groups simply drops the terms that need it).

The loss is a statistic of the whole batch, so with data-parallel training the mean of each rank's local loss
is NOT the loss of the global batch. ``distributed_scanet_loss`` computes it from sums reduced across ranks,
in the same two passes as the one-process formula (the variances are population variances, sum (s - mean)^2 / n,
never E[s^2] - mean^2, which cancels badly in float32):
    pass 1: all-reduce [sum s+, sum s-, n+, n-]             -> the global means
    pass 2: all-reduce [sum (s+ - mean+)^2, sum (s- - mean-)^2] -> the global variances
Two all-reduces of 4 and 2 scalars a step. The reduction is ``AllReduceSum`` (what
torch.distributed.nn.functional.all_reduce does, which torch 2.13 deprecates without an autograd successor): its
backward all-reduces (sums) the incoming gradients: every rank computes the same global loss, so each rank's
gradient of its own similarities is world_size x its share of the global gradient, and DistributedDataParallel's
gradient averaging (sum / world_size) turns that into exactly the gradient of one process on the global batch.
"""

from __future__ import annotations

import torch


class AllReduceSum(torch.autograd.Function):
    """Sum of a tensor over the ranks of ``group``, differentiable: the gradient is the sum over ranks of the
    gradients flowing into the result (each rank's input reaches every rank's output)."""

    @staticmethod
    def forward(ctx, tensor, group):
        import torch.distributed as dist

        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return AllReduceSum.apply(grad, ctx.group), None


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _check(similarity: torch.Tensor, target: torch.Tensor) -> None:
    if similarity.shape != target.shape or similarity.dim() != 1:
        raise ValueError(
            f"similarity and target must both be (B,), got {tuple(similarity.shape)} and {tuple(target.shape)}"
        )


def _loss_from_sums(similarity, target, margin: float, lam: float, reduce_sum):
    """The loss with every batch sum passed through ``reduce_sum`` (identity: one process; all-reduce: ranks)."""
    pos = target.to(similarity.dtype)
    neg = 1.0 - pos
    first = reduce_sum(torch.stack([(similarity * pos).sum(), (similarity * neg).sum(), pos.sum(), neg.sum()]))
    sum_pos, sum_neg, n_pos, n_neg = first.unbind()
    mean_pos = sum_pos / n_pos.clamp(min=1)
    mean_neg = sum_neg / n_neg.clamp(min=1)
    second = reduce_sum(
        torch.stack([(((similarity - mean_pos) ** 2) * pos).sum(), (((similarity - mean_neg) ** 2) * neg).sum()])
    )
    var_pos = second[0] / n_pos.clamp(min=1)  # population variance
    var_neg = second[1] / n_neg.clamp(min=1)
    both = ((n_pos > 0) & (n_neg > 0)).to(similarity.dtype)
    hinge = torch.relu(margin - (mean_pos - mean_neg)) * both
    loss = var_pos + var_neg + lam * hinge
    return loss, {"var_pos": var_pos, "var_neg": var_neg, "mean_pos": mean_pos, "mean_neg": mean_neg, "hinge": hinge}


def scanet_loss(similarity: torch.Tensor, target: torch.Tensor, margin: float = 0.6, lam: float = 0.35):
    """similarity: (B,) in [0, 1]; target: (B,) 1 for a matching pair, 0 otherwise. Returns (loss, parts)."""
    _check(similarity, target)
    return _loss_from_sums(similarity, target, margin, lam, _identity)


def distributed_scanet_loss(
    similarity: torch.Tensor, target: torch.Tensor, margin: float = 0.6, lam: float = 0.35, group=None
):
    """The loss of the global batch (every rank's pairs together) from this rank's (b,) share of it.

    Every rank must call it once per step (it runs two collectives); the value returned is the same on all
    ranks. Without an initialized process group (or with one rank) it is ``scanet_loss``. The gradient that
    reaches this rank's similarities is world_size x the global one: average the parameter gradients across
    ranks (DistributedDataParallel does) to get exactly the one-process gradient of the global batch. A rank
    may hold an empty share (b = 0).
    """
    import torch.distributed as dist

    _check(similarity, target)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return scanet_loss(similarity, target, margin, lam)
    return _loss_from_sums(similarity, target, margin, lam, lambda t: AllReduceSum.apply(t, group))
