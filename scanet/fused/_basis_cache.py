"""The first graph convolution without an SpMM: its Chebyshev basis, computed once per text and cached.

The text GCN's first layer reads the bag-of-words, which is data: its basis T_k(L~) x (k < K) depends on the
Laplacian and the texts only, never on a parameter. ``ChebBasisCache`` computes it once for every row of a
text matrix (``scanet.native.chebyshev_basis``, chunks of 256 texts) and hands out a (K, N, V, 1) view
that ``scanet.native.cheb_conv_from_basis(..., index=batch)`` reads in place: layer 1 becomes a per-vertex
combination of K numbers + bias + ReLU, and its backward computes dW and db only (the texts need no
gradient). Per step this replaces layer 1's 2 forward SpMMs (and the (B, V) gather of the batch's texts and
its transposed copy) by one read of B x K x V float32 numbers (Wiki: 256 x 3 x 10,055 x 4 B = 31 MB).

Memory: N x K x V float32, stored (N, K, V) so that each text's K runs of V numbers are contiguous. Eng-Wiki's
training split (about 2,173 texts, V = 10,055, K = 3): 262 MB; all 2,866 texts: 346 MB. float32, not bf16:
the cached path must give what the SpMM path gives (the same float32 basis, the same sums; tested), and bf16
would round T_1, T_2 (the recursion's terms are kept float32 everywhere, see scanet.native).

Invalidation. The cache is keyed on the texts tensor (data pointer, shape, strides, dtype, version counter)
and the Laplacian's three buffers (data pointers, version counters) and K, and it keeps references to them,
so a pointer cannot be reused by another tensor while the entry lives. Writing into the texts or the
Laplacian in place bumps a version counter and the next call recomputes; ``load_state_dict`` into the model
copies into the Laplacian's buffers in place (a version bump) as well. Parameters play no part. One entry
per cache (the last text matrix seen): a training loop asks for the same matrix every step.
"""

from __future__ import annotations

import torch

from scanet.laplacian import Laplacian

CHUNK_TEXTS = 256  # texts per chebyshev_basis call: bounds its (K, V, chunk) work buffer (31 MB on Wiki)


def _key(texts: torch.Tensor, laplacian: Laplacian, K: int) -> tuple:
    parts: list = [K, texts.dtype, tuple(texts.shape), tuple(texts.stride()), texts.data_ptr(), texts._version]
    for t in (laplacian.crow, laplacian.col, laplacian.values):
        parts += [t.data_ptr(), t._version, t.dtype]
    return tuple(parts)


class ChebBasisCache:
    """[T_0 x, ..., T_{K-1} x] for every row x of one fixed (N, V) text matrix, recomputed only when the texts
    or the Laplacian change (see the module docstring). ``get`` returns the (K, N, V, 1) view."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._refs: tuple = ()
        self._view: torch.Tensor | None = None

    def __deepcopy__(self, memo) -> ChebBasisCache:  # a copied model rebuilds its own when it needs one
        return ChebBasisCache()

    def __getstate__(self) -> dict:  # pickled empty: the cache is derived data
        return {"_key": None, "_refs": (), "_view": None}

    def clear(self) -> None:
        self._key, self._refs, self._view = None, (), None

    @torch.no_grad()
    def get(self, texts: torch.Tensor, laplacian: Laplacian, K: int) -> torch.Tensor:
        from scanet import native

        if texts.dim() != 2 or texts.shape[1] != laplacian.size:
            raise ValueError(
                f"texts must be (N, V) with V = {laplacian.size} (the Laplacian's size), got {tuple(texts.shape)}"
            )
        if texts.dtype != torch.float32 or texts.device.type != "cpu":
            raise ValueError(f"the basis cache takes float32 CPU texts, got {texts.dtype} on {texts.device}")
        key = _key(texts, laplacian, K)
        if key != self._key or self._view is None:
            self.clear()  # free the old entry before building the new one
            csr = laplacian.csr(torch.float32)
            cache = torch.empty(texts.shape[0], K, texts.shape[1], dtype=torch.float32)
            for s in range(0, texts.shape[0], CHUNK_TEXTS):
                chunk = texts[s : s + CHUNK_TEXTS].unsqueeze(-1)
                cache[s : s + CHUNK_TEXTS] = native.chebyshev_basis(csr, chunk, K).squeeze(-1).permute(1, 0, 2)
            self._key = key
            self._refs = (texts, laplacian.crow, laplacian.col, laplacian.values)
            self._view = cache.permute(1, 0, 2).unsqueeze(-1)  # (K, N, V, 1), V contiguous: read in place
        return self._view
