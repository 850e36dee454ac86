"""Benchmarks of the whole Wiki training step and of all-pairs evaluation, fp32 against bf16 (torch.autocast).

    OMP_WAIT_POLICY=passive pytest bench/bench_train_step.py --benchmark        (pytest-benchmark, sequential)
    OMP_WAIT_POLICY=passive python bench/bench_train_step.py --rounds 7 --json PATH   (interleaved: use this
        on a shared machine; providers are timed round-robin so that slow spells hit all of them alike)

Data: random, with the Wiki shapes: the word graph of scanet.data.graph.random_graph_laplacian(10,055, k=8)
(nnz ~ 10 per row, float32 CSR), bags of words ~2% non-zero summing to 1, 4096-d non-negative image features
(VGG-19 fc7's width), B = 256 pairs, N = 1024, two co-attention layers, dropout 0.2, the loss of eq. 10 and
AdamW(fused=True), as scanet.train builds them.

Ops (one name per table block; ratios to the "eager" provider of the same op and case, and to a named base):
  train_step   forward + loss + backward + AdamW step of scanet.model.SCANet
  pair_scores  the test split's all-pairs logits, 693 x 693 at N = 1024 (the Wiki test set), from the encoders'
               outputs, by the chunked CPU path (scanet.reference.pair_logits, 64 texts a chunk)
  gemm         torch.matmul at a shape of each op (the text FC 256 x 10,055 x 1,024; a layer-2 chunk
               16,384 x 1,024 x 1,024), fp32 and bf16: the machine's rate, measured in this run

Providers:
  train_step:  eager             SCANet(fused=False), float32: torch.sparse.mm Chebyshev, nn.Dropout
               fused_fp32_today  SCANet(fused=True) as before this change: native Chebyshev, then nn.Dropout's
                                 separate mask pass (``fuses_dropout`` switched off), the eager co-attention
                                 elementwise ops, head and image standardization (``native = False``), layer 2's
                                 dW from its saved basis (``save_basis = True``)
               fused_fp32        SCANet(fused=True) as scanet.train runs it: layer 1 from the per-text cache of
                                 its Chebyshev basis (scanet.fused._basis_cache, built once outside the
                                 timing; no SpMM), layer 2 native with the dropout in its epilogue, the
                                 co-attention's relu-softmax-Hadamard and the head (dropout, Hadamard, FC to
                                 a logit) one native pass each way (scanet.native_dense)
               fused_bf16_gather fused_bf16 with layer 1 by SpMMs on the gathered batch (the bf16 step before
                                 the cache)
               fused_bf16        fused_fp32 under autocast_context("cpu", "bf16"): the GEMMs bf16 on AMX (oneDNN),
                                 the recursion, softmax statistics, the loss and AdamW in float32
               fused_bf16_master fused_bf16 with scanet.master_weights (as scanet.train runs CPU bf16): the FC
                                 layers hold bf16 copies for the forward; one native pass per FC master
                                 (scanet.adam_bf16: bf16 grad in, master, AdamW moments and bf16 copy out)
                                 The FC weights stored (in, out) in memory (MasterWeights' default with the
                                 native step: autograd then hands oneDNN its faster dW and dX GEMM forms,
                                 bench/bench_fc_layout.py)
               fused_bf16_master_row_major  the same with the FC weights stored as nn.Linear builds them
                                 ((out, in) row-major: MasterWeights(transposed=False), as before)
               fused_bf16_master_unfused  the same with MasterWeights(native=False): the bf16 grads widened
                                 into persistent buffers, torch's fused AdamW on the masters, the copies
                                 refreshed in place (no per-step casts into fresh 20/41 MB tensors); the
                                 same numbers as fused_bf16 with the weights so laid out, bit for bit
               fused_bf16_master_saved_basis  fused_bf16_master with layer 2's forward saving its Chebyshev
                                 basis for dW (``ChebConv.save_basis = True``, as before the adjoint backward:
                                 20 MB more written and read a step)
  pair_scores: fp32_today  the chunk loop as it was before this change (gathered f[ti], a1[ii] copies, the
                           last layer's scale applied to both factors; fp32), kept here as the baseline
               eager       scanet.reference.pair_logits now, fp32 (layer 1 by broadcasting, scale folded into
                           the head)
               bf16        the same with bf16 features under bf16 autocast (logits float32)
  gemm:        fp32, bf16

Models. FLOPs per step: SpMMs 6 x 2 nnz B (two layers, forward and backward's dx/dW recursion), the text FC
3 x 2 B V N, the image FC 3 x 2 B D N, co-attention 2 layers x 2 modalities x 3 x 2 B N^2 (the head and the
elementwise work are not counted); the same nominal count for every provider (the cached layer 1
does less of it: its SpMMs ran once per text, outside the step). All pairs: 2 modalities x 2 Nt Ni N^2
(layer 2's GEMMs). gemm_share =
(the op's FLOP/s) / (the gemm rate of the same precision at that op's shape, measured in this run).
train_step rows also count minor_faults_per_step (getrusage, 3 steps after the timed rounds): fresh pages the
kernel zero-fills for the step's new large tensors, a cost that the machine's load does not change; and
speedup_vs_fused_bf16_per_round, the median over rounds of (fused_bf16's time / this provider's) in the same
round (``--rounds 40 --pair-rounds 0`` for a steadier figure on a loaded machine: the step alone, ~2 s a round).
``--baseline-rev REV`` adds the provider fused_fp32_at_REV: the fused fp32 step of the code at revision REV itself
(bench/step_at_revision.py: a git worktree, its own native library, a child process on the same data), timed in
the same rounds, with every train_step row's ratio to it (speedup_vs_fused_fp32_at_REV).
"""

