"""Two-stage search at scale (op "search"): a FAISS shortlist re-ranked by the full co-attention score.

    pytest bench/bench_search.py --benchmark [--bench-full] [-s] [--bench-json PATH]

Collection: C synthetic images (C = 20,000; 1,000,000 with --bench-full), drawn from the synthetic dataset's
class-conditional image distribution as it shows in the training split (a class is drawn uniformly, the image
is that class's mean training image plus Gaussian noise of the training residuals' per-feature std), and
encoded by a SCANet trained here on the synthetic dataset (3 epochs, N = 256, two co-attention layers, the
setup of bench_pair_scores.py). Queries: the synthetic test texts, text -> image, k = 10.

Search: the "layer2-mean" stage-1 vectors (scanet.ann; reference attention = the training split's means) in a
FAISS index chosen by size (scanet.ann.choose_kind: flat up to 100,000 items, HNSW above: M = 32,
efConstruction = 40, efSearch = max(128, S)), a shortlist of S in (100, 200, 500), re-ranked by
scanet.retrieve.score_pairs on the S gathered pairs, top 10. At 1M items the exact FAISS shortlist (IndexFlatIP) is
timed too (provider "flat").

Each row: median and p99 of the latency of ONE query (encode the text, stage-1 vector, FAISS search, re-rank,
top 10), over 200 queries one after another (pytest-benchmark rounds), torch and FAISS on one thread; the
build (encode_seconds: the collection through the model; index_seconds: FAISS train + add); memory
(collection_bytes: the features and
layer-1 attention kept for re-ranking, index_bytes: the saved FAISS file, rss_peak_bytes: the process's peak
RSS so far); the saved index's load_seconds. Recall (recall_at_10): of the two-stage top 10 against the
exhaustive co-attention top 10 on the first 20,000 items, for 100 queries, with an index of the row's kind
built on that subset (HNSW for the 1M rows); recall_at_10_flat and recall_at_10_layer1: the same with the
exact shortlist, and with scanet.retrieve's "layer1" stage-1 score; at 1M, agreement_vs_flat: the fraction of the
top 10 shared with the
exact-shortlist two-stage search over the whole collection. test_hnsw_ef_sweep: the same at 1M and S = 200 for
HNSW beams efSearch in (256, 512, 1024) (the main rows use 128).

IVF (scanet.ann kind "ivf", nlist = 4 sqrt(C), nprobe = nlist / 32) was the size-chosen kind of the first run
of this benchmark: 16 ms median at 1M but recall@10 0.16 (bench/results/2026-12-01-cpu-2core-search-ivf.json),
which is why HNSW is chosen by size now.
"""

from __future__ import annotations

import contextlib
import resource
import time

import numpy as np
import pytest
import torch

SUBSET = 20_000  # exhaustive scoring for recall: 100 queries x 20,000 items x 4 N^2 FLOPs
RECALL_QUERIES = 100
LATENCY_QUERIES = 200
SHORTLISTS = (100, 200, 500)
ENCODE_BATCH = 65_536
SIZES = (20_000, 1_000_000)

_CACHE: dict = {}


@pytest.fixture(scope="module")
def trained(trained_synthetic):
    pytest.importorskip("faiss", reason="bench_search needs faiss-cpu")
    from scanet import ann, retrieve

    model, ds, base = trained_synthetic
    ref = ann.reference_attention(
        retrieve.encode_items(model, "text", ds.train.text_matrix()),
        retrieve.encode_items(model, "image", ds.train.images),
    )
    return {"model": model, "dataset": ds, "reference": ref, "dir": base}


def image_batches(dataset, n: int, batch: int, seed: int = 0):
    """n synthetic image inputs in batches; batch b is drawn from its own seed, so the first items are the
    same whatever n (the 20,000-item subset of the 1M collection is the 20,000-item collection)."""
    tr = dataset.train
    classes = np.unique(tr.labels)
    means = np.stack([tr.images[tr.labels == c].mean(0) for c in classes])
    std = np.concatenate([tr.images[tr.labels == c] - means[i] for i, c in enumerate(classes)]).std(0)
    for b, s in enumerate(range(0, n, batch)):
        rng = np.random.default_rng([seed, b])
        m = min(batch, n - s)
        label = rng.integers(0, len(classes), m)
        yield (means[label] + std * rng.normal(size=(m, means.shape[1]))).astype(np.float32)


