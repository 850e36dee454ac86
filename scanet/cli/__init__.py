"""The ``scanet`` command: prepare, train, evaluate, experiment, search, features. Nothing in the library imports it.

    scanet prepare wiki --root ../shared/data/wiki          raw data -> prepared/wiki (cached)
    scanet train --preset wiki --root ../shared/data/wiki   prepare (cached), train, evaluate, CCA side by side
    scanet train                                            the same on the embedded synthetic dataset
    scanet evaluate --checkpoint runs/wiki/last.pt --root ../shared/data/wiki
    scanet search index|query ...                           a search index and queries (scanet.index)
    scanet features images|models|classify ...              CNN image features (scanet.features)
    scanet experiment table3|table4 --preset wiki --root ... the paper's grids of runs (scanet.experiment)

Verbs: each module of ``VERB_MODULES`` defines ``add_commands(subparsers)``, registering its subcommands with
``set_defaults(func=...)``; a new verb group is a new module here and one line in that list. Shared options
and the checkpoint-then-dataset load sequence: scanet.cli._common.
"""

from __future__ import annotations

import argparse
import os
import sys

# On a shared machine OpenMP threads that spin while waiting slow every op down badly; passive waiting costs
# little on a dedicated one. It must be set before torch is imported, which the verb modules below do.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from scanet.cli import experiment, features, prepare, search, train
from scanet.cli._common import dataset_options, load_dataset, load_trained, use_fused  # noqa: F401

VERB_MODULES = (prepare, train, experiment, search, features)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scanet", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module in VERB_MODULES:
        module.add_commands(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError, ImportError) as e:  # OSError: a full disk, a read-only folder, a missing file
        # An OSError we raised carries its sentence in strerror (str() would prefix "[Errno 28]").
        text = e.strerror if isinstance(e, OSError) and e.strerror and e.filename is None and len(e.args) == 2 else e
        print(f"scanet {args.command}: error: {text}", file=sys.stderr)
        return 2
    return 0
