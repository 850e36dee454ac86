"""The co-attention step and the similarity head on CPU, forward + backward: eager torch against the native
epilogues (scanet.native_dense) and torch.compile of the eager code, at the Wiki step's shapes (M = 256 pairs,
N = 1024), bf16 autocast and fp32.

    OMP_WAIT_POLICY=passive pytest bench/bench_native_dense.py --benchmark      (pytest-benchmark, sequential)
    OMP_WAIT_POLICY=passive python bench/bench_native_dense.py --rounds 50 --json PATH   (interleaved)

Ops (one name per op, as in tests/test_native_dense.py):
  coattention  z = f W^T + b (torch's GEMM, the same for every provider), softmax(relu(z)) * g * N, and the
               backward into f, g, W, b: eager = scanet.reference.coattention, native = scanet.fused.coattention
               (the one-pass epilogue after the same GEMM), compile = torch.compile(reference.coattention)
  head         dropout(p = 0.2) -> FC(f_T * f_I) -> one logit, and its backward: eager = scanet.layers.
               SimilarityHead, native = scanet.fused.SimilarityHead, compile = torch.compile(the eager head)

Models. coattention: FLOPs = 3 x 2 M N^2 (the GEMMs; the epilogue's are not counted); the epilogue's bytes at
one pass each way (forward reads z, g, writes out and the float32 map p; backward reads dout, p, z, g and
writes dz, dg): 12 + 12 element sizes, i.e. 8 x 2 + 2 x 4 = 24 B an element in bf16. head: bytes = one pass
each way over f_T, f_I (forward reads both, backward reads both and writes both): 6 element sizes.
"""

from __future__ import annotations

import pytest
import torch

from _script import interleaved, parse_and_start, write_summary

M, N = 256, 1024
OPS = ("coattention", "head")
PROVIDERS = ("eager", "native", "compile")
PRECISIONS = ("bf16", "fp32")


def _inputs(precision: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    f = torch.randn(M, N, generator=g).to(dtype).requires_grad_()
    other = torch.randn(M, N, generator=g).to(dtype).requires_grad_()
    return f, other


def coattention_step(provider: str, precision: str):
    """fn() running one co-attention step forward and backward (f, g from the encoders in the autocast dtype)."""
    from scanet import fused, reference
    from scanet.precision import autocast_context

    f, g = _inputs(precision)
    fc = torch.nn.Linear(N, N)
    torch.nn.init.normal_(fc.weight, std=N**-0.5)
    op = {
        "eager": reference.coattention,
        "native": fused.coattention,
        "compile": torch.compile(reference.coattention, dynamic=False),
    }[provider]

    def run():
        with autocast_context("cpu", precision):
            out = op(f, g, fc.weight, fc.bias, scale=float(N))
        torch.autograd.grad(out, (f, g, fc.weight, fc.bias), torch.ones_like(out))

    return run


def head_step(provider: str, precision: str):
    """fn() running the similarity head forward and backward, in training mode (dropout on)."""
    from scanet import fused, layers
    from scanet.precision import autocast_context

    f_t, f_i = _inputs(precision, seed=1)
    torch.manual_seed(0)
    head = (fused.SimilarityHead if provider == "native" else layers.SimilarityHead)(N, 0.2).train()
    fn = torch.compile(head, dynamic=False) if provider == "compile" else head

    def run():
        with autocast_context("cpu", precision):
            logit = fn(f_t, f_i)
        torch.autograd.grad(logit.float().sum(), (f_t, f_i, head.fc.weight, head.fc.bias))

    return run


def model(op: str, precision: str) -> dict:
    elem = 2 if precision == "bf16" else 4
    if op == "coattention":
        return {"flops": 3 * 2 * M * N * N, "bytes": M * N * (10 * elem + 2 * 4)}
    return {"flops": None, "bytes": 6 * M * N * elem}


STEPS = {"coattention": coattention_step, "head": head_step}


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op", OPS)
def test_native_dense(benchmark, measure, op, provider, precision):
    if torch.cuda.is_available():
        pytest.skip("bench_native_dense times the CPU epilogues")
    from scanet import native_dense

    if provider == "native" and not native_dense.available():
        pytest.skip(f"native epilogues unavailable: {native_dense.unavailable_reason()}")
    measure(
        benchmark,
        STEPS[op](provider, precision),
        op=op,
        case=f"M={M} N={N} {precision}",
        provider=provider,
        rounds=30,
        **model(op, precision),
    )


def main(argv=None) -> None:
    """``python bench/bench_native_dense.py --rounds 50 --json PATH``: every op's providers interleaved."""
    import argparse
    import statistics

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--rounds", type=int, default=50)
    args, load_at_start = parse_and_start(ap, argv)
    rows = []
    for op in OPS:
        for precision in PRECISIONS:
            steps = {p: STEPS[op](p, precision) for p in PROVIDERS}
            for fn in steps.values():  # torch.compile's compilation outside the timing
                fn()
            times = interleaved(steps, args.rounds)
            m = model(op, precision)
            for p in PROVIDERS:
                med = statistics.median(times[p])
                per_round = statistics.median([e / t for e, t in zip(times["eager"], times[p], strict=True)])
                rows.append(
                    {
                        "op": op,
                        "case": f"M={M} N={N} {precision} threads={args.threads}",
                        "provider": p,
                        "median_s": med,
                        "min_s": min(times[p]),
                        "rounds": args.rounds,
                        **m,
                        "GB/s (epilogue bytes)": m["bytes"] / med / 1e9,
                        "speedup_vs_eager_per_round": per_round,
                    }
                )
                print(f"{op:12s} {precision:5s} {p:8s} median {med * 1e3:7.3f} ms  x{per_round:.2f} vs eager")
    write_summary(args.json, "bench/bench_native_dense.py", argv, rows, load_at_start)


if __name__ == "__main__":
    main()
