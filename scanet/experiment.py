"""The paper's grids of training runs: Table 3 (text encoder x image encoder x co-attention layers) and Table 4
(margin m x lambda), run cell by cell, resumable, with the paper's values beside ours.

Why over 400 lines: the grid definitions, the checks that decide whether a cell can run, the state file and
the resumable loop are one job (each reads the others' records); the rendering lives in scanet.experiment_report.

``GRIDS`` defines each table once: a tuple of axes, each a tuple of ``Level``s (the label the table prints, the
config settings it stands for, or the reason it is open). A new encoder or value is one ``Level`` line; a new
input a cell needs is one line of ``INPUT_NEEDS``; a paper value is one entry of ``PAPER_VALUES``.

``run_grid(table, preset, dataset, out)``:

- **Cells** are normal run folders ``out/cells/<cell>/`` trained by ``scanet.train.train`` with the base preset
  (preset + ``overrides`` + ``epochs``, the same for every cell) and the cell's settings. ``train`` holds out the
  validation split and selects the epoch on it; a cell's reported MAPs are the selected epoch's test MAPs under
  both protocols (``scanet.evaluate.PROTOCOLS``).
- **State**: ``out/<table>.json`` is written atomically after every cell: the configuration, every cell
  (status, settings, overrides, selected epoch, both protocols' MAPs, wall seconds) and each invocation (date,
  machine, command, wall seconds). The Markdown and PNG are rendered from it alone (scanet.experiment_report),
  so an interrupted and resumed grid gives the same table as an uninterrupted one (tested).
- **Resume**: a cell recorded "done" is never trained again; any other cell with a ``last.pt`` resumes from it
  (``train(resume=True)``). A state file made with another configuration (preset, overrides, epochs, prepared
  data) is refused naming what differs, never mixed with this one: use the same options or another ``out``.
- **Cells that cannot run** are listed with their reason, never dropped: "open" (VGG-19 / ResNet-50 rows: no
  pretrained weights offline), "not run" (the configuration has no such key yet, refuses the value, or the
  dataset lacks an input the cell needs: CNN-5 needs raw pixels, which Wiki's SIFT-128 features are not).
- **Failures**: a ValueError inside a cell (a clear message about its configuration or data) marks that cell
  "failed" with the message and the grid goes on; anything else (an interrupt, a crash) stops the grid with the
  state saved ("partial" cells keep their wall time) and the exception raised again.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scanet.config import Preset, apply_overrides
from scanet.data.prepared import PreparedDataset
from scanet.io import atomic_write, read_text
from scanet.run_folder import RUN_FILES, claim, config_differences
from scanet.train import train

STATE_FORMAT = 1
NOT_YET = "not trained yet (outside --cells, or the grid was stopped before it)"


# ------------------------------------------------------------------------------------------ the grids
@dataclass(frozen=True)
class Level:
    """One value of an axis: ``label`` as the table prints it, ``name`` in the cell's folder name, the config
    ``settings`` it stands for, or ``open_reason`` when it cannot run here at all."""

    label: str
    name: str
    settings: tuple[tuple[str, Any], ...] = ()
    open_reason: str | None = None


@dataclass(frozen=True)
class Axis:
    title: str
    levels: tuple[Level, ...]


@dataclass(frozen=True)
class Grid:
    name: str
    title: str
    axes: tuple[Axis, ...]  # the last axis forms the columns of the compact tables, the others the rows
    plot: str  # "heatmap" (rows x columns) or "lines" (x: the last axis; one line per row)


def _values(key: str, values, prefix: str, fmt: str = "g") -> tuple[Level, ...]:
    return tuple(Level(format(v, fmt), f"{prefix}{format(v, fmt)}", ((key, v),)) for v in values)


def _no_weights(model: str, loader: str) -> str:
    return (
        f"open: {model} features need pretrained ImageNet weights, which cannot be had offline here "
        f"(scanet.encoders.{loader} reads a local torchvision weights file)"
    )


GRIDS = {
    "table3": Grid(
        "table3",
        "Table 3: text encoder x image encoder x co-attention layers",
        (
            Axis(
                "text encoder",
                (
                    Level("GCN", "gcn", (("text_encoder", "gcn"),)),
                    Level("LSTM", "lstm", (("text_encoder", "lstm"),)),
                    Level("CNN", "cnn", (("text_encoder", "cnn"),)),
                ),
            ),
            Axis(
                "image encoder",
                (
                    Level("fixed features", "fixed", (("image_encoder", "fixed"),)),
                    Level("CNN-5", "cnn5", (("image_encoder", "cnn5"),)),
                    Level("VGG-19 fc7", "vgg19", open_reason=_no_weights("VGG-19 fc7", "load_vgg19")),
                    Level("ResNet-50", "resnet50", open_reason=_no_weights("ResNet-50 pool5", "load_resnet50")),
                ),
            ),
            Axis("co-attention layers", _values("coattention_layers", (0, 1, 2, 3), "L")),
        ),
        plot="lines",
    ),
    "table4": Grid(
        "table4",
        "Table 4: margin m x lambda",
        (
            Axis("m", _values("margin", (0.4, 0.5, 0.6, 0.7, 0.8), "m", ".1f")),
            Axis("lambda", _values("lam", (0.25, 0.30, 0.35, 0.40), "lam", ".2f")),
        ),
        plot="heatmap",
    ),
}

# Settings that are what the model does when the configuration has no such key at all (SCANet as the paper
# describes it: the GCN text encoder, fixed image features): dropped, not refused, on such a configuration.
BUILT_IN = {("text_encoder", "gcn"), ("image_encoder", "fixed")}

# (key, value) -> (what the prepared dataset must hold, whether it does). The attribute names are those of the
# prepared format's token sequences and raw pixels (scanet.data.prepared.Split).
INPUT_NEEDS: dict[tuple[str, Any], tuple[str, Callable[[PreparedDataset], bool]]] = {
    ("text_encoder", "lstm"): ("token-id sequences", lambda ds: getattr(ds.train, "tokens", None) is not None),
    ("text_encoder", "cnn"): ("token-id sequences", lambda ds: getattr(ds.train, "tokens", None) is not None),
    ("image_encoder", "cnn5"): ("raw image pixels", lambda ds: getattr(ds.train, "pixels", None) is not None),
}

# The paper's values, {table: {dataset name: {cell name: (text->image, image->text)}}}. Its Table 3 / 4 cells
# are not available offline; what is known is its headline MAP for the full model (GCN text, VGG-19 fc7 images,
# 2 co-attention layers, m = 0.6, lambda = 0.35), placed beside the matching cell. Filling in the tables is one
# entry per cell here.
PAPER_HEADLINE = {"wiki": (0.81, 0.46), "nuswide": (0.58, 0.52), "pascal": (0.48, 0.34)}
PAPER_VALUES: dict[str, dict[str, dict[str, tuple[float, float]]]] = {
    "table3": {ds: {"gcn_vgg19_L2": v} for ds, v in PAPER_HEADLINE.items()},
    "table4": {ds: {"m0.6_lam0.35": v} for ds, v in PAPER_HEADLINE.items()},
}
PAPER_NOTE = (
    "The paper's values: its headline MAP (text query / image query) for its full model (GCN, VGG-19 fc7, 2 "
    "co-attention layers, m = 0.6, lambda = 0.35) beside the matching cell, in both protocol tables because the "
    "paper does not say which; it is probably the authors' group's protocol (test queries vs training "
    "candidates, MAP@100: the second table), not comparable with MAP@all test vs test. The other cells' paper "
    "values are not available offline (scanet.experiment.PAPER_VALUES)."
)


@dataclass(frozen=True)
class Cell:
    name: str  # folder name and key, e.g. "gcn_fixed_L2", "m0.6_lam0.35"
    labels: tuple[str, ...]  # one per axis
    settings: tuple[tuple[str, Any], ...]
    open_reason: str | None


def get_grid(table: str) -> Grid:
    if table not in GRIDS:
        raise ValueError(f"unknown table {table!r}; known: {', '.join(GRIDS)}")
    return GRIDS[table]


def grid_cells(grid: Grid) -> list[Cell]:
    """Every cell of the grid, in the table's order (the first axis varies slowest)."""
    cells = []
    for levels in itertools.product(*(a.levels for a in grid.axes)):
        reasons = [lv.open_reason for lv in levels if lv.open_reason]
        cells.append(
            Cell(
                "_".join(lv.name for lv in levels),
                tuple(lv.label for lv in levels),
                tuple(kv for lv in levels for kv in lv.settings),
                reasons[0] if reasons else None,
            )
        )
    return cells


