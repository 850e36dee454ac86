"""The ahead-of-time compile gate over a pruned set (bench/aot_compile.py --set test): no GPU needed.

Compiles, for sm_80 and sm_90, what the kernels' planners choose for the Wiki (M = 256, N = 1024) and WebNews
(N = 256) training steps in every precision, forward and backward, the Wiki all-pairs scores, and one INDEX_64
case (M * N >= 2^31), through Triton's own argument specialization, and fails on a compile error, any register
spill, shared memory over the arch's per-block limit, or a tf32/bf16/fp16 GEMM without tensor-core
instructions in its SASS. The gate runs in a subprocess without TRITON_INTERPRET (tests/conftest.py sets it
for this process, and interpreted kernels cannot be compiled).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scanet.kernels import _common
from scanet.kernels import coattention as kernels

REPO = Path(__file__).resolve().parents[1]
TC_PRECISIONS = ("tf32", "bf16", "fp16")


@pytest.fixture(scope="module")
def gate(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "aot-test.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(out.parent / "triton-cache")  # fresh: every kernel really compiles
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "aot_compile.py"),
            "--set",
            "test",
            "--arch",
            "80,90",
            "--quiet",
            "--out",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(proc.stdout)
    return json.loads(out.read_text())


def _where(r):
    return f"sm_{r['arch']} {r['kernel']} {r.get('precision')} {r['plan']['constexprs']} ({r['cases']})"


def test_every_kernel_and_precision_is_compiled(gate):
    assert gate["triton"] == __import__("triton").__version__
    seen = {(r["arch"], r["kernel"]) for r in gate["records"]}
    for arch in (80, 90):
        for k in (
            "_coattention_fwd_kernel",
            "_coattention_normalize_kernel",
            "_coattention_bwd_kernel",
            "_matmul_kernel",
            "_pair_scores_kernel",
        ):
            assert (arch, k) in seen, f"sm_{arch} {k} missing from the gate"
        precisions = {r["precision"] for r in gate["records"] if r["arch"] == arch and r["gemm"]}
        assert precisions == set(_common.PRECISIONS), precisions


def test_no_compile_errors(gate):
    errors = [f"{_where(r)}: {r['error']}" for r in gate["records"] if r["status"] != "compiled"]
    assert not errors, "\n".join(errors)


def test_no_register_spills(gate):
    spills = [
        f"{_where(r)}: {r['spill_stores']}/{r['spill_loads']} B at {r['registers']} registers"
        for r in gate["records"]
        if r["spill_stores"] or r["spill_loads"]
    ]
    assert not spills, "\n".join(spills)
    assert all(r["registers"] and r["registers"] <= 255 for r in gate["records"])


def test_shared_memory_within_the_per_block_limit(gate):
    over = [
        f"{_where(r)}: {r['shared_bytes']} > {r['shared_limit']}"
        for r in gate["records"]
        if r["shared_bytes"] > r["shared_limit"]
    ]
    assert not over, "\n".join(over)
    assert {r["shared_limit"] for r in gate["records"] if r["arch"] == 90} == {232448}


def test_reduced_precision_gemms_use_tensor_cores(gate):
    want = {80: "HMMA.", 90: ("HMMA.", "HGMMA.")}
    missing = [
        _where(r)
        for r in gate["records"]
        if r["gemm"]
        and r["precision"] in TC_PRECISIONS
        and not any(op.startswith(want[r["arch"]]) for op in (r["tensor_core_ops"] or {}))
    ]
    assert not missing, "\n".join(missing)
    fp32 = [r for r in gate["records"] if r["gemm"] and r["precision"] == "fp32"]
    assert fp32 and not any(r["tensor_core_ops"] for r in fp32), "fp32 must stay off the tensor cores"


def test_index64_variants_compile(gate):
    """Every kernel with an INDEX_64 flag compiles with it set (they all failed once: two returns of
    different int widths in the index helper)."""
    wide = {
        r["kernel"]
        for r in gate["records"]
        if r["plan"]["constexprs"].get("INDEX_64") is True and r["status"] == "compiled"
    }
    assert wide == {
        "_coattention_fwd_kernel",
        "_coattention_normalize_kernel",
        "_coattention_bwd_kernel",
        "_matmul_kernel",
    }


# ------------------------------------------------------------------------------- planning (no compiling)
def test_precision_checks_by_capability():
    assert _common.default_precision(90) == "tf32" and _common.default_precision(80) == "tf32"
    assert _common.default_precision(70) == "fp32" and _common.default_precision(None) == "fp32"
    for prec in ("tf32", "bf16", "fp16"):
        with pytest.raises(ValueError, match=f"precision '{prec}' is not available on sm_70"):
            _common.check_precision(prec, 70)
        _common.check_precision(prec, 80)
        _common.check_precision(prec, None)
    _common.check_precision("fp32", 70)
    with pytest.raises(ValueError, match="precision must be one of"):
        _common.check_precision("fp8", 90)


def test_planner_refuses_tf32_on_v100_and_plans_meta_tensors():
    meta = dict(device="meta", dtype=torch.float32)
    f, g, w, b = (
        torch.empty(256, 1024, **meta),
        torch.empty(256, 1024, **meta),
        torch.empty(1024, 1024, **meta),
        torch.empty(1024, **meta),
    )
    with pytest.raises(ValueError, match="sm_70"):
        kernels.plan_forward(f, g, w, b, 1024.0, "tf32", True, _common.GPU.known(70))
    plans, (out, a, lse) = kernels.plan_forward(f, g, w, b, 1024.0, "bf16", True, _common.GPU.known(90))
    assert [p.label for p in plans] == ["coattention forward GEMM", "coattention normalize"]
    assert out.shape == a.shape == (256, 1024) and lse.shape == (256,)
    gemm = plans[0].constexprs
    assert (gemm["BLOCK_M"], gemm["BLOCK_N"], gemm["DOT_CAST"], gemm["INDEX_64"]) == (32, 64, "bf16", False)
    wg, _ = kernels.plan_forward(f, g, w, b, 1024.0, "bf16", True, _common.GPU.known(90), wgmma=True)
    assert wg[0].constexprs["BLOCK_M"] == 64
    with pytest.raises(ValueError, match="explicit gpu"):
        kernels.plan_forward(f, g, w, b)
