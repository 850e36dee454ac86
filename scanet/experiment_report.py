"""A grid's Markdown table and PNG, rendered from its state file alone (scanet.experiment writes the state).

Rendering only from the state is what makes a resumed grid's table the uninterrupted one's: nothing here reads
a run folder or a clock. Layout of ``<table>.md``: a header (configuration, cells by status, grid wall time,
the command), then per protocol (scanet.evaluate.PROTOCOLS) one row per cell in the table's order (text->image,
image->text, mean; the paper's value beside it) and a compact mean-MAP table (the last axis as columns), then
the cells' epochs, wall times and overrides, and numbered notes for every cell that did not run.
"""

from __future__ import annotations

from pathlib import Path

from scanet.evaluate import PROTOCOLS
from scanet.io import atomic_write

NOT_AVAILABLE = "n/a (not available offline)"


def compact_matrix(state: dict, protocol: str) -> tuple[list[str], list[str], list[list[float | None]]]:
    """(row labels, column labels, mean MAP or None) with the last axis as the columns and every combination of
    the other axes as a row ("GCN / fixed features"), in the table's order."""
    rows: list[str] = []
    cols: list[str] = []
    values: dict[tuple[str, str], float] = {}
    axes = state["axes"]
    for name in state["order"]:
        cell = state["cells"][name]
        labels = [cell["labels"][a] for a in axes]
        row, col = " / ".join(labels[:-1]), labels[-1]
        rows += [row] if row not in rows else []
        cols += [col] if col not in cols else []
        if cell["status"] == "done":
            values[row, col] = cell["protocols"][protocol]["mean"]
    return rows, cols, [[values.get((r, c)) for c in cols] for r in rows]


def _note_marks(state: dict) -> tuple[dict[str, int], list[str]]:
    """cell name -> note number for every cell that has a reason, and the notes ("open: ...")."""
    notes: list[str] = []
    marks = {}
    for name in state["order"]:
        cell = state["cells"][name]
        if cell["status"] == "done":
            continue
        text = cell["reason"] or ""
        text = text if text.startswith(cell["status"]) else f"{cell['status']}: {text}".rstrip(": ")
        if text not in notes:
            notes.append(text)
        marks[name] = notes.index(text) + 1
    return marks, notes


def _paper_cell(state: dict, name: str) -> str:
    v = state["paper_values"].get(name)
    return NOT_AVAILABLE if v is None else f"{v[0]:.3f} / {v[1]:.3f} / {(v[0] + v[1]) / 2:.3f}"


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header: list[str], rows: list[list]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows)]


def protocol_tables(state: dict) -> str:
    """The MAP tables of every protocol (the part of the Markdown that a resumed grid reproduces exactly)."""
    axes = state["axes"]
    marks, _ = _note_marks(state)
    lines: list[str] = []
    for pname, proto in PROTOCOLS.items():
        lines += ["", f"## {proto.label} ({pname} protocol)", ""]
        rows = []
        for name in state["order"]:
            cell = state["cells"][name]
            labels = [cell["labels"][a] for a in axes]
            if cell["status"] == "done":
                p = cell["protocols"][pname]
                ours = [f"{p['text2image']:.4f}", f"{p['image2text']:.4f}", f"{p['mean']:.4f}"]
            else:
                ours = [f"{cell['status']} [{marks[name]}]", "", ""]
            rows.append([*labels, *ours, _paper_cell(state, name)])
        lines += _table([*axes, "text->image", "image->text", "mean", "paper (text->image / image->text / mean)"], rows)
        r_labels, c_labels, matrix = compact_matrix(state, pname)
        lines += ["", f"The mean of the two directions ({proto.metric}):", ""]
        lines += _table(
            [" / ".join(axes[:-1]) + f" \\ {axes[-1]}", *c_labels],
            [[r, *("" if v is None else f"{v:.4f}" for v in vals)] for r, vals in zip(r_labels, matrix, strict=True)],
        )
    return "\n".join(lines) + "\n"


def markdown(state: dict) -> str:
    cfg = state["config"]
    counts: dict[str, int] = {}
    for cell in state["cells"].values():
        counts[cell["status"]] = counts.get(cell["status"], 0) + 1
    runs = state["runs"]
    last = runs[-1] if runs else {}
    head = [
        f"# {state['title']}: {cfg['dataset']}",
        "",
        f"Preset `{cfg['preset']['name']}`, overrides `{' '.join(cfg['overrides']) or '(none)'}`, "
        f"{cfg['preset']['train']['epochs']} epochs per cell; each cell's epoch is selected on the validation "
        "split and its test MAP reported. "
        + f"{len(state['order'])} cells: "
        + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())),
        "",
        f"Grid wall time {state.get('wall_seconds', 0.0):.1f} s over {len(runs)} invocation(s); the last started "
        f"{last.get('started', '?')} on {last.get('machine', '?')}.",
        "",
        f"Rerun: `{last.get('command') or '(not recorded)'}`",
    ]
    marks, notes = _note_marks(state)
    cells = []
    for name in state["order"]:
        cell = state["cells"][name]
        epoch = f"{cell['selected_epoch']} / {cell['epochs_run']}" if cell["status"] == "done" else ""
        wall = f"{cell['wall_seconds']:.1f}" if "wall_seconds" in cell else ""
        status = cell["status"] + (f" [{marks[name]}]" if name in marks else "")
        cells.append([f"`{name}`", status, epoch, wall, f"`{' '.join(cell['overrides'])}`"])
    tail = ["", "## Cells", ""]
    tail += _table(["cell", "status", "selected epoch / epochs run", "wall s", "overrides"], cells)
    tail += ["", "Notes:", ""] + [f"{i}. {n}" for i, n in enumerate(notes, 1)] if notes else []
    tail += ["", state["paper_note"], ""]
    return "\n".join(head) + "\n" + protocol_tables(state) + "\n".join(tail)


def write_outputs(out: str | Path, state: dict, png: bool = True) -> None:
    """``out/<table>.md`` (atomically) and, with ``png``, ``out/<table>.png``: a heatmap of mean MAP (rows x the
    last axis) or one line per row over the last axis, one panel per protocol."""
    out = Path(out)
    name = state["config"]["table"]
    text = markdown(state)
    atomic_write(out / f"{name}.md", lambda fh: fh.write(text.encode()))
    if not png:
        return
    from scanet.plots import plot_grid_heatmap, plot_grid_lines

    panels = {}
    for pname, proto in PROTOCOLS.items():
        panels[f"{pname}: {proto.metric}"] = compact_matrix(state, pname)
    axes = state["axes"]
    title = f"{state['title']}: {state['config']['dataset']} (mean MAP)"
    if state["plot"] == "heatmap":
        plot_grid_heatmap(panels, out / f"{name}.png", title, row_title=" / ".join(axes[:-1]), col_title=axes[-1])
    else:
        plot_grid_lines(panels, out / f"{name}.png", title, x_title=axes[-1])
