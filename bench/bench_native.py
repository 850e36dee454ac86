"""Benchmarks of the native CPU backend (scanet.native, csrc/): the text GCN and the Wiki training step on CPU.

Run: ``OMP_WAIT_POLICY=passive pytest bench/bench_native.py --benchmark`` (CPU; native rows skip with a reason
where the extension is not built). CPU timings on the shared 2-core machines are noisy: read the ratios,
measured side by side in one run, not the times. OMP_WAIT_POLICY=passive (it must be set before torch is
imported) matters on a busy machine: with the default, a thread that reaches a barrier spins on a core that its
descheduled partner needs; the native GCN at 2 threads measured 60 ms with it and 140 ms without (B=256). It
applies to every provider alike (torch's own ops use the same OpenMP runtime).

Graph: the Wiki preset's word graph size, V = 10,055 words, from random 50-d "embeddings" (GloVe-50d's width):
scanet.data.graph.knn_graph (k=8, cosine, symmetrized by max), normalized Laplacian, rescaled with lmax = 2,
float32 CSR. B in (64, 256, 1024) texts per batch. Every case is forward + backward.

Ops (one name per table block; each row's ratio is to the "eager" provider of the same op and case):
  native_cheb_layer   one ChebConv (K=3, F=1, ReLU); x, W, b all require grad
  native_text_gcn     the text GCN: two ChebConv layers (K=3, one channel) on the fixed bag-of-words (no dx for
                      layer 1), gathered from the dataset (bow rows, or basis rows for native_cached)
  native_text_encoder the whole TextEncoder of scanet.model: the GCN, dropout, FC 10055 -> 1024
  native_train_step   one SCANet training step at the Wiki preset (B=256, N=1024, 2 co-attention layers,
                      4096-d image features as the paper's VGG-19 fc7, the loss of eq. 10, Adam); the
                      projected epoch (80,000 pairs / 256 = 313 steps) is median * steps_per_epoch
  native_coattention  one co-attention step softmax(relu(f W^T + b)) * g * N at M=256, N=1024
  native_dropout      dropout p=0.2 on the second ChebConv's (B, V) output at B=256, with that layer, fwd+bwd
  native_text_path    the Wiki text path at B=256: ChebConv (bag-of-words, no dx) -> ChebConv -> dropout 0.2
                      -> FC 10055 -> 1024, forward + backward of every parameter, fp32 vs bf16 autocast

Providers:
  eager          scanet.reference / scanet.model with fused=False: torch.sparse.mm on CSR, autograd
  scipy          scipy.sparse CSR @ dense, the same recursion, backward written out (a torch.autograd.Function)
  native         scanet.native.cheb_conv (ChebConv.op swapped for it)
  native_cached  layer 1 from a per-text cache of its Chebyshev basis (scanet.native.chebyshev_basis, computed
                 once per text, outside the timing; the batch's rows read in place with index=), then one
                 native ChebConv: one propagation (2 SpMMs forward, 2 backward) per step instead of two
  *+compile      the same with the co-attention module under torch.compile (inductor); for native_coattention,
                 "compile" is the step alone under torch.compile
  *+fused_adam   the same with torch.optim.Adam(fused=True) (scanet.train uses the default multi-tensor Adam)
  native_dropout: eager = torch's F.dropout after the native layer (bernoulli_ mask, mul, mask kept for
                 backward); native_fused = cheb_conv(dropout_p=0.2), the counter-based mask in the epilogue
                 (regenerated in backward); no_dropout = the layer alone (the floor)
  native_text_path: eager = scanet.reference ops in fp32 with F.dropout; native_fp32 / native_bf16 =
                 scanet.native.cheb_conv, fp32 or under torch.autocast("cpu", bfloat16) (the FC a bf16 GEMM
                 on AMX through oneDNN), with F.dropout or +fused_dropout; +fp32_hidden keeps layer 1's output
                 float32 (cheb_conv(out_dtype=torch.float32)): layer 2 reads it in place, and only the last
                 layer's bf16 output feeds the FC

Models. FLOPs: an SpMM is 2 nnz N (N = B*F signals); a GEMM 2 m n k; fwd+bwd of a linear layer 3 GEMMs.
Bytes (GCN rows only): per SpMM the gathered neighbour rows nnz*N*4 plus one read and one write of V*N*4.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from _script import interleaved, write_summary
from scanet import native, reference
from scanet.config import ModelConfig

V_WIKI = 10_055
K = 3
N_COMMON = 1024
IMAGE_DIM = 4096
N_TEXTS = 2_866  # texts in Eng-Wiki: the size of the cache a batch is gathered from
PAIRS_PER_EPOCH = 80_000
BATCHES = (64, 256, 1024)

needs_native = pytest.mark.skipif(
    not native.available(), reason=f"native extension unavailable: {native.unavailable_reason()}"
)


def _skip_on_cuda():
    if torch.cuda.is_available():
        pytest.skip("bench_native times the CPU backend; see bench_cheb.py for CUDA")


# -------------------------------------------------------------------------------------------------- data
_DATA: dict = {}


def word_graph():
    """(scipy L~, torch CSR L~) of a 10,055-word kNN graph; built once per session."""
    if "graph" not in _DATA:
        from scanet.data.graph import knn_graph, normalized_laplacian, rescale_laplacian, to_torch_csr

        emb = np.random.default_rng(0).standard_normal((V_WIKI, 50)).astype(np.float32)
        lt = rescale_laplacian(normalized_laplacian(knn_graph(emb, k=8)), 2.0)
        _DATA["graph"] = (lt, to_torch_csr(lt))
    return _DATA["graph"]


def bags_of_words(n: int, V: int, seed: int = 0) -> torch.Tensor:
    """(n, V) non-negative, ~2% non-zero, rows summing to 1: the shape of a Wiki article's bag-of-words."""
    g = torch.Generator().manual_seed(seed)
    bow = torch.rand(n, V, generator=g) * (torch.rand(n, V, generator=g) < 0.02)
    return bow / bow.sum(1, keepdim=True).clamp(min=1e-6)


