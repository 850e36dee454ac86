"""The on-disk search index and its queries: build/save/load an index, free text -> model input, one query.

Why a little over 400 lines: the on-disk search index (format, checks, model hash), its FAISS file and the
free-text query path belong to one job: a saved, queryable collection.

``build_index`` encodes one side of a dataset split (common-space features and layer-1 attention per item,
which is all that queries need from the collection; the other side too, so an item can be a query by its id)
and records the hash of the model's weights and the dataset fingerprint; ``load_index(path, model)`` refuses
an index built by another model. The file is written atomically (scanet.io) and read with
``torch.load(weights_only=True)``: loading never runs code. ``search_index`` answers one query with
scanet.retrieve's exhaustive or two-stage search.

FAISS (scanet.ann, optional): ``build_ann`` makes an inner-product index of the collection's stage-1 vectors,
``save_index(index, path, ann)`` writes it beside the search index (``<name>.faiss``) and records its sha256 in
the search index, so ``load_ann`` finds exactly the FAISS file built with it (and ANNIndex.load refuses other
weights). A two-stage query then takes its shortlist from FAISS instead of the exact GEMM over all items.
Two-layer models also store the "layer2-mean" reference (the mean layer-1 attention of each modality over up to
REFERENCE_SAMPLE training items), which that stage-1 score needs.
"""

from __future__ import annotations

import datetime
import hashlib
from pathlib import Path

import numpy as np
import torch

from scanet.io import atomic_torch_save, safe_torch_load
from scanet.retrieve import Items, encode_items, exhaustive_search, model_hash, reference_attention, two_stage_search

INDEX_FORMAT = "scanet-search-index-v1"
SIDES = {"images": "image", "texts": "text"}  # --side value -> modality of the collection
AUTO_EXHAUSTIVE_MAX = 5000  # collections up to this size are searched exhaustively
REFERENCE_SAMPLE = 4096  # training items per modality for the layer2-mean means
ANN_CHOICES = ("auto", "flat", "ivf", "hnsw", "none")  # --ann of `scanet search index`


def dataset_language(dataset) -> str:
    """The tokenizer language of a prepared dataset: its manifest's, "whitespace" for the synthetic dataset
    (its texts are lists of vocabulary words), English otherwise (Wiki)."""
    params = (dataset.manifest or {}).get("params", {}) or {}
    if params.get("language"):
        return str(params["language"])
    return "whitespace" if dataset.name == "synthetic" else "en"


def _split(dataset, split: str):
    from scanet.data.prepared import Split

    if split in ("train", "test"):
        return getattr(dataset, split)
    if split != "all":
        raise ValueError(f"split must be 'test', 'train' or 'all', got {split!r}")
    return Split.concatenate(dataset.train, dataset.test)


def _record(items: Items, ids, labels, words=None) -> dict:
    return {
        "modality": items.modality,
        "ids": list(ids),
        "labels": torch.from_numpy(np.asarray(labels).copy()),
        "features": items.features.detach().float().cpu(),
        "attention": None if items.attention is None else items.attention.detach().float().cpu(),
        "words": words,
    }


def top_words(bow, vocab, n: int = 8) -> list[str]:
    """The n most frequent vocabulary words of each text (ties by vocabulary order), space separated: what a
    contact sheet shows of a text whose file is not at hand."""
    bow = bow.tocsr()
    out = []
    for r in range(bow.shape[0]):
        cols, vals = bow.indices[bow.indptr[r] : bow.indptr[r + 1]], bow.data[bow.indptr[r] : bow.indptr[r + 1]]
        order = np.lexsort((cols, -vals))[:n]
        out.append(" ".join(vocab[c] for c in cols[order]))
    return out


def _items(record: dict, device="cpu", dtype=torch.float32) -> Items:
    att = record["attention"]
    return Items(
        record["modality"],
        record["features"].to(device=device, dtype=dtype),
        None if att is None else att.to(device=device, dtype=dtype),
    )


def encode_in_batches(
    model, modality: str, inputs, batch_size: int = 256, progress: bool = True, desc: str | None = None
) -> Items:
    """encode_items over ``inputs`` (bag-of-words rows or image features) ``batch_size`` rows at a time, with a
    progress bar counting items. Memory: the encoded collection (features + attention: 8 N bytes an item)."""
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = inputs.shape[0]
    parts = []
    with tqdm(total=n, unit=modality, desc=desc or f"encoding {modality}s", leave=False, disable=not progress) as bar:
        for s in range(0, n, batch_size):
            parts.append(encode_items(model, modality, inputs[s : s + batch_size], batch_size))
            bar.update(len(parts[-1]))
    if not parts:
        raise ValueError(f"no {modality}s to encode")
    att = None if parts[0].attention is None else torch.cat([p.attention for p in parts if p.attention is not None])
    return Items(modality, torch.cat([p.features for p in parts]), att)


