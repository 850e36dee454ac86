"""Raw data -> prepared graph and features. One module per dataset format, plus text, graph and embeddings.

``PREPARERS[name](root, out_dir, **options)`` prepares a dataset into the format of scanet.data.prepared;
``prepare(name, ...)`` is the checked entry point and ``dataset_for_preset`` the one load sequence of the
command line (an already prepared folder, else prepare the preset's dataset, cached).
"""

import importlib
import inspect
from pathlib import Path

from scanet.data.prepared import PreparedDataset, Split  # noqa: F401


def _preparer(module: str, needs_root: bool = True):
    """A preparer that imports its dataset module when called, so listing the datasets costs nothing."""

    def prepare_dataset(root=None, out_dir=None, **kw):
        mod = importlib.import_module(f"scanet.data.{module}")
        return mod.prepare(root, out_dir, **kw) if needs_root else mod.prepare(out_dir, **kw)

    prepare_dataset.__name__ = f"prepare_{module}"
    return prepare_dataset


# name -> preparer(root, out_dir, **options), and one line each for `scanet prepare --help`.
PREPARERS = {
    "wiki": _preparer("wiki"),
    "synthetic": _preparer("synthetic", needs_root=False),
    "webnews": _preparer("webnews"),
    "custom": _preparer("custom"),
    "nuswide": _preparer("nuswide"),
    "pascal": _preparer("pascal"),
    "pascal-sentences": _preparer("pascal_sentences"),
}
DESCRIPTIONS = {
    "wiki": "Eng-Wiki (Rasiwasia et al. 2010): *_txt_img_cat.list, texts/*.xml, raw_features.mat "
    "(or the labelled wikiData.mat)",
    "synthetic": "an embedded toy dataset (no --root)",
    "webnews": "Chinese web news: *_txt_img_cat.list, categories.list, texts/*.txt, images/<class>/",
    "custom": "any folder in the documented format (docs/custom_format.md): train.tsv, test.tsv, ...",
    "nuswide": "NUS-WIDE official release (BoW_int.dat, Tags1k.dat, Groundtruth) or an XAll/YAll/LAll .mat",
    "pascal": "Pascal VOC 2007 tags (Hwang & Grauman): train.mat, test.mat, voc.mat",
    "pascal-sentences": "Pascal Sentences: pascal_sentences.json + images/ or a feature matrix",
}


def prepare(name: str, root=None, out_dir=None, **options) -> PreparedDataset:
    if name not in PREPARERS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(PREPARERS))}")
    if root is None and name != "synthetic":
        raise ValueError(f"dataset {name!r} needs --root DIR (its raw data)")
    from scanet.config import Preset, check_field

    for key in ("vocab_size", "knn"):  # the Preset fields' bounds, whoever calls
        if options.get(key) is not None:
            options[key] = check_field(Preset("", ""), key, options[key], where="prepare option ")
    known = preparer_options(name)
    unknown = sorted(set(options) - set(known))
    unknown = [k for k in unknown if k not in ("progress", "log")]  # how a preparer reports, not an option
    if unknown and known is not ANY_OPTION:
        raise ValueError(f"dataset {name!r} has no option {unknown[0]!r}; its options: {', '.join(known)}")
    return PREPARERS[name](root, out_dir, **options)


ANY_OPTION: list[str] = []  # a preparer that takes **params checks them itself (synthetic)


def preparer_options(name: str) -> list[str]:
    """The keyword options of a dataset's prepare() (what `scanet prepare NAME --option KEY=VALUE` accepts)."""
    mod = importlib.import_module(f"scanet.data.{name.replace('-', '_')}")
    params = list(inspect.signature(mod.prepare).parameters.values())
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return ANY_OPTION
    return [
        p.name
        for p in params
        if (p.kind is p.KEYWORD_ONLY or p.default is not p.empty) and p.name not in ("out_dir", "progress", "log")
    ]


def dataset_for_preset(
    preset,
    data=None,
    root=None,
    prepared_dir="prepared",
    fingerprint: str | None = None,
    options: dict | None = None,
) -> PreparedDataset:
    """The dataset a preset trains on: the prepared folder ``data`` if given, else its raw data at ``root``
    prepared (cached) into ``prepared_dir/<dataset>`` with the preset's vocabulary size and kNN, and ``options``
    (the preparer's keyword options, e.g. {"graph": "paper"}: `--option KEY=VALUE`) over them.

    ``fingerprint`` (a checkpoint's ``dataset_fingerprint``): the prepared data a trained model needs. A cache
    holding exactly it is loaded as it is (it may have been prepared with non-default options); a cache holding
    other prepared data is refused, never rebuilt with the preset's defaults over the user's cache."""
    options = dict(options or {})
    if data:
        if options:
            raise ValueError(
                f"preparation options {sorted(options)} do not apply to --data {data} (already prepared); "
                "prepare it with them (`scanet prepare ... --option KEY=VALUE`) or pass --root instead"
            )
        return PreparedDataset.load(data)
    out = Path(prepared_dir) / preset.dataset
    if fingerprint and (out / "manifest.json").is_file():
        params = _cache_of_checkpoint(out, fingerprint)
        try:
            return PreparedDataset.load(out)
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(
                f"{e}. It holds the checkpoint's prepared data: prepare it again with the options "
                f"it was made with (parameters {params})"
            ) from e
    if preset.dataset == "synthetic":
        return prepare("synthetic", out_dir=out, **options)
    if not root:
        raise ValueError(f"preset {preset.name!r} needs --root DIR (the raw {preset.dataset} data) or --data")
    opts = {k: v for k, v in (("vocab_size", preset.vocab_size), ("knn", preset.knn)) if v is not None}
    return prepare(preset.dataset, root, out, **(opts | options))


def _cache_of_checkpoint(out: Path, fingerprint: str) -> dict:
    """Refuse (ValueError) a prepared cache whose fingerprint is not the checkpoint's, naming both; else return
    the cache's preparation parameters."""
    import json

    from scanet.io import read_text

    try:
        have = json.loads(read_text(out / "manifest.json", "prepared-data manifest"))
    except (ValueError, OSError) as e:
        raise ValueError(
            f"{out}/manifest.json is unreadable ({e}); prepare the data again with the options of the "
            "training run, or pass --data"
        ) from None
    if have.get("fingerprint") != fingerprint:
        raise ValueError(
            f"{out} holds prepared data {have.get('fingerprint')} (parameters {have.get('params')}) "
            f"but the checkpoint was trained on prepared data {fingerprint}; it is not rebuilt with "
            "the preset's defaults over your cache. Pass --data with the training run's prepared "
            "folder, or --prepared-dir with another folder to prepare into"
        )
    return have.get("params")