def collection(trained, n: int):
    """The encoded collection (Items kept for re-ranking) and its FAISS index of the auto kind, built in one
    streamed pass: each batch is encoded, stored, and its stage-1 vectors are added to the index."""
    key = ("collection", n)
    if key in _CACHE:
        return _CACHE[key]
    from scanet import ann, retrieve

    model, ref = trained["model"], trained["reference"]
    N = model.coattention.dim
    feats = torch.empty(n, N)
    att = torch.empty(n, N)
    timing = {"encode": 0.0}

    def stream():
        pos = 0
        for x in image_batches(trained["dataset"], n, ENCODE_BATCH):
            t0 = time.perf_counter()
            items = retrieve.encode_items(model, "image", x, batch_size=8192)
            feats[pos : pos + len(x)], att[pos : pos + len(x)] = items.features, items.attention
            pos += len(x)
            v = ann.stage1_vectors(model, items, "layer2-mean", ref)
            timing["encode"] += time.perf_counter() - t0
            yield v

    index = ann.ANNIndex.build(
        stream(),
        N,
        "auto",
        total=n,
        model_hash=retrieve.model_hash(model),
        stage1="layer2-mean",
        modality="image",
        reference=ref,
    )
    items = retrieve.Items("image", feats, att)
    path = index.save(trained["dir"] / f"collection-{n}.faiss", overwrite=True)
    t0 = time.perf_counter()
    loaded = ann.ANNIndex.load(path, model=model)
    load_seconds = time.perf_counter() - t0
    assert len(loaded) == n
    info = {
        "encode_seconds": timing["encode"],
        "index_seconds": index.build_seconds - timing["encode"],
        "index_bytes": path.stat().st_size,
        "load_seconds": load_seconds,
        "collection_bytes": (feats.numel() + att.numel()) * 4,
        "nlist": getattr(index.index, "nlist", None),
        "nprobe": index.nprobe,
    }
    del loaded
    path.unlink()
    _CACHE[key] = (items, index, info)
    return _CACHE[key]


def queries(trained, count: int):
    from scanet.data.text import text_features

    ds = trained["dataset"]
    return text_features(ds.test.bow[:count])


def exhaustive_top10(trained):
    """The exhaustive co-attention top 10 of RECALL_QUERIES text queries over the 20,000-item subset."""
    if "exhaustive" not in _CACHE:
        from scanet import retrieve

        model = trained["model"]
        items = collection(trained, SUBSET)[0]
        texts = retrieve.encode_items(model, "text", queries(trained, RECALL_QUERIES))
        t0 = time.perf_counter()
        res = retrieve.exhaustive_search(model, texts, items.subset(slice(0, SUBSET)), 10)
        _CACHE["exhaustive"] = (texts, res.indices, time.perf_counter() - t0)
    return _CACHE["exhaustive"]


def overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a[:, :, None] == b[:, None, :]).any(-1).float().mean().item()


def subset_recall(trained, kind: str, S: int, stage1: str = "layer2-mean") -> float:
    """recall@10 of two-stage search (a FAISS index of ``kind`` on the subset) against exhaustive search."""
    from scanet import ann

    key = ("recall", kind, S, stage1)
    if key not in _CACHE:
        model = trained["model"]
        texts, truth, _ = exhaustive_top10(trained)
        items = collection(trained, SUBSET)[0]
        ikey = ("subset-index", kind, stage1)
        if ikey not in _CACHE:
            _CACHE[ikey] = ann.ANNIndex.from_items(
                model, items, kind=kind, stage1=stage1, reference=trained["reference"], progress=False
            )
        res = ann.two_stage_search_ann(model, texts, items, _CACHE[ikey], 10, S)
        _CACHE[key] = overlap(res.indices, truth)
    return _CACHE[key]


@contextlib.contextmanager
def one_thread():
    """One query is too small for threads: on a shared 2-core machine OpenMP's spin-waiting for a descheduled
    thread costs tens of ms a call (measured: median 107-355 ms with 2 threads, minimum 3 ms). The build
    (k-means, encoding) keeps every thread."""
    import faiss

    t, f = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(t)
        faiss.omp_set_num_threads(f)