def text_cache(L, bows: torch.Tensor) -> torch.Tensor:
    """The per-text basis cache (n, K, V): computed once per dataset, in chunks to bound the work buffers."""
    key = ("cache", bows.shape)
    if key not in _DATA:
        parts = [
            native.chebyshev_basis(L, chunk.unsqueeze(-1), K).squeeze(-1).permute(1, 0, 2).contiguous()
            for chunk in bows.split(512)
        ]
        _DATA[key] = torch.cat(parts)
    return _DATA[key]


def basis_view(cache: torch.Tensor) -> torch.Tensor:
    """(K, N, V, 1) view of the (N, K, V) cache: cheb_conv_from_basis(..., index=) reads its rows in place."""
    return cache.permute(1, 0, 2).unsqueeze(-1)


def spmm_flops(nnz: int, n: int, count: int) -> int:
    return 2 * nnz * n * count


def spmm_bytes(nnz: int, V: int, n: int, count: int) -> int:
    return count * (nnz * n + 2 * V * n) * 4


# ------------------------------------------------------------------------------------------ scipy provider
class ScipyChebConv(torch.autograd.Function):
    """act(sum_k T_k(L~) x W_k + b) with scipy SpMMs; backward by Clenshaw with L~^T (= L~ here)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lt, relu):
        B, V, F_in = x.shape
        Kw, _, F_out = weight.shape
        X = x.detach().permute(1, 0, 2).reshape(V, B * F_in).numpy()
        T = [X]
        if Kw > 1:
            T.append(lt @ X)
        for _ in range(2, Kw):
            T.append(2.0 * (lt @ T[-1]) - T[-2])
        W = weight.detach().numpy()
        z = sum(t.reshape(V * B, F_in) @ W[k] for k, t in enumerate(T)).reshape(V, B, F_out)
        if bias is not None:
            z = z + bias.detach().numpy()
        y = np.maximum(z, 0) if relu else z
        ctx.lt, ctx.relu, ctx.T, ctx.has_bias = lt, relu, T, bias is not None
        y_t = torch.from_numpy(np.ascontiguousarray(y))
        ctx.save_for_backward(weight, y_t)
        return y_t.permute(1, 0, 2)

    @staticmethod
    def backward(ctx, grad_y):
        weight, y_t = ctx.saved_tensors
        V, B, F_out = y_t.shape
        Kw, F_in, _ = weight.shape
        dz = grad_y.permute(1, 0, 2).contiguous().numpy()
        if ctx.relu:
            dz = dz * (y_t.numpy() > 0)
        dz2 = dz.reshape(V * B, F_out)
        W = weight.detach().numpy()
        dW = np.stack([t.reshape(V * B, F_in).T @ dz2 for t in ctx.T])
        db = dz2.sum(0) if ctx.has_bias else None
        dx = None
        if ctx.needs_input_grad[0]:
            G = [(dz2 @ W[k].T).reshape(V, B * F_in) for k in range(Kw)]
            lt_t = ctx.lt.T.tocsr()
            b1, b2 = G[-1], np.zeros_like(G[-1])
            for k in range(Kw - 2, 0, -1):
                b1, b2 = G[k] + 2.0 * (lt_t @ b1) - b2, b1
            out = G[0] + (lt_t @ b1) - b2 if Kw > 1 else G[0]
            dx = torch.from_numpy(out.reshape(V, B, F_in)).permute(1, 0, 2)
        return (dx, torch.from_numpy(dW), torch.from_numpy(db) if db is not None else None, None, None)


def scipy_cheb_conv(lt):
    def op(laplacian_csr, x, weight, bias=None, activation="relu"):
        return ScipyChebConv.apply(x, weight, bias, lt, activation == "relu")

    return op


# ------------------------------------------------------------------------------------------------- helpers
def _conv_op(provider, lt):
    return {
        "eager": reference.cheb_conv,
        "scipy": scipy_cheb_conv(lt),
        "native": native.cheb_conv,
        "native_cached": native.cheb_conv,
    }[provider]


def _require(provider):
    _skip_on_cuda()
    if provider.startswith("native") and not native.available():
        pytest.skip(f"native extension unavailable: {native.unavailable_reason()}")


def _rounds(B):
    return 3 if B >= 1024 else 5


def encode_text_cached(encoder, cache, index, laplacian):
    """TextEncoder.forward with layer 1 from the cached basis (the wiring the report proposes for model.py)."""
    c0, c1 = encoder.convs
    x = native.cheb_conv_from_basis(basis_view(cache), c0.weight, c0.bias, c0.activation, index=index)
    x = native.cheb_conv(laplacian, x, c1.weight, c1.bias, c1.activation)
    return encoder.act(encoder.fc(encoder.dropout(x.flatten(1))))


# ------------------------------------------------------------------------------------------------- benches
@pytest.mark.parametrize("B", BATCHES, ids=[f"B={b}" for b in BATCHES])
@pytest.mark.parametrize("provider", ["eager", "scipy", "native"])
def test_native_cheb_layer(benchmark, measure, provider, B):
    _require(provider)
    lt, L = word_graph()
    op = _conv_op(provider, lt)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(B, V_WIKI, 1, generator=g).requires_grad_()
    w = (torch.randn(K, 1, 1, generator=g) / K).requires_grad_()
    b = torch.zeros(1).requires_grad_()
    go = torch.randn(B, V_WIKI, 1, generator=g)

    def run():
        y = op(L, x, w, b, "relu")
        torch.autograd.grad(y, (x, w, b), go)

    nnz = L.values().numel()
    measure(
        benchmark,
        run,
        op="native_cheb_layer",
        case=f"V={V_WIKI} B={B} fwd+bwd",
        provider=provider,
        flops=spmm_flops(nnz, B, 4),
        bytes=spmm_bytes(nnz, V_WIKI, B, 4),
        rounds=_rounds(B),
    )


@pytest.fixture
def threads(request):
    """torch.set_num_threads for one benchmark, restored after it."""
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


@pytest.mark.parametrize("threads", [1, 2], indirect=True, ids=lambda t: f"threads={t}")
@pytest.mark.parametrize("B", BATCHES, ids=[f"B={b}" for b in BATCHES])
@pytest.mark.parametrize("provider", ["eager", "scipy", "native", "native_cached"])
def test_native_text_gcn(benchmark, measure, provider, B, threads):
    """Two ChebConv layers (K=3, one channel) on gathered bags-of-words; weights get gradients, bow does not.

    Also at one thread: on a busy 2-core machine every OpenMP barrier can wait for a descheduled thread, so the
    thread count changes the picture (scipy is single-threaded either way)."""
    _require(provider)
    from scanet.model import ChebConv

    lt, L = word_graph()
    bows = bags_of_words(N_TEXTS, V_WIKI)
    idx = torch.randperm(N_TEXTS, generator=torch.Generator().manual_seed(2))[:B]
    torch.manual_seed(0)
    convs = [ChebConv(1, 1, K), ChebConv(1, 1, K)]
    params = [p for c in convs for p in c.parameters()]
    go = torch.randn(B, V_WIKI, 1, generator=torch.Generator().manual_seed(3))
    op = _conv_op(provider, lt)
    if provider == "native_cached":
        cache = text_cache(L, bows)

        def forward():
            x = native.cheb_conv_from_basis(basis_view(cache), convs[0].weight, convs[0].bias, "relu", index=idx)
            return op(L, x, convs[1].weight, convs[1].bias, "relu")
    else:

        def forward():
            x = bows[idx].unsqueeze(-1)
            for c in convs:
                x = op(L, x, c.weight, c.bias, c.activation)
            return x

    def run():
        torch.autograd.grad(forward(), params, go)

    nnz = L.values().numel()
    spmms = 4 if provider == "native_cached" else 6  # layer 1 fwd 2 (unless cached), layer 2 fwd 2 + dx 2
    measure(
        benchmark,
        run,
        op="native_text_gcn",
        case=f"V={V_WIKI} B={B} threads={threads} fwd+bwd",
        provider=provider,
        flops=spmm_flops(nnz, B, spmms),
        bytes=spmm_bytes(nnz, V_WIKI, B, spmms),
        rounds=_rounds(B),
    )


@pytest.mark.parametrize("B", BATCHES, ids=[f"B={b}" for b in BATCHES])
@pytest.mark.parametrize("provider", ["eager", "scipy", "native", "native_cached"])
def test_native_text_encoder(benchmark, measure, monkeypatch, provider, B):
    """scanet.model.TextEncoder (GCN, dropout 0.2, FC 10055 -> 1024), training mode, forward + backward."""
    _require(provider)
    from scanet.model import ChebConv, TextEncoder

    lt, L = word_graph()
    monkeypatch.setattr(ChebConv, "op", staticmethod(_conv_op(provider, lt)))
    bows = bags_of_words(N_TEXTS, V_WIKI)
    idx = torch.randperm(N_TEXTS, generator=torch.Generator().manual_seed(2))[:B]
    torch.manual_seed(0)
    enc = TextEncoder(V_WIKI, N_COMMON, channels=(1, 1), K=K, dropout=0.2).train()
    params = list(enc.parameters())
    go = torch.randn(B, N_COMMON, generator=torch.Generator().manual_seed(3))
    if provider == "native_cached":
        cache = text_cache(L, bows)

        def forward():
            return encode_text_cached(enc, cache, idx, L)
    else:

        def forward():
            return enc(bows[idx], L)

    def run():
        torch.autograd.grad(forward(), params, go)

    nnz = L.values().numel()
    spmms = 4 if provider == "native_cached" else 6
    flops = spmm_flops(nnz, B, spmms) + 3 * 2 * B * V_WIKI * N_COMMON
    measure(
        benchmark,
        run,
        op="native_text_encoder",
        case=f"V={V_WIKI} B={B} fwd+bwd",
        provider=provider,
        flops=flops,
        rounds=_rounds(B),
    )


def _coattention_step(f, g, weight, bias):
    return reference.coattention(f, g, weight, bias, scale=float(f.shape[1]))


@pytest.mark.parametrize("provider", ["eager", "compile"])
def test_native_coattention(benchmark, measure, provider):
    """One co-attention step at the Wiki preset on CPU: eager vs torch.compile (inductor's fused epilogue)."""
    _skip_on_cuda()
    M, N = 256, N_COMMON
    g0 = torch.Generator().manual_seed(0)
    f = torch.randn(M, N, generator=g0).requires_grad_()
    g = torch.randn(M, N, generator=g0).requires_grad_()
    lin = torch.nn.Linear(N, N)
    go = torch.randn(M, N, generator=g0)
    step = _coattention_step if provider == "eager" else torch.compile(_coattention_step)

    def run():
        torch.autograd.grad(step(f, g, lin.weight, lin.bias), (f, g, lin.weight, lin.bias), go)

    # GEMMs: forward f W^T, backward dW and df; the elementwise softmax/ReLU/Hadamard passes are bandwidth.
    measure(
        benchmark,
        run,
        op="native_coattention",
        case=f"M={M} N={N} fwd+bwd",
        provider=provider,
        flops=3 * 2 * M * N * N,
        bytes=10 * M * N * 4,
    )


TRAIN_PROVIDERS = [
    "eager",
    "eager+fused_adam",
    "native",
    "native_cached",
    "native_cached+fused_adam",
    "native_cached+compile",
]


@pytest.mark.parametrize("provider", TRAIN_PROVIDERS)
def test_native_train_step(benchmark, measure, monkeypatch, provider):
    """One training step of scanet.model.SCANet at the Wiki preset (fused=False, ChebConv.op swapped)."""
    _require(provider)
    from scanet.loss import scanet_loss
    from scanet.model import ChebConv, SCANet

    lt, L = word_graph()
    B = 256
    config = ModelConfig()
    monkeypatch.setattr(ChebConv, "op", staticmethod(_conv_op(provider.split("+")[0], lt)))
    torch.manual_seed(0)
    model = SCANet(V_WIKI, IMAGE_DIM, lt, config).train()
    # Adam as scanet.train builds it, or with fused=True: one C++ loop over all parameters instead of ~10
    # multi-tensor passes (18.7M parameters, mostly the text FC's 10M).
    opt = torch.optim.Adam(
        model.parameters(), lr=1e-4, weight_decay=0.005, **({"fused": True} if provider.endswith("+fused_adam") else {})
    )
    bows = bags_of_words(N_TEXTS, V_WIKI)
    images = torch.randn(N_TEXTS, IMAGE_DIM, generator=torch.Generator().manual_seed(4)).relu()
    g = torch.Generator().manual_seed(5)
    ti = torch.randint(0, N_TEXTS, (B,), generator=g)
    ii = torch.randint(0, N_TEXTS, (B,), generator=g)
    target = (torch.rand(B, generator=g) < 0.5).float()
    coattention = torch.compile(model.coattention) if provider.endswith("+compile") else model.coattention
    if provider.startswith("native_cached"):
        cache = text_cache(model.laplacian(), bows)

        def similarity():
            f_t = encode_text_cached(model.text_encoder, cache, ti, model.laplacian())
            f_t, f_i = coattention(f_t, model.encode_image(images[ii]))
            return torch.sigmoid(model.head(f_t, f_i))
    else:

        def similarity():
            f_t, f_i = coattention(model.encode_text(bows[ti]), model.encode_image(images[ii]))
            return torch.sigmoid(model.head(f_t, f_i))

    def run():
        loss, _ = scanet_loss(similarity(), target, 0.6, 0.35)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    N, L_co = config.common_dim, config.coattention_layers
    nnz = L.values().numel()
    spmms = 4 if provider.startswith("native_cached") else 6
    flops = (
        spmm_flops(nnz, B, spmms) + 3 * 2 * B * V_WIKI * N + 3 * 2 * B * IMAGE_DIM * N + L_co * 2 * 3 * 2 * B * N * N
    )
    steps = math.ceil(PAIRS_PER_EPOCH / B)
    median = measure(
        benchmark,
        run,
        op="native_train_step",
        case=f"wiki B={B} N={N}",
        provider=provider,
        flops=flops,
        steps_per_epoch=steps,
    )
    print(f"\n{provider}: step {median * 1e3:.1f} ms -> projected epoch {median * steps:.1f} s ({steps} steps)")


# ------------------------------------------------------------------------------ bf16 and the fused dropout
DROPOUT_P = 0.2
DROPOUT_PROVIDERS = ["eager", "native_fused", "no_dropout"]
TEXT_PATH_PROVIDERS = [
    "eager",
    "native_fp32",
    "native_fp32+fused_dropout",
    "native_bf16",
    "native_bf16+fused_dropout",
    "native_bf16+fused_dropout+fp32_hidden",
]


def _hidden_signal(L, B):
    """Layer 1's output for B gathered texts (stored (V, B, 1), as the native op writes it), as layer 2's x."""
    bows = bags_of_words(B, V_WIKI, seed=7).unsqueeze(-1)
    w = torch.tensor([[[1.0]], [[0.3]], [[-0.2]]])
    return native.cheb_conv(L, bows, w, torch.zeros(1), "relu", symmetric=True)


def dropout_step(provider: str, B: int = 256):
    """fn() running the second ChebConv with dropout 0.2 on its (B, V) output, forward + backward of x, W, b."""
    _, L = word_graph()
    x = _hidden_signal(L, B).requires_grad_()
    w = torch.randn(K, 1, 1, generator=torch.Generator().manual_seed(1)).div_(K).requires_grad_()
    b = torch.zeros(1, requires_grad=True)
    go = torch.randn(B, V_WIKI, generator=torch.Generator().manual_seed(3))  # the FC's (B, V) gradient

    def forward():
        if provider == "native_fused":
            return native.cheb_conv(L, x, w, b, "relu", symmetric=True, dropout_p=DROPOUT_P).flatten(1)
        y = native.cheb_conv(L, x, w, b, "relu", symmetric=True).flatten(1)
        return torch.nn.functional.dropout(y, DROPOUT_P, True) if provider == "eager" else y

    def run():
        torch.autograd.grad(forward(), (x, w, b), go)

    return run


def text_path_step(provider: str, B: int = 256):
    """fn() running the Wiki text path (ChebConv, ChebConv, dropout, FC) forward + backward of every parameter."""
    import torch.nn.functional as F

    _, L = word_graph()
    bows = bags_of_words(N_TEXTS, V_WIKI)
    idx = torch.randperm(N_TEXTS, generator=torch.Generator().manual_seed(2))[:B]
    torch.manual_seed(0)
    w1, w2 = (torch.randn(K, 1, 1).div_(K).requires_grad_() for _ in range(2))
    b1, b2 = (torch.zeros(1, requires_grad=True) for _ in range(2))
    fc = torch.nn.Linear(V_WIKI, N_COMMON)
    params = [w1, b1, w2, b2, *fc.parameters()]
    go = torch.randn(B, N_COMMON, generator=torch.Generator().manual_seed(3))
    bf16 = "bf16" in provider
    fused = "fused_dropout" in provider
    hidden = {"out_dtype": torch.float32} if "fp32_hidden" in provider else {}

    def forward():
        x = bows[idx].unsqueeze(-1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if provider == "eager":
                h = reference.cheb_conv(L, reference.cheb_conv(L, x, w1, b1), w2, b2)
                return fc(F.dropout(h.flatten(1), DROPOUT_P, True))
            h = native.cheb_conv(L, x, w1, b1, "relu", symmetric=True, **hidden)
            if fused:
                h = native.cheb_conv(L, h, w2, b2, "relu", symmetric=True, dropout_p=DROPOUT_P).flatten(1)
            else:
                h = F.dropout(native.cheb_conv(L, h, w2, b2, "relu", symmetric=True).flatten(1), DROPOUT_P, True)
            return fc(h)

    def run():
        out = forward()
        torch.autograd.grad(out, params, go.to(out.dtype))

    return run


def text_path_flops(B: int = 256) -> int:
    nnz = word_graph()[1].values().numel()
    return spmm_flops(nnz, B, 6) + 3 * 2 * B * V_WIKI * N_COMMON


@pytest.mark.parametrize("provider", DROPOUT_PROVIDERS)
def test_native_dropout(benchmark, measure, provider):
    """Dropout 0.2 on the second ChebConv's output, with that layer (x, W, b get gradients), B=256."""
    _require("native")
    measure(
        benchmark,
        dropout_step(provider),
        op="native_dropout",
        case=f"p={DROPOUT_P} V={V_WIKI} B=256 layer+dropout fwd+bwd",
        provider=provider,
        rounds=9,
    )


@pytest.mark.parametrize("provider", TEXT_PATH_PROVIDERS)
def test_native_text_path(benchmark, measure, provider):
    """The Wiki text path (two ChebConvs K=3 one channel, dropout 0.2, FC 10055 -> 1024), B=256, fwd+bwd."""
    _require(provider)
    measure(
        benchmark,
        text_path_step(provider),
        op="native_text_path",
        case=f"wiki V={V_WIKI} B=256 K={K} fwd+bwd",
        provider=provider,
        flops=text_path_flops(),
        rounds=5 if provider == "eager" else 9,
    )


def main(argv=None) -> None:
    """``python bench/bench_native.py --rounds 15 --threads 2 --json PATH``: the bf16 / fused-dropout
    comparison (native_text_path, native_dropout) with providers interleaved round by round, as JSON."""
    import argparse
    import os
    import statistics

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, nargs="+", default=[2])
    ap.add_argument("--json", required=True)
    args = ap.parse_args(argv)
    load_at_start = " ".join(f"{x:.1f}" for x in os.getloadavg())
    if not native.available():
        raise SystemExit(f"native extension unavailable: {native.unavailable_reason()}")
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for op, case, providers, make, flops, base in (
            (
                "native_text_path",
                f"wiki V={V_WIKI} B=256 K={K} threads={threads} fwd+bwd",
                TEXT_PATH_PROVIDERS,
                text_path_step,
                text_path_flops(),
                "native_fp32",
            ),
            (
                "native_dropout",
                f"p={DROPOUT_P} V={V_WIKI} B=256 threads={threads} layer+dropout fwd+bwd",
                DROPOUT_PROVIDERS,
                dropout_step,
                None,
                "eager",
            ),
        ):
            times = interleaved({p: make(p) for p in providers}, args.rounds)
            med = {p: statistics.median(t) for p, t in times.items()}
            for p, t in times.items():
                row = dict(
                    op=op,
                    case=case,
                    provider=p,
                    median_s=med[p],
                    min_s=min(t),
                    rounds=len(t),
                    flops=flops,
                    speedup_vs_eager=med["eager"] / med[p],
                )
                row[f"speedup_vs_{base}"] = med[base] / med[p]
                if flops:
                    row["TFLOP/s"] = flops / med[p] / 1e12
                rows.append(row)
                print(
                    f"{op:<17} threads={threads} {p:<40} median {med[p] * 1e3:8.1f} ms  min {min(t) * 1e3:8.1f} ms"
                    f"  x{base} {med[base] / med[p]:.2f}  x eager {med['eager'] / med[p]:.2f}"
                )
    write_summary(args.json, "bench/bench_native.py", argv, rows, load_at_start)


if __name__ == "__main__":
    main()