from __future__ import annotations

import math

import pytest
import torch

from _script import interleaved, parse_and_start, write_summary
from scanet.config import ModelConfig

V_WIKI = 10_055
N_COMMON = 1024
IMAGE_DIM = 4096
N_TEXTS = 2_866
B = 256
N_TEST = 693
CHUNK = 64
PAIRS_PER_EPOCH = 80_000
STEP_PROVIDERS = (
    "eager",
    "fused_fp32_today",
    "fused_fp32",
    "fused_bf16_gather",
    "fused_bf16",
    "fused_bf16_master",
    "fused_bf16_master_row_major",
    "fused_bf16_master_unfused",
    "fused_bf16_master_saved_basis",
)
PAIR_PROVIDERS = ("fp32_today", "eager", "bf16")
GEMM_SHAPES = {"train_step": (B, V_WIKI, N_COMMON), "pair_scores": (16_384, N_COMMON, N_COMMON)}

_DATA: dict = {}


def _skip_on_cuda():
    if torch.cuda.is_available():
        pytest.skip("bench_train_step times the CPU path (bf16 on AMX); bench_pair_scores.py covers CUDA")


def wiki_graph():
    if "graph" not in _DATA:
        from scanet.data.graph import random_graph_laplacian

        _DATA["graph"] = random_graph_laplacian(V_WIKI, k=8, seed=0)
    return _DATA["graph"]