def grid_keys(grid: Grid) -> set[str]:
    return {k for a in grid.axes for lv in a.levels for k, _ in lv.settings}


def _config_has(preset: Preset, key: str) -> bool:
    return any(key in {f.name for f in dataclasses.fields(o)} for o in (preset, preset.model, preset.train))


def cell_settings(cell: Cell, base: Preset) -> list[tuple[str, Any]]:
    """The cell's settings for ``base``: a BUILT_IN setting the configuration has no key for is left out."""
    return [(k, v) for k, v in cell.settings if _config_has(base, k) or (k, v) not in BUILT_IN]


def cell_overrides(cell: Cell, base: Preset) -> list[str]:
    return [f"{k}={v}" for k, v in cell_settings(cell, base)]


def base_preset(grid: Grid, preset: Preset, overrides: list[str], epochs: int | None = None) -> Preset:
    """The preset every cell starts from: ``overrides`` (--set) and ``epochs`` applied. A grid key among the
    overrides, or epochs given twice, is refused (the grid sets those keys per cell)."""
    keys = {o.split("=", 1)[0].split(".")[-1] for o in overrides}
    clash = sorted(keys & grid_keys(grid))
    if clash:
        raise ValueError(
            f"--set {', '.join(clash)}: {grid.name} sets {'this key' if len(clash) == 1 else 'these keys'} per cell; "
            "leave it out of the overrides"
        )
    if epochs is not None and "epochs" in keys:
        raise ValueError("epochs given twice (--epochs and --set epochs=); give one")
    return apply_overrides(preset, list(overrides) + ([f"epochs={epochs}"] if epochs is not None else []))


