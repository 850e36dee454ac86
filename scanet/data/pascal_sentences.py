"""The UIUC Pascal Sentence dataset (Rashtchian et al. 2010): 1,000 images, 20 VOC classes x 50, five captions each.

    ROOT/pascal_sentences.json   {"2008_000716.jpg": {"category": "aeroplane", "captions": [5 strings]}, ...}
                                 (the layout of the public downloader; 996 images have 5 captions, 3 have 4, 1 has 6)
    ROOT/images/...              the JPEGs, anywhere below (e.g. images/<category>/<file>.jpg): image_features="cnn"
                                 computes CNN features with scanet.features (EfficientNet-Lite0, cached beside the
                                 prepared folder)
    or a feature matrix          image_features=PATH.npy, one row per image, with the row names in PATH's stem + .txt
                                 (or image_ids.txt beside it): one file name or id a line ("2008_000716.jpg")

There is no official split; the literature's 800 / 100 / 100 train / validation / test is drawn with ``seed``,
stratified by class (40 / 5 / 5 of each class's 50). The prepared dataset holds train and test; the validation ids
are written to ``<out>/preparation_report.json`` (``val_in_train=True`` trains on them as well).

Text side: each image's captions joined into one text, English tokens (lowercase letter runs, 1-letter tokens and
the function words below out), the ``vocab_size`` most frequent training words with a vector, their kNN word graph.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from scanet.data.embeddings import GLOVE_50D, load_word_vectors
from scanet.data.graph import word_graph
from scanet.data.prepared import PreparedDataset, Split, cached, hash_files
from scanet.data.text import bag_of_words, build_vocabulary, english_tokenizer
from scanet.data.tokens import token_ids
from scanet.io import read_text, safe_np_load

JSON_NAME = "pascal_sentences.json"
REPORT_NAME = "preparation_report.json"
# Function words that dominate captions ("a", "is" and "the" are in nearly every one) and carry no class.
CAPTION_STOPWORDS = frozenset(
    """
