"""FAISS for the first stage of two-stage search: exact, IVF and HNSW inner-product indexes over stage-1 vectors.

Why a little over 400 lines: one job, the FAISS stage: choosing and building the index kind, its checked
on-disk format (a hash before FAISS reads a byte) and the shortlist-then-re-rank search that uses it.

The stage-1 score factorizes per item (scanet.retrieve.stage1_vectors: score = <q_query, v_item>), so the
shortlist is a maximum-inner-product search, which is what FAISS does (pip install faiss-cpu):

  "flat"  IndexFlatIP: exact, every query scans all C vectors (C * d multiply-adds). The default up to
          FLAT_MAX items; bytes = 4 C d.
  "hnsw"  IndexHNSWFlat, inner product: a navigable small-world graph of ``hnsw_m`` links a node per layer
          (~ 4 C d + 8 C M bytes), log-time queries controlled by ``ef_search`` (raised to the shortlist size
          when smaller). The default above FLAT_MAX. Its build is the slow part: each insertion is a search
          (1M x 256 on the project's 2 shared cores: minutes, bench/bench_search.py records it).
  "ivf"   IndexIVFFlat, inner product: k-means into ``nlist`` lists (default 4 sqrt(C), the FAISS guideline),
          a query scans the ``nprobe`` lists whose centroids score highest: about nlist d + (nprobe / nlist) C d
          multiply-adds, vectors stored exactly (4 C d + 8 C bytes for the ids). Only when asked for: on the
          stage-1 vectors of a trained SCANet (norms from 11 to 257, mean 37, on the benchmark's collection) the
          residual of an item to its centroid dominates the inner product, so the lists a query probes miss
          its best items: 16% of the exhaustive top 10 at nprobe = nlist / 32 and 1M items (bench/results),
          65-70% on 20,000 items even at nprobe = nlist / 5, against 98-99% for HNSW there. HNSW is not exact
          either: at 1M items its two-stage top 10 shares 85-87% with the exact-shortlist two-stage top 10, at
          efSearch 128 to 1024 alike (the graph, not the beam, limits it; bench/results).

Stage-1 scores: scanet.retrieve's "layer1" and "cosine", and "layer2-mean" (here, for two-layer models): the
model's own two-layer score with the one pair-dependent factor, the layer-2 attention, computed against a
fixed partner, the mean layer-1 attention of the other modality over a reference sample (the training split):

    logit = sum_n w P_I(a1_t f_i) P_T(a1_i f_t) a1_i f_t a1_t f_i + b,   P_X(x) = softmax(relu(fc2_X(x))) * scale
          ~ <w P_T(abar_i f_t) a1_t f_t,  P_I(abar_t f_i) a1_i f_i> + b

which factorizes (query vector, item vector), and is exact for a pair whose layer-1 attentions are the means.
On the synthetic model of bench/bench_search.py (20,000 images, N = 256) its shortlist of 100 holds 98% of the
exhaustive top 10, "layer1"'s 45% (measured before writing this; the benchmark records its own figures).

Approximate indexes lose some of the exact shortlist; the full co-attention re-ranking (scanet.retrieve
score_pairs) is what decides the final top k, so what matters is the recall of the final top k against
exhaustive scoring, measured in tests/test_ann.py and bench/bench_search.py.

On disk (``save``/``load``, beside the search index: ``ann_path_for``): a magic line, a JSON header (format,
kind, dim, size, the stage-1 method, the model hash of scanet.retrieve.model_hash, search parameters, the
sha256 of the FAISS bytes) and the FAISS serialization (faiss.write_index's format, via serialize_index).
Loading reads data only (no pickle), checks the checksum before FAISS parses anything, and refuses an index
built by other weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

ANN_FORMAT = "scanet-ann-v1"
MAGIC = b"SCANET-ANN\n"
KINDS = ("flat", "ivf", "hnsw")
FLAT_MAX = 100_000  # "auto": exact search up to this many items (a query: 4 C d bytes read), HNSW above
IVF_TRAIN_PER_LIST = 40  # k-means sample: this many vectors a list (FAISS warns below 39)
IVF_NPROBE_FRACTION = 1 / 32  # default nprobe = nlist / 32 (at least 8)
# M = 32 links: M = 16 kept 92% of the top 10 on the benchmark's 20,000 items, M = 32 98-99%; efConstruction = 40
# (FAISS's default) built as good a graph there as 80 in two thirds of the time.
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 40, 128


# the stage-1 scores, their vectors and the "layer2-mean" reference live in scanet.retrieve (the search core)
from scanet.retrieve import STAGE1, mean_attention, reference_attention, stage1_vectors  # noqa: E402,F401


def faiss_module():
    try:
        import faiss
    except ImportError:
        raise ImportError("scanet.ann needs FAISS: pip install faiss-cpu (or pip install scanet[search])") from None
    return faiss


def choose_kind(n: int) -> str:
    """ "flat" (exact) up to FLAT_MAX items, "hnsw" above (see the module docstring for why not IVF)."""
    if n < 1:
        raise ValueError(f"a collection needs at least one item, got {n}")
    return "flat" if n <= FLAT_MAX else "hnsw"


def default_nlist(n: int) -> int:
    return max(1, min(int(4 * math.sqrt(n)), n // IVF_TRAIN_PER_LIST or 1))


def _as_float32(x, dim: int | None, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim != 2 or (dim is not None and x.shape[1] != dim):
        want = f"(n, {dim})" if dim is not None else "(n, d)"
        raise ValueError(f"{what} must be a {want} matrix, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what} has NaN or infinite values")
    return x


class ANNIndex:
    """A FAISS inner-product index over the stage-1 vectors of one collection (ids = collection positions)."""

    def __init__(
        self,
        index,
        kind: str,
        dim: int,
        model_hash: str | None = None,
        stage1: str = "layer1",
        modality: str | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
        build_seconds: float | None = None,
        reference: dict | None = None,
    ):
        if stage1 not in STAGE1:
            raise ValueError(f"stage-1 score must be one of {STAGE1}, got {stage1!r}")
        if stage1 == "layer2-mean" and reference is None:
            raise ValueError("an index of stage-1 'layer2-mean' vectors needs the reference attention it used")
        self.index, self.kind, self.dim = index, kind, dim
        self.reference = (
            None
            if reference is None
            else {m: torch.as_tensor(np.asarray(reference[m], dtype=np.float32)) for m in ("text", "image")}
        )
        self.model_hash, self.stage1, self.modality = model_hash, stage1, modality
        self.build_seconds = build_seconds
        self.nprobe: int | None = None
        self.ef_search: int | None = None
        self.set_search_params(nprobe=nprobe, ef_search=ef_search)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def __repr__(self) -> str:
        p = {
            "ivf": f", nlist={getattr(self.index, 'nlist', '?')}, nprobe={self.nprobe}",
            "hnsw": f", ef_search={self.ef_search}",
        }.get(self.kind, "")
        return f"ANNIndex({self.kind}, {len(self)} x {self.dim}{p}, model {self.model_hash})"

    # ------------------------------------------------------------------------------------------------ build
    @classmethod
    def build(
        cls,
        batches: Iterable,
        dim: int,
        kind: str = "auto",
        total: int | None = None,
        *,
        model_hash: str | None = None,
        stage1: str = "layer1",
        modality: str | None = None,
        reference: dict | None = None,
        nlist: int | None = None,
        nprobe: int | None = None,
        hnsw_m: int = HNSW_M,
        ef_construction: int = HNSW_EF_CONSTRUCTION,
        ef_search: int = HNSW_EF_SEARCH,
        progress: bool = True,
    ) -> ANNIndex:
        """Build from a stream of (n, dim) float32 batches (numpy or torch), added in order: ids 0, 1, ...

        kind "auto" needs ``total`` (the collection size) to choose; IVF trains its k-means on the first
        nlist x IVF_TRAIN_PER_LIST vectors of the stream (buffered), so pass a stream in random order or
        accept that the lists fit its head.
        """
        import time

        faiss = faiss_module()
        if kind not in KINDS + ("auto",):
            raise ValueError(f"kind must be one of {KINDS + ('auto',)}, got {kind!r}")
        if kind == "auto":
            if total is None:
                raise ValueError("kind 'auto' chooses by collection size: give total= (or an explicit kind)")
            kind = choose_kind(total)
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        t0 = time.perf_counter()
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="item", desc=f"faiss {kind} index", leave=False)
        stream: Iterator = (_as_float32(b, dim, "a batch of stage-1 vectors") for b in batches)
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = ef_construction
        else:
            if nlist is None:
                if total is None:
                    raise ValueError("an IVF index needs nlist= or total= (nlist defaults to 4 sqrt(total))")
                nlist = default_nlist(total)
            if nlist < 1:
                raise ValueError(f"nlist must be >= 1, got {nlist}")
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            head, have = [], 0
            for b in stream:  # buffer the k-means sample from the head of the stream
                head.append(b)
                have += len(b)
                if have >= nlist * IVF_TRAIN_PER_LIST:
                    break
            if have < nlist:
                raise ValueError(
                    f"an IVF index of nlist={nlist} lists needs at least {nlist} vectors, the "
                    f"stream gave {have}: lower nlist or use kind='flat'"
                )
            sample = np.concatenate(head)
            if bar is not None:
                bar.set_postfix_str(f"k-means: {nlist} lists on {len(sample)} vectors")
            index.train(sample[: nlist * IVF_TRAIN_PER_LIST])
            del sample
            stream = _chain(head, stream)
        n = 0
        for b in stream:
            index.add(b)
            n += len(b)
            if bar is not None:
                bar.update(len(b))
        if bar is not None:
            bar.close()
        if n == 0:
            raise ValueError("the stream of stage-1 vectors was empty: nothing to index")
        if total is not None and n != total:
            raise ValueError(f"the stream gave {n} vectors but total={total} was announced")
        if kind == "ivf" and nprobe is None:
            nprobe = max(8, int(index.nlist * IVF_NPROBE_FRACTION))
        return cls(
            index,
            kind,
            dim,
            model_hash,
            stage1,
            modality,
            nprobe=nprobe,
            ef_search=ef_search if kind == "hnsw" else None,
            build_seconds=time.perf_counter() - t0,
            reference=reference,
        )

    @classmethod
    def from_items(
        cls,
        model,
        items,
        kind: str = "auto",
        batch_size: int = 65536,
        stage1: str = "layer1",
        reference: dict | None = None,
        **kw,
    ) -> ANNIndex:
        """The index of an encoded collection (scanet.retrieve.Items), its stage-1 vectors made batch by batch."""
        from scanet.retrieve import model_hash

        n = len(items)
        batches = (
            stage1_vectors(model, items.subset(slice(s, s + batch_size)), stage1, reference)
            for s in range(0, n, batch_size)
        )
        return cls.build(
            batches,
            items.features.shape[1],
            kind,
            total=n,
            model_hash=model_hash(model),
            stage1=stage1,
            modality=items.modality,
            reference=reference,
            **kw,
        )

    def query_vectors(self, model, queries) -> torch.Tensor:
        """The stage-1 vectors of encoded queries, by this index's stage-1 score (and reference)."""
        return stage1_vectors(model, queries, self.stage1, self.reference)

    # ----------------------------------------------------------------------------------------------- search
    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        if nprobe is not None:
            if self.kind != "ivf":
                raise ValueError(f"nprobe is a parameter of IVF indexes, this one is {self.kind!r}")
            if nprobe < 1:
                raise ValueError(f"nprobe must be >= 1, got {nprobe}")
            self.nprobe = int(min(nprobe, self.index.nlist))
            self.index.nprobe = self.nprobe
        if ef_search is not None:
            if self.kind != "hnsw":
                raise ValueError(f"ef_search is a parameter of HNSW indexes, this one is {self.kind!r}")
            if ef_search < 1:
                raise ValueError(f"ef_search must be >= 1, got {ef_search}")
            self.ef_search = int(ef_search)
            self.index.hnsw.efSearch = self.ef_search

    def search(self, queries, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, ids), each (Q, k), best first. k is capped at the collection size; an approximate index
        may find fewer than k items for a query: those slots hold id -1 and score -inf."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = _as_float32(queries, self.dim, "queries")
        k = min(k, len(self))
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = max(self.ef_search or HNSW_EF_SEARCH, k)  # a beam narrower than k loses
        scores, ids = self.index.search(q, k)
        scores[ids < 0] = -np.inf
        return torch.from_numpy(scores), torch.from_numpy(ids).long()

    # --------------------------------------------------------------------------------------------- on disk
    def header(self) -> dict:
        return {
            "format": ANN_FORMAT,
            "kind": self.kind,
            "dim": self.dim,
            "size": len(self),
            "model_hash": self.model_hash,
            "stage1": self.stage1,
            "modality": self.modality,
            "nlist": int(self.index.nlist) if self.kind == "ivf" else None,
            "nprobe": self.nprobe,
            "ef_search": self.ef_search,
            "build_seconds": self.build_seconds,
            "reference": None
            if self.reference is None
            else {m: [float(x) for x in t.tolist()] for m, t in self.reference.items()},
        }

    def save(self, path, overwrite: bool = False) -> Path:
        """Write atomically (temporary file, fsync, rename); an existing file is kept unless overwrite=True."""
        faiss = faiss_module()
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists: pass overwrite=True to replace it")
        blob = faiss.serialize_index(self.index)  # uint8 array: faiss.write_index's bytes
        header = dict(
            self.header(), faiss_bytes=int(blob.nbytes), faiss_sha256=hashlib.sha256(memoryview(blob)).hexdigest()
        )
        head = json.dumps(header).encode()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC + struct.pack("<Q", len(head)) + head)
                f.write(memoryview(blob))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path, model=None, expected_hash: str | None = None) -> ANNIndex:
        """Read an index; with ``model`` (or ``expected_hash``) refuse one built by other weights."""
        faiss = faiss_module()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"FAISS index not found: {path} (build one with scanet.ann.ANNIndex.build)")
        data = path.read_bytes()
        if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 8:
            raise ValueError(f"{path} is not a SCANet FAISS index (it does not start with {MAGIC!r})")
        (n_head,) = struct.unpack("<Q", data[len(MAGIC) : len(MAGIC) + 8])
        start = len(MAGIC) + 8
        try:
            header = json.loads(data[start : start + n_head])
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is corrupt: its header is not JSON ({e})") from None
        if not isinstance(header, dict) or header.get("format") != ANN_FORMAT:
            raise ValueError(f"{path} is corrupt or of another format (format {ANN_FORMAT!r} expected)")
        blob = memoryview(data)[start + n_head :]
        if len(blob) != header.get("faiss_bytes") or hashlib.sha256(blob).hexdigest() != header.get("faiss_sha256"):
            raise ValueError(
                f"{path} is corrupt: its FAISS data ({len(blob)} bytes) does not match the checksum "
                f"in its header ({header.get('faiss_bytes')} bytes); rebuild the index"
            )
        want = expected_hash
        if model is not None:
            from scanet.retrieve import model_hash

            want = model_hash(model)
        if want is not None and header.get("model_hash") != want:
            raise ValueError(
                f"the FAISS index {path} was built with model {header.get('model_hash')} but this "
                f"checkpoint is model {want}: scores would not be comparable; rebuild the index "
                "with this checkpoint"
            )
        try:
            index = faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8))
        except RuntimeError as e:
            raise ValueError(f"{path} is corrupt: FAISS could not read it ({e})") from None
        if index.ntotal != header["size"] or index.d != header["dim"]:
            raise ValueError(
                f"{path} is corrupt: its FAISS index holds {index.ntotal} x {index.d} vectors, the "
                f"header says {header['size']} x {header['dim']}"
            )
        return cls(
            index,
            header["kind"],
            header["dim"],
            header.get("model_hash"),
            header.get("stage1", "layer1"),
            header.get("modality"),
            nprobe=header.get("nprobe"),
            ef_search=header.get("ef_search"),
            build_seconds=header.get("build_seconds"),
            reference=header.get("reference"),
        )


