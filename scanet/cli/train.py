"""``scanet train`` and ``scanet evaluate``: training runs and checkpoint evaluation, results as JSON + PNG."""

from __future__ import annotations

import json
import time
from pathlib import Path

from scanet.cli._common import dataset_options, load_dataset, load_trained, module_options, use_fused
from scanet.config import TrainConfig, arg_type, flag_type
from scanet.precision import PRECISIONS


def _baseline_scorers(dataset, root) -> dict:
    """name -> score_fn(text_split, image_split): CCA on the model's own inputs, semantic matching (single-label
    data), and CCA on Wiki's classic LDA-10 text features where they exist."""
    from scanet.baselines import cca_split_scorer, semantic_matching_split_scorer

    rows = {"CCA (bag-of-words SVD-100, same image features)": cca_split_scorer(dataset, "bow")}
    if dataset.train.labels.ndim == 1:
        rows["semantic matching (logistic regression per modality, same features)"] = semantic_matching_split_scorer(
            dataset
        )
    if dataset.name == "wiki" and root and (Path(root) / "raw_features.mat").is_file():
        from scanet.data.wiki import read_raw_features

        f = read_raw_features(Path(root) / "raw_features.mat", len(dataset.train), len(dataset.test))
        # The image side is the prepared one: the classic SIFT-128 unless prepared otherwise (e.g. sift-sqrt).
        images = (dataset.manifest or {}).get("params", {}).get("image_features", "sift")
        name = "CCA (LDA-10 + SIFT-128, classic features)" if images == "sift" else f"CCA (LDA-10 + {images} images)"
        rows[name] = cca_split_scorer(dataset, "lda", lda=(f["T_tr"], f["T_te"]))
    return rows


def _baseline_rows(dataset, root, protocols, scores_out: dict | None = None) -> dict:
    """Each baseline's standard retrieval report, with its protocol reports under "protocols". ``scores_out``
    receives each baseline's score matrices under its name (for the paired comparison)."""
    from scanet.evaluate import evaluate_protocols, retrieval_report

    rows = {}
    for name, score in _baseline_scorers(dataset, root).items():
        test_scores = score(dataset.test, dataset.test)
        report = retrieval_report(test_scores, dataset.test.labels, dataset.test.labels)
        known = {("test", "test"): test_scores}
        matrices: dict = {}
        rows[name] = {**report, "protocols": evaluate_protocols(score, dataset, protocols, known, matrices)}
        if scores_out is not None:
            scores_out[name] = matrices
    return rows


def _comparison_text(name: str, baseline: str, comparison: dict) -> str:
    """The paired comparisons of one baseline as text: a line per protocol and direction."""
    first = next(iter(comparison.values()))["mean"]
    lines = [
        f"{name} minus {baseline} (paired bootstrap over the {first['queries']} test items, "
        f"{first['n_resamples']} resamples, {first['confidence']:.0%} interval):"
    ]
    for pname, c in comparison.items():
        for direction in ("text2image", "image2text", "mean"):
            b = c[direction]
            lines.append(
                f"  {pname:<8} {direction:<10} {b['difference']:+.4f}  [{b['ci'][0]:+.4f}, {b['ci'][1]:+.4f}]  "
                f"above in {b['fraction_above']:.1%} of resamples"
            )
    return "\n".join(lines)


def _map_table_text(rows: dict) -> str:
    """One protocol's MAP table as aligned text: a header line, then one line per method."""
    width = max([len("method"), *map(len, rows)])  # the longest method name, so the columns line up
    lines = [f"{'method':<{width}} {'text->image':>12} {'image->text':>12} {'mean':>8}"]
    for name, row in rows.items():
        lines.append(f"{name:<{width}} {row['text2image']:>12.4f} {row['image2text']:>12.4f} {row['mean']:>8.4f}")
    return "\n".join(lines)


def _write_results(out: Path, reports: dict, extra: dict, stem: str = "") -> None:
    """``{stem}results.json`` (a MAP table per protocol, labelled, plus the full reports) and
    ``{stem}pr_curves.png`` in ``out``, each written atomically."""
    from scanet.evaluate import PROTOCOLS
    from scanet.io import atomic_write
    from scanet.plots import plot_pr_curves

    tables: dict[str, dict] = {}
    for pname, proto in PROTOCOLS.items():
        rows = {name: r["protocols"][pname] for name, r in reports.items() if pname in r.get("protocols", {})}
        if rows:
            tables[pname] = {
                "label": proto.label,
                "metric": proto.metric,
                "rows": {
                    name: {
                        "text2image": r["text2image"][proto.metric],
                        "image2text": r["image2text"][proto.metric],
                        "mean": r["mean"],
                    }
                    for name, r in rows.items()
                },
            }
    table = {
        name: {"text2image": r["text2image"]["map"], "image2text": r["image2text"]["map"], "mean": r["mean_map"]}
        for name, r in reports.items()
    }
    text = json.dumps({"map": table, "protocols": tables, **extra, "reports": reports}, indent=1)
    atomic_write(out / f"{stem}results.json", lambda fh: fh.write(text.encode()))
    plot_pr_curves(reports, out / f"{stem}pr_curves.png", title=extra.get("dataset", ""))
    for t in tables.values():
        print(f"\n{t['label']}\n{_map_table_text(t['rows'])}")
    print(f"\nwritten: {out / f'{stem}results.json'}, {out / f'{stem}pr_curves.png'}")


