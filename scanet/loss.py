"""The SCANet loss (eq. 10): variance of both groups plus a margin on the gap between their means.

    L = (var+ + var-) + lambda * max(0, m - (mean+ - mean-))

over the similarities of matching (same class) and non-matching pairs in a batch; m = 0.6, lambda = 0.35.
Written with masks rather than boolean indexing so that the step never synchronizes with the host (a batch
without one of the groups simply drops the terms that need it).
"""
from __future__ import annotations

import torch


def scanet_loss(similarity: torch.Tensor, target: torch.Tensor, margin: float = 0.6, lam: float = 0.35):
    """similarity: (B,) in [0, 1]; target: (B,) 1 for a matching pair, 0 otherwise. Returns (loss, parts)."""
    if similarity.shape != target.shape or similarity.dim() != 1:
        raise ValueError(f"similarity and target must both be (B,), got {tuple(similarity.shape)} "
                         f"and {tuple(target.shape)}")
    pos = target.to(similarity.dtype)
    neg = 1.0 - pos
    n_pos, n_neg = pos.sum(), neg.sum()
    mean_pos = (similarity * pos).sum() / n_pos.clamp(min=1)
    mean_neg = (similarity * neg).sum() / n_neg.clamp(min=1)
    var_pos = (((similarity - mean_pos) ** 2) * pos).sum() / n_pos.clamp(min=1)   # population variance
    var_neg = (((similarity - mean_neg) ** 2) * neg).sum() / n_neg.clamp(min=1)
    both = ((n_pos > 0) & (n_neg > 0)).to(similarity.dtype)
    hinge = torch.relu(margin - (mean_pos - mean_neg)) * both
    loss = var_pos + var_neg + lam * hinge
    return loss, {"var_pos": var_pos, "var_neg": var_neg, "mean_pos": mean_pos, "mean_neg": mean_neg,
                  "hinge": hinge}
