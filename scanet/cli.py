"""The ``scanet`` command: prepare, train, evaluate (and the commands other modules register).

    scanet prepare wiki --root ../shared/data/wiki          raw data -> prepared/wiki (cached)
    scanet train --preset wiki --root ../shared/data/wiki   prepare (cached), train, evaluate, CCA side by side
    scanet train                                            the same on the embedded synthetic dataset
    scanet evaluate --checkpoint runs/wiki/last.pt --root ../shared/data/wiki
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

# Modules that add their own subcommands: each defines add_commands(subparsers).
COMMAND_MODULES: list[str] = ["scanet.features", "scanet.retrieve"]


def _dataset_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", help="raw data directory of the dataset (e.g. ../shared/data/wiki)")
    p.add_argument("--data", help="an already prepared dataset folder (instead of --root)")
    p.add_argument("--prepared-dir", default="prepared", help="where prepared datasets are cached")


def load_dataset(args, preset):
    from scanet.data import prepare
    from scanet.data.prepared import PreparedDataset

    if args.data:
        return PreparedDataset.load(args.data)
    if preset.dataset == "synthetic":
        return prepare("synthetic", out_dir=Path(args.prepared_dir) / "synthetic")
    if not args.root:
        raise ValueError(f"preset {preset.name!r} needs --root DIR (the raw {preset.dataset} data) or --data")
    opts = {k: v for k, v in (("vocab_size", preset.vocab_size), ("knn", preset.knn)) if v is not None}
    return prepare(preset.dataset, args.root, Path(args.prepared_dir) / preset.dataset, **opts)


def _baseline_rows(dataset, root) -> dict:
    """CCA on the model's own inputs, plus CCA on Wiki's classic LDA-10 text features where they exist."""
    from scanet.baselines import cca_report, semantic_matching_report

    rows = {"CCA (bag-of-words SVD-100, same image features)": cca_report(dataset, "bow")}
    if dataset.train.labels.ndim == 1:
        rows["semantic matching (logistic regression per modality, same features)"] = semantic_matching_report(dataset)
    if dataset.name == "wiki" and root and (Path(root) / "raw_features.mat").is_file():
        from scanet.data.wiki import read_raw_features

        f = read_raw_features(Path(root) / "raw_features.mat", len(dataset.train), len(dataset.test))
        rows["CCA (LDA-10 + SIFT-128, classic features)"] = cca_report(dataset, "lda", lda=(f["T_tr"], f["T_te"]))
    return rows


def _write_results(out: Path, reports: dict, extra: dict) -> None:
    from scanet.evaluate import plot_pr_curves

    table = {name: {"text2image": r["text2image"]["map"], "image2text": r["image2text"]["map"],
                    "mean": r["mean_map"]} for name, r in reports.items()}
    (out / "results.json").write_text(json.dumps({"map": table, **extra, "reports": reports}, indent=1))
    plot_pr_curves(reports, out / "pr_curves.png", title=extra.get("dataset", ""))
    print(f"\n{'method':<52} {'text->image':>12} {'image->text':>12} {'mean':>8}")
    for name, row in table.items():
        print(f"{name:<52} {row['text2image']:>12.4f} {row['image2text']:>12.4f} {row['mean']:>8.4f}")
    print(f"\nwritten: {out / 'results.json'}, {out / 'pr_curves.png'}")


def use_fused(args) -> bool:
    """--fused / --eager, else auto: the fused modules on CUDA, and on CPU when the native backend is built."""
    if getattr(args, "eager", False):
        return False
    if args.fused:
        return True
    import torch

    if torch.device(args.device).type == "cuda":
        return True
    import scanet.native

    return scanet.native.available()


def cmd_prepare(args) -> None:
    from scanet.data import prepare

    opts = {}
    if args.dataset != "synthetic":
        # Only the options given: each dataset has its own defaults (WebNews: 5,000 words, word2vec; custom:
        # its dataset.json), which a command-line default would silently override.
        lmax = None if args.lmax is None else args.lmax if args.lmax == "exact" else float(args.lmax)
        opts = {k: v for k, v in dict(vocab_size=args.vocab_size, knn=args.knn, embeddings=args.embeddings,
                                      lmax=lmax, image_features=args.image_features).items() if v is not None}
    t0 = time.perf_counter()
    ds = prepare(args.dataset, args.root, args.out or Path(args.prepared_dir) / args.dataset, **opts)
    print(json.dumps({k: v for k, v in ds.manifest.items() if k not in ("inputs", "params")}, indent=1))
    print(f"prepared in {time.perf_counter() - t0:.1f} s")


def cmd_train(args) -> None:
    from scanet.config import apply_overrides, get_preset
    from scanet.train import train

    preset = apply_overrides(get_preset(args.preset or ("wiki" if args.root else "synthetic")), args.set or [])
    dataset = load_dataset(args, preset)
    out = Path(args.out or Path("runs") / preset.name)
    t0 = time.perf_counter()
    fused = use_fused(args)
    print(f"modules: {'fused (scanet.fused)' if fused else 'eager (scanet.model)'} on {args.device}")
    result = train(preset, dataset, out, device=args.device, fused=fused, resume=args.resume,
                   compile=args.compile, cuda_graphs=args.cuda_graphs)
    wall = time.perf_counter() - t0
    reports = {"SCANet": result["report"]}
    if not args.no_baseline:
        reports.update(_baseline_rows(dataset, args.root))
    _write_results(out, reports, {"dataset": dataset.name, "preset": preset.name, "epochs": preset.train.epochs,
                                  "train_wall_seconds": wall,
                                  "seconds_per_epoch": [h["epoch_seconds"] for h in result["history"]]})


def cmd_evaluate(args) -> None:
    from scanet.evaluate import evaluate_model
    from scanet.train import load_checkpoint, load_model, preset_from_dict

    state = load_checkpoint(args.checkpoint)
    preset = preset_from_dict(state["preset"])
    dataset = load_dataset(args, preset)
    model, _ = load_model(state, dataset, device=args.device, fused=use_fused(args))
    report, _ = evaluate_model(model, dataset, "test", args.chunk_size, progress=True)
    reports = {"SCANet": report}
    if args.baseline:
        reports.update(_baseline_rows(dataset, args.root))
    out = Path(args.out or Path(args.checkpoint).parent)
    out.mkdir(parents=True, exist_ok=True)
    _write_results(out, reports, {"dataset": dataset.name, "checkpoint": str(args.checkpoint),
                                  "epoch": state["epoch"]})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scanet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="raw data -> prepared word graph, bag-of-words and features (cached)")
    p.add_argument("dataset", help="wiki, synthetic, ...")
    p.add_argument("--root", help="raw data directory")
    p.add_argument("--out", help="output folder (default prepared/<dataset>)")
    p.add_argument("--prepared-dir", default="prepared")
    p.add_argument("--vocab-size", type=int, help="default: the dataset's (wiki 10,055, webnews 5,000)")
    p.add_argument("--knn", type=int, help="default: the dataset's (8)")
    p.add_argument("--embeddings", help="'glove-6b-50d', 'word2vec', 'cooccurrence' or a word2vec/GloVe file "
                                        "(default: the dataset's: GloVe for wiki, word2vec for webnews)")
    p.add_argument("--lmax", help="'exact' (eigsh) or a number such as 2 (default: the dataset's, 'exact')")
    p.add_argument("--image-features", help="wiki: 'sift' (default), 'cnn' (EfficientNet-Lite0 on ROOT/images) "
                                            "or an .npy matrix")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train SCANet, evaluate MAP on the test split, compare with CCA")
    p.add_argument("--preset", help="wiki, synthetic, ... (default: wiki with --root, else synthetic)")
    _dataset_options(p)
    p.add_argument("--out", help="run folder (default runs/<preset>)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field, e.g. epochs=10")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--device", default="cpu")
    p.add_argument("--fused", action="store_true",
                   help="use the fused modules of scanet.fused (default: on CUDA, and on CPU when the native "
                        "backend is built)")
    p.add_argument("--eager", action="store_true", help="use the eager modules of scanet.model")
    p.add_argument("--compile", action="store_true", help="run the training step under torch.compile")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="capture the whole training step in a CUDA graph (CUDA only; drops each epoch's partial batch)")
    p.add_argument("--no-baseline", action="store_true", help="skip the CCA baseline")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="MAP of a checkpoint on the test split (JSON + PR-curve PNG)")
    p.add_argument("--checkpoint", required=True)
    _dataset_options(p)
    p.add_argument("--out", help="output folder (default: the checkpoint's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--fused", action="store_true", help="fused modules (default: auto, as for train)")
    p.add_argument("--eager", action="store_true", help="eager modules")
    p.add_argument("--chunk-size", type=int, default=64, help="texts scored at a time (bounds memory)")
    p.add_argument("--baseline", action="store_true", help="also run the CCA baseline")
    p.set_defaults(func=cmd_evaluate)

    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv=None) -> int:
    # On a shared machine OpenMP threads that spin while waiting slow every op down badly; passive waiting
    # costs little on a dedicated one. Set before torch is imported (the commands import it lazily).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"scanet {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