def build_index(
    model,
    dataset,
    side: str,
    split: str = "test",
    *,
    root=None,
    stopwords=(),
    batch_size: int = 256,
    checkpoint=None,
    progress: bool = False,
) -> dict:
    """Encode one side of a split as the searchable collection (and the other side, so that an item of the
    split can be a query by its id). Everything a query needs except the model itself."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {sorted(SIDES)}, got {side!r}")
    from scanet.inputs import image_input, text_input

    s, cfg = _split(dataset, split), model.config
    dataset.require_inputs(cfg)
    texts = encode_in_batches(model, "text", text_input(s, cfg, sparse=True), batch_size, progress)
    images = encode_in_batches(model, "image", image_input(s, cfg), batch_size, progress)
    reference = None
    if model.coattention.num_layers == 2:  # the "layer2-mean" stage-1 score's fixed partners
        tr, m = dataset.train, min(REFERENCE_SAMPLE, len(dataset.train))
        ref = reference_attention(
            encode_items(model, "text", text_input(tr, cfg, sparse=True)[:m], batch_size),
            encode_items(model, "image", image_input(tr, cfg)[:m], batch_size),
        )
        reference = {k: v.detach().float().cpu() for k, v in ref.items()}
    t_rec = _record(texts, s.text_ids, s.labels, top_words(s.bow, dataset.vocab))
    i_rec = _record(images, s.image_ids, s.labels)
    collection, queries = (i_rec, t_rec) if side == "images" else (t_rec, i_rec)
    return {
        "format": INDEX_FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "side": side,
        "split": split,
        "model_hash": model_hash(model),
        "checkpoint": str(checkpoint) if checkpoint else None,
        "dataset_fingerprint": dataset.fingerprint,
        "dataset_name": dataset.name,
        "classes": list(dataset.classes),
        "common_dim": model.coattention.dim,
        "coattention_layers": model.coattention.num_layers,
        "text_encoder": cfg.text_encoder,
        "max_tokens": cfg.max_tokens,
        "collection": collection,
        "queries": queries,
        "vocab": list(dataset.vocab),
        "language": dataset_language(dataset),
        "stopwords": sorted(set(stopwords)),
        "root": str(Path(root).resolve()) if root else None,
        "reference_attention": reference,
        "ann": None,
    }


def default_ann_stage1(model) -> str:
    """The FAISS index's stage-1 score: "layer2-mean" for two-layer models (the best measured), else "layer1"."""
    return "layer2-mean" if model.coattention.num_layers == 2 else "layer1"


def build_ann(model, index: dict, kind: str = "auto", stage1: str | None = None, progress: bool = True, **kw):
    """The FAISS index (scanet.ann.ANNIndex) of a search index's collection; kind "auto" chooses by size."""
    from scanet.ann import ANNIndex

    if kind not in ANN_CHOICES or kind == "none":
        raise ValueError(f"kind must be one of {ANN_CHOICES[:-1]}, got {kind!r}")
    stage1 = stage1 or default_ann_stage1(model)
    reference = index.get("reference_attention") if stage1 == "layer2-mean" else None
    param = next(model.parameters())
    return ANNIndex.from_items(
        model,
        _items(index["collection"], param.device, param.dtype),
        kind,
        stage1=stage1,
        reference=reference,
        progress=progress,
        **kw,
    )


def _file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def save_index(index: dict, path, ann=None) -> None:
    """Write the search index (and ``ann``, its FAISS index, beside it as <name>.faiss, recorded by sha256)."""
    index["ann"] = None
    if ann is not None:
        from scanet.ann import ann_path_for

        ann_path = ann.save(ann_path_for(path), overwrite=True)  # it belongs to the index being written
        index["ann"] = {
            "file": ann_path.name,
            "sha256": _file_sha256(ann_path),
            "kind": ann.kind,
            "stage1": ann.stage1,
            "size": len(ann),
        }
    atomic_torch_save(path, index)  # temporary file, fsync, rename


