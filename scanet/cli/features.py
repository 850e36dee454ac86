"""``scanet features images|models|classify``: CNN image features from the command line (scanet.features)."""

from __future__ import annotations

import sys
from pathlib import Path

from scanet.config import flag_type
from scanet.data.images import IMAGE_EXTENSIONS, list_images
from scanet.features import (
    DEFAULT_MODEL,
    IMAGE_MODELS,
    classify,
    extract_cached,
    imagenet_class_name,
    model_availability,
)
from scanet.features.extract import _paths_next_to


def _read_list_file(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"list file not found: {path}")
    return [ln.rstrip("\r\n") for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def cmd_images(args) -> None:
    root = Path(args.root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    names = _read_list_file(Path(args.list)) if args.list else list_images(root)
    if not names:
        raise ValueError(f"no image files under {root} (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    out = Path(args.out)
    if out.suffix != ".npy":
        raise ValueError(f"--out must name a .npy file, got {out}")
    res = extract_cached(
        [root / n for n in names], names, out, args.model, args.batch_size, progress=not args.no_progress
    )
    _, report_path = _paths_next_to(out)
    if res.notes:
        print(f"{len(res.notes)} files needed a conversion (see {report_path}), e.g.:")
        for n in list(res.notes)[:5]:
            print(f"  {n}: {'; '.join(res.notes[n])}")
    if res.failed:
        print(f"{len(res.failed)} of {len(names)} files could not be read:", file=sys.stderr)
        for n, why in list(res.failed.items())[:20]:
            print(f"  {n}: {why}", file=sys.stderr)
        if not args.allow_failures:
            raise ValueError(
                f"{len(res.failed)} images could not be read (report: {report_path}); pass "
                "--allow-failures to write features for the others (the manifest's 'rows' says "
                "which file each row is)"
            )
    print(f"{out}: {res.features.shape[0]} x {res.features.shape[1]} float32 ({args.model})")


def cmd_models(args) -> None:
    for name, why in model_availability().items():
        spec = IMAGE_MODELS[name]
        print(f"{name:<20} {spec.dim:>5}-d  {'available' if why is None else 'unavailable: ' + why}")


def cmd_classify(args) -> None:
    for f, top in zip(args.images, classify(args.images, args.model, args.top), strict=True):
        print(f"{f}: " + ", ".join(f"{i} {imagenet_class_name(i)} ({p:.2f})" for i, p in top))


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "features",
        help="CNN image features (EfficientNet-Lite0; VGG-19/ResNet-50 where torchvision and its weights exist)",
    )
    sub = p.add_subparsers(dest="features_command", required=True)
    q = sub.add_parser("images", help="features of every image under --root (cached, with a failure report)")
    q.add_argument("--root", required=True, help="folder of images (searched recursively)")
    q.add_argument("--out", required=True, help="FEATS.npy; FEATS.manifest.json and FEATS.report.json go beside")
    q.add_argument("--model", default=DEFAULT_MODEL, choices=list(IMAGE_MODELS))
    q.add_argument("--batch-size", type=flag_type(int, "--batch-size", lo=1), default=32)
    q.add_argument("--list", help="a file of image paths relative to --root, one a line (default: every image)")
    q.add_argument(
        "--allow-failures",
        "--allow-missing",
        action="store_true",
        help="write features for the readable images even if some are missing or unreadable",
    )
    q.add_argument("--no-progress", action="store_true")
    q.set_defaults(func=cmd_images)
    q = sub.add_parser("models", help="list the extractors and whether they can run here")
    q.set_defaults(func=cmd_models)
    q = sub.add_parser("classify", help="ImageNet top-k of images (checks the weights and preprocessing)")
    q.add_argument("images", nargs="+")
    q.add_argument("--model", default=DEFAULT_MODEL, choices=list(IMAGE_MODELS))
    q.add_argument("--top", type=flag_type(int, "--top", lo=1), default=5)
    q.set_defaults(func=cmd_classify)