def cell_blocker(cell: Cell, base: Preset, dataset: PreparedDataset) -> tuple[str, str] | None:
    """(status, reason) when the cell cannot run here: "open" (no weights), or "not run" (a key the
    configuration lacks, a value it refuses, an input the dataset lacks); None when it can."""
    if cell.open_reason:
        return "open", cell.open_reason
    settings = cell_settings(cell, base)
    for key, _ in settings:
        if not _config_has(base, key):
            return "not run", f"the configuration has no key {key!r} yet (scanet.config)"
    try:
        apply_overrides(base, cell_overrides(cell, base))
    except ValueError as e:
        return "not run", str(e)
    for kv in settings:
        if kv in INPUT_NEEDS:
            what, has = INPUT_NEEDS[kv]
            if not has(dataset):
                return "not run", f"{kv[0]}={kv[1]} needs {what}; the prepared dataset {dataset.name!r} has none"
    return None


# ------------------------------------------------------------------------------------------ the state
def _config_record(grid: Grid, base: Preset, overrides: list[str], epochs: int | None, dataset) -> dict:
    return {
        "table": grid.name,
        "preset": dataclasses.asdict(base),
        "overrides": list(overrides),
        "epochs": epochs,
        "dataset": dataset.name,
        "dataset_fingerprint": dataset.fingerprint,
    }


