"""Every matplotlib figure the package writes (the Agg backend: files only, no display).

plot_training_curve(history, path)     training loss and test MAP per epoch (scanet.train)
plot_pr_curves(reports, path)          precision-recall per direction, one line per method (train, evaluate)
contact_sheet(result, path, root)      a search query and its results as a grid of tiles (scanet search)
plot_grid_heatmap(panels, path, title) a grid's mean MAP over two axes, one panel per protocol (Table 4)
plot_grid_lines(panels, path, title)   a grid's mean MAP over its last axis, one line per row (Table 3)
"""

from __future__ import annotations

from pathlib import Path

from scanet.data.images import find_image_file, find_text_snippet


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training_curve(history: list[dict], path: Path) -> None:
    """Loss per epoch and, where evaluated, test MAP per epoch (history: scanet.train's metrics rows)."""
    plt = _pyplot()

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    ep = [h["epoch"] for h in history]
    a1.plot(ep, [h["loss"] for h in history], marker="o", ms=3)
    a1.set_xlabel("epoch")
    a1.set_ylabel("training loss (eq. 10)")
    a1.grid(alpha=0.3)
    ev = [h for h in history if "text2image_map" in h]
    if ev:
        for key, name in (
            ("text2image_map", "text -> image"),
            ("image2text_map", "image -> text"),
            ("mean_map", "mean"),
        ):
            a2.plot([h["epoch"] for h in ev], [h[key] for h in ev], marker="o", ms=3, label=name)
        a2.legend()
    a2.set_xlabel("epoch")
    a2.set_ylabel("test MAP")
    a2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_pr_curves(reports: dict[str, dict], path: str | Path, title: str = "precision-recall") -> None:
    """One panel per direction, one line per method (reports maps a method name to a retrieval_report);
    a single legend below the panels gives each method's MAP in both directions."""
    plt = _pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2 + 0.25 * len(reports)))
    lines: list = []
    for ax, direction in zip(axes, ("text2image", "image2text"), strict=True):
        lines = []
        for rep in reports.values():
            pr = rep[direction]["pr_curve"]
            (line,) = ax.plot(pr["recall"], pr["precision"], marker="o", ms=3)
            lines.append(line)
        ax.set_title(f"{title}: {direction.replace('2', ' -> ')}")
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    labels = [
        f"{name}: MAP text->image {rep['text2image']['map']:.3f}, image->text {rep['image2text']['map']:.3f}"
        for name, rep in reports.items()
    ]
    fig.legend(lines, labels, loc="lower center", ncol=1, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.045 * len(reports) + 0.02, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


GridPanel = tuple[list[str], list[str], list[list[float | None]]]  # rows, columns, values (None: no value)


def plot_grid_heatmap(
    panels: dict[str, GridPanel], path: str | Path, title: str, row_title: str = "", col_title: str = ""
) -> None:
    """One heatmap per panel (scanet.experiment_report.compact_matrix), each cell annotated with its value;
    cells without a value are blank (grey)."""
    import numpy as np

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2), squeeze=False)
    for ax, (name, (rows, cols, values)) in zip(axes[0], panels.items(), strict=True):
        a = np.array([[np.nan if v is None else v for v in r] for r in values], dtype=float)
        ax.set_facecolor("#dddddd")
        finite = a[np.isfinite(a)]
        im = ax.imshow(
            np.ma.masked_invalid(a),
            cmap="viridis",
            vmin=finite.min() if finite.size else 0,
            vmax=finite.max() if finite.size else 1,
        )
        lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
        for (i, j), v in np.ndenumerate(a):
            if np.isfinite(v):  # dark text on viridis's bright end, white on its dark end
                light = hi > lo and (v - lo) / (hi - lo) > 0.6
                ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=7, color="black" if light else "white")
        ax.set_xticks(range(len(cols)), cols)
        ax.set_yticks(range(len(rows)), rows)
        ax.set_xlabel(col_title)
        ax.set_ylabel(row_title)
        ax.set_title(name, fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_grid_lines(panels: dict[str, GridPanel], path: str | Path, title: str, x_title: str = "") -> None:
    """One panel per protocol: a line per row over the columns (missing values leave gaps); rows without any
    value are left out of the plot (the Markdown table lists why)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.4), squeeze=False)
    for ax, (name, (rows, cols, values)) in zip(axes[0], panels.items(), strict=True):
        drawn = 0
        for label, vals in zip(rows, values, strict=True):
            if all(v is None for v in vals):
                continue
            ax.plot(range(len(cols)), [float("nan") if v is None else v for v in vals], marker="o", ms=4, label=label)
            drawn += 1
        if drawn:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no cell finished yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks(range(len(cols)), cols)
        ax.set_xlabel(x_title)
        ax.set_ylabel("mean MAP")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def contact_sheet(result: dict, path, root=None, columns: int = 5) -> Path:
    """A PNG grid: the query, then each result (rank, id, class, similarity). Images are drawn where
    find_image_file finds a file under ``root``, otherwise (and for texts) a text tile (``result``: what
    scanet.index.search_index returns)."""
    import textwrap

    plt = _pyplot()

    tiles: list[tuple[str, str, Path | None]] = []
    q = result["query"]
    if q["kind"] == "free text":
        tiles.append(("query (free text)", textwrap.shorten(q["text"], 160), None))
    else:
        qmod = "image" if q["kind"].startswith("image") else "text"
        img = find_image_file(root, q["id"], q.get("class")) if qmod == "image" else None
        body = (find_text_snippet(root, q["id"]) or q.get("words", "")) if qmod == "text" else "(no image file)"
        tiles.append((f"query: {qmod} {q['id']}\n{q.get('class', '')}", body, img))
    modality = result["collection"]["modality"]
    for r in result["results"]:
        title = f"#{r['rank']} {r['id']}  {r['similarity']:.3f}\n{r['class']}"
        if modality == "image":
            tiles.append((title, "(no image file)", find_image_file(root, r["id"], r["class"])))
        else:
            tiles.append((title, find_text_snippet(root, r["id"]) or r.get("words", ""), None))
    cols = max(1, min(columns, len(tiles)))
    rows = -(-len(tiles) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, body, img) in zip(axes.flat, tiles, strict=False):  # the grid may have more cells than tiles
        ax.set_title(title, fontsize=8)
        if img is not None:
            try:
                ax.imshow(plt.imread(img))
                continue
            except Exception:  # noqa: BLE001 - any unreadable image file: fall back to a text tile
                body = f"(unreadable image {Path(img).name})"
        ax.add_patch(plt.Rectangle((0, 0), 1, 1, transform=ax.transAxes, facecolor="#f2f2f2", edgecolor="#999999"))
        ax.text(
            0.5, 0.5, textwrap.fill(body, 28), ha="center", va="center", fontsize=7, transform=ax.transAxes, wrap=True
        )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
