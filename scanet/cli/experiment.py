"""``scanet experiment table3|table4``: the paper's grids of runs (scanet.experiment), resumable, as MD/JSON/PNG."""

from __future__ import annotations

import shlex
from pathlib import Path

from scanet.cli._common import dataset_options, load_dataset, module_options, use_fused
from scanet.config import TrainConfig, arg_type


def _command(args) -> str:
    """The command line that reruns (resumes) this grid."""
    argv = ["scanet", "experiment", args.table, "--preset", args.preset]
    defaults = {"prepared_dir": "prepared", "device": "cpu"}
    for flag in ("root", "data", "prepared_dir", "epochs", "out", "cells", "device"):
        value = getattr(args, flag)
        if value is not None and value != defaults.get(flag):
            argv += [f"--{flag.replace('_', '-')}", str(value)]
    for item in args.set or []:
        argv += ["--set", item]
    argv += [f"--{flag}" for flag in ("fused", "eager") if getattr(args, flag)]
    return shlex.join(argv)


def cmd_experiment(args) -> None:
    from scanet.config import get_preset
    from scanet.experiment import base_preset, get_grid, run_grid
    from scanet.io import check_writable

    grid = get_grid(args.table)
    preset = get_preset(args.preset)
    overrides = list(args.set or [])
    base = base_preset(grid, preset, overrides, args.epochs)  # bad overrides: an error before any data is read
    args.out = args.out or str(Path("runs") / f"{args.table}-{preset.name}")
    check_writable(args.out, "grid folder")
    dataset = load_dataset(args, base)
    state = run_grid(
        args.table,
        preset,
        dataset,
        args.out,
        overrides=overrides,
        epochs=args.epochs,
        cells=args.cells,
        device=args.device,
        fused=use_fused(args),
        command=_command(args),
    )
    failed = [c for c in state["cells"].values() if c["status"] == "failed"]
    if failed:
        raise ValueError(
            f"{len(failed)} cell(s) failed (listed in {args.out}/{args.table}.md): "
            + "; ".join(f"{c['name']}: {c['reason']}" for c in failed)
        )


def add_commands(sub) -> None:
    p = sub.add_parser(
        "experiment",
        help="run the paper's Table 3 (encoders x co-attention layers) or Table 4 (m x lambda) grid",
        description="Each cell is a run folder OUT/cells/<cell>/ (scanet train's), selected on validation; "
        "OUT/<table>.json/.md/.png hold the table under both protocols beside the paper's values. Rerunning the "
        "same command resumes: finished cells are kept, a half-finished one continues from its last.pt.",
    )
    p.add_argument("table", choices=("table3", "table4"), help="which grid")
    p.add_argument("--preset", required=True, help="wiki, webnews, synthetic, ... (the base configuration)")
    dataset_options(p)
    p.add_argument(
        "--epochs", type=arg_type(TrainConfig, "epochs", "--epochs"), help="epochs per cell (default: the preset's)"
    )
    p.add_argument("--out", help="grid folder (default runs/<table>-<preset>)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config field in every cell (e.g. positive_pairs=10000); recorded, and a rerun with other "
        "overrides is refused",
    )
    p.add_argument("--cells", metavar="TEXT", help="train only the cells whose name contains TEXT (e.g. _L2, m0.6)")
    module_options(p, "fused modules (default: auto, as for train)", "eager modules")
    p.set_defaults(func=cmd_experiment)
