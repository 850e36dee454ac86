"""Eng-Wiki (Rasiwasia et al. 2010) in its standard layout.

    ROOT/trainset_txt_img_cat.list   text_id <TAB> image_id <TAB> category (1-based)
    ROOT/testset_txt_img_cat.list    same
    ROOT/categories.list             class names (optional)
    ROOT/texts/<text_id>.xml         <document ...><text>...</text>...</document>
    ROOT/raw_features.mat            I_tr/I_te 128-d SIFT BoVW, T_tr/T_te 10-d LDA, rows in list order
    ROOT/stopwords.txt               optional stop-word list
    ROOT/images/                     optional raw images (not in the copy available here)

888 of the 2,866 real texts are not well-formed XML (a raw '&' or '<' inside the text), so the text is taken with
a regular expression rather than an XML parser.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import numpy as np

from scanet.data.assemble import assemble
from scanet.data.embeddings import WordVectors, load_word_vectors
from scanet.data.graph import check_graph
from scanet.data.kernel_map import rbf_kernel_map
from scanet.data.languages import check_word2vec_options, embeddings_for
from scanet.data.lists import ListEntry, read_list  # scanet.data.wiki.read_list: public here
from scanet.data.prepared import PreparedDataset, cached, hash_files
from scanet.data.text import bag_of_words, build_vocabulary, english_tokenizer, read_stopwords
from scanet.features import DEFAULT_MODEL, cnn_features_for_entries, get_image_model
from scanet.io import read_text, safe_np_load

_TEXT = re.compile(r"<text>(.*?)</text>", re.DOTALL)
_TAG = re.compile(r"<[^>]{0,200}>")


def read_wiki_text(path: Path) -> str:
    """The text of one Wiki document: the body of <text>, markup removed, entities decoded."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file missing: {path}")
    raw = path.read_text(encoding="utf-8", errors="replace")
    m = _TEXT.search(raw)
    if m is None:
        raise ValueError(f"{path}: no <text>...</text> element")
    return html.unescape(_TAG.sub(" ", m.group(1)))


def read_raw_features(path: Path, n_train: int, n_test: int) -> dict[str, np.ndarray]:
    """I_tr, I_te (SIFT-128) and T_tr, T_te (LDA-10) from raw_features.mat, checked against the list sizes."""
    import scipy.io

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image features not found: {path}")
    try:
        mat = scipy.io.loadmat(path)
    except Exception as e:  # scipy raises several types for a broken file
        raise ValueError(f"cannot read {path}: {e}") from e
    out = {}
    for key, n in (("I_tr", n_train), ("I_te", n_test), ("T_tr", n_train), ("T_te", n_test)):
        if key not in mat:
            raise ValueError(f"{path} has no variable {key!r} (has {sorted(k for k in mat if not k.startswith('__'))})")
        a = np.asarray(mat[key], dtype=np.float32)
        if a.ndim != 2 or a.shape[0] != n:
            raise ValueError(f"{path}: {key} has shape {a.shape}, expected {n} rows (one per list entry)")
        if not np.isfinite(a).all():
            raise ValueError(f"{path}: {key} contains NaN or inf")
        out[key] = a
    return out


# The image features read from raw_features.mat: the histograms as they are, their Hellinger map, or the
# Hellinger map through an RBF kernel map fitted on the training split (scanet.data.kernel_map).
SIFT_FEATURES = ("sift", "sift-sqrt", "sift-sqrt-rbf")
IMAGE_FEATURE_NAMES = (*SIFT_FEATURES, "cnn")  # anything else is the path of an .npy matrix


def hellinger(histograms: np.ndarray, path: Path, key: str) -> np.ndarray:
    """Each bin's square root (BoVW counts or frequencies must be non-negative: a negative bin is refused)."""
    low = float(histograms.min()) if histograms.size else 0.0
    if low < 0:
        raise ValueError(
            f"{path}: {key} has a negative bin ({low:g}); image_features='sift-sqrt' needs non-negative histograms"
        )
    return np.sqrt(histograms).astype(np.float32)


def _check_root(root: Path) -> None:
    if not root.is_dir():
        raise FileNotFoundError(f"Wiki data directory not found: {root}")
    for f in ("trainset_txt_img_cat.list", "testset_txt_img_cat.list"):
        if not (root / f).is_file():
            raise FileNotFoundError(f"{root} does not look like the Eng-Wiki layout: {f} is missing")
    if not (root / "texts").is_dir():
        raise FileNotFoundError(f"{root}/texts/ is missing (one <text_id>.xml per list entry)")


def load_texts(root: Path, entries: list[ListEntry]) -> list[str]:
    missing = [e.text_id for e in entries if not (root / "texts" / f"{e.text_id}.xml").is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} text ids have no text file in {root / 'texts'}, e.g. {missing[:3]}")
    return [read_wiki_text(root / "texts" / f"{e.text_id}.xml") for e in entries]


