"""WebNews: Chinese web-news image-text pairs (10 classes) in a Wiki-like layout.

    ROOT/trainset_txt_img_cat.list   text_id <TAB> image_id <TAB> label (1-based; last line may lack a newline)
    ROOT/testset_txt_img_cat.list    same
    ROOT/categories.list             class names, one a line, label order
    ROOT/texts/<text_id>.txt         UTF-8 Chinese text (title + body)
    ROOT/images/<class name>/<image_id>.jpg   JPEG, but also PNG/BMP behind the .jpg name, RGBA, CMYK, grayscale

Preparation: jieba tokens, word2vec trained on the training texts (no pretrained Chinese vectors are
available offline), the ``vocab_size`` most frequent training words, their kNN word graph, bag-of-words, and
EfficientNet-Lite0 features of the images (cached beside the prepared folder, see scanet.features), and the
images' 64 x 64 pixels for the end-to-end CNN-5 encoder (scanet.data.pixels).

Quirks of the shipped data, each handled and written to ``<out>/preparation_report.json``:
    * 3 image files with a space before the extension ("22 .jpg"): found by id, used, noted.
    * 7 ids with an image in two class folders (byte-identical copies): the copy in the folder of the item's
      own class is used, the other noted.
    * 7 entries without any image: excluded from the prepared dataset (4 train, 3 test), listed with the reason.
    * PNG/BMP content behind .jpg names, RGBA, CMYK and grayscale images: decoded by content, converted to RGB,
      noted per file. An unreadable (truncated, empty) image excludes its entry, with the reason.
So the real data gives 1,696 training and 497 test pairs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from scanet.data.assemble import REPORT_NAME, counts, log_exclusions, partition, write_report  # noqa: F401
from scanet.data.graph import check_graph
from scanet.data.images import choose_images
from scanet.data.languages import effective_embeddings, embeddings_for, tokenizer_for, tokenizer_version
from scanet.data.lists import ListEntry, read_list
from scanet.data.pixels import pixels_for, stack_pixels
from scanet.data.prepared import PreparedDataset, cached, hash_files
from scanet.data.wiki import build_text_dataset
from scanet.features import features_for_images, get_image_model
from scanet.io import read_text as _read_text

LISTS = ("trainset_txt_img_cat.list", "testset_txt_img_cat.list")


def check_root(root: Path) -> None:
    if not root.is_dir():
        raise FileNotFoundError(f"WebNews data directory not found: {root}")
    for f in LISTS + ("categories.list",):
        if not (root / f).is_file():
            raise FileNotFoundError(f"{root} does not look like the WebNews layout: {f} is missing")
    for d in ("texts", "images"):
        if not (root / d).is_dir():
            raise FileNotFoundError(f"{root}/{d}/ is missing")


def read_categories(root: Path, entries: list[ListEntry]) -> list[str]:
    names = [ln.strip() for ln in _read_text(root / "categories.list", "category list").splitlines() if ln.strip()]
    top = max(e.label for e in entries)
    if top > len(names):
        raise ValueError(f"{root / 'categories.list'} names {len(names)} classes but the lists use label {top}")
    return names


def resolve_entries(root: Path, entries: list[ListEntry], classes: list[str]):
    """image id -> ImageChoice for every entry, the own class folder preferred (see module doc)."""
    return choose_images(root / "images", entries, classes)


def read_text(path: Path) -> str:
    return _read_text(path, "news text")


def prepare(
    root: str | Path,
    out_dir: str | Path | None = None,
    *,
    vocab_size: int = 5000,
    knn: int = 8,
    embeddings: str = "word2vec",
    lmax: str | float | None = None,
    graph: str = "symmetric",
    image_model: str = "efficientnet-lite0",
    batch_size: int = 32,
    w2v_dim: int = 100,
    w2v_epochs: int = 20,
    w2v_min_count: int = 2,
    pixel_size: int = 64,
    progress=print,
) -> PreparedDataset:
    """Prepare WebNews (cached in ``out_dir``, default ``prepared/webnews``); see the module doc.

    graph: "symmetric" (default) or "paper" (the SCANet authors' group's directed kNN graph with self loops and
    lmax 2, see scanet.data.graph); lmax None: the graph's default (exact, resp. 2).
    ``pixel_size``: the raw images are also kept as (3, S, S) uint8 pixels for the CNN-5 encoder
    (scanet.data.pixels; 0: none)."""
    check_graph(graph, lmax)
    lmax = ("exact" if graph == "symmetric" else 2.0) if lmax is None else lmax
    root = Path(root)
    check_root(root)
    out_dir = Path(out_dir or Path("prepared") / "webnews")
    spec = get_image_model(image_model)
    lists = [root / f for f in LISTS]
    image_files = [p for p in (root / "images").rglob("*") if p.is_file()]
    inputs = {
        "lists": hash_files(lists + [root / "categories.list"]),
        "texts": hash_files(sorted((root / "texts").glob("*.txt"))),
        "images": hash_files(image_files, root / "images"),
        "image_model_weights": spec.weights(),
    }
    emb = effective_embeddings("zh", embeddings)
    params = {
        "dataset": "webnews",
        "vocab_size": vocab_size,
        "knn": knn,
        "embeddings": emb,
        "lmax": lmax,
        "image_model": image_model,
        "image_preprocessing": spec.preprocessing,
        "tokenizer": tokenizer_version("zh"),
        "language": "zh",
        "word2vec": {"dim": w2v_dim, "epochs": w2v_epochs, "min_count": w2v_min_count, "seed": 0}
        if emb == "word2vec"
        else None,
        "pixel_size": pixel_size,
    }
    if graph != "symmetric":  # only then: caches made before the option existed stay valid
        params["graph"] = graph
    report: dict = {}

    def build() -> PreparedDataset:
        splits = {"train": read_list(lists[0]), "test": read_list(lists[1])}
        everything = splits["train"] + splits["test"]
        classes = read_categories(root, everything)
        choices = resolve_entries(root, everything, classes)
        progress(f"image features of {sum(c.path is not None for c in choices.values())} images with {image_model}")
        feats, problems = features_for_images(
            root / "images",
            list(choices.values()),
            out_dir.parent / f"{out_dir.name}.images-{image_model}.npy",
            image_model,
            batch_size,
            progress=True,
            log=progress,
        )
        tok = tokenizer_for("zh")

        def reason(e):
            text_path = root / "texts" / f"{e.text_id}.txt"
            why = problems.get(e.image_id)
            return why if why is not None or text_path.is_file() else f"text file missing: {text_path.name}"

        kept, excluded = partition(splits, reason, lambda e: {"label": classes[e.label - 1]})
        toks = {s: [tok(read_text(root / "texts" / f"{e.text_id}.txt")) for e in kept[s]] for s in kept}
        empty = [e.text_id for s in kept for e, t in zip(kept[s], toks[s], strict=True) if not t]
        if empty:
            progress(f"note: {len(empty)} texts have no token after tokenization, e.g. {empty[:5]}")
        wv = embeddings_for(
            "zh", embeddings, toks["train"], progress, dim=w2v_dim, epochs=w2v_epochs, min_count=w2v_min_count
        )
        img = {s: np.stack([feats[e.image_id] for e in kept[s]]) for s in kept}
        pixels = None
        if pixel_size:
            px = pixels_for(root / "images", choices.values(), pixel_size, progress=True)
            pixels = {s: stack_pixels(px, [e.image_id for e in kept[s]], f"{s}: ") for s in kept}
        ds = build_text_dataset(
            "webnews",
            kept["train"],
            kept["test"],
            toks["train"],
            toks["test"],
            img["train"],
            img["test"],
            classes,
            wv,
            vocab_size,
            knn,
            lmax,
            progress,
            pixels=pixels,
            graph=graph,
        )
        report.update(
            {
                **counts(splits, kept),
                "excluded": excluded,
                "image_notes": {c.image_id: c.notes for c in choices.values() if c.notes},
                "empty_texts": empty,
                "word_vectors": wv.name,
                "vocab_size": ds.vocab_size,
            }
        )
        return ds

    ds = cached(out_dir, params, inputs, build, progress)
    if report:
        summarize(report, progress)
    write_report(out_dir, report, progress)
    return ds


def summarize(report: dict, log=print) -> None:
    log_exclusions(report, log)
    notes = report["image_notes"]
    kinds: dict[str, int] = {}
    for ns in notes.values():
        for n in ns:
            key = (
                "space in file name"
                if "spaces around" in n
                else "id in several folders"
                if "places" in n
                else n.split(" (")[0]
                if "behind" in n
                else n
            )
            kinds[key] = kinds.get(key, 0) + 1
    for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]):
        log(f"  {v:>4} x {k}")