def _versions():
    import faiss

    return {
        "faiss": faiss.__version__,
        "torch_threads": torch.get_num_threads(),
        "faiss_threads": faiss.omp_get_max_threads(),
    }


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("S", SHORTLISTS)
@pytest.mark.parametrize("provider", ("auto", "flat"))
def test_search(benchmark, measure, bench_device, full_sweep, trained, n, S, provider):
    from scanet import ann, retrieve

    if n > SUBSET and not full_sweep:
        pytest.skip(f"the {n:,}-item collection runs with --bench-full (about 4 GB of memory, minutes to build)")
    if provider == "flat" and (n <= ann.FLAT_MAX or S != 200):
        pytest.skip("the exact-shortlist comparison runs at 1M items with S = 200 (auto is flat below 100k)")
    if bench_device.type != "cpu":
        pytest.skip("FAISS runs on the CPU here (faiss-cpu); the re-ranking device would differ from the index's")
    model = trained["model"]
    items, index, info = collection(trained, n)
    if provider == "flat":
        if ("flat", n) not in _CACHE:
            _CACHE[("flat", n)] = ann.ANNIndex.from_items(
                model, items, kind="flat", stage1="layer2-mean", reference=trained["reference"], progress=False
            )
        index = _CACHE[("flat", n)]
    kind = index.kind
    bows = queries(trained, LATENCY_QUERIES)
    state = {"i": 0}

    def one_query():
        i = state["i"] % LATENCY_QUERIES
        state["i"] += 1
        q = retrieve.encode_items(model, "text", bows[i : i + 1])
        return ann.two_stage_search_ann(model, q, items, index, 10, S)

    extra = dict(info, kind=kind, shortlist=S, collection=n)
    extra["recall_at_10"] = subset_recall(trained, kind if n > ann.FLAT_MAX else "flat", S)
    extra["recall_at_10_flat"] = subset_recall(trained, "flat", S)
    extra["recall_at_10_layer1"] = subset_recall(trained, "flat", S, stage1="layer1")
    extra["recall_subset"] = SUBSET
    extra["recall_queries"] = RECALL_QUERIES
    extra["exhaustive_subset_seconds_per_query"] = exhaustive_top10(trained)[2] / RECALL_QUERIES
    if (
        n > ann.FLAT_MAX and provider == "auto"
    ):  # what the approximate index loses against the exact shortlist at full size
        texts = retrieve.encode_items(model, "text", bows)
        if ("flat", n) not in _CACHE:
            _CACHE[("flat", n)] = ann.ANNIndex.from_items(
                model, items, kind="flat", stage1="layer2-mean", reference=trained["reference"], progress=False
            )
        exact = ann.two_stage_search_ann(model, texts, items, _CACHE[("flat", n)], 10, S)
        approx = ann.two_stage_search_ann(model, texts, items, index, 10, S)
        extra["agreement_vs_flat"] = overlap(approx.indices, exact.indices)
        extra["shortlist_recall_vs_flat"] = overlap(approx.shortlist, exact.shortlist)
    extra["rss_peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with one_thread():
        extra.update(_versions())
        median = measure(
            benchmark,
            one_query,
            op="search",
            case=f"C={n} N={model.coattention.dim} k=10 S={S}",
            provider=kind if provider == "auto" else "flat",
            device=bench_device,
            rounds=LATENCY_QUERIES,
            **extra,
        )
    p99 = benchmark.extra_info["p99_s"]
    print(
        f"\nC={n:,} {kind} S={S}: median {median * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms, recall@10 "
        f"{extra['recall_at_10']:.3f} (flat {extra['recall_at_10_flat']:.3f}, layer1 "
        f"{extra['recall_at_10_layer1']:.3f}); build {info['encode_seconds']:.1f} s encode + "
        f"{info['index_seconds']:.1f} s index, index {info['index_bytes'] / 2**20:.0f} MiB"
    )


@pytest.mark.parametrize("ef", (256, 512, 1024))
def test_hnsw_ef_sweep(benchmark, measure, bench_device, full_sweep, trained, ef):
    """HNSW's beam width at 1M items, S = 200: latency against agreement with the exact shortlist."""
    from scanet import ann, retrieve

    if not full_sweep:
        pytest.skip("the efSearch sweep runs on the 1,000,000-item collection, with --bench-full")
    if bench_device.type != "cpu":
        pytest.skip("FAISS runs on the CPU here (faiss-cpu)")
    n, S = SIZES[-1], 200
    model = trained["model"]
    items, index, info = collection(trained, n)
    if index.kind != "hnsw":
        pytest.skip(f"the collection's index is {index.kind}, not HNSW")
    bows = queries(trained, LATENCY_QUERIES)
    texts = retrieve.encode_items(model, "text", bows)
    if ("flat", n) not in _CACHE:
        _CACHE[("flat", n)] = ann.ANNIndex.from_items(
            model, items, kind="flat", stage1="layer2-mean", reference=trained["reference"], progress=False
        )
    exact = ann.two_stage_search_ann(model, texts, items, _CACHE[("flat", n)], 10, S)
    default_ef = index.ef_search
    index.set_search_params(ef_search=ef)
    try:
        approx = ann.two_stage_search_ann(model, texts, items, index, 10, S)
        extra = dict(
            info,
            kind="hnsw",
            shortlist=S,
            collection=n,
            ef_search=ef,
            agreement_vs_flat=overlap(approx.indices, exact.indices),
            shortlist_recall_vs_flat=overlap(approx.shortlist, exact.shortlist),
            rss_peak_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        )
        state = {"i": 0}

        def one_query():
            i = state["i"] % LATENCY_QUERIES
            state["i"] += 1
            q = retrieve.encode_items(model, "text", bows[i : i + 1])
            return ann.two_stage_search_ann(model, q, items, index, 10, S)

        with one_thread():
            extra.update(_versions())
            median = measure(
                benchmark,
                one_query,
                op="search",
                case=f"C={n} N={model.coattention.dim} k=10 S={S}",
                provider=f"hnsw-ef{ef}",
                device=bench_device,
                rounds=LATENCY_QUERIES,
                **extra,
            )
    finally:
        index.set_search_params(ef_search=default_ef)
    print(
        f"\nC={n:,} hnsw ef={ef} S={S}: median {median * 1e3:.2f} ms, p99 {benchmark.extra_info['p99_s'] * 1e3:.2f}"
        f" ms, top-10 agreement with the exact shortlist {extra['agreement_vs_flat']:.3f}"
    )