def bags_of_words(n: int, V: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    bow = torch.rand(n, V, generator=g) * (torch.rand(n, V, generator=g) < 0.02)
    return bow / bow.sum(1, keepdim=True).clamp(min=1e-6)


def step_flops() -> int:
    nnz = wiki_graph().nnz
    N, L = N_COMMON, 2
    return 6 * 2 * nnz * B + 3 * 2 * B * V_WIKI * N + 3 * 2 * B * IMAGE_DIM * N + L * 2 * 3 * 2 * B * N * N


def pair_flops(n: int = N_TEST, N: int = N_COMMON) -> int:
    return 2 * 2 * n * n * N * N


def gemm_flops(shape) -> int:
    m, k, n = shape
    return 2 * m * k * n


# ------------------------------------------------------------------------------------------------ steps
def train_step(provider: str):
    """fn() running one training step of the Wiki-shaped SCANet for ``provider`` (see the module docstring)."""
    import contextlib

    from scanet import fused as fused_modules
    from scanet.loss import scanet_loss
    from scanet.master_weights import MasterWeights
    from scanet.model import SCANet
    from scanet.precision import autocast_context

    fused = provider != "eager"
    torch.manual_seed(0)
    model = SCANet(V_WIKI, IMAGE_DIM, wiki_graph(), ModelConfig(dropout=0.2), fused=fused).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.005, fused=True)
    bows = bags_of_words(N_TEXTS, V_WIKI)
    images = torch.randn(N_TEXTS, IMAGE_DIM, generator=torch.Generator().manual_seed(4)).relu()
    g = torch.Generator().manual_seed(5)
    ti, ii = torch.randint(0, N_TEXTS, (B,), generator=g), torch.randint(0, N_TEXTS, (B,), generator=g)
    target = (torch.rand(B, generator=g) < 0.5).float()
    precision = "bf16" if "bf16" in provider else "fp32"
    today = provider.endswith("_today")
    # As scanet.train's step: the whole text matrix and the batch's indices (layer 1 from the per-text basis
    # cache on the native backend); "_today" and "_gather" hand over the gathered batch (layer 1 by SpMMs).
    cached = not (today or provider.endswith("_gather"))

    if today or provider.endswith("_saved_basis"):  # layer 2's dW from its saved basis, as before the adjoint
        model.text_encoder.convs[-1].save_basis = True
    if today:  # the step before the dropout moved into the epilogue (nn.Dropout after the GCN) and before the
        # native co-attention epilogue and head (scanet.native_dense): eager elementwise ops there
        model.text_encoder.convs[-1].fuses_dropout = lambda x: False
        model.coattention.native = False
        model.head.native = False
        model.image_encoder.native = False
    assert not fused or isinstance(model.text_encoder.convs[-1], fused_modules.ChebConv)
    weights = (
        MasterWeights(
            model,
            opt,
            native=not provider.endswith("_unfused"),
            transposed=False if provider.endswith("_row_major") else None,
        )
        if "_master" in provider
        else None
    )
    if weights is not None and not provider.endswith("_unfused") and not weights.native:
        raise RuntimeError(f"{provider}: the native optimizer step is off: {weights.native_off_reason}")
    stepper = weights or opt  # zero_grad() and step(), as in scanet.train
    forward_weights = weights.in_forward if weights is not None else contextlib.nullcontext

    def run():
        with autocast_context("cpu", precision), forward_weights():
            sim = model(bows, images[ii], text_index=ti) if cached else model(bows[ti], images[ii])
        loss, _ = scanet_loss(sim, target, 0.6, 0.35)
        stepper.zero_grad(set_to_none=True)
        loss.backward()
        stepper.step()

    return run


def pair_step(provider: str, n: int = N_TEST, N: int = N_COMMON):
    """fn() scoring all n x n pairs of a two-layer model from fixed encoder outputs."""
    from scanet import reference
    from scanet.model import SCANet
    from scanet.precision import autocast_context

    key = ("pairs", n, N)
    if key not in _DATA:
        from scanet.data.graph import random_graph_laplacian

        torch.manual_seed(0)  # tiny encoders: only the co-attention and the head matter here
        model = SCANet(16, 8, random_graph_laplacian(16, k=2), ModelConfig(common_dim=N)).eval()
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for fc in list(model.coattention.text_fc) + list(model.coattention.image_fc):
                fc.weight.copy_(torch.randn(N, N, generator=g) * (2.0 / N**0.5))
        _DATA[key] = (model, torch.randn(n, N, generator=g), torch.randn(n, N, generator=g))
    model, f_t, f_i = _DATA[key]
    precision = "bf16" if provider == "bf16" else "fp32"
    if precision == "bf16":  # what the encoders hand the scorer under bf16 autocast
        f_t, f_i = f_t.bfloat16(), f_i.bfloat16()

    if provider == "fp32_today":
        return lambda: _pair_logits_before(model, f_t, f_i)

    def run():
        with autocast_context("cpu", precision):
            return reference.pair_logits(model, f_t, f_i, chunk_pairs=CHUNK * n)

    return run


