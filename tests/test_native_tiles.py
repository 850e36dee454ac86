"""The column tiles of the native Chebyshev kernels (csrc/cheb_conv.cpp, "Work"): tile edges, thread counts.

cheb_conv's forward and backward split the batch into tiles of nb entries (a multiple of 16, see tile_batch) that
each run the whole recursion; the dW / db sums are one partial per 16 batch entries. These tests pick shapes
whose tiles do not divide B (a short last tile, a last chunk of fewer than 16 entries), F_in != F_out, K = 1, 2,
4, dropout, and the gradient in either layout and dtype, and check them against the float64 oracle and, bitwise,
across thread counts.
"""

from __future__ import annotations

import pytest
import torch

from scanet import native, reference
from tests.test_native import knn_laplacian, vb

needs_native = pytest.mark.skipif(
    not native.available(), reason=f"native extension unavailable: {native.unavailable_reason()}"
)

# (B, V, F_in, F_out): V = 300 keeps the tiles at 16 entries when B <= 128 (at least 8 tiles), so B = 40 is
# tiles 16 + 16 + 8; B = 1 a single one-entry tile; B = 130 tiles of 32 (the last one 2 entries).
TILE_SHAPES = [(40, 300, 1, 1), (1, 300, 1, 1), (37, 300, 2, 3), (130, 300, 1, 1), (21, 90, 3, 1)]


def _run(L, x, w, b, *, threads, dropout_p=0.0, seed=0, grad=None, out_dtype=None):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        xr, wr, br = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
        torch.manual_seed(seed)  # the dropout seed comes from torch's generator
        y = native.cheb_conv(L, xr, wr, br, "relu", dropout_p=dropout_p, out_dtype=out_dtype)
        g = grad if grad is not None else torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
        grads = torch.autograd.grad(y, (xr, wr, br), g.to(y.dtype))
        return [y.detach(), *grads]
    finally:
        torch.set_num_threads(old)


@needs_native
@pytest.mark.parametrize("shape", TILE_SHAPES, ids=lambda s: "B{}V{}Fi{}Fo{}".format(*s))
@pytest.mark.parametrize("K", [1, 2, 3, 4])
@pytest.mark.parametrize("grad_layout", ["bv", "vb"])
def test_tiles_match_float64_reference(shape, K, grad_layout):
    B, V, F_in, F_out = shape
    L = knn_laplacian(V, dtype=torch.float64)
    g = torch.Generator().manual_seed(K)
    x = torch.randn(B, V, F_in, generator=g, dtype=torch.float64)
    w = torch.randn(K, F_in, F_out, generator=g, dtype=torch.float64) / K
    b = torch.randn(F_out, generator=g, dtype=torch.float64)
    go = torch.randn(B, V, F_out, generator=g, dtype=torch.float64)
    if grad_layout == "vb":
        go = vb(go)
    for x_in in (x, vb(x)):
        got = _run(L, x_in, w, b, threads=2, grad=go)
        xr, wr, br = x_in.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
        y = reference.cheb_conv(L, xr, wr, br, "relu")
        want = [y.detach(), *torch.autograd.grad(y, (xr, wr, br), go)]
        for name, a, c in zip(("y", "dx", "dW", "db"), got, want, strict=True):
            torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")


@needs_native
@pytest.mark.parametrize("shape", TILE_SHAPES, ids=lambda s: "B{}V{}Fi{}Fo{}".format(*s))
@pytest.mark.parametrize("K", [2, 3, 4])
def test_tiles_bitwise_equal_for_1_2_3_threads_with_dropout(shape, K):
    B, V, F_in, F_out = shape
    L = knn_laplacian(V)
    g = torch.Generator().manual_seed(3)
    x = vb(torch.randn(B, V, F_in, generator=g).abs())
    w = torch.randn(K, F_in, F_out, generator=g) / K
    b = torch.randn(F_out, generator=g).abs() + 0.5  # the ReLU passes most outputs: non-trivial gradients
    # bf16 output and a bf16 (B, V) gradient: the text FC's path, read in place without a widened copy
    grad = torch.randn(B, V, F_out, generator=g).to(torch.bfloat16)
    runs = [_run(L, x, w, b, threads=t, dropout_p=0.25, seed=7, grad=grad, out_dtype=torch.bfloat16) for t in (1, 2, 3)]
    for other in runs[1:]:
        for a, c in zip(runs[0], other, strict=True):
            assert torch.equal(a, c)
    assert runs[0][2].abs().sum() > 0 and runs[0][1].abs().sum() > 0