def cmd_train(args) -> None:
    from scanet import distributed as sd

    try:
        _train_run(args)
    finally:
        sd.destroy()  # under torchrun: leave the process group (a no-op for one process)


def _train_run(args) -> None:
    from scanet import distributed as sd
    from scanet.config import apply_overrides, get_preset
    from scanet.io import check_writable
    from scanet.precision import check_precision
    from scanet.train import train

    overrides = (args.set or []) + ([f"precision={args.precision}"] if args.precision else [])
    preset = apply_overrides(get_preset(args.preset or ("wiki" if args.root else "synthetic")), overrides)
    check_precision(preset.train.precision)
    sd.init_from_env(args.device)  # torchrun: join the group (train() finds it joined)
    out = check_writable(args.out or Path("runs") / preset.name, "run folder")  # before preparing data
    if not sd.is_main():
        sd.barrier()  # rank 0 prepares (and caches) the dataset, then the others read it
    dataset = load_dataset(args, preset)
    if sd.is_main():
        sd.barrier()
    t0 = time.perf_counter()
    fused = use_fused(args)
    if sd.is_main():
        print(
            f"modules: {'fused (scanet.fused)' if fused else 'eager (scanet.model)'} on {args.device}, "
            f"precision {preset.train.precision}"
        )
    matrices: dict = {}
    result = train(
        preset,
        dataset,
        out,
        device=args.device,
        fused=fused,
        resume=args.resume,
        compile=args.compile,
        cuda_graphs=args.cuda_graphs,
        force=args.force,
        scores_out=matrices,
    )
    wall = time.perf_counter() - t0
    if not sd.is_main():  # under torchrun rank 0 alone writes the results
        return
    reports = {"SCANet": result["report"]}
    extra = {
        "dataset": dataset.name,
        "preset": preset.name,
        "epochs": preset.train.epochs,
        "selected_epoch": result["selected_epoch"],
        "selected_by": result["report"]["selected_by"],
        "precision": preset.train.precision,
        "train_wall_seconds": wall,
        "seconds_per_epoch": [h["epoch_seconds"] for h in result["history"]],
    }
    comparisons: dict = {}
    if not args.no_baseline:
        baseline_matrices: dict = {}
        reports.update(_baseline_rows(dataset, args.root, "both", baseline_matrices))
        comparisons = _compare(matrices, baseline_matrices, dataset, "both", args.bootstrap)
    _write_results(out, reports, _with_comparisons(extra, "SCANet", comparisons))
    _print_comparisons("SCANet", comparisons)


def _compare(matrices: dict, baseline_matrices: dict, dataset, protocols, resamples: int) -> dict:
    """{baseline: compare_protocols(model, baseline)}: is the model above each baseline, beyond the luck of the
    test queries? Empty with resamples = 0."""
    from scanet.comparison import compare_protocols

    if not resamples:
        return {}
    return {b: compare_protocols(matrices, m, dataset, protocols, resamples) for b, m in baseline_matrices.items()}


def _with_comparisons(extra: dict, name: str, comparisons: dict) -> dict:
    return {**extra, "comparisons": {"method": name, "minus": comparisons}} if comparisons else extra


def _print_comparisons(name: str, comparisons: dict) -> None:
    for baseline, c in comparisons.items():
        print(f"\n{_comparison_text(name, baseline, c)}")


EVALUATE_STEM = "evaluate_"  # scanet evaluate writes evaluate_results.json: never the run's results.json


