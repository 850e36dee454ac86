"""Benchmark harness shared by every bench/ file.

``pytest bench/ --benchmark`` runs the sweeps (``--benchmark`` is ours: pytest-benchmark has no such flag).
Without it every benchmark skips with a reason, so a plain ``pytest`` stays fast.

Each benchmark calls ``measure(benchmark, fn, op=..., case=..., provider=..., bytes=..., flops=...)``:
pytest-benchmark times ``fn`` (CUDA work is synchronized inside the timed call), and the median is recorded
in one table. At the end of the session every row gets its ratio to the ``eager`` provider of the same
(op, case), measured side by side in this run, plus GB/s and TFLOP/s from the stated byte and FLOP models.
The table is printed and written as JSON (``--bench-json PATH``, default bench/results/latest-<device>.json).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
from pathlib import Path

import pytest
import torch

_ROWS: list[dict] = []


def pytest_addoption(parser):
    group = parser.getgroup("scanet benchmarks")
    group.addoption(
        "--benchmark", action="store_true", default=False, help="run the benchmark sweeps in bench/ (skipped otherwise)"
    )
    group.addoption(
        "--bench-full",
        action="store_true",
        default=False,
        help="the full sweep (large V, B, M); default on CPU is a reduced sweep that fits 2 cores",
    )
    group.addoption("--bench-json", default=None, help="where to write the JSON summary")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--benchmark"):
        return
    skip = pytest.mark.skip(reason="benchmarks run only with `pytest bench/ --benchmark`")
    for item in items:
        if "bench" in Path(str(item.fspath)).parts:
            item.add_marker(skip)


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores"


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def full_sweep(request) -> bool:
    return bool(request.config.getoption("--bench-full")) or torch.cuda.is_available()


def _synchronized(fn, device):
    if device is not None and torch.device(device).type == "cuda":

        def run():
            out = fn()
            torch.cuda.synchronize()
            return out

        return run
    return fn


@pytest.fixture
def measure():
    """measure(benchmark, fn, *, op, case, provider, device, bytes=None, flops=None, rounds=None, derived=None).

    ``derived`` maps a field name to a function of the median (seconds), e.g. a projected schedule time.
    """

    def _measure(
        benchmark,
        fn,
        *,
        op: str,
        case: str,
        provider: str,
        device=None,
        bytes=None,
        flops=None,
        rounds: int | None = None,
        derived: dict | None = None,
        **extra,
    ):
        run = _synchronized(fn, device)
        run()  # warm-up: compilation, autotuning, allocator
        if rounds is None:
            rounds = 20 if (device is not None and torch.device(device).type == "cuda") else 5
        benchmark.group = f"{op} {case}"
        benchmark.extra_info.update(dict(op=op, case=case, provider=provider, bytes=bytes, flops=flops, **extra))
        benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
        median = benchmark.stats.stats.median
        times = sorted(benchmark.stats.stats.data)
        p99 = times[min(len(times) - 1, math.ceil(0.99 * len(times)) - 1)]  # nearest-rank percentile
        benchmark.extra_info["p99_s"] = p99
        row = dict(
            op=op,
            case=case,
            provider=provider,
            median_s=median,
            p99_s=p99,
            rounds=len(times),
            bytes=bytes,
            flops=flops,
            **extra,
        )
        if bytes:
            row["GB/s"] = bytes / median / 1e9
        if flops:
            row["TFLOP/s"] = flops / median / 1e12
        for key, from_median in (derived or {}).items():  # fields computed from the median
            row[key] = from_median(median)
            benchmark.extra_info[key] = row[key]
        _ROWS.append(row)
        return median

    return _measure


def _summarize() -> list[dict]:
    eager = {(r["op"], r["case"]): r["median_s"] for r in _ROWS if r["provider"] == "eager"}
    for r in _ROWS:
        base = eager.get((r["op"], r["case"]))
        r["speedup_vs_eager"] = (base / r["median_s"]) if base else None
    return _ROWS


def pytest_sessionfinish(session, exitstatus):
    if not _ROWS:
        return
    rows = _summarize()
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        pass
    summary = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(),
        "cuda": torch.version.cuda,
        "versions": versions,
        "note": (
            "CPU timings on shared 2-core machines are noisy: read the ratios, not the times"
            if not torch.cuda.is_available()
            else "CUDA timings synchronize after every call"
        ),
        "rows": rows,
    }
    path = session.config.getoption("--bench-json")
    if path is None:
        tag = "cuda" if torch.cuda.is_available() else "cpu"
        path = Path(__file__).parent / "results" / f"latest-{tag}.json"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1))
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.write_line("")
        tr.write_line(f"scanet benchmark summary ({summary['device']}) -> {path}")
        tr.write_line(
            f"{'op':<18} {'case':<34} {'provider':<16} {'median ms':>10} {'x eager':>8} {'GB/s':>8} {'TFLOP/s':>8}"
        )
        for r in rows:
            sp = f"{r['speedup_vs_eager']:.2f}" if r["speedup_vs_eager"] else "-"
            gb = f"{r['GB/s']:.1f}" if r.get("GB/s") else "-"
            tf = f"{r['TFLOP/s']:.2f}" if r.get("TFLOP/s") else "-"
            tr.write_line(
                f"{r['op']:<18} {r['case']:<34} {r['provider']:<16} {r['median_s'] * 1e3:>10.3f} "
                f"{sp:>8} {gb:>8} {tf:>8}"
            )


@pytest.fixture(scope="session")
def trained_synthetic(tmp_path_factory, bench_device):
    """(model, dataset, folder): a SCANet trained on the synthetic data (N = 256, 3 epochs, 693 test items), in
    eval mode, shared by the retrieval benchmarks (bench_pair_scores, bench_search)."""
    import dataclasses

    from scanet.checkpoint import load_model
    from scanet.config import get_preset
    from scanet.data import synthetic
    from scanet.train import train

    base = tmp_path_factory.mktemp("trained-synthetic")
    ds = synthetic.prepare(base / "prepared", progress=lambda *a: None, n_test=693)
    preset = get_preset("synthetic")
    preset = dataclasses.replace(
        preset,
        model=dataclasses.replace(preset.model, common_dim=256),
        train=dataclasses.replace(preset.train, epochs=3, eval_every=0),
    )
    train(preset, ds, base / "run", device=str(bench_device), progress=False, log=lambda *a: None)
    model, _ = load_model(base / "run" / "last.pt", ds, device=bench_device)
    return model.eval(), ds, base