def prepare(
    root: str | Path,
    out_dir: str | Path | None = None,
    *,
    vocab_size: int = 10_055,
    knn: int = 8,
    embeddings: str = "glove-6b-50d",
    lmax: str | float | None = None,
    image_features: str = "sift",
    graph: str = "symmetric",
    w2v_dim: int = 50,
    w2v_window: int = 5,
    w2v_epochs: int = 5,
    w2v_min_count: int = 5,
    w2v_sg: bool = False,
    progress=print,
) -> PreparedDataset:
    """Prepare Eng-Wiki (cached in ``out_dir``, default ``prepared/wiki``).

    image_features: "sift" (raw_features.mat, 128-d), "sift-sqrt" (the same histograms, each bin's square root:
    the Hellinger map of a BoVW histogram, under which the dot product of two rows is their Bhattacharyya
    coefficient; rows that sum to 1 come out with unit L2 norm), "sift-sqrt-rbf" (the square roots through an
    RBF kernel map fitted on the training images only, scanet.data.kernel_map: 2,173 columns on Eng-Wiki, so
    that the linear layers of every model see the kernel), "cnn" (EfficientNet-Lite0 features of
    ROOT/images, see scanet.features; cached beside out_dir; entries without a readable image are excluded and
    reported), or a path to an .npy matrix (train rows then test rows, in list order).

    The word graph, two readings side by side (scanet.data.graph has the details):
        default        embeddings="glove-6b-50d", graph="symmetric": GloVe 6B-50d vectors, a kNN graph with
                       exp(-d^2/sigma^2) weights symmetrized by max(W, W^T), no self loops, lmax exact.
        paper group    embeddings="word2vec", graph="paper": word2vec trained here on the tokenized training
                       texts (gensim, ``w2v_dim`` 50 and ``w2v_window`` 5 as their code; the rest gensim's own
                       defaults, which a call naming only size and window gets: CBOW, 5 epochs, min_count 5;
                       seeded, one worker: deterministic), each word linked to itself and its k most similar
                       words (weight 1, not symmetrized), in-degree normalized, lmax = 2 (L~ = L - I).
    The two options are independent (GloVe with graph="paper" works too). lmax None: the graph's default.
    """
    check_graph(graph, lmax)
    w2v = check_word2vec_options(
        "wiki",
        w2v_dim=w2v_dim,
        w2v_window=w2v_window,
        w2v_epochs=w2v_epochs,
        w2v_min_count=w2v_min_count,
        w2v_sg=w2v_sg,
    )
    root = Path(root)
    if root.is_dir() and not (root / "trainset_txt_img_cat.list").is_file():
        from scanet.data import wiki_mat  # the labelled .mat release (wikiData.mat)

        if wiki_mat.find_labelled_mat(root) is not None:
            if image_features != "sift":
                raise ValueError(
                    f"{root} is the labelled .mat release (no list files): its images are the .mat's I features, "
                    f"so image_features={image_features!r} does not apply (it needs raw_features.mat and the "
                    "*_txt_img_cat.list files)"
                )
            if graph != "symmetric" or str(embeddings) == "word2vec":
                raise ValueError(
                    f"{root} is the labelled .mat release (no list files): its text graph is over the text-feature "
                    f"columns, so graph={graph!r} / embeddings={str(embeddings)!r} do not apply (they need texts/ "
                    "and the *_txt_img_cat.list files)"
                )
            return wiki_mat.prepare(root, out_dir, knn=knn, lmax="exact" if lmax is None else lmax, progress=progress)
    _check_root(root)
    out_dir = Path(out_dir or Path("prepared") / "wiki")
    lists = [root / "trainset_txt_img_cat.list", root / "testset_txt_img_cat.list"]
    text_files = sorted((root / "texts").glob("*.xml"))
    # A name that is neither known nor a matrix file (a typo such as 'sift_sqrt') is refused here, not reported
    # later as a missing file; an existing matrix keeps loading whatever its suffix, as before the check.
    path_like = str(image_features).endswith(".npy") or Path(image_features).is_file()
    if image_features not in IMAGE_FEATURE_NAMES and not path_like:
        names = ", ".join(repr(n) for n in IMAGE_FEATURE_NAMES)
        raise ValueError(f"image_features must be {names} or the path of an .npy matrix, got {image_features!r}")
    feature_file = root / "raw_features.mat" if image_features in SIFT_FEATURES else Path(image_features)
    inputs = {
        "lists": hash_files(lists),
        "texts": hash_files(text_files),
        "image_features": hash_files([feature_file]) if feature_file.is_file() else "missing",
    }
    if image_features == "cnn":
        if not (root / "images").is_dir():
            raise FileNotFoundError(f"image_features='cnn' needs the raw images in {root / 'images'}")
        inputs["image_features"] = hash_files([p for p in (root / "images").rglob("*") if p.is_file()], root / "images")
        inputs["image_model_weights"] = get_image_model(DEFAULT_MODEL).weights()
    if (root / "stopwords.txt").is_file():
        inputs["stopwords"] = hash_files([root / "stopwords.txt"])
    lmax = ("exact" if graph == "symmetric" else 2.0) if lmax is None else lmax
    params = {
        "dataset": "wiki",
        "vocab_size": vocab_size,
        "knn": knn,
        "embeddings": str(embeddings),
        "lmax": lmax,
        "image_features": str(image_features),
        "tokenizer": "english-v1",
    }
    # Keys only where an option leaves its default, so caches (and checkpoint fingerprints) made before the
    # option existed stay valid.
    if graph != "symmetric":
        params["graph"] = graph
    if str(embeddings) == "word2vec":
        params["word2vec"] = dict(w2v, seed=0)

    def build() -> PreparedDataset:
        train_e, test_e = read_list(lists[0]), read_list(lists[1])
        if image_features == "cnn":
            (train_e, test_e), (img_tr, img_te), _, _ = cnn_features_for_entries(
                root,
                (train_e, test_e),
                _class_names(root, train_e + test_e),
                out_dir.parent / f"{out_dir.name}.images-{DEFAULT_MODEL}.npy",
                log=progress,
            )
        progress(f"reading {len(train_e) + len(test_e)} texts from {root / 'texts'}")
        stop = read_stopwords(root / "stopwords.txt") if (root / "stopwords.txt").is_file() else set()
        tok = english_tokenizer(stop)
        train_tok = [tok(t) for t in load_texts(root, train_e)]
        test_tok = [tok(t) for t in load_texts(root, test_e)]
        if image_features == "cnn":
            pass  # computed above, entries without an image left out
        elif image_features in SIFT_FEATURES:
            feats = read_raw_features(feature_file, len(train_e), len(test_e))
            img_tr, img_te = feats["I_tr"], feats["I_te"]
            if image_features in ("sift-sqrt", "sift-sqrt-rbf"):
                img_tr, img_te = hellinger(img_tr, feature_file, "I_tr"), hellinger(img_te, feature_file, "I_te")
            if image_features == "sift-sqrt-rbf":
                progress(f"RBF kernel map of {len(img_tr)} training images (landmarks: the training rows)")
                img_tr, img_te = rbf_kernel_map(img_tr, [img_te], what=f"{feature_file} (I_tr, I_te)")
        else:
            if not feature_file.is_file():
                raise FileNotFoundError(f"image feature matrix not found: {feature_file}")
            m = safe_np_load(feature_file, "image feature matrix").astype(np.float32)
            if m.ndim != 2 or m.shape[0] != len(train_e) + len(test_e):
                raise ValueError(f"{feature_file}: expected ({len(train_e) + len(test_e)}, D), got {m.shape}")
            img_tr, img_te = m[: len(train_e)], m[len(train_e) :]
        vectors = (
            embeddings_for("en", embeddings, train_tok, progress, **w2v) if embeddings == "word2vec" else embeddings
        )
        return build_text_dataset(
            "wiki",
            train_e,
            test_e,
            train_tok,
            test_tok,
            img_tr,
            img_te,
            _class_names(root, train_e + test_e),
            vectors,
            vocab_size,
            knn,
            lmax,
            progress,
            graph=graph,
        )

    return cached(out_dir, params, inputs, build, progress)