def _check_same_config(path: Path, saved: dict, given: dict, base: Preset) -> None:
    """Refuse (ValueError) a state file of another configuration, naming every difference."""
    diffs = (
        [f"table (saved {saved.get('table')!r}, given {given['table']!r})"] if saved["table"] != given["table"] else []
    )
    if saved.get("dataset_fingerprint") != given["dataset_fingerprint"]:
        diffs.append(
            f"prepared data (saved {saved.get('dataset')!r} {saved.get('dataset_fingerprint')}, given "
            f"{given['dataset']!r} {given['dataset_fingerprint']})"
        )
    diffs += [f"{k} (saved {s!r}, given {g!r})" for k, (s, g) in config_differences(saved["preset"], base).items()]
    if diffs:
        raise ValueError(
            f"{path} holds a grid run with another configuration: {'; '.join(diffs)}. Rerun with the saved "
            f"options (preset, --set {' '.join(saved.get('overrides') or []) or '(none)'}, --epochs "
            f"{saved.get('epochs')}) or choose another --out"
        )


def load_state(path: Path) -> dict | None:
    """The grid state file, or None when there is none; a file that is not a grid state is a ValueError."""
    if not path.is_file():
        return None
    try:
        state = json.loads(read_text(path, "grid state file"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); move it away or choose another --out") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or "config" not in state:
        raise ValueError(f"{path} is not a grid state file of this version; move it away or choose another --out")
    return state


def save_state(path: Path, state: dict) -> None:
    text = json.dumps(state, indent=1)
    atomic_write(path, lambda fh: fh.write(text.encode()))


def _protocol_row(p: dict) -> dict:
    m = p["metric"]
    return {
        "label": p["label"],
        "metric": m,
        "text2image": p["text2image"][m],
        "image2text": p["image2text"][m],
        "mean": p["mean"],
    }


def machine_description(device) -> str:
    import torch

    return (
        f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, device {device})"
    )


