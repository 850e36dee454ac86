"""The FC layers' GEMMs and optimizer pass with the weight stored (out, in) as nn.Linear builds it ("row_major")
or transposed in memory, strides (1, out) ("transposed", what scanet.master_weights does for CPU bf16 training).

    OMP_WAIT_POLICY=passive python bench/bench_fc_layout.py --rounds 15 --json PATH     (interleaved, DRAM-cold)
    OMP_WAIT_POLICY=passive pytest bench/bench_fc_layout.py --benchmark    (pytest-benchmark: forward + backward
        in bf16 per case and layout, sequential, operands as the previous call left them in the caches)

Ops, at the Wiki step's shapes (B = 256, N = 1024), each call with its operands evicted to DRAM first (an 800 MB
pass in between, as inside a training step, where the other layers' data pass through the caches):
  fc_forward   y = F.linear(x, W, b), as the model calls it
  fc_backward  y.backward(dy): autograd's dX GEMM (when x requires grad) and dW GEMM, and the bias sum
  adam         one optimizer step of that weight and bias: "native" = scanet.adam_bf16 (bf16 grad, 28 B a weight),
               "torch" = torch's fused AdamW with a float32 grad, both on the layout of the row
Cases: text  W 1024 x 10,055, x (256, 10,055) stored vertex-major as the Chebyshev layer writes it (x^T
             contiguous), x requires grad
       image W 1024 x 4,096, x (256, 4,096) row-major features, no grad
       coatt W 1024 x 1,024, x (256, 1,024) row-major, x requires grad
dtypes: bf16 (oneDNN on AMX) and fp32 (MKL) for the GEMMs; FLOPs 2 B in out per GEMM. Ratios: each row's median
against the row_major row of the same op, case and dtype, measured in the same rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from _script import parse_and_start, write_summary

B, N = 256, 1024
CASES = {"text": (10_055, True, True), "image": (4_096, False, False), "coatt": (1_024, False, True)}
LAYOUTS = ("row_major", "transposed")
FLUSH_BYTES = 800_000_000


def _weight(out_dim: int, in_dim: int, layout: str, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    w = (torch.randn(out_dim, in_dim, generator=g) * 0.02).to(dtype)
    return w.t().contiguous().t() if layout == "transposed" else w


def make(case: str, layout: str, dtype: torch.dtype):
    """(forward fn, backward fn, adam fns by provider) for one case, layout and GEMM dtype."""
    in_dim, vertex_major, x_grad = CASES[case]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(in_dim, B, generator=g).to(dtype).t() if vertex_major else torch.randn(B, in_dim, generator=g)
    x = x.to(dtype).requires_grad_(x_grad)
    w = _weight(N, in_dim, layout, dtype, g).requires_grad_(True)
    b = torch.zeros(N, dtype=dtype, requires_grad=True)
    dy = torch.randn(B, N, generator=g).to(dtype)
    state = {}

    def forward():
        state["y"] = F.linear(x, w, b)

    def backward():
        if "y" not in state:
            forward()
        w.grad = b.grad = x.grad = None
        state.pop("y").backward(dy)

    adams = {}
    if dtype == torch.bfloat16:
        from scanet.adam_bf16 import step_with_bf16_grads

        master = torch.nn.Parameter(_weight(N, in_dim, layout, torch.float32, g))
        grad, copy = (torch.randn(N, in_dim, generator=g) * 1e-3).to(dtype), master.detach().to(dtype)
        grad = grad.t().contiguous().t() if layout == "transposed" else grad
        opt = torch.optim.AdamW([master], lr=1e-4, weight_decay=0.005, fused=True)
        groups = {id(master): opt.param_groups[0]}
        adams["native"] = lambda: step_with_bf16_grads(opt, [(master, grad, None, copy)], groups)
        torch_master = torch.nn.Parameter(master.detach().clone())
        torch_master.grad = torch.empty_like(torch_master).copy_(grad)  # laid out as the parameter
        torch_opt = torch.optim.AdamW([torch_master], lr=1e-4, weight_decay=0.005, fused=True)
        adams["torch"] = torch_opt.step
    return forward, backward, adams


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", list(CASES))
def test_fc_layout(benchmark, measure, case, layout):
    """One Wiki FC's forward and backward in bf16 with its weight stored ``layout``."""
    if torch.cuda.is_available():
        pytest.skip("a CPU benchmark (oneDNN's bf16 GEMMs on AMX)")
    in_dim, _, x_grad = CASES[case]
    forward, backward, _ = make(case, layout, torch.bfloat16)

    def run():
        forward()
        backward()

    measure(
        benchmark,
        run,
        op="fc_layout",
        case=f"{case} W {N}x{in_dim} B={B} bf16",
        provider=layout,
        flops=(3 if x_grad else 2) * 2 * B * in_dim * N,
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    args, load_at_start = parse_and_start(ap, argv)
    flush = torch.empty(FLUSH_BYTES // 4)
    fns: dict[tuple, object] = {}
    for case, (in_dim, _, x_grad) in CASES.items():
        for dtype in (torch.bfloat16, torch.float32):
            for layout in LAYOUTS:
                fwd, bwd, adams = make(case, layout, dtype)
                d = "bf16" if dtype == torch.bfloat16 else "fp32"
                fns[("fc_forward", case, d, layout)] = (fwd, 2 * B * in_dim * N)
                fns[("fc_backward", case, d, layout)] = (bwd, (2 if x_grad else 1) * 2 * B * in_dim * N)
                for provider, fn in adams.items():
                    fns[(f"adam_{provider}", case, "fp32", layout)] = (fn, None)
    for fn, _ in fns.values():  # warm-up: oneDNN primitives, optimizer state, first-touch pages
        fn(), fn()
    times: dict[tuple, list[float]] = {k: [] for k in fns}
    from tqdm import tqdm

    for _ in tqdm(range(args.rounds), desc="rounds"):
        for key, (fn, _) in fns.items():
            if key[0] == "fc_backward":
                fns[("fc_forward",) + key[1:]][0]()  # the graph to run backward through, outside the timing
            flush.add_(1.0)
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    rows = []
    for key, t in times.items():
        op, case, dtype, layout = key
        base = statistics.median(times[(op, case, dtype, "row_major")])
        med = statistics.median(t)
        flops = fns[key][1]
        rows.append(
            dict(
                op=op,
                case=f"{case} W {N}x{CASES[case][0]} B={B}",
                dtype=dtype,
                provider=layout,
                median_s=med,
                min_s=min(t),
                rounds=len(t),
                flops=flops,
                **({"TFLOP/s": flops / med / 1e12} if flops else {}),
                speedup_vs_row_major=base / med,
                speedup_vs_row_major_per_round=statistics.median(
                    a / b for a, b in zip(times[(op, case, dtype, "row_major")], t, strict=True)
                ),
            )
        )
        print(
            f"{op:<12} {case:<6} {dtype} {layout:<10} median {med * 1e3:7.2f} ms"
            + (f"  {flops / med / 1e12:.2f} TFLOP/s" if flops else "")
            + f"  x row_major {base / med:.2f}"
        )
    write_summary(args.json, "bench/bench_fc_layout.py", argv, rows, load_at_start)


if __name__ == "__main__":
    main()
