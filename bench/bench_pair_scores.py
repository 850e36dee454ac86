"""Benchmarks of all-pairs scoring (op "pair_scores") and of two-stage retrieval (op "retrieval").

    pytest bench/bench_pair_scores.py --benchmark [--bench-full] [-s]

pair_scores: the logits of every (text, image) pair of a two-layer SCANet from the encoders' outputs
f_t (Nq, N) and f_i (Nc, N): layer-1 attention once per item, layer 2 and the head per pair. Providers, timed
side by side in one run:
  gemm       torch.matmul (Mg, N) @ (N, N), repeated to the same FLOPs as layer 2 (the rate to compare with);
             gemm-tf32 (torch float32 matmul precision "high") and gemm-bf16 (bf16 inputs) on CUDA
  eager      the eager oracle scanet.reference.pair_logits (score_all(scorer="eager"); 64 texts a chunk:
             every per-pair intermediate is a (64 Nc, N) tensor)
  compile    the same chunk loop with the per-chunk layer-2 function under torch.compile (static shapes)
  fused      scanet.fused.pair_scores (Triton; CUDA only: the CPU interpreter measures nothing useful);
             fused-tf32 / fused-bf16: its GEMM-input precision option
FLOP model: 2 modalities x 2 Nq Nc N^2 (layer 2's GEMMs; the exps and layer 1 are not counted).
Extra fields: pairs_per_s; gemm_fraction = (fused TFLOP/s) / (gemm TFLOP/s of the same precision, measured in
this run on the same shape of work); peak_bytes = torch.cuda.max_memory_allocated during one call, less what
was allocated before (CUDA only: on CPU tracemalloc does not see torch's allocator and RSS includes its caching,
so neither is a meaningful peak; the eager path's working set is ~8 tensors of 64 Nc x N floats by design).
Sweep: (Nq, Nc) in (693, 693), (1000, 1000), (10000, 10000) x N in (256, 1024) on CUDA or with --bench-full;
on CPU by default only (693, 693) at N = 256 and a reduced (200, 200) at N = 1024.

retrieval: exhaustive search (provider "eager") against two-stage search ("two-stage-S<shortlist>": the layer-1
shortlist, then the full score of the shortlisted pairs) on the synthetic dataset's 693 test items (the Wiki
test size) with a model trained here for 3 epochs at N = 256, text -> image, k = 10. Extra fields from
scanet.retrieve.shortlist_report: recall_at_k (of the exhaustive top 10 within the shortlist), map and map_lost
(MAP@all of the two-stage ranking, and exhaustive MAP minus it); speedup_vs_eager is the speed won.
"""

from __future__ import annotations

import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

SHAPES_FULL = [(693, 693), (1000, 1000), (10000, 10000)]
N_FULL = (256, 1024)
REDUCED = {(693, 693, 256), (200, 200, 1024)}
PROVIDERS = ("gemm", "gemm-tf32", "gemm-bf16", "eager", "compile", "fused", "fused-tf32", "fused-bf16")
CHUNK = 64  # texts a chunk in the eager and compiled paths (SCANet's default)
GEMM_ROWS_MAX = 65536  # rows of the reference GEMM a call (bounds its memory)

_GEMM_RATE: dict = {}  # (case, precision) -> FLOP/s measured by the gemm providers of this run
_COMPILED: dict = {}


def flops_model(nq: int, nc: int, N: int) -> int:
    return 2 * 2 * nq * nc * N * N


def _cases():
    out = [(nq, nc, n) for nq, nc in SHAPES_FULL for n in N_FULL]
    out.append((200, 200, 1024))
    return out


def _model(N: int, device):
    """A two-layer SCANet (tiny encoders: only the co-attention and the head matter here), random weights."""
    from scanet.config import ModelConfig
    from scanet.model import SCANet

    torch.manual_seed(0)
    model = SCANet(4, 4, sp.identity(4, format="csr"), ModelConfig(common_dim=N, coattention_layers=2))
    with torch.no_grad():
        for fc in list(model.coattention.text_fc) + list(model.coattention.image_fc):
            fc.weight.normal_(0.0, 1.0 / N**0.5)
            fc.bias.normal_(0.0, 0.1)
    return model.eval().to(device)


