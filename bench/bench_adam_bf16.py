"""The optimizer step of CPU bf16 training with master weights, alone: the Wiki FC shapes (18.7 M weights).

Providers, timed round-robin (a shared machine: read the ratios):
  unfused  MasterWeights' old step: widen each bf16 grad into a float32 buffer, torch's fused AdamW on the
           float32 masters, round the masters into the bf16 copies (three passes, ~40 B a weight)
  native   scanet.adam_bf16.step_with_bf16_grads: one pass, 28 B a weight
  torch_adamw_only  torch's fused AdamW with float32 grads ready (the pass the unfused step shares)

    PYTHONPATH=$PWD OMP_WAIT_POLICY=passive python bench/bench_adam_bf16.py --rounds 30 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from scanet.adam_bf16 import step_with_bf16_grads

# text FC (N x V), image FC (N x 4096), 2 layers x 2 modalities of co-attention FCs (N x N), their biases
N, V, IMAGE_DIM = 1024, 10055, 4096
SHAPES = [(N, V), (N, IMAGE_DIM)] + [(N, N)] * 4 + [(N,)] * 6


def make(provider: str):
    g = torch.Generator().manual_seed(0)
    masters = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in SHAPES]
    opt = torch.optim.AdamW(masters, lr=1e-4, weight_decay=0.005, fused=True)
    copies = [m.detach().to(torch.bfloat16) for m in masters]
    grads = [torch.randn(s, generator=g).to(torch.bfloat16) for s in SHAPES]
    buffers = [torch.empty_like(m) for m in masters]
    groups = {id(m): opt.param_groups[0] for m in masters}

    @torch.no_grad()
    def unfused():
        for m, gr, buf in zip(masters, grads, buffers, strict=True):
            m.grad = buf.copy_(gr)
        opt.step()
        for m, c in zip(masters, copies, strict=True):
            c.copy_(m)

    def native():
        step_with_bf16_grads(opt, [(m, gr, None, c) for m, gr, c in zip(masters, grads, copies, strict=True)], groups)

    @torch.no_grad()
    def torch_adamw_only():
        for m, buf in zip(masters, buffers, strict=True):
            m.grad = buf
        opt.step()

    if provider == "torch_adamw_only":
        for buf, gr in zip(buffers, grads, strict=True):
            buf.copy_(gr)
    return {"unfused": unfused, "native": native, "torch_adamw_only": torch_adamw_only}[provider]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    providers = ("unfused", "native", "torch_adamw_only")
    load_before = os.getloadavg()
    fns = {p: make(p) for p in providers}
    for fn in fns.values():  # warm-up: the optimizer state, page faults of first touch
        fn(), fn()
    times: dict[str, list[float]] = {p: [] for p in providers}
    for _ in range(args.rounds):
        for p in providers:
            t0 = time.perf_counter()
            fns[p]()
            times[p].append(time.perf_counter() - t0)
    n = sum(torch.Size(s).numel() for s in SHAPES)
    rows = []
    for p in providers:
        per_round = [u / n_ for u, n_ in zip(times["unfused"], times[p], strict=True)]
        rows.append(
            {
                "provider": p,
                "median_ms": 1e3 * statistics.median(times[p]),
                "min_ms": 1e3 * min(times[p]),
                "speedup_vs_unfused_per_round": statistics.median(per_round),
                "weights": n,
                "threads": torch.get_num_threads(),
                "rounds": args.rounds,
            }
        )
        print(
            f"{p:18s} median {rows[-1]['median_ms']:7.2f} ms  min {rows[-1]['min_ms']:7.2f} ms  "
            f"x{rows[-1]['speedup_vs_unfused_per_round']:.2f} vs unfused (per round)"
        )
    if args.json:
        with open(args.json, "w") as f:
            record = {
                "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "torch": torch.__version__,
                "command": "OMP_WAIT_POLICY=passive python " + " ".join(sys.argv),
                "note": "providers interleaved round by round on a shared 2-core machine: read the ratios; load "
                f"average at the start {load_before}, at the end {os.getloadavg()}",
                "rows": rows,
            }
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
