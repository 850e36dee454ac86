"""Word-graph statistics of a prepared Wiki under each construction (README "how the paper was read").

    python bench/graph_stats.py --root ../shared/data/wiki [--prepared-dir /tmp/graph-stats] [--out FILE]

Prepares Eng-Wiki three ways (default GloVe + symmetric; GloVe + paper graph; corpus word2vec + paper graph, the
authors' group's reading) into ``--prepared-dir`` (cached there: a second run only reads), timing each, and writes
per construction: V, nnz of L~, entries a row, the fraction of off-diagonal edges whose reverse edge exists,
whether L~ is symmetric (scanet.laplacian's check), the spectral radius of L~ (Chebyshev's domain is [-1, 1]),
in-degree spread (off-diagonal), and the neighbour sets of a few words (alphabetical; in the symmetric graph also
the words that list them).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from scanet.data import prepare
from scanet.laplacian import Laplacian

CONFIGS = {
    "default (glove-6b-50d, symmetric)": {},
    "glove-6b-50d, paper graph": {"graph": "paper"},
    "word2vec on the training texts, paper graph (the group's reading)": {"graph": "paper", "embeddings": "word2vec"},
}
PROBES = ("music", "war", "football", "king", "species")


def statistics(ds) -> dict:
    Lt = sp.csr_matrix(ds.laplacian, dtype=np.float64)
    V = Lt.shape[0]
    off = Lt - sp.diags(Lt.diagonal())
    off.eliminate_zeros()
    pattern = (off != 0).astype(np.int8)
    both = pattern.multiply(pattern.T).nnz
    per_row = np.diff(Lt.indptr)
    in_deg = np.asarray(pattern.sum(axis=0)).ravel()  # how many words list this word as a neighbour
    if Laplacian(Lt.astype(np.float32)).symmetric:
        radius = float(np.abs(spla.eigsh(Lt, k=1, which="LM", return_eigenvectors=False, tol=1e-6)).max())
    else:
        radius = float(np.abs(spla.eigs(Lt, k=1, which="LM", return_eigenvectors=False, tol=1e-6)).max())
    neighbours = {}
    index = {w: i for i, w in enumerate(ds.vocab)}
    for w in PROBES:
        if w in index:
            neighbours[w] = sorted(ds.vocab[j] for j in pattern.getrow(index[w]).indices)
    return {
        "V": V,
        "nnz": int(Lt.nnz),
        "entries_per_row": {"min": int(per_row.min()), "mean": float(per_row.mean()), "max": int(per_row.max())},
        "diagonal_entries": int((Lt.diagonal() != 0).sum()),  # of L~ (2/lmax - 1 + ... where lmax < 2)
        "off_diagonal_edges": int(pattern.nnz),
        "reciprocated_fraction": both / max(pattern.nnz, 1),
        "symmetric": bool(Laplacian(Lt.astype(np.float32)).symmetric),
        "spectral_radius": radius,
        "lmax": ds.lmax,
        "in_degree": {
            "min": int(in_deg.min()),
            "max": int(in_deg.max()),
            "words_nobody_lists": int((in_deg == 0).sum()),
        },
        "neighbours": neighbours,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True)
    p.add_argument("--prepared-dir", default="/tmp/graph-stats")
    p.add_argument("--out", default="docs/results/wiki-word-graph-2026-12-01-cpu.json")
    args = p.parse_args(argv)
    rows = {}
    for i, (name, opts) in enumerate(CONFIGS.items()):
        t0 = time.perf_counter()
        ds = prepare("wiki", args.root, Path(args.prepared_dir) / f"wiki-{i}", **opts)
        seconds = time.perf_counter() - t0
        rows[name] = {"options": opts, "preparation_s": round(seconds, 1), **statistics(ds)}
        print(name, json.dumps(rows[name], indent=1))
    summary = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"cpu-{platform.machine()}-{os.cpu_count()}cores",
        "command": "nice -n 5 python bench/graph_stats.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "note": "preparation_s is a cold preparation (texts read and tokenized, vectors loaded or trained, graph "
        "built), on a shared 2-core machine with other jobs running: a rough figure; a cache hit reads in ~1 s",
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