def cmd_evaluate(args) -> None:
    from scanet.checkpoint import load_checkpoint, load_model
    from scanet.evaluate import ensemble_scorer, evaluate_protocols, model_scorer, retrieval_report
    from scanet.io import check_writable

    checkpoints = [Path(c) for c in args.checkpoint]
    for c in checkpoints:
        if not c.is_file():
            raise FileNotFoundError(f"checkpoint not found: {c}")
    if len(checkpoints) > 1 and not args.out:
        raise ValueError(
            f"{len(checkpoints)} checkpoints given: name the output folder with --out (an ensemble's results "
            "belong to none of the run folders)"
        )
    # Where the results go, checked before any work: writable, and nothing there overwritten without --force.
    out = check_writable(args.out or checkpoints[0].parent, "output folder")
    targets = [out / f"{EVALUATE_STEM}results.json", out / f"{EVALUATE_STEM}pr_curves.png"]
    if not args.force and any(t.exists() for t in targets):
        raise ValueError(
            f"{targets[0]} already exists (an earlier evaluation); --force overwrites it, or choose another --out"
        )
    fused = use_fused(args)
    model, state, dataset = load_trained(args, fused=fused, checkpoint=checkpoints[0])
    dataset.require_inputs(model.config)
    scorers = [model_scorer(model, args.chunk_size, progress=True, precision=args.precision)]
    epochs = [state["epoch"]]
    for c in checkpoints[1:]:  # every member on the first one's prepared data (load_model checks the fingerprint)
        member_state = load_checkpoint(c)
        try:
            member, _ = load_model(member_state, dataset, device=args.device, fused=fused)
        except ValueError as e:
            raise ValueError(f"{c}: {e} (an ensemble's checkpoints must share the first one's data)") from e
        dataset.require_inputs(member.config)
        scorers.append(model_scorer(member, args.chunk_size, progress=True, precision=args.precision))
        epochs.append(member_state["epoch"])
    score = ensemble_scorer(scorers) if len(scorers) > 1 else scorers[0]
    test_scores = score(dataset.test, dataset.test)
    report = retrieval_report(test_scores, dataset.test.labels, dataset.test.labels)
    matrices: dict = {}
    report["protocols"] = evaluate_protocols(score, dataset, args.protocol, {("test", "test"): test_scores}, matrices)
    name = "SCANet" if len(scorers) == 1 else f"SCANet, mean logits of {len(scorers)} checkpoints"
    reports = {name: report}
    comparisons: dict = {}
    if args.baseline:
        baseline_matrices: dict = {}
        reports.update(_baseline_rows(dataset, args.root, args.protocol, baseline_matrices))
        comparisons = _compare(matrices, baseline_matrices, dataset, args.protocol, args.bootstrap)
    what: dict = (
        {"checkpoint": str(checkpoints[0]), "epoch": epochs[0]}
        if len(checkpoints) == 1
        else {"checkpoints": [str(c) for c in checkpoints], "epochs": epochs}
    )
    extra = {"dataset": dataset.name, **what, "precision": args.precision}
    _write_results(out, reports, _with_comparisons(extra, name, comparisons), stem=EVALUATE_STEM)
    _print_comparisons(name, comparisons)


def _bootstrap_option(p, when: str) -> None:
    p.add_argument(
        "--bootstrap",
        type=flag_type(int, "--bootstrap", lo=0),
        default=10_000,
        metavar="N",
        help=f"{when}: resamples of the paired bootstrap over test items that gives each difference (model minus "
        "baseline) an interval, in the results JSON and printed (default 10000; 0: no comparison)",
    )


def add_commands(sub) -> None:
    p = sub.add_parser("train", help="train SCANet, evaluate MAP on the test split, compare with CCA")
    p.add_argument("--preset", help="wiki, synthetic, ... (default: wiki with --root, else synthetic)")
    dataset_options(p)
    p.add_argument("--out", help="run folder (default runs/<preset>)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field, e.g. epochs=10")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/last.pt (a larger --set epochs= extends a finished run; other changes are refused)",
    )
    p.add_argument("--force", action="store_true", help="replace a run already in OUT (default: refuse)")
    module_options(
        p,
        "use the fused modules of scanet.fused (default: on CUDA, and on CPU when the native backend is built)",
        "use the eager modules of scanet.model",
    )
    p.add_argument("--compile", action="store_true", help="run the training step under torch.compile")
    p.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="capture the whole training step in a CUDA graph (CUDA only; drops each epoch's partial batch)",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="forward passes under torch.autocast in bf16/fp16 (sets train.precision; default: the "
        "preset's, fp32); parameters, optimizer state, softmax statistics and the loss stay fp32",
    )
    p.add_argument("--no-baseline", action="store_true", help="skip the baselines (CCA, semantic matching)")
    _bootstrap_option(p, "unless --no-baseline")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="MAP of a checkpoint (or an ensemble) on the test split (JSON + PR-curve PNG)")
    p.add_argument(
        "--checkpoint",
        required=True,
        action="append",
        help="a checkpoint; given more than once, the ensemble of them (the mean of their logits; needs --out)",
    )
    dataset_options(p)
    p.add_argument(
        "--out",
        help="output folder of evaluate_results.json / evaluate_pr_curves.png (default: the "
        "checkpoint's; the training run's results.json is never touched)",
    )
    p.add_argument("--force", action="store_true", help="overwrite an earlier evaluation's files")
    module_options(p, "fused modules (default: auto, as for train)", "eager modules")
    p.add_argument(
        "--chunk-size",
        type=arg_type(TrainConfig, "score_chunk", "--chunk-size"),
        default=64,
        help="texts scored at a time (bounds memory)",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="score under torch.autocast in bf16/fp16 (the logits stay fp32; default fp32)",
    )
    p.add_argument(
        "--baseline",
        action="store_true",
        help="also run the baselines (CCA; semantic matching on single-label data) and compare the model with each",
    )
    _bootstrap_option(p, "with --baseline")
    p.add_argument(
        "--protocol",
        choices=("standard", "paper", "both"),
        default="both",
        help="standard: test queries vs test candidates, MAP@all (+MAP@50); paper: test queries vs "
        "training candidates, MAP@100 / relevant retrieved (the authors' group's code); default both",
    )
    p.set_defaults(func=cmd_evaluate)