@needs_native
def test_gradient_layout_does_not_change_results_bitwise():
    """A bf16 gradient is read in place in either layout ((B, V) rows from the FC, or (V, B) rows) and widened
    element by element: both give the same bits, and the same as the float32 widening of it."""
    B, V, K = 37, 300, 3
    L = knn_laplacian(V)
    g = torch.Generator().manual_seed(4)
    x = vb(torch.randn(B, V, 1, generator=g))
    w, b = torch.randn(K, 1, 1, generator=g) / K, torch.randn(1, generator=g)
    grad = torch.randn(B, V, 1, generator=g).to(torch.bfloat16)
    xr, wr, br = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    y = native.cheb_conv(L, xr, wr, br, "relu", dropout_p=0.2, out_dtype=torch.bfloat16)
    results = [torch.autograd.grad(y, (xr, wr, br), gr, retain_graph=True) for gr in (grad, vb(grad))]
    for a, c in zip(*results, strict=True):
        assert torch.equal(a, c)


@needs_native
def test_gradient_of_another_dtype_and_zero_strides():
    """A float16 gradient for a bf16 output is converted first; an expanded (stride 0) one is read in place."""
    B, V, K = 19, 120, 3
    L = knn_laplacian(V)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(B, V, 1, generator=g)
    w, b = torch.randn(K, 1, 1, generator=g) / K, torch.randn(1, generator=g)
    y_ref_x = x.double().requires_grad_()
    y_ref = reference.cheb_conv(L.to(torch.float64), y_ref_x, w.double(), b.double(), "relu")
    for grad in (torch.full((B, V, 1), 0.5, dtype=torch.float16), torch.ones(1, 1, 1).expand(B, V, 1)):
        xr = x.clone().requires_grad_()
        y = native.cheb_conv(L, xr, w, b, "relu", out_dtype=torch.bfloat16 if grad.dtype == torch.float16 else None)
        (dx,) = torch.autograd.grad(y, (xr,), grad)
        (want,) = torch.autograd.grad(y_ref, (y_ref_x,), grad.double(), retain_graph=True)
        # relu masks from a bf16 y may differ where y rounds to 0; compare where the float64 y is clearly away
        torch.testing.assert_close(dx.double(), want, rtol=2e-5, atol=2e-5)


@needs_native
def test_dx_comes_out_contiguous_and_feeds_the_cached_basis_layer():
    """cheb_conv's dx is (B, V, F_in) contiguous whatever x's layout (the cached-basis layer below reads it
    as runs in place), and the two-layer gradient through it equals the float64 one."""
    B, V, K = 37, 300, 3
    L = knn_laplacian(V)
    g = torch.Generator().manual_seed(8)
    texts = torch.rand(B, V, generator=g)
    # a per-text cache (K, N, V, 1) with V contiguous, read by index: the "runs" layout of the Wiki step
    cache = native.chebyshev_basis(L, texts.unsqueeze(-1), K).squeeze(-1).contiguous().unsqueeze(-1)
    index = torch.randperm(B, generator=g)
    w1, b1 = (torch.randn(K, 1, 1, generator=g) / K).requires_grad_(), torch.randn(1, generator=g).requires_grad_()
    w2, b2 = (torch.randn(K, 1, 1, generator=g) / K).requires_grad_(), torch.randn(1, generator=g).requires_grad_()
    h = native.cheb_conv_from_basis(cache, w1, b1, "relu", index=index)
    assert h.permute(1, 0, 2).is_contiguous()  # (V, B) rows: layer 2 reads it in place
    seen = {}
    h.register_hook(lambda grad: seen.setdefault("dx", grad))
    y = native.cheb_conv(L, h, w2, b2, "relu")
    go = torch.randn(y.shape, generator=g)
    got = torch.autograd.grad(y, (w1, b1, w2, b2), go)
    assert seen["dx"].is_contiguous()
    L64, t64 = L.to(torch.float64), texts[index].double().unsqueeze(-1)
    p64 = [p.detach().double().requires_grad_() for p in (w1, b1, w2, b2)]
    y64 = reference.cheb_conv(L64, reference.cheb_conv(L64, t64, p64[0], p64[1], "relu"), p64[2], p64[3], "relu")
    want = torch.autograd.grad(y64, p64, go.double())
    for a, c in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), c, rtol=1e-4, atol=1e-4)