def load_ann(index: dict, path, model):
    """The FAISS index saved with the search index at ``path``, or None if it was built without one. Refuses a
    FAISS file other than the one recorded (sha256) and one built by other weights (ANNIndex.load)."""
    rec = index.get("ann")
    if not rec:
        return None
    from scanet.ann import ANNIndex

    ann_path = Path(path).with_name(rec["file"])
    if not ann_path.is_file():
        raise FileNotFoundError(
            f"the search index {path} was built with the FAISS index {ann_path}, which is "
            "missing: rebuild the index (scanet search index), or query with --no-ann"
        )
    if _file_sha256(ann_path) != rec["sha256"]:
        raise ValueError(
            f"{ann_path} is not the FAISS index built with {path} (its sha256 differs): rebuild the "
            "index (scanet search index), or query with --no-ann"
        )
    ann = ANNIndex.load(ann_path, model=model)
    if len(ann) != len(index["collection"]["ids"]):
        raise ValueError(f"{ann_path} holds {len(ann)} items, the search index {len(index['collection']['ids'])}")
    return ann


def load_index(path, model=None) -> dict:
    """Load an index; with ``model``, refuse it unless it was built by exactly these weights."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"search index not found: {path} (build one with `scanet search index`)")
    index = safe_torch_load(path, "search index")
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise ValueError(f"{path} is not a SCANet search index (format {INDEX_FORMAT!r} expected)")
    for side in ("collection", "queries"):
        rec = index.get(side)
        if isinstance(rec, dict) and isinstance(rec.get("labels"), torch.Tensor):
            rec["labels"] = rec["labels"].numpy()
    if model is not None:
        h = model_hash(model)
        if h != index["model_hash"]:
            raise ValueError(
                f"the index {path} was built with model {index['model_hash']} but this checkpoint is "
                f"model {h}: scores would not be comparable; rebuild the index with this checkpoint"
            )
    return index


# --------------------------------------------------------------------------------------------------- query
def query_tokenizer(language: str):
    """The training tokenizer of ``language`` WITHOUT its stop-word filter (stop words are reported apart)."""
    if language == "en":
        from scanet.data.text import english_tokenizer

        return english_tokenizer(())
    if language == "whitespace":
        return lambda text: text.lower().split()
    try:
        from scanet.data.languages import tokenizer_for
    except ImportError as e:
        raise ValueError(f"no tokenizer for language {language!r}") from e
    return tokenizer_for(language)


def prepare_query_text(
    text: str, vocab, language: str = "en", stopwords=(), text_encoder: str = "gcn", max_tokens: int | None = None
) -> dict:
    """Free text -> tokens (the dataset's tokenizer) -> known words, unknown words, ignored stop words, and the
    model's text input: text_features of the bag-of-words over the saved vocabulary (gcn), or the known words'
    ids in order, the first ``max_tokens`` (lstm/cnn, as scanet.inputs gives a split's texts). No known word: an
    error."""
    from scanet.data.text import bag_of_words, text_features

    tokens = query_tokenizer(language)(text)
    stop, vocab_set = set(stopwords), set(vocab)
    known = [w for w in tokens if w in vocab_set and w not in stop]
    unknown = sorted({w for w in tokens if w not in vocab_set and w not in stop})
    ignored = sorted({w for w in tokens if w in stop})
    if not known:
        raise ValueError(
            f"the query {text!r} has no word of the model's vocabulary ({len(vocab)} words)"
            + (f"; unknown: {', '.join(unknown)}" if unknown else "")
            + (f"; stop words ignored: {', '.join(ignored)}" if ignored else "")
        )
    if text_encoder == "gcn":
        features = text_features(bag_of_words([known], list(vocab)))
    else:
        from scanet.data.tokens import token_ids

        features = token_ids([known], list(vocab)).padded(max_length=max_tokens)[0]
    return {
        "tokens": tokens,
        "known": known,
        "unknown_words": unknown,
        "stopwords_ignored": ignored,
        "features": features,
    }


def class_name(classes, label) -> str:
    label = np.asarray(label)
    if label.ndim == 0:
        c = int(label)
        return classes[c] if 0 <= c < len(classes) else str(c)
    return ", ".join(classes[c] for c in np.flatnonzero(label)) or "-"


def _resolve_shortlist(shortlist, n: int, k: int) -> int:
    """0 = exhaustive. "auto": exhaustive up to AUTO_EXHAUSTIVE_MAX items, else max(20 k, 200)."""
    if shortlist in (None, "auto"):
        return 0 if n <= AUTO_EXHAUSTIVE_MAX else max(20 * k, 200)
    try:
        s = int(shortlist)
    except (TypeError, ValueError):
        raise ValueError(f"shortlist must be 'auto' or an integer >= 0, got {shortlist!r}") from None
    if s < 0:
        raise ValueError(f"shortlist must be 'auto' or an integer >= 0, got {s}")
    return s


@torch.no_grad()
def search_index(
    model,
    index: dict,
    *,
    text: str | None = None,
    text_id: str | None = None,
    image_id: str | None = None,
    top_k: int = 10,
    shortlist="auto",
    stage1: str | None = None,
    precision: str = "fp32",
    ann=None,
) -> dict:
    """One query (free text, or an item of the index's split by id) against the index's collection.

    ``ann`` (load_ann): a two-stage query takes its shortlist from this FAISS index when ``stage1`` is its
    score (None: the FAISS index's, else "layer1"); otherwise the exact GEMM shortlist."""
    if sum(x is not None for x in (text, text_id, image_id)) != 1:
        raise ValueError("give exactly one of text, text_id, image_id")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    param = next(model.parameters())
    coll = index["collection"]
    want = "image" if (text is not None or text_id is not None) else "text"
    if coll["modality"] != want:
        q = "a text" if want == "image" else "an image"
        raise ValueError(f"this index holds {coll['modality']}s: {q} query needs an index built with --side {want}s")
    collection = _items(coll, param.device, param.dtype)
    info: dict = {}
    if text is not None:
        prep = prepare_query_text(
            text,
            index["vocab"],
            index.get("language", "en"),
            index.get("stopwords", ()),
            model.config.text_encoder,
            model.config.max_tokens,
        )
        queries = encode_items(model, "text", prep["features"])
        info = {
            "kind": "free text",
            "text": text,
            "known_words": len(prep["known"]),
            "unknown_words": prep["unknown_words"],
            "stopwords_ignored": prep["stopwords_ignored"],
        }
    else:
        qrec = index["queries"]
        qid = text_id if text_id is not None else image_id
        try:
            pos = qrec["ids"].index(qid)
        except ValueError:
            raise ValueError(
                f"{qrec['modality']} id {qid!r} is not in the index ({index['split']} split of "
                f"{index['dataset_name']}; ids look like {', '.join(qrec['ids'][:3])})"
            ) from None
        queries = _items(qrec, param.device, param.dtype).subset(slice(pos, pos + 1))
        info = {"kind": f"{qrec['modality']} id", "id": qid, "class": class_name(index["classes"], qrec["labels"][pos])}
        if qrec.get("words"):
            info["words"] = qrec["words"][pos]
    S = _resolve_shortlist(shortlist, len(collection), top_k)
    stage1 = stage1 or (ann.stage1 if ann is not None else "layer1")
    if S == 0 or S >= len(collection):
        res, mode = exhaustive_search(model, queries, collection, top_k, precision), "exhaustive"
    elif ann is not None and ann.stage1 == stage1:
        from scanet.ann import two_stage_search_ann

        res = two_stage_search_ann(model, queries, collection, ann, top_k, S, precision=precision)
        mode = f"two-stage (FAISS {ann.kind} {stage1} shortlist of {S})"
    else:
        res = two_stage_search(
            model,
            queries,
            collection,
            top_k,
            S,
            stage1,
            precision=precision,
            reference=index.get("reference_attention"),
        )
        mode = f"two-stage ({stage1} shortlist of {S})"
    results = []
    found = [(i, logit) for i, logit in zip(res.indices[0].tolist(), res.logits[0].tolist(), strict=True) if i >= 0]
    for r, (i, logit) in enumerate(found):  # (an approximate index may fill fewer than k slots)
        results.append(
            {
                "rank": r + 1,
                "id": coll["ids"][i],
                "index": i,
                "logit": logit,
                "similarity": float(torch.sigmoid(torch.tensor(logit, dtype=torch.float64))),
                "class": class_name(index["classes"], coll["labels"][i]),
            }
        )
        if coll.get("words"):
            results[-1]["words"] = coll["words"][i]
    return {
        "query": info,
        "collection": {
            "modality": coll["modality"],
            "size": len(collection),
            "dataset": index["dataset_name"],
            "split": index["split"],
        },
        "mode": mode,
        "results": results,
    }
