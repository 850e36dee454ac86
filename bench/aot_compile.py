"""Ahead-of-time compile gate for the Triton kernels: no GPU needed.

    python bench/aot_compile.py [--arch 70,80,90] [--set ci|full] [--out FILE.json] [--jobs 2] [--check]

Calls the kernels' own planning functions (kernels.coattention.plan_forward / plan_backward / plan_matmul,
kernels.pair_scores.plan_layer2, kernels.cheb under collect_plans()) on meta tensors of the model presets',
benchmarks' and tests' shapes, for each GPU description (kernels._common.KNOWN_GPUS: sm_70 V100, sm_80 A100,
sm_90 H100/H200), puts every plan's arguments through Triton's own binder (the specialization JITFunction.run
applies: integers equal to 1 become constants, divisibility-by-16 attributes), and compiles each distinct
specialization with triton.compile(ASTSource(...), target=GPUTarget("cuda", CC, 32)). Per specialization it
records: kernel, plan (tiles, warps, stages, precision), arch, triton version, compiled or the error,
registers, spill stores/loads, shared memory (against the arch's per-block limit), the tensor-core
instructions in the SASS (cuobjdump: HMMA / HGMMA and their shapes) and an estimated occupancy. A plan the
launcher refuses (tf32/bf16 on sm_70) is recorded as "refused" with its message.

Findings (what --check fails on, and tests/test_aot_compile.py asserts): a compile error; any spill on a
preset shape (the "ci" set: Wiki and WebNews), any spill at all with --strict-spills; shared memory over the
per-block limit; a tf32/bf16/fp16 GEMM plan on sm_80/sm_90 without tensor-core instructions. On sm_70 Triton
3.x lowers tl.dot to FMAs whatever the operand type (its Volta MMA path was removed), so the fp16 path there
is reported, not failed: the table says "FMA".

Run it without TRITON_INTERPRET (the interpreter's kernels cannot be compiled). Results: JSON (date, triton,
torch and ptxas versions, every record) and a short table on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import multiprocessing
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("aot_compile: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="aot-triton-cache-"))  # fresh: ptxas runs
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, stated (silences its warning)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from kernels import cheb, coattention, pair_scores  # noqa: E402
from kernels._common import KNOWN_GPUS, PRECISIONS  # noqa: E402

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
META = torch.device("meta")
TC_PRECISIONS = ("tf32", "bf16", "fp16")


# ------------------------------------------------------------------------------------------------------ cases
def _t(*shape, dtype=torch.float32):
    return torch.empty(shape, device=META, dtype=dtype)


def coattention_plans(M, N, precision, gpu, backward=True, wgmma=None):
    """(plans) of one co-attention step: forward (saving for backward) and, with backward, the elementwise
    backward kernel and the two GEMMs when they run in Triton."""
    f, g, w, b = _t(M, N), _t(M, N), _t(N, N), _t(N)
    plans, (out, a, lse) = coattention.plan_forward(f, g, w, b, float(N), precision, True, gpu, wgmma=wgmma)
    if backward:
        dout = _t(M, N)
        bwd, _, gemms = coattention.plan_backward(dout, out, a, lse, f, g, w, float(N), precision, True, True, gpu)
        plans.append(bwd)
        if coattention.triton_backward_gemms(precision, gpu):
            for name, left, right in gemms:
                plan, _ = coattention.plan_matmul(left, right, precision, gpu)
                plan.label = f"matmul ({name})"
                plans.append(plan)
    return plans


def pair_plans(nq, nc, N, precision, gpu, layout="outer", shortlist=None):
    f_t, f_i, a_t, a_i = _t(nq, N), _t(nc, N), _t(nq, N), _t(nc, N)
    w_t, w_i, b_t, b_i, hw = _t(N, N), _t(N, N), _t(N), _t(N), _t(N)
    kw = {}
    if shortlist:
        kw = dict(text_index=_t(nq * shortlist, dtype=torch.int64), image_index=_t(nq * shortlist, dtype=torch.int64))
    plan, _ = pair_scores.plan_layer2(
        f_t, f_i, a_t, a_i, w_t, b_t, w_i, b_i, hw, 0.0, float(N), precision=precision, layout=layout, gpu=gpu, **kw
    )
    return [plan] if plan is not None else []


def cheb_plans(V, B, F_in, F_out, K, need_x, dtype=torch.float32, nnz_per_row=17):
    """Forward and backward launches of one Chebyshev layer (the second SCANet layer needs dx; the first,
    on the fixed bag of words, keeps the basis instead)."""
    nnz = V * nnz_per_row
    op = cheb.CSR(_t(V + 1, dtype=torch.int64), _t(nnz, dtype=torch.int64), _t(nnz, dtype=dtype), V)
    X, weight, bias = _t(V, B, F_in, dtype=dtype), _t(K, F_in, F_out, dtype=dtype), _t(F_out, dtype=dtype)
    with cheb.collect_plans() as plans:
        Y, basis = cheb.cheb_forward(op, X, weight, bias, True, keep_basis=not need_x)
        cheb.cheb_backward(op, X, Y, torch.empty_like(Y), weight, basis, True, need_x, True, True)
    return plans


def cases(which: str, archs):
    """(case name, preset?, gpu, plans) for the chosen set. "test" (tests/test_aot_compile.py): the Wiki and
    WebNews training steps in every precision, forward and backward, the Wiki all-pairs scores, and one INDEX_64
    case. "ci": those plus the evaluation shapes of both presets, the wgmma tiles, INDEX_64 in every precision
    and the Chebyshev layers; "full": those plus the benchmark sweeps and the tests' shapes."""
    out = []
    if which == "test":
        for cc in archs:
            gpu = KNOWN_GPUS[cc]
            for prec in PRECISIONS:
                if cc < 80 and prec != "fp32":
                    continue
                out.append((f"wiki step M=256 N=1024 {prec}", True, gpu, coattention_plans(256, 1024, prec, gpu)))
                out.append((f"webnews step M=256 N=256 {prec}", True, gpu, coattention_plans(256, 256, prec, gpu)))
                out.append((f"wiki scores 693x693 N=1024 {prec}", True, gpu, pair_plans(693, 693, 1024, prec, gpu)))
            prec = "bf16" if cc >= 80 else "fp32"
            out.append((f"index64 M=2097153 N=1024 {prec}", False, gpu, coattention_plans(2**21 + 1, 1024, prec, gpu)))
        return out

    def add(name, preset, gpu, fn, *args, **kw):
        try:
            plans = fn(*args, **kw)
        except ValueError as e:  # a refusal by the planner (tf32/bf16 on sm_70)
            out.append((name, preset, gpu, e))
            return
        out.append((name, preset, gpu, plans))

    for cc in archs:
        gpu = KNOWN_GPUS[cc]
        for prec in PRECISIONS:
            # Presets: Wiki (batch 256, N = 1024), WebNews (batch 256, N = 256); evaluation scores 64 texts a
            # chunk against the test set (Wiki 693 items; WebNews 497), all pairs and a 100-shortlist.
            add(f"wiki step M=256 N=1024 {prec}", True, gpu, coattention_plans, 256, 1024, prec, gpu)
            add(f"webnews step M=256 N=256 {prec}", True, gpu, coattention_plans, 256, 256, prec, gpu)
            add(f"wiki scores 693x693 N=1024 {prec}", True, gpu, pair_plans, 693, 693, 1024, prec, gpu)
            add(f"webnews scores 497x497 N=256 {prec}", True, gpu, pair_plans, 497, 497, 256, prec, gpu)
            add(
                f"wiki shortlist 693x100 N=1024 {prec}", True, gpu, pair_plans, 693, 693, 1024, prec, gpu, shortlist=100
            )
            if cc >= 90 and prec in TC_PRECISIONS:
                add(
                    f"wiki step M=256 N=1024 {prec} wgmma tiles",
                    True,
                    gpu,
                    coattention_plans,
                    256,
                    1024,
                    prec,
                    gpu,
                    wgmma=True,
                )
            # INDEX_64: M * N >= 2^31 (forward, normalize, backward, and dW's K = M GEMM).
            add(f"index64 M=2097153 N=1024 {prec}", False, gpu, coattention_plans, 2**21 + 1, 1024, prec, gpu)
        add("wiki cheb V=10055 B=256 layer 1 (basis kept)", True, gpu, cheb_plans, 10055, 256, 1, 1, 3, False)
        add("wiki cheb V=10055 B=256 layer 2 (dx)", True, gpu, cheb_plans, 10055, 256, 1, 1, 3, True)
        add("webnews cheb V=5000 B=256 layer 2 (dx)", True, gpu, cheb_plans, 5000, 256, 1, 1, 3, True)
        if which != "full":
            continue
        for prec in PRECISIONS:
            for M in (256, 4096, 65536):
                for N in (256, 500, 1024, 4096):
                    add(f"bench step M={M} N={N} {prec}", False, gpu, coattention_plans, M, N, prec, gpu)
            # tests/test_coattention.py: its CUDA cases and two CPU ones (one column; N = 500)
            for M, N in [(1, 1), (4, 500), (1000, 1024), (513, 4096), (4099, 256), (300, 1)]:
                add(f"test step M={M} N={N} {prec}", False, gpu, coattention_plans, M, N, prec, gpu)
            for nq, nc in [(693, 693), (1000, 1000), (10000, 10000), (200, 200)]:
                for N in (256, 500, 1024, 4096):
                    for layout in pair_scores.LAYOUTS:
                        add(
                            f"bench scores {nq}x{nc} N={N} {layout} {prec}",
                            False,
                            gpu,
                            pair_plans,
                            nq,
                            nc,
                            N,
                            prec,
                            gpu,
                            layout,
                        )
                for S in (20, 100):
                    add(
                        f"bench shortlist {nq}x{S} N=1024 {prec}",
                        False,
                        gpu,
                        pair_plans,
                        nq,
                        nc,
                        1024,
                        prec,
                        gpu,
                        shortlist=S,
                    )
            for nq, nc, N in [(5, 7, 16), (33, 17, 64), (2, 3, 1), (300, 300, 1024)]:
                add(f"test scores {nq}x{nc} N={N} {prec}", False, gpu, pair_plans, nq, nc, N, prec, gpu)
        for V in (1000, 50000):
            for B in (1, 64, 4096):
                for need_x in (False, True):
                    add(
                        f"bench cheb V={V} B={B} {'dx' if need_x else 'basis'}",
                        False,
                        gpu,
                        cheb_plans,
                        V,
                        B,
                        1,
                        1,
                        3,
                        need_x,
                    )
        # tests/test_cheb.py's channel and order variants (fp32), and float64 once
        for F_in, F_out, K in [(1, 1, 1), (1, 1, 2), (3, 5, 3), (8, 8, 3), (16, 4, 3)]:
            for need_x in (True, False):
                add(
                    f"test cheb F={F_in}->{F_out} K={K} {'dx' if need_x else 'basis'}",
                    False,
                    gpu,
                    cheb_plans,
                    300,
                    7,
                    F_in,
                    F_out,
                    K,
                    need_x,
                )
        add("test cheb F=3->5 K=3 float64", False, gpu, cheb_plans, 300, 7, 3, 5, 3, True, torch.float64)
    return out


