"""``scanet prepare DATASET``: raw data -> prepared folder (scanet.data)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from scanet.cli._common import parse_options
from scanet.config import Preset, arg_type


def cmd_prepare(args) -> None:
    from scanet.data import prepare

    opts = {}
    if args.dataset != "synthetic":
        # Only the options given: each dataset has its own defaults (WebNews: 5,000 words, word2vec; custom:
        # its dataset.json), which a command-line default would silently override.
        lmax = None if args.lmax is None else args.lmax if args.lmax == "exact" else float(args.lmax)
        opts = {
            k: v
            for k, v in dict(
                vocab_size=args.vocab_size,
                knn=args.knn,
                embeddings=args.embeddings,
                lmax=lmax,
                image_features=args.image_features,
            ).items()
            if v is not None
        }
    opts.update(parse_options(args.option))
    t0 = time.perf_counter()
    ds = prepare(args.dataset, args.root, args.out or Path(args.prepared_dir) / args.dataset, **opts)
    print(json.dumps({k: v for k, v in ds.manifest.items() if k not in ("inputs", "params")}, indent=1))
    print(f"prepared in {time.perf_counter() - t0:.1f} s")


def add_commands(sub) -> None:
    from scanet.data import DESCRIPTIONS, PREPARERS

    known = "\n".join(f"  {name:<10} {DESCRIPTIONS.get(name, '')}".rstrip() for name in sorted(PREPARERS))
    p = sub.add_parser(
        "prepare",
        help="raw data -> prepared word graph, bag-of-words and features (cached)",
        description="Prepare a dataset (cached). Datasets:\n" + known,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dataset", help="one of: " + ", ".join(sorted(PREPARERS)))
    p.add_argument("--root", help="raw data directory")
    p.add_argument("--out", help="output folder (default prepared/<dataset>)")
    p.add_argument("--prepared-dir", default="prepared")
    p.add_argument(
        "--vocab-size",
        type=arg_type(Preset, "vocab_size", "--vocab-size"),
        help="default: the dataset's (wiki 10,055, webnews 5,000)",
    )
    p.add_argument("--knn", type=arg_type(Preset, "knn", "--knn"), help="default: the dataset's (8)")
    p.add_argument(
        "--embeddings",
        help="'glove-6b-50d', 'word2vec', 'cooccurrence' or a word2vec/GloVe file "
        "(default: the dataset's: GloVe for wiki, word2vec for webnews)",
    )
    p.add_argument("--lmax", help="'exact' (eigsh) or a number such as 2 (default: the dataset's, 'exact')")
    p.add_argument(
        "--image-features",
        help="wiki: 'sift' (default), 'sift-sqrt' (the SIFT histograms' square roots: Hellinger-mapped BoVW), "
        "'sift-sqrt-rbf' (those through an RBF kernel map fitted on the training images), "
        "'cnn' (EfficientNet-Lite0 on ROOT/images) or an .npy matrix",
    )
    p.add_argument(
        "--option",
        action="append",
        metavar="KEY=VALUE",
        help="any other option of the dataset's preparer, e.g. nuswide: --option n_train=40000 "
        "--option tags=all; pascal: --option single_object=False; wiki: --option graph=paper (an unknown key "
        "lists them)",
    )
    p.set_defaults(func=cmd_prepare)