@torch.no_grad()
def _pair_logits_before(model, f_t, f_i):
    """The all-pairs chunk loop of scanet.reference.pair_logits before bf16 scoring (two layers), verbatim."""
    from scanet.reference import head_weights, layer1_attention

    w, b = head_weights(model, f_t.dtype)
    a1_t, a1_i = layer1_attention(model, f_t, "text"), layer1_attention(model, f_i, "image")
    Nt, Ni = f_t.shape[0], f_i.shape[0]
    out = torch.empty(Nt, Ni, dtype=f_t.dtype)
    cols = torch.arange(Ni)
    for s in range(0, Nt, CHUNK):
        e = min(s + CHUNK, Nt)
        ti, ii = torch.arange(s, e).repeat_interleave(Ni), cols.repeat(e - s)
        pt, pi = a1_i[ii] * f_t[ti], a1_t[ti] * f_i[ii]
        pt, pi = model.coattention.layer(1, pt, pi)
        out[s:e] = ((pt * pi) @ w + b).reshape(e - s, Ni)
    return out


def gemm_step(op: str, provider: str):
    m, k, n = GEMM_SHAPES[op]
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if provider == "bf16" else torch.float32
    a, b = torch.randn(m, k, generator=g).to(dtype), torch.randn(k, n, generator=g).to(dtype)
    return lambda: a @ b


# ----------------------------------------------------------------------------------------- pytest-benchmark
@pytest.mark.parametrize("provider", ("fp32", "bf16"))
@pytest.mark.parametrize("op", tuple(GEMM_SHAPES))
def test_gemm(benchmark, measure, op, provider):
    _skip_on_cuda()
    shape = GEMM_SHAPES[op]
    measure(
        benchmark,
        gemm_step(op, provider),
        op="gemm",
        case=f"{op} {'x'.join(map(str, shape))}",
        provider=provider,
        flops=gemm_flops(shape),
    )


@pytest.mark.parametrize("provider", STEP_PROVIDERS)
def test_train_step(benchmark, measure, provider):
    """One Wiki-shaped training step (B=256, V=10,055, N=1024); the projected epoch is median * 313 steps."""
    _skip_on_cuda()
    from scanet import native

    if provider != "eager" and not native.available():
        pytest.skip(f"native extension unavailable: {native.unavailable_reason()}")
    steps = math.ceil(PAIRS_PER_EPOCH / B)
    measure(
        benchmark,
        train_step(provider),
        op="train_step",
        case=f"wiki B={B} V={V_WIKI} N={N_COMMON}",
        provider=provider,
        flops=step_flops(),
        rounds=3 if provider == "eager" else 7,
        derived={"epoch_s": lambda m: m * steps},
    )


@pytest.mark.parametrize("provider", PAIR_PROVIDERS)
def test_pair_scores(benchmark, measure, provider):
    """All 693 x 693 test pairs at N = 1024, the chunked CPU scorer, fp32 vs bf16."""
    _skip_on_cuda()
    measure(
        benchmark,
        pair_step(provider),
        op="pair_scores",
        case=f"{N_TEST}x{N_TEST} N={N_COMMON}",
        provider=provider,
        flops=pair_flops(),
        rounds=3,
    )