# ----------------------------------------------------------------------------------------- specialization
_BINDERS: dict = {}


def specialize(plan, cc):
    """Triton's own binder and argument packing (what JITFunction.run does before compiling)."""
    target = GPUTarget("cuda", cc, 32)
    key = (id(plan.kernel), cc)
    if key not in _BINDERS:
        backend = make_backend(target)
        _BINDERS[key] = (backend, create_function_from_signature(plan.kernel.signature, plan.kernel.params, backend))
    backend, binder = _BINDERS[key]
    kwargs = dict(plan.constexprs, num_warps=plan.num_warps, num_stages=plan.num_stages, debug=False)
    bound, specialization, options = binder(*plan.args, **kwargs)
    options, signature, constexprs, attrs = plan.kernel._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options.__dict__


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (bool, int, float, str)) or x is None:
        return x
    return str(x)


# ---------------------------------------------------------------------------------------------- compiling
_JOBS: list = []


def _ptxas_info(log: str) -> dict:
    info = {}
    m = re.search(r"Used (\d+) registers", log)
    info["registers"] = int(m.group(1)) if m else None
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if m:
        info["stack_bytes"], info["spill_stores"], info["spill_loads"] = (int(v) for v in m.groups())
    else:
        info["stack_bytes"] = info["spill_stores"] = info["spill_loads"] = None
    return info


