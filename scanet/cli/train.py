"""``scanet train`` and ``scanet evaluate``: training runs and checkpoint evaluation, results as JSON + PNG."""
from __future__ import annotations

import json
import time
from pathlib import Path

from scanet.cli._common import dataset_options, load_dataset, load_trained, module_options, use_fused
from scanet.precision import PRECISIONS


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
    from scanet.plots import plot_pr_curves

    table = {name: {"text2image": r["text2image"]["map"], "image2text": r["image2text"]["map"],
                    "mean": r["mean_map"]} for name, r in reports.items()}
    (out / "results.json").write_text(json.dumps({"map": table, **extra, "reports": reports}, indent=1))
    plot_pr_curves(reports, out / "pr_curves.png", title=extra.get("dataset", ""))
    print(f"\n{'method':<52} {'text->image':>12} {'image->text':>12} {'mean':>8}")
    for name, row in table.items():
        print(f"{name:<52} {row['text2image']:>12.4f} {row['image2text']:>12.4f} {row['mean']:>8.4f}")
    print(f"\nwritten: {out / 'results.json'}, {out / 'pr_curves.png'}")


def cmd_train(args) -> None:
    from scanet.config import apply_overrides, get_preset
    from scanet.precision import check_precision
    from scanet.train import train

    overrides = (args.set or []) + ([f"precision={args.precision}"] if args.precision else [])
    preset = apply_overrides(get_preset(args.preset or ("wiki" if args.root else "synthetic")), overrides)
    check_precision(preset.train.precision)
    dataset = load_dataset(args, preset)
    out = Path(args.out or Path("runs") / preset.name)
    t0 = time.perf_counter()
    fused = use_fused(args)
    print(f"modules: {'fused (scanet.fused)' if fused else 'eager (scanet.model)'} on {args.device}, "
          f"precision {preset.train.precision}")
    result = train(preset, dataset, out, device=args.device, fused=fused, resume=args.resume,
                   compile=args.compile, cuda_graphs=args.cuda_graphs)
    wall = time.perf_counter() - t0
    reports = {"SCANet": result["report"]}
    if not args.no_baseline:
        reports.update(_baseline_rows(dataset, args.root))
    _write_results(out, reports, {"dataset": dataset.name, "preset": preset.name, "epochs": preset.train.epochs,
                                  "precision": preset.train.precision, "train_wall_seconds": wall,
                                  "seconds_per_epoch": [h["epoch_seconds"] for h in result["history"]]})


def cmd_evaluate(args) -> None:
    from scanet.evaluate import evaluate_model

    model, state, dataset = load_trained(args, fused=use_fused(args))
    report, _ = evaluate_model(model, dataset, "test", args.chunk_size, progress=True, precision=args.precision)
    reports = {"SCANet": report}
    if args.baseline:
        reports.update(_baseline_rows(dataset, args.root))
    out = Path(args.out or Path(args.checkpoint).parent)
    out.mkdir(parents=True, exist_ok=True)
    _write_results(out, reports, {"dataset": dataset.name, "checkpoint": str(args.checkpoint),
                                  "epoch": state["epoch"], "precision": args.precision})


def add_commands(sub) -> None:
    p = sub.add_parser("train", help="train SCANet, evaluate MAP on the test split, compare with CCA")
    p.add_argument("--preset", help="wiki, synthetic, ... (default: wiki with --root, else synthetic)")
    dataset_options(p)
    p.add_argument("--out", help="run folder (default runs/<preset>)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field, e.g. epochs=10")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    module_options(p, "use the fused modules of scanet.fused (default: on CUDA, and on CPU when the native "
                      "backend is built)", "use the eager modules of scanet.model")
    p.add_argument("--compile", action="store_true", help="run the training step under torch.compile")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="capture the whole training step in a CUDA graph (CUDA only; drops each epoch's partial batch)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="forward passes under torch.autocast in bf16/fp16 (sets train.precision; default: the "
                        "preset's, fp32); parameters, optimizer state, softmax statistics and the loss stay fp32")
    p.add_argument("--no-baseline", action="store_true", help="skip the CCA baseline")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="MAP of a checkpoint on the test split (JSON + PR-curve PNG)")
    p.add_argument("--checkpoint", required=True)
    dataset_options(p)
    p.add_argument("--out", help="output folder (default: the checkpoint's)")
    module_options(p, "fused modules (default: auto, as for train)", "eager modules")
    p.add_argument("--chunk-size", type=int, default=64, help="texts scored at a time (bounds memory)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="score under torch.autocast in bf16/fp16 (the logits stay fp32; default fp32)")
    p.add_argument("--baseline", action="store_true", help="also run the CCA baseline")
    p.set_defaults(func=cmd_evaluate)