def _class_names(root: Path, entries: list[ListEntry]) -> list[str]:
    n = max(e.label for e in entries)
    f = root / "categories.list"
    names = read_text(f, "category list").split() if f.is_file() else []
    return names if len(names) == n else [str(i + 1) for i in range(n)]


def build_text_dataset(
    name,
    train_e,
    test_e,
    train_tok,
    test_tok,
    img_tr,
    img_te,
    classes,
    embeddings: str | WordVectors,
    vocab_size,
    knn,
    lmax,
    progress=print,
    pixels: dict | None = None,
    *,
    graph: str = "symmetric",
) -> PreparedDataset:
    """Every dataset in the list layout with tokenized texts: vocabulary with vectors, then ``assemble`` (which
    keeps the texts' token sequences and the vocabulary's vectors; ``pixels``: raw images per split, or None;
    ``graph``: the word-graph construction, see scanet.data.graph)."""
    wv = embeddings if isinstance(embeddings, WordVectors) else load_word_vectors(embeddings)
    vocab = build_vocabulary(train_tok, vocab_size, keep=wv.__contains__)

    def part(entries, toks, imgs):
        return (
            [e.text_id for e in entries],
            [e.image_id for e in entries],
            bag_of_words(toks, vocab),
            imgs,
            np.asarray([e.label - 1 for e in entries], np.int64),
        )

    return assemble(
        name,
        vocab,
        wv,
        classes,
        {"train": part(train_e, train_tok, img_tr), "test": part(test_e, test_tok, img_te)},
        knn,
        lmax,
        progress,
        docs={"train": train_tok, "test": test_tok},
        pixels=pixels,
        graph=graph,
    )