CUOBJDUMP = [str(BIN / "cuobjdump")]  # --cuobjdump puts another first (CUDA 13's cannot read sm_70 cubins)


def _count(pattern: str, text: str) -> dict:
    ops: dict = {}
    for m in re.finditer(pattern, text):
        ops[m.group(0)] = ops.get(m.group(0), 0) + 1
    return ops


def _sass(cubin: bytes):
    """(SASS text, None) from the first cuobjdump that can read the cubin, else (None, why not)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as fh:
        fh.write(cubin)
        path = fh.name
    why = []
    try:
        for tool in CUOBJDUMP:
            res = subprocess.run([tool, "-sass", path], capture_output=True, text=True)
            if res.returncode == 0 and res.stdout.strip():
                return res.stdout, None
            why.append(f"{tool}: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}")
    finally:
        os.remove(path)
    return None, "; ".join(why)


def occupancy(registers, shared, num_warps, gpu) -> float | None:
    """Resident warps / max warps an SM from registers (256-register allocation units a warp), shared memory
    (1 KB reserved a block on sm_80+) and threads; an estimate, as the CUDA occupancy calculator does."""
    if registers is None:
        return None
    regs_per_warp = -(-registers * 32 // 256) * 256
    by_regs = (gpu.registers_per_sm // regs_per_warp) // num_warps
    reserved = 1024 if gpu.capability >= 80 else 0
    by_smem = gpu.shared_per_sm // (shared + reserved) if shared else gpu.max_blocks_per_sm
    by_warps = gpu.max_warps_per_sm // num_warps
    blocks = min(by_regs, by_smem, by_warps, gpu.max_blocks_per_sm)
    return round(blocks * num_warps / gpu.max_warps_per_sm, 3)


def _compile(i: int) -> dict:
    kernel, signature, constexprs, attrs, options, cc = _JOBS[i]
    t0 = time.time()
    rec: dict = {}
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            ck = triton.compile(
                ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32), options=options
            )
    except Exception as e:  # noqa: BLE001 - the gate records every failure
        msg = str(e).strip().splitlines()
        rec.update(status="error", error=f"{type(e).__name__}: " + " | ".join(m.strip() for m in msg[-6:])[:600])
    else:
        rec.update(status="compiled", shared_bytes=int(ck.metadata.shared), **_ptxas_info(buf.getvalue()))
        sass, why = _sass(ck.asm["cubin"])
        rec["ptx_mma_ops"] = _count(r"\b(wgmma\.mma_async|mma\.sync)[.\w]*", ck.asm["ptx"])
        if sass is None:
            rec.update(tensor_core_ops=None, sass_unavailable=why)
        else:
            rec["tensor_core_ops"] = _count(r"\b(HGMMA|HMMA|IMMA)\.[A-Za-z0-9_.x]+", sass)
    rec["compile_s"] = round(time.time() - t0, 2)
    return rec


def ptxas_version() -> str:
    out = subprocess.run([str(BIN / "ptxas"), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+), V([\d.]+)", out)
    return m.group(2) if m else out.strip().splitlines()[-1]


def run(which: str, archs, jobs: int = 2, progress: bool = True, only: str | None = None) -> dict:
    t0 = time.time()
    records, by_key = [], {}
    refused = []
    for name, preset, gpu, plans in cases(which, archs):
        if only and not re.search(only, name):
            continue
        if isinstance(plans, Exception):
            refused.append(dict(case=name, preset=preset, arch=gpu.capability, status="refused", error=str(plans)))
            continue
        for plan in plans:
            signature, constexprs, attrs, options = specialize(plan, gpu.capability)
            key = (
                plan.kernel.fn.__name__,
                gpu.capability,
                repr(sorted(signature.items())),
                repr(sorted(constexprs.items(), key=str)),
                repr(sorted(attrs.items(), key=str)),
                options["num_warps"],
                options["num_stages"],
            )
            if key not in by_key:
                by_key[key] = len(records)
                records.append(
                    dict(
                        kernel=plan.kernel.fn.__name__,
                        label=plan.label,
                        arch=gpu.capability,
                        plan=_jsonable(plan.describe()),
                        precision=plan.meta.get("precision") if plan.meta.get("gemm") else None,
                        gemm=bool(plan.meta.get("gemm")),
                        preset=False,
                        cases=[],
                        shared_limit=gpu.shared_per_block,
                        signature=_jsonable(signature),
                        specialized_constants=_jsonable(constexprs),
                    )
                )
                _JOBS.append((plan.kernel, signature, constexprs, attrs, options, gpu.capability))
            rec = records[by_key[key]]
            rec["cases"].append(name)
            rec["preset"] = rec["preset"] or preset
    n = len(_JOBS)
    print(
        f"aot_compile: {n} distinct specializations ({which}, sm_{'/'.join(map(str, archs))}, triton "
        f"{triton.__version__}), {len(refused)} refused plans; compiling with {jobs} processes",
        flush=True,
    )
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(jobs) as pool:
        it = pool.imap(_compile, range(n))
        try:
            from tqdm import tqdm

            it = tqdm(it, total=n, disable=not progress, file=sys.stderr)
        except ImportError:
            pass
        for i, res in enumerate(it):
            records[i].update(res)
    for rec in records:
        if rec["status"] == "compiled":
            rec["occupancy"] = occupancy(
                rec["registers"], rec["shared_bytes"], rec["plan"]["num_warps"], KNOWN_GPUS[rec["arch"]]
            )
    result = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        set=which,
        archs=list(archs),
        triton=triton.__version__,
        torch=torch.__version__,
        ptxas=ptxas_version(),
        python=platform.python_version(),
        host=platform.node(),
        gpus={str(cc): _jsonable(KNOWN_GPUS[cc].__dict__) for cc in archs},
        seconds=round(time.time() - t0, 1),
        records=records + refused,
    )
    result["findings"] = findings(result)
    return result


# ------------------------------------------------------------------------------------------------ findings
def tensor_cores(r: dict) -> list:
    """The tensor-core instructions of a record: SASS (HMMA/HGMMA) when it could be disassembled, else PTX."""
    if r.get("tensor_core_ops") is not None:
        return sorted(r["tensor_core_ops"])
    return [f"ptx:{op}" for op in sorted(r.get("ptx_mma_ops") or {})]


def findings(result: dict, strict_spills: bool = False) -> list:
    """Every record that fails the gate, with the reason. See the module docstring."""
    out = []
    for r in result["records"]:
        if r["status"] == "refused":
            continue
        more = " ..." if len(r["cases"]) > 1 else ""
        where = f"sm_{r['arch']} {r['kernel']} {r['precision'] or ''} ({r['cases'][0]}{more})"
        if r["status"] == "error":
            out.append(dict(kind="compile error", where=where, detail=r["error"]))
            continue
        spill = (r["spill_stores"] or 0) + (r["spill_loads"] or 0)
        if spill and (r["preset"] or strict_spills):
            out.append(
                dict(
                    kind="spill",
                    where=where,
                    detail=f"{r['spill_stores']}/{r['spill_loads']} B stores/loads at {r['registers']} registers",
                )
            )
        if r["shared_bytes"] > r["shared_limit"]:
            out.append(
                dict(
                    kind="shared memory", where=where, detail=f"{r['shared_bytes']} B > {r['shared_limit']} B per block"
                )
            )
        if r["gemm"] and r["precision"] in TC_PRECISIONS and r["arch"] >= 80 and not tensor_cores(r):
            out.append(dict(kind="no tensor cores", where=where, detail="no HMMA/HGMMA in the SASS"))
    return out


def table(result: dict) -> str:
    """One line per (arch, kernel, precision): compiles, errors, spilling specializations, max registers,
    max shared memory, min occupancy, tensor-core instructions."""
    rows: dict = {}
    for r in result["records"]:
        if r["status"] == "refused":
            key = (r["arch"], "(refused by the planner)", next((p for p in PRECISIONS if f" {p}" in r["case"]), "-"))
        else:
            key = (r["arch"], r["kernel"], r["precision"] or "-")
        row = rows.setdefault(key, dict(n=0, err=0, spill=0, regs=0, shared=0, occ=1.0, tc=set(), refused=0))
        row["n"] += 1
        if r["status"] == "refused":
            row["refused"] += 1
            continue
        if r["status"] == "error":
            row["err"] += 1
            continue
        row["spill"] += bool((r["spill_stores"] or 0) + (r["spill_loads"] or 0))
        row["regs"] = max(row["regs"], r["registers"] or 0)
        row["shared"] = max(row["shared"], r["shared_bytes"])
        row["occ"] = min(row["occ"], r["occupancy"] if r["occupancy"] is not None else 1.0)
        row["tc"].update(".".join(op.split(".")[:2]) for op in tensor_cores(r))
        row["sass"] = row.get("sass", True) and r.get("tensor_core_ops") is not None
    lines = [
        f"triton {result['triton']}, ptxas {result['ptxas']}, set {result['set']}, {result['seconds']} s",
        f"{'arch':5} {'kernel':31} {'prec':5} {'specs':>5} {'err':>3} {'spill':>5} {'regs':>4} "
        f"{'shared':>7} {'occ':>5}  tensor cores",
    ]
    for (arch, kernel, prec), row in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        if row["refused"]:
            lines.append(f"sm_{arch:<2} {kernel:31} {prec:5} {row['n']:5d}  refused (clear ValueError)")
            continue
        tc = ",".join(sorted(row["tc"])) or ("FMA" if prec in TC_PRECISIONS else "-")
        if prec == "fp32":
            tc = ",".join(sorted(row["tc"])) or "FMA (fp32 asked)"
        if not row.get("sass", True):
            tc += " (PTX: no SASS disassembler for this arch)"
        lines.append(
            f"sm_{arch:<2} {kernel[:31]:31} {prec:5} {row['n']:5d} {row['err']:3d} {row['spill']:5d} "
            f"{row['regs']:4d} {row['shared']:7d} {row['occ']:5.2f}  {tc}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="70,80,90", help="compute capabilities, comma separated (70, 80, 90)")
    ap.add_argument("--set", dest="which", choices=("test", "ci", "full"), default="ci")
    ap.add_argument("--out", type=Path, help="write the JSON here (refuses to overwrite unless --force)")
    ap.add_argument("--force", action="store_true", help="overwrite --out")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--check", action="store_true", help="exit 1 when there are findings")
    ap.add_argument("--strict-spills", action="store_true", help="count spills outside the presets as findings")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--only", help="compile only the cases whose name matches this regular expression")
    ap.add_argument(
        "--patch",
        type=Path,
        help="with --only: replace, in this earlier JSON, the records of the "
        "matching cases by the new ones (a planner change re-checked without a full run); the "
        "result records the patch and is written to --out",
    )
    ap.add_argument(
        "--cuobjdump",
        action="append",
        default=[],
        help="a cuobjdump to try before triton's own (CUDA 13's cannot disassemble sm_70)",
    )
    args = ap.parse_args(argv)
    try:
        archs = [int(a) for a in args.arch.split(",") if a.strip()]
    except ValueError:
        ap.error(f"--arch takes comma-separated integers such as 70,80,90, got {args.arch!r}")
    unknown = [a for a in archs if a not in KNOWN_GPUS]
    if unknown:
        ap.error(f"--arch: no GPU description for {unknown}; known: {sorted(KNOWN_GPUS)}")
    if args.out and args.out.exists() and not args.force:
        ap.error(f"--out {args.out} exists; pass --force to overwrite it")
    CUOBJDUMP[:0] = args.cuobjdump
    result = run(args.which, archs, args.jobs, progress=not args.quiet, only=args.only)
    result["cuobjdump"] = CUOBJDUMP
    if args.patch:
        if not args.only:
            ap.error("--patch needs --only")
        old = json.loads(args.patch.read_text())
        if old["triton"] != result["triton"] or old["set"] != result["set"]:
            ap.error(f"--patch {args.patch}: triton {old['triton']} / set {old['set']} differ from this run's")
        keep = [
            r
            for r in old["records"]
            if not all(re.search(args.only, c) for c in (r["cases"] if "cases" in r else [r["case"]]))
        ]
        for r in keep:  # cases of kept records that the new run re-checked
            if "cases" in r:
                r["cases"] = [c for c in r["cases"] if not re.search(args.only, c)]
        old.setdefault("patches", []).append(
            dict(
                date=result["date"],
                only=args.only,
                records=len(result["records"]),
                replaced=len(old["records"]) - len(keep),
                seconds=result["seconds"],
            )
        )
        old["records"] = keep + result["records"]
        result = old
    result["findings"] = findings(result, args.strict_spills)
    print(table(result))
    for f in result["findings"]:
        print(f"FINDING {f['kind']}: {f['where']}: {f['detail']}")
    print(f"{len(result['findings'])} findings")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 1 if (args.check and result["findings"]) else 0


if __name__ == "__main__":
    sys.exit(main())
