"""Fused similarity head: ``SimilarityHead``, the drop-in for scanet.layers.SimilarityHead (same constructor,
parameters and state_dict).

On CPU tensors (float32, bfloat16 or float16, autocast included) with the native extension built, the head's
dropout, Hadamard product and FC to one logit run as one pass each way (scanet.native_dense.similarity_head,
csrc/dense_epilogues.cpp): the dropout mask is the counter-based one of the Chebyshev epilogue, regenerated in
backward, instead of ``nn.Dropout``'s ``bernoulli_`` (measured 3.5 ms a Wiki step for the eager head against
1.0 ms, bench/bench_native_dense.py). The logits come out float32 (eager autocast rounds them to bf16; the loss
reads float32). Elsewhere (CUDA, float64, no extension, ``native = False``) it is the eager head.
"""

from __future__ import annotations

import torch

from scanet import layers


def uses_native_head(f_t: torch.Tensor) -> bool:
    """True when the head on tensors like ``f_t`` runs the native op (CPU, not float64, extension built)."""
    from scanet import native_dense

    return native_dense.runs_on(f_t)


class SimilarityHead(layers.SimilarityHead):
    """scanet.layers.SimilarityHead, fused on CPU (see the module docstring); ``native`` (constructor keyword or
    attribute, default True) False keeps the eager head everywhere."""

    def __init__(self, dim: int, dropout: float = 0.2, *, native: bool = True):
        super().__init__(dim, dropout)
        self.native = native

    def forward(self, f_t: torch.Tensor, f_i: torch.Tensor) -> torch.Tensor:
        if self.native and uses_native_head(f_t):
            from scanet import native_dense

            return native_dense.similarity_head(
                f_t, f_i, self.fc.weight, self.fc.bias, self.dropout.p, self.training and self.dropout.p > 0
            )
        return super().forward(f_t, f_i)