def minor_faults_per_call(fn, calls: int = 3) -> float:
    """Page faults (minor: the kernel zero-filling fresh pages) per call of fn, after the timed rounds: the
    cost of allocating large tensors afresh, which a shared machine's load does not change (getrusage)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def main(argv=None) -> None:
    """``python bench/bench_train_step.py --rounds 7 --json PATH``: the training step and all-pairs scoring,
    fp32 against bf16, each op's providers (and its GEMM rate rows) interleaved round by round, as JSON."""
    import argparse
    import statistics

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--pair-rounds", type=int, default=3, help="0: the training step alone")
    ap.add_argument(
        "--baseline-rev",
        default=None,
        help="also time the fused fp32 step of this older revision, in a child process, round by round with the "
        "others (bench/step_at_revision.py; e.g. a2adf9b, the code when the bf16 issue was filed)",
    )
    args, load_at_start = parse_and_start(ap, argv)
    revision = None
    if args.baseline_rev:
        from step_at_revision import RevisionStep

        revision = RevisionStep(args.baseline_rev, args.threads)
    at_rev = f"fused_fp32_at_{args.baseline_rev}"
    rows = []
    for op, case, make, providers, flops, rounds, base in (
        (
            "train_step",
            f"wiki B={B} V={V_WIKI} N={N_COMMON} threads={args.threads}",
            train_step,
            STEP_PROVIDERS,
            step_flops(),
            args.rounds,
            "fused_fp32_today",
        ),
        (
            "pair_scores",
            f"{N_TEST}x{N_TEST} N={N_COMMON} threads={args.threads}",
            pair_step,
            PAIR_PROVIDERS,
            pair_flops(),
            args.pair_rounds,
            "eager",
        ),
    ):
        if rounds < 1:
            continue
        steps = {p: make(p) for p in providers}
        if op == "train_step" and revision is not None:
            providers = (*providers, at_rev)
            steps[at_rev] = revision  # timed here around the round trip to the child (~0.1 ms of ~180)
        steps.update({f"gemm_{p}": gemm_step(op, p) for p in ("fp32", "bf16")})
        times = interleaved(steps, rounds)
        # faults of this process: the revision's step runs in its child, so it has none to count here
        faults = (
            {p: minor_faults_per_call(steps[p]) if p != at_rev else None for p in providers}
            if op == "train_step"
            else {}
        )
        med = {p: statistics.median(t) for p, t in times.items()}
        gemm_rate = {p: gemm_flops(GEMM_SHAPES[op]) / med[f"gemm_{p}"] for p in ("fp32", "bf16")}
        for p, t in times.items():
            is_gemm = p.startswith("gemm_")
            f = gemm_flops(GEMM_SHAPES[op]) if is_gemm else flops
            prec = "bf16" if "bf16" in p else "fp32"
            row = dict(
                op=op if not is_gemm else "gemm",
                case=case if not is_gemm else f"{op} {'x'.join(map(str, GEMM_SHAPES[op]))} threads={args.threads}",
                provider=p,
                median_s=med[p],
                min_s=min(t),
                rounds=len(t),
                flops=f,
                **{"TFLOP/s": f / med[p] / 1e12},
            )
            if not is_gemm:
                row["speedup_vs_eager"] = med["eager"] / med[p]
                row[f"speedup_vs_{base}"] = med[base] / med[p]
                if op == "train_step" and at_rev in med:
                    row[f"speedup_vs_{at_rev}"] = med[at_rev] / med[p]
                    row[f"speedup_vs_{at_rev}_per_round"] = statistics.median(
                        a / b for a, b in zip(times[at_rev], t, strict=True)
                    )
                row["gemm_share"] = (f / med[p]) / gemm_rate[prec]
                if op == "train_step":
                    row["epoch_s"] = med[p] * math.ceil(PAIRS_PER_EPOCH / B)
                    row["minor_faults_per_step"] = faults[p]
                    # the median of the per-round ratios: a slow spell hits both steps of a round alike
                    row["speedup_vs_fused_bf16_per_round"] = statistics.median(
                        a / b for a, b in zip(times["fused_bf16"], t, strict=True)
                    )
            rows.append(row)
            extra = (
                ""
                if is_gemm
                else (
                    f"  x eager {row['speedup_vs_eager']:.2f}  x{base} "
                    f"{row[f'speedup_vs_{base}']:.2f}  gemm share {row['gemm_share']:.2f}"
                )
            )
            print(
                f"{op:<12} {p:<18} median {med[p] * 1e3:9.1f} ms  min {min(t) * 1e3:9.1f} ms  "
                f"{f / med[p] / 1e12:.3f} TFLOP/s{extra}"
                + (f"  x{at_rev} {row[f'speedup_vs_{at_rev}']:.2f}" if f"speedup_vs_{at_rev}" in row else "")
            )
    if revision is not None:
        revision.close()
    write_summary(args.json, "bench/bench_train_step.py", argv, rows, load_at_start)


if __name__ == "__main__":
    main()