def _layer2_chunk(f_t, a1_t, f_i, a1_i, w_t, b_t, w_i, b_i, w, b, scale: float):
    """Logits of a chunk of texts against every image, layer 2 and the head (what torch.compile sees)."""
    N = f_t.shape[1]
    x_t = (a1_i.unsqueeze(0) * f_t.unsqueeze(1)).reshape(-1, N)
    x_i = (a1_t.unsqueeze(1) * f_i.unsqueeze(0)).reshape(-1, N)
    p_t = torch.softmax(F.relu(F.linear(x_t, w_t, b_t)), dim=-1) * scale  # attention from the text side
    p_i = torch.softmax(F.relu(F.linear(x_i, w_i, b_i)), dim=-1) * scale
    return (((p_i * x_t) * (p_t * x_i)) @ w + b).reshape(f_t.shape[0], f_i.shape[0])


def _compiled():
    if "fn" not in _COMPILED:
        torch._dynamo.reset()
        _COMPILED["fn"] = torch.compile(_layer2_chunk, dynamic=False)
    return _COMPILED["fn"]


def _score_fn(provider: str, model, f_t, f_i):
    from scanet.fused import pair_scores
    from scanet.reference import layer1_attention, pair_logits

    if provider == "eager":
        return lambda: pair_logits(model, f_t, f_i, chunk_pairs=CHUNK * len(f_i))
    if provider == "compile":
        fn = _compiled()
        c = model.coattention
        w, b = model.head.fc.weight.reshape(-1), model.head.fc.bias

        def run():
            a1_t, a1_i = layer1_attention(model, f_t, "text"), layer1_attention(model, f_i, "image")
            out = torch.empty(f_t.shape[0], f_i.shape[0], device=f_t.device)
            for s in range(0, f_t.shape[0], CHUNK):
                out[s : s + CHUNK] = fn(
                    f_t[s : s + CHUNK],
                    a1_t[s : s + CHUNK],
                    f_i,
                    a1_i,
                    c.text_fc[1].weight,
                    c.text_fc[1].bias,
                    c.image_fc[1].weight,
                    c.image_fc[1].bias,
                    w,
                    b,
                    c.scale,
                )
            return out

        return run
    precision = {"fused": "fp32", "fused-tf32": "tf32", "fused-bf16": "bf16"}[provider]
    return lambda: pair_scores(model, f_t, f_i, precision=precision)


