"""What every text dataset's preparation ends with, written once: which items are kept (and why the others are
not), the word graph over the vocabulary, the splits, and the preparation report.

    partition(items, reason_of)         kept items per split and the excluded ones with their reason
    log_exclusions(report, log)         the report's kept/excluded summary, one line per excluded item
    write_report(out_dir, report, log)  <out>/preparation_report.json (after a build; a cache hit keeps it)
    assemble(...)                       vocabulary vectors -> kNN word graph -> Splits (+ token sequences,
                                        pixels) -> PreparedDataset
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from scanet.data.graph import word_graph
from scanet.data.prepared import PreparedDataset, Split
from scanet.data.tokens import token_ids

REPORT_NAME = "preparation_report.json"


def partition(
    items: dict[str, list], reason_of: Callable[[Any], str | None], describe: Callable[[Any], dict] | None = None
) -> tuple[dict[str, list], list[dict]]:
    """Split each split's items into kept (``reason_of(item)`` is None) and excluded records
    {split, text_id, image_id, **describe(item), reason}."""
    kept: dict[str, list] = {}
    excluded: list[dict] = []
    for split, its in items.items():
        kept[split] = []
        for it in its:
            why = reason_of(it)
            if why is None:
                kept[split].append(it)
            else:
                excluded.append(
                    {
                        "split": split,
                        "text_id": it.text_id,
                        "image_id": it.image_id,
                        **(describe(it) if describe else {}),
                        "reason": why,
                    }
                )
    return kept, excluded


def counts(items: dict[str, list], kept: dict[str, list]) -> dict:
    return {"entries": {k: len(v) for k, v in items.items()}, "kept": {k: len(v) for k, v in kept.items()}}


def log_exclusions(report: dict, log=print) -> None:
    log(
        f"entries: train {report['entries']['train']}, test {report['entries']['test']}; kept: "
        f"train {report['kept']['train']}, test {report['kept']['test']}; {len(report['excluded'])} excluded"
    )
    for x in report["excluded"]:
        label = f" ({x['label']})" if "label" in x else ""
        log(f"  excluded {x['split']} {x['text_id']}{label}: {x['reason']}")


def write_report(out_dir: Path, report: dict, log=print) -> Path:
    """Write the report of a build; with an empty report (a cache hit) only say where the old one is."""
    path = Path(out_dir) / REPORT_NAME
    if report:
        path.write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
        log(f"preparation report: {path}")
    elif path.is_file():
        log(f"prepared data is up to date (cache hit); its preparation report: {path}")
    return path


def assemble(
    name: str,
    vocab: list[str],
    word_vectors,
    classes: list[str],
    parts: dict[str, tuple],
    knn: int,
    lmax,
    progress=print,
    docs: dict[str, list] | None = None,
    pixels: dict[str, np.ndarray] | None = None,
    *,
    graph: str = "symmetric",
) -> PreparedDataset:
    """The prepared dataset: the ``knn``-NN word graph of the vocabulary's vectors (``graph``: "symmetric" or
    "paper", see scanet.data.graph), and per split ("train", "test")
    ``parts[split] = (text_ids, image_ids, bow, image_features, labels)``. ``docs[split]``: the tokenized texts
    in order (-> token sequences over the vocabulary, and the vocabulary's vectors are kept for the LSTM/CNN
    encoders); ``pixels[split]``: (n, 3, S, S) uint8 raw images (CNN-5)."""
    progress(
        f"vocabulary: {len(vocab)} words with a vector in {word_vectors.name}; building the {knn}-NN word graph "
        f"({graph})"
    )
    vectors = word_vectors.lookup(vocab)
    lap, lm = word_graph(vectors, knn, lmax, graph)
    splits = {
        k: Split(
            list(t),
            list(i),
            bow,
            np.ascontiguousarray(img, dtype=np.float32),
            labels,
            token_ids(docs[k], vocab) if docs is not None else None,
            pixels[k] if pixels is not None else None,
        )
        for k, (t, i, bow, img, labels) in parts.items()
    }
    return PreparedDataset(
        name,
        vocab,
        lap,
        lm,
        classes,
        splits["train"],
        splits["test"],
        word_vectors=np.asarray(vectors, np.float32) if docs is not None else None,
    )
