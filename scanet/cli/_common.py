"""What every verb shares: the dataset options and the checkpoint-then-dataset load sequence, written once.

(A module of its own rather than scanet/cli/__init__.py, so that the verb modules can import it while
__init__ imports them.)
"""

from __future__ import annotations

import argparse


def parse_options(items: list[str] | None, flag: str = "--option") -> dict:
    """``KEY=VALUE`` strings -> {key: value}, each value read as ``--set`` reads it (``scanet.config.parse_value``:
    8, 2.0, false, or the plain word paper): ``--option single_object=false`` is False, not the truthy "false"."""
    from scanet.config import parse_value

    opts: dict = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} {item!r} is not of the form KEY=VALUE")
        opts[key] = parse_value(raw)
    return opts


def dataset_options(
    p: argparse.ArgumentParser, root_help: str = "raw data directory of the dataset (e.g. ../shared/data/wiki)"
) -> None:
    p.add_argument("--root", help=root_help)
    p.add_argument("--data", help="an already prepared dataset folder (instead of --root)")
    p.add_argument("--prepared-dir", default="prepared", help="where prepared datasets are cached")
    p.add_argument(
        "--option",
        action="append",
        metavar="KEY=VALUE",
        help="an option of the dataset's preparer when it is prepared from --root, as for `scanet prepare "
        "--option`, e.g. --option graph=paper --option embeddings=word2vec (the cache in --prepared-dir is "
        "rebuilt when the options differ from the ones it was made with: give another --prepared-dir to keep it)",
    )


def load_dataset(args, preset, fingerprint: str | None = None):
    """The dataset of --data, else the preset's dataset prepared from --root (scanet.data.dataset_for_preset);
    ``fingerprint``: a checkpoint's prepared data, which an existing cache must hold (never rebuilt over it)."""
    from scanet.data import dataset_for_preset

    return dataset_for_preset(
        preset,
        data=args.data,
        root=args.root,
        prepared_dir=args.prepared_dir,
        fingerprint=fingerprint,
        options=parse_options(getattr(args, "option", None)),
    )


def load_trained(args, preset_name: str | None = None, fused: bool = False, checkpoint=None):
    """--checkpoint (or ``checkpoint``), then its dataset (the checkpoint's preset, or ``preset_name``), then the
    model on it: (model, checkpoint state, dataset). The model refuses a dataset other than the one it was
    trained on."""
    from scanet.checkpoint import load_checkpoint, load_model, preset_from_dict
    from scanet.config import get_preset

    state = load_checkpoint(args.checkpoint if checkpoint is None else checkpoint)
    preset = get_preset(preset_name) if preset_name else preset_from_dict(state["preset"])
    dataset = load_dataset(args, preset, fingerprint=None if preset_name else state.get("dataset_fingerprint"))
    model, _ = load_model(state, dataset, device=args.device, fused=fused)
    return model, state, dataset


def module_options(p: argparse.ArgumentParser, fused_help: str, eager_help: str) -> None:
    p.add_argument("--device", default="cpu")
    p.add_argument("--fused", action="store_true", help=fused_help)
    p.add_argument("--eager", action="store_true", help=eager_help)


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
