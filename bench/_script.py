"""What the CPU benchmark scripts (bench_native.py, bench_train_step.py run as ``python bench/...``) share: the
round-robin timing of their providers and the JSON summary they write (date, machine, versions, the command that
reruns it, the machine's load around the run, the rows)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm


def write_summary(path: str | Path, script: str, argv: list[str] | None, rows: list, load_at_start: str) -> None:
    summary = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"cpu-{platform.machine()}-{os.cpu_count()}cores",
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "command": f"OMP_WAIT_POLICY=passive python {script} " + " ".join(argv if argv is not None else sys.argv[1:]),
        "note": (
            "providers interleaved round by round on a shared 2-core machine (other jobs running): read "
            f"the ratios, not the times; load average (1, 5, 15 min) at the start {load_at_start}, "
            f"at the end " + " ".join(f"{x:.1f}" for x in os.getloadavg())
        ),
        "rows": rows,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1))
    print(f"-> {path}")


def parse_and_start(ap, argv=None):
    """Add the scripts' shared options (--threads, default 2; --json, required) to ``ap``, parse ``argv``, set
    torch's thread count, and return (args, the load average at the start as a string for write_summary)."""
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    return args, " ".join(f"{x:.1f}" for x in os.getloadavg())


def interleaved(steps: dict, rounds: int) -> dict:
    """Time every fn of ``steps`` once per round, round-robin, after one warm-up call each (allocator, oneDNN
    primitives, the Laplacian checks, Adam's state), so that a busy machine's slow spells hit all providers alike
    (the sequential pytest-benchmark runs cannot); returns provider -> list of seconds."""
    times: dict = {name: [] for name in steps}
    for fn in steps.values():
        fn()
    for _ in tqdm(range(rounds), desc="rounds"):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times