# ------------------------------------------------------------------------------------------ running
def run_grid(
    table: str,
    preset: Preset,
    dataset: PreparedDataset,
    out: str | Path,
    *,
    overrides: list[str] | None = None,
    epochs: int | None = None,
    cells: str | None = None,
    device: str = "cpu",
    fused: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    stop_after_cells: int | None = None,
    command: str = "",
) -> dict:
    """Run (or resume) the grid ``table`` into ``out`` and write its JSON, Markdown and PNG; returns the state.

    ``cells``: only the cells whose name contains this text are trained (the others keep their recorded status);
    ``stop_after_cells``: stop after training this many cells (for tests of resume).
    """
    from tqdm import tqdm

    from scanet.experiment_report import write_outputs

    grid = get_grid(table)
    overrides = list(overrides or [])
    base = base_preset(grid, preset, overrides, epochs)
    say: Callable[[str], None] = log or tqdm.write
    all_cells = grid_cells(grid)
    chosen = [c for c in all_cells if cells is None or cells in c.name]
    if not chosen:
        raise ValueError(
            f"--cells {cells!r} matches no cell of {grid.name}; its cells: {', '.join(c.name for c in all_cells)}"
        )
    out = Path(out)
    held = [f for f in RUN_FILES if (out / f).exists()]
    if held:
        raise ValueError(f"{out} holds a training run ({', '.join(held)}); a grid needs a folder of its own (--out)")
    # The grid folder's lock (one grid process per folder) and its interrupted writes, as for a run folder.
    folder = claim(out, base, dataset.fingerprint, log=say)
    try:
        path = out / f"{grid.name}.json"
        config = _config_record(grid, base, overrides, epochs, dataset)
        state = load_state(path)
        if state is not None:
            _check_same_config(path, state["config"], config, base)
        else:
            state = {"format": STATE_FORMAT, "title": grid.title, "config": config, "cells": {}, "runs": []}
        state["order"] = [c.name for c in all_cells]
        state["axes"] = [a.title for a in grid.axes]
        state["paper_values"] = {k: list(v) for k, v in PAPER_VALUES.get(grid.name, {}).get(dataset.name, {}).items()}
        state["paper_note"] = PAPER_NOTE
        state["plot"] = grid.plot
        this_run = {
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_description(device),
            "command": command,
            "cells": cells,
            "wall_seconds": 0.0,
        }
        state["runs"].append(this_run)
        to_run = []
        for c in all_cells:
            entry = state["cells"].get(c.name, {})
            if entry.get("status") == "done":
                continue
            blocked = cell_blocker(c, base, dataset)
            entry = {
                **entry,
                "name": c.name,
                "labels": dict(zip(state["axes"], c.labels, strict=True)),
                "settings": dict(c.settings),
                "overrides": overrides + cell_overrides(c, base),
                "status": blocked[0] if blocked else entry.get("status", "pending"),
                "reason": blocked[1] if blocked else entry.get("reason", NOT_YET),
            }
            state["cells"][c.name] = entry
            if blocked is None and c in chosen:
                to_run.append(c)
        t_grid = time.perf_counter()

        def finish_run() -> None:
            this_run["wall_seconds"] = time.perf_counter() - t_grid
            state["wall_seconds"] = sum(r["wall_seconds"] for r in state["runs"])
            save_state(path, state)

        finish_run()
        done_before = sum(e["status"] == "done" for e in state["cells"].values())
        say(
            f"{grid.name}: {len(all_cells)} cells, {done_before} done, {len(to_run)} to train now, "
            f"{sum(e['status'] in ('open', 'not run') for e in state['cells'].values())} open or not run"
        )
        bar = tqdm(to_run, desc=grid.name, unit="cell", disable=not progress)
        trained = 0
        for c in bar:
            if stop_after_cells is not None and trained >= stop_after_cells:
                break
            bar.set_postfix_str(c.name)
            entry = state["cells"][c.name]
            _run_cell(c, entry, base, dataset, out / "cells" / c.name, device, fused, progress, say, finish_run)
            trained += 1
            finish_run()
            write_outputs(out, state, png=False)
        bar.close()
        finish_run()
        write_outputs(out, state)
        say(f"{grid.name}: written {out / (grid.name + '.md')}, .json, .png ({this_run['wall_seconds']:.1f} s)")
        return state
    finally:
        folder.release()


def _run_cell(cell: Cell, entry: dict, base, dataset, cell_dir: Path, device, fused, progress, say, save) -> None:
    """Train (or resume) one cell into ``cell_dir`` and record its result in ``entry``."""
    t0 = time.perf_counter()
    earlier = entry.get("wall_seconds", 0.0)
    try:
        result = train(
            apply_overrides(base, cell_overrides(cell, base)),
            dataset,
            cell_dir,
            device=device,
            fused=fused,
            resume=(cell_dir / "last.pt").is_file(),
            progress=progress,
            log=say,
        )
    except ValueError as e:  # a clear message about this cell's configuration or data: the grid goes on
        entry.update(status="failed", reason=str(e), wall_seconds=earlier + time.perf_counter() - t0)
        say(f"{cell.name}: failed: {e}")
        return
    except BaseException:
        entry.update(status="partial", reason="interrupted", wall_seconds=earlier + time.perf_counter() - t0)
        save()
        raise
    report = result["report"]
    entry.update(
        status="done",
        reason=None,
        selected_epoch=result["selected_epoch"],
        selected_by=report["selected_by"],
        epochs_run=len(result["history"]),
        protocols={name: _protocol_row(p) for name, p in report["protocols"].items()},
        wall_seconds=earlier + time.perf_counter() - t0,
    )
    parts = [
        f"{name} {p['text2image']:.4f}/{p['image2text']:.4f} mean {p['mean']:.4f}"
        for name, p in entry["protocols"].items()
    ]
    say(
        f"{cell.name}: epoch {entry['selected_epoch']}/{entry['epochs_run']} selected, "
        f"{', '.join(parts)} ({entry['wall_seconds']:.1f} s)"
    )