an the and or of on in at to with by for from into onto over under near next up down off out its it is are was were
be been being this that these those there here his her their them they he she we you your our as while who which
what some another other each one two three four few several very has have having does do doing
""".split()
)


def read_captions(path: Path) -> dict[str, dict]:
    """file name -> {"category", "captions"}, checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Pascal Sentences captions not found: {path}")
    try:
        data = json.loads(read_text(path, "captions JSON"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path} must hold an object {{file name: {{category, captions}}}}")
    for name, v in data.items():
        if not isinstance(v, dict) or not isinstance(v.get("category"), str) or not v["category"]:
            raise ValueError(f"{path}: entry {name!r} has no category")
        caps = v.get("captions")
        if not isinstance(caps, list) or not caps or not all(isinstance(c, str) for c in caps):
            raise ValueError(f"{path}: entry {name!r} needs a non-empty list of caption strings")
    return data


def image_id(name: str) -> str:
    return Path(str(name).replace("\\", "/")).stem.strip()


def stratified_split(
    categories: list[str], n_val: int, n_test: int, seed: int
) -> tuple[list[int], list[int], list[int]]:
    """Indices for train / val / test: per class, in seeded random order, n_val / n_test share of it each
    (rounded so that the totals are exactly n_val and n_test)."""
    rng = np.random.default_rng(seed)
    classes = sorted(set(categories))
    n = len(categories)
    if n_val + n_test >= n:
        raise ValueError(f"{n_val} validation + {n_test} test items leave no training item of {n}")
    by_class = {c: [i for i, x in enumerate(categories) if x == c] for c in classes}
    val, test, train = [], [], []
    for c in classes:
        idx = [by_class[c][j] for j in rng.permutation(len(by_class[c]))]
        k_val, k_test = round(len(idx) * n_val / n), round(len(idx) * n_test / n)
        val += idx[:k_val]
        test += idx[k_val : k_val + k_test]
        train += idx[k_val + k_test :]
    # rounding per class can miss the totals by a few: move items from train, seeded
    for target, want in ((val, n_val), (test, n_test)):
        while len(target) < want:
            target.append(train.pop(int(rng.integers(len(train)))))
        while len(target) > want:
            train.append(target.pop(int(rng.integers(len(target)))))
    return sorted(train), sorted(val), sorted(test)


def _matrix_names(matrix: Path) -> Path:
    for p in (matrix.with_suffix(".txt"), matrix.parent / "image_ids.txt"):
        if p.is_file():
            return p
    raise FileNotFoundError(
        f"{matrix}: its row names are missing ({matrix.with_suffix('.txt').name} or "
        "image_ids.txt beside it, one image file name or id a line)"
    )


def prepare(
    root: str | Path,
    out_dir: str | Path | None = None,
    *,
    image_features: str = "cnn",
    image_model: str = "efficientnet-lite0",
    n_val: int = 100,
    n_test: int = 100,
    seed: int = 0,
    val_in_train: bool = False,
    vocab_size: int = 2000,
    knn: int = 8,
    embeddings: str = GLOVE_50D,
    lmax: str | float = "exact",
    batch_size: int = 32,
    progress=print,
) -> PreparedDataset:
    """Prepare Pascal Sentences (cached in ``out_dir``, default ``prepared/pascal-sentences``)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Pascal Sentences data directory not found: {root}")
    captions_file = root / JSON_NAME
    if not captions_file.is_file():
        raise FileNotFoundError(f"{root} does not look like the Pascal Sentences layout: {JSON_NAME} is missing")
    out_dir = Path(out_dir or Path("prepared") / "pascal-sentences")
    inputs = {"captions": hash_files([captions_file])}
    if image_features == "cnn":
        if not (root / "images").is_dir():
            raise FileNotFoundError(
                f"image_features='cnn' needs the images in {root / 'images'}; without them pass "
                "image_features=PATH.npy (one row per image, names in PATH.txt)"
            )
        from scanet.features import get_image_model

        spec = get_image_model(image_model)
        inputs["images"] = hash_files([p for p in (root / "images").rglob("*") if p.is_file()], root / "images")
        inputs["image_model_weights"] = spec.weights()
    else:
        matrix = Path(image_features)
        if not matrix.is_file():
            raise FileNotFoundError(f"image feature matrix not found: {matrix} (or pass image_features='cnn')")
        inputs["images"] = hash_files([matrix, _matrix_names(matrix)])
    if embeddings != GLOVE_50D:
        inputs["embeddings"] = hash_files([Path(embeddings)])
    params = {
        "dataset": "pascal-sentences",
        "image_features": "cnn" if image_features == "cnn" else "matrix",
        "image_model": image_model if image_features == "cnn" else None,
        "n_val": n_val,
        "n_test": n_test,
        "seed": seed,
        "val_in_train": val_in_train,
        "vocab_size": vocab_size,
        "knn": knn,
        "embeddings": str(embeddings),
        "lmax": lmax,
        "tokenizer": "english-v1+caption-stopwords-v1",
    }
    report: dict = {}

    def build() -> PreparedDataset:
        data = read_captions(captions_file)
        names = sorted(data)
        ids = [image_id(n) for n in names]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{captions_file}: two file names share an image id")
        feats, problems = _image_features(root, names, ids, image_features, image_model, batch_size, out_dir, progress)
        if problems:
            listing = "; ".join(f"{k}: {v}" for k, v in list(problems.items())[:5])
            raise ValueError(f"{len(problems)} of {len(names)} images have no features ({listing})")
        categories = [data[n]["category"] for n in names]
        classes = sorted(set(categories))
        train, val, test = stratified_split(categories, n_val, n_test, seed)
        if val_in_train:
            train = sorted(train + val)
        tok = english_tokenizer(CAPTION_STOPWORDS)
        toks = [tok(" ".join(data[n]["captions"])) for n in names]
        wv = load_word_vectors(embeddings)
        vocab = build_vocabulary([toks[i] for i in train], vocab_size, keep=wv.__contains__)
        progress(f"vocabulary: {len(vocab)} words with a vector in {wv.name}; building the {knn}-NN word graph")
        lap, lm = word_graph(wv.lookup(vocab), knn, lmax)
        label = {c: i for i, c in enumerate(classes)}

        def split(idx):
            return Split(
                [ids[i] for i in idx],
                [ids[i] for i in idx],
                bag_of_words([toks[i] for i in idx], vocab),
                np.stack([feats[ids[i]] for i in idx]).astype(np.float32),
                np.asarray([label[categories[i]] for i in idx], np.int64),
                token_ids([toks[i] for i in idx], vocab),
            )

        report.update(
            {
                "images": len(names),
                "classes": classes,
                "split": {"train": len(train), "val": len(val), "test": len(test)},
                "val_ids": [ids[i] for i in val],
                "val_in_train": val_in_train,
                "captions_per_image": {
                    str(k): int(v)
                    for k, v in zip(
                        *np.unique([len(data[n]["captions"]) for n in names], return_counts=True), strict=True
                    )
                },
                "vocab_size": len(vocab),
                "word_vectors": wv.name,
            }
        )
        return PreparedDataset(
            "pascal-sentences",
            vocab,
            lap,
            lm,
            classes,
            split(train),
            split(test),
            word_vectors=wv.lookup(vocab).astype(np.float32),
        )

    ds = cached(out_dir, params, inputs, build, progress)
    if report:
        (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=1), encoding="utf-8")
        progress(f"Pascal Sentences: {report['split']} (validation ids in {out_dir / REPORT_NAME})")
    return ds


def _image_features(root, names, ids, image_features, image_model, batch_size, out_dir, progress):
    """image id -> feature row, and image id -> why it has none."""
    if image_features == "cnn":
        from scanet.features import features_for_images, index_images, resolve_image

        index = index_images(root / "images")
        choices = [resolve_image(index, i, root / "images") for i in ids]
        return features_for_images(
            root / "images",
            choices,
            out_dir.parent / f"{out_dir.name}.images-{image_model}.npy",
            image_model,
            batch_size,
            progress=True,
            log=progress,
        )
    matrix = Path(image_features)
    m = safe_np_load(matrix, "image feature matrix")
    if m.ndim != 2:
        raise ValueError(f"{matrix} must be a 2-D (images, features) matrix, got shape {m.shape}")
    names_file = _matrix_names(matrix)
    row_names = [ln.strip() for ln in read_text(names_file, "feature row names").splitlines() if ln.strip()]
    if len(row_names) != m.shape[0]:
        raise ValueError(f"{names_file} names {len(row_names)} rows but {matrix} has {m.shape[0]}")
    rows = {image_id(n): i for i, n in enumerate(row_names)}
    if not np.isfinite(m).all():
        raise ValueError(f"{matrix} contains NaN or inf")
    feats = {i: m[rows[i]] for i in ids if i in rows}
    return feats, {i: f"not among the rows named in {names_file.name}" for i in ids if i not in rows}