def _chain(head: list, rest: Iterator) -> Iterator:
    yield from head
    yield from rest


def ann_path_for(search_index_path) -> Path:
    """Where the FAISS index of a search index lives: beside it, ``<name>.faiss``."""
    return Path(search_index_path).with_suffix(".faiss")


# ------------------------------------------------------------------------------------------------- two-stage
@torch.no_grad()
def two_stage_search_ann(
    model, queries, collection, ann: ANNIndex, k: int, shortlist: int, precision: str = "fp32", chunk_pairs: int = 16384
):
    """Two-stage search with a FAISS shortlist: the ``shortlist`` items of largest stage-1 score by ``ann``,
    re-ranked by the full co-attention score (scanet.retrieve.score_pairs on the gathered pairs), top k.

    ``collection`` is the encoded collection the index was built from (features and layer-1 attention: what
    the re-ranking needs). Returns scanet.retrieve.SearchResult; a slot the index could not fill has index -1.
    """
    from scanet.retrieve import SearchResult, rank, score_pairs

    if shortlist < 1:
        raise ValueError(f"shortlist must be >= 1, got {shortlist}")
    if len(collection) != len(ann):
        raise ValueError(
            f"the FAISS index holds {len(ann)} items but the collection has {len(collection)}: "
            "they were not built together"
        )
    if ann.modality is not None and ann.modality != collection.modality:
        raise ValueError(f"the FAISS index holds {ann.modality}s, the collection {collection.modality}s")
    if {queries.modality, collection.modality} != {"text", "image"}:
        raise ValueError(
            f"cross-modal search needs text queries over images or image queries over texts, got "
            f"{queries.modality} queries over {collection.modality}s"
        )
    _, short = ann.search(ann.query_vectors(model, queries), shortlist)
    device = collection.features.device
    short = short.to(device)
    missing = short < 0
    safe = short.clamp_min(0)  # score a valid pair in the empty slots, then drop it
    Q, S = short.shape
    q_index = torch.arange(Q, device=device).repeat_interleave(S)
    c_index = safe.reshape(-1)
    texts, images = (queries, collection) if queries.modality == "text" else (collection, queries)
    ti, ii = (q_index, c_index) if queries.modality == "text" else (c_index, q_index)
    logits = score_pairs(model, texts, images, ti, ii, precision=precision, chunk_pairs=chunk_pairs).reshape(Q, S)
    logits = logits.masked_fill(missing, float("-inf"))
    top, idx = rank(logits, short, min(k, S))
    return SearchResult(top, idx, short)