def _gemm_fn(nq, nc, N, device, precision):
    """A GEMM (Mg, N) @ (N, N) repeated reps times: about the FLOPs of layer 2 (2 x Nq Nc rows of N^2)."""
    rows = 2 * nq * nc
    mg = min(rows, GEMM_ROWS_MAX)
    reps = -(-rows // mg)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(mg, N, device=device).to(dtype)
    w = torch.randn(N, N, device=device).to(dtype)
    out = torch.empty(mg, N, device=device, dtype=dtype)

    def run():
        for _ in range(reps):
            torch.matmul(a, w, out=out)
        return out

    return run, 2 * reps * mg * N * N


@pytest.mark.parametrize("nq,nc,N", _cases())
@pytest.mark.parametrize("provider", PROVIDERS)
def test_pair_scores(benchmark, measure, bench_device, full_sweep, nq, nc, N, provider):
    cuda = bench_device.type == "cuda"
    if (nq, nc, N) == (200, 200, 1024) and full_sweep:
        pytest.skip("(200, 200) at N = 1024 is the reduced CPU stand-in for the full sweep's shapes")
    if not full_sweep and (nq, nc, N) not in REDUCED:
        pytest.skip("outside the reduced CPU sweep ((693, 693) at N = 256, (200, 200) at N = 1024): pass --bench-full")
    if provider.startswith("fused") and not cuda:
        pytest.skip("the fused scorer is timed on CUDA only (on CPU it runs in the Triton interpreter)")
    if provider in ("gemm-tf32", "gemm-bf16") and not cuda:
        pytest.skip(f"{provider} is the reference rate of the fused tensor-core variants, which need CUDA")
    case = f"Nq={nq} Nc={nc} N={N}"
    precision = {"gemm-tf32": "tf32", "gemm-bf16": "bf16", "fused-tf32": "tf32", "fused-bf16": "bf16"}.get(
        provider, "fp32"
    )
    flops = flops_model(nq, nc, N)
    heavy = flops > 5e13  # 10k x 10k: a single eager call is many seconds
    rounds = 3 if (heavy or not cuda) else None
    pairs = nq * nc
    if provider.startswith("gemm"):
        fn, gemm_flops = _gemm_fn(nq, nc, N, bench_device, precision)
        prev = torch.get_float32_matmul_precision()
        if precision == "tf32":
            torch.set_float32_matmul_precision("high")
        try:
            median = measure(
                benchmark,
                fn,
                op="pair_scores",
                case=case,
                provider=provider,
                device=bench_device,
                flops=gemm_flops,
                rounds=rounds,
            )
        finally:
            torch.set_float32_matmul_precision(prev)
        _GEMM_RATE[(case, precision)] = gemm_flops / median
        return
    model = _model(N, bench_device)
    gen = torch.Generator(device=bench_device).manual_seed(1)
    f_t = torch.randn(nq, N, generator=gen, device=bench_device)
    f_i = torch.randn(nc, N, generator=gen, device=bench_device)
    fn = _score_fn(provider, model, f_t, f_i)
    peak = None
    if cuda:
        fn()  # compile / autotune outside the peak measurement
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    rate = _GEMM_RATE.get((case, precision))
    measure(
        benchmark,
        fn,
        op="pair_scores",
        case=case,
        provider=provider,
        device=bench_device,
        flops=flops,
        rounds=rounds,
        peak_bytes=peak,
        output_bytes=4 * pairs,
        peak_note=None if cuda else "CPU: no meaningful peak (tracemalloc misses torch's allocator)",
        derived={"pairs_per_s": lambda m: pairs / m, "gemm_fraction": lambda m: (flops / m) / rate if rate else None},
    )


# ------------------------------------------------------------------------------------------------ retrieval
@pytest.fixture(scope="module")
def retrieval_setup(trained_synthetic):
    from scanet import retrieve

    model, ds, _ = trained_synthetic
    texts = retrieve.encode_items(model, "text", ds.test.text_matrix())
    images = retrieve.encode_items(model, "image", ds.test.images)
    report = retrieve.shortlist_report(
        model, texts, images, ds.test.labels, ds.test.labels, k=10, shortlists=(20, 50, 100)
    )
    return model, texts, images, report


@pytest.mark.parametrize("provider", ("eager", "two-stage-S20", "two-stage-S50", "two-stage-S100"))
def test_retrieval(benchmark, measure, bench_device, retrieval_setup, provider):
    from scanet import retrieve

    model, texts, images, report = retrieval_setup
    nq, nc, N = len(texts), len(images), texts.features.shape[1]
    case = f"synthetic t2i Nq={nq} Nc={nc} N={N} k=10"
    if provider == "eager":
        fn = lambda: retrieve.exhaustive_search(model, texts, images, 10)  # noqa: E731
        extra = dict(
            map=report["exhaustive"]["map"], map_at_k=report["exhaustive"]["map_at_k"], recall_at_k=1.0, map_lost=0.0
        )
        flops = flops_model(nq, nc, N)
    else:
        S = int(provider.split("S")[-1])
        row = next(r for r in report["two_stage"] if r["shortlist"] == S)
        fn = lambda: retrieve.two_stage_search(model, texts, images, 10, S)  # noqa: E731
        extra = {k: row[k] for k in ("recall_at_k", "map", "map_at_k", "map_lost")}
        flops = flops_model(nq, S, N) + 2 * nq * nc * N
    measure(
        benchmark, fn, op="retrieval", case=case, provider=provider, device=bench_device, flops=flops, rounds=5, **extra
    )
