"""The four Chebyshev ops of the bf16 Wiki step, this checkout's library against csrc/ at another git revision.

    OMP_WAIT_POLICY=passive python bench/compare_cheb_ops.py --rev d6b9d98 --rounds 9 [--threads 2] [--json PATH]

Builds the other revision's csrc/cheb_conv.cpp with its torch.library namespace renamed (scanet_native ->
scanet_base, so that both libraries load into one process) under build/compare/<rev>/, then times the ops
round-robin (old, new, old, new, ...) at the Wiki shapes with the layouts the step hands them (see
tests/test_native_tiles.py): layer 1 from a per-text basis cache (3 x 2,866 x 10,055 float32, 256 rows by
index), layer 2 cheb_conv with dropout 0.2 and a bf16 output, its backward with a bf16 gradient in (V, B) rows
(what the bf16 FC returns), layer 1's backward with layer 2's dx. Also checks that both give the same bits.
Graph: scanet.data.graph.random_graph_laplacian(10,055, k=8). On the shared machines read the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scanet import native  # noqa: E402
from scanet.data.graph import random_graph_laplacian  # noqa: E402


def build_base(rev: str) -> Path:
    """csrc/ at ``rev`` with the op namespace renamed, built by CMake into build/compare/<rev>/."""
    out = ROOT / "build" / "compare" / rev
    lib = out / "build" / "_base.so"
    if lib.exists():
        return lib
    (out / "csrc").mkdir(parents=True, exist_ok=True)
    src = subprocess.run(["git", "show", f"{rev}:csrc/cheb_conv.cpp"], cwd=ROOT, check=True, capture_output=True)
    text = src.stdout.decode().replace("TORCH_LIBRARY(scanet_native", "TORCH_LIBRARY(scanet_base")
    text = text.replace("TORCH_LIBRARY_IMPL(scanet_native", "TORCH_LIBRARY_IMPL(scanet_base")
    (out / "csrc" / "cheb_conv.cpp").write_text(text)
    (out / "CMakeLists.txt").write_bytes((ROOT / "CMakeLists.txt").read_bytes())
    import torch.utils

    subprocess.run(
        [
            "cmake",
            "-S",
            str(out),
            "-B",
            str(out / "build"),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DSCANET_TORCH_VERSION={torch.__version__}",
            "-DSCANET_OUTPUT_NAME=_base",
        ],
        check=True,
        capture_output=True,
    )
    subprocess.run(["cmake", "--build", str(out / "build")], check=True, capture_output=True)
    return lib


def wiki_ops(ns: str, seed: int = 0):
    """The step's four calls in namespace ``ns``, sharing inputs; returns (state, [(name, fn)])."""
    o = getattr(torch.ops, ns)
    V, B, K, N = 10_055, 256, 3, 2_866
    g = torch.Generator().manual_seed(seed)
    lap = random_graph_laplacian(V, k=8)
    crow, col = torch.from_numpy(lap.indptr.astype("int64")), torch.from_numpy(lap.indices.astype("int64"))
    val = torch.from_numpy(lap.data.astype("float32"))
    basis = torch.randn(N, K, V, generator=g).permute(1, 0, 2).unsqueeze(-1)  # (K, N, V, 1), V contiguous
    index = torch.randint(0, N, (B,), generator=g)
    w1, b1 = torch.randn(K, 1, 1, generator=g) / 2, torch.randn(1, generator=g) / 10
    w2, b2 = torch.randn(K, 1, 1, generator=g) / 2, torch.randn(1, generator=g) / 10
    grad_y2 = torch.randn(V, B, generator=g).to(torch.bfloat16).t().unsqueeze(-1)  # (B, V, 1) as (V, B) rows
    st: dict = {}

    def l1_fwd():
        st["y1"] = o.cheb_conv_from_basis_forward(basis, w1, b1, True, index)

    def l2_fwd():
        st["y2"], st["saved"] = o.cheb_conv_forward(
            crow, col, val, st["y1"], w2, b2, True, True, True, 0.2, 1234, torch.bfloat16
        )

    def l2_bwd():
        st["dx"], st["dw2"], st["db2"] = o.cheb_conv_backward(
            grad_y2, crow, col, val, None, None, None, st["y1"], st["saved"], st["y2"], w2,
            True, True, True, True, True, 0.2, 1234,
        )  # fmt: skip

    def l1_bwd():
        st["dw1"], st["db1"] = o.cheb_conv_from_basis_backward(
            st["dx"], basis, st["y1"], w1, b1, True, True, True, index
        )

    return st, [
        ("l1_from_basis_fwd", l1_fwd),
        ("l2_cheb_fwd", l2_fwd),
        ("l2_cheb_bwd", l2_bwd),
        ("l1_from_basis_bwd", l1_bwd),
    ]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rev", required=True, help="git revision whose csrc/ is the baseline")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not native.available():
        raise SystemExit(f"this checkout's library is unavailable: {native.unavailable_reason()}")
    torch.ops.load_library(str(build_base(args.rev)))
    torch.set_num_threads(args.threads)
    provs = {"base": wiki_ops("scanet_base"), "new": wiki_ops("scanet_native")}
    times: dict = {p: {name: [] for name, _ in fns} for p, (_, fns) in provs.items()}
    for r in range(args.rounds + 1):  # round 0 warms up
        for p, (_, fns) in provs.items():
            for name, fn in fns:
                t = time.perf_counter()
                fn()
                if r:
                    times[p][name].append(time.perf_counter() - t)
    same = {k: torch.equal(provs["base"][0][k], provs["new"][0][k]) for k in provs["new"][0]}
    rows = []
    for name in times["new"]:
        mb, mn = statistics.median(times["base"][name]), statistics.median(times["new"][name])
        rows.append(dict(op=name, base_median_s=mb, new_median_s=mn, base_min_s=min(times["base"][name]),
                         new_min_s=min(times["new"][name]), speedup_median=mb / mn))  # fmt: skip
        print(f"{name:18s} base {mb * 1e3:7.2f} ms  new {mn * 1e3:7.2f} ms  base/new {mb / mn:5.2f}")
    tb, tn = sum(r["base_median_s"] for r in rows), sum(r["new_median_s"] for r in rows)
    print(f"{'sum':18s} base {tb * 1e3:7.2f} ms  new {tn * 1e3:7.2f} ms  base/new {tb / tn:5.2f}")
    print("bitwise equal:", ", ".join(f"{k}={v}" for k, v in same.items()))
    if args.json:
        doc = dict(command=" ".join(sys.argv), rev=args.rev, threads=args.threads, rounds=args.rounds,
                   load_average=os.getloadavg(), rows=rows, bitwise_equal=same)  # fmt: skip
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
