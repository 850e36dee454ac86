"""FAISS first stage (scanet.ann): exact against exhaustive, approximate at a stated recall, on-disk safety."""

import numpy as np
import pytest
import torch

faiss = pytest.importorskip("faiss", reason="FAISS tests need faiss-cpu (pip install -e .[dev] includes it)")

from scanet import ann, retrieve  # noqa: E402
from test_pair_scores import make_items, make_model  # noqa: E402


def encoded(model, n_text, n_image, seed):
    bow, image = make_items(n_text, n_image, seed)
    return retrieve.encode_items(model, "text", bow), retrieve.encode_items(model, "image", image)


def clustered(n, d, n_clusters, seed, n_queries=200, spread=1.0):
    """Vectors around n_clusters centres (std 1 around centres of std ``spread``: overlapping clusters at the
    default, where inner-product neighbours often lie in other lists), and queries from the same mixture."""
    rng = np.random.default_rng(seed)
    centres = spread * rng.normal(size=(n_clusters, d))
    x = (centres[rng.integers(0, n_clusters, n)] + rng.normal(size=(n, d))).astype(np.float32)
    q = (centres[rng.integers(0, n_clusters, n_queries)] + rng.normal(size=(n_queries, d))).astype(np.float32)
    return x, q


def batches(x, size):
    return (x[s : s + size] for s in range(0, len(x), size))


def recall(found: torch.Tensor, truth: torch.Tensor) -> float:
    return (truth[:, :, None] == found[:, None, :]).any(-1).float().mean().item()


# ------------------------------------------------------------------------------------------------ exact
@pytest.mark.parametrize("direction", ["text2image", "image2text"])
def test_flat_shortlist_of_the_whole_collection_is_exhaustive_search(direction):
    model = make_model(24, 2, "n", seed=3)
    texts, images = encoded(model, 9, 40, seed=3)
    queries, collection = (texts, images) if direction == "text2image" else (images, texts)
    index = ann.ANNIndex.from_items(model, collection, progress=False)
    assert index.kind == "flat" and len(index) == len(collection) and index.modality == collection.modality
    exh = retrieve.exhaustive_search(model, queries, collection, 10)
    two = ann.two_stage_search_ann(model, queries, collection, index, 10, shortlist=len(collection))
    assert torch.equal(two.indices, exh.indices)
    torch.testing.assert_close(two.logits, exh.logits, rtol=1e-12, atol=1e-12)


def test_flat_search_is_the_exact_inner_product_top_k():
    model = make_model(16, 2, "n", seed=5)
    texts, images = encoded(model, 7, 300, seed=5)
    q, v = retrieve.stage1_vectors(model, texts), retrieve.stage1_vectors(model, images)
    index = ann.ANNIndex.build(batches(v, 64), v.shape[1], "flat", total=len(v), progress=False)
    scores, ids = index.search(q, 12)
    ref_s, ref_i = retrieve.top_k_inner_product(q, v, 12, backend="torch")
    assert torch.equal(ids, ref_i)
    torch.testing.assert_close(scores.double(), ref_s, rtol=1e-5, atol=1e-5)
    # and the two-stage search on this shortlist equals scanet.retrieve's own two-stage search
    two = ann.two_stage_search_ann(model, texts, images, index, 5, shortlist=30)
    ref = retrieve.two_stage_search(model, texts, images, 5, 30, backend="torch")
    assert torch.equal(two.indices, ref.indices)


def test_one_layer_model_flat_shortlist_of_k_is_exact():
    """With one co-attention layer the stage-1 score IS the model's score: a shortlist of k is exhaustive."""
    model = make_model(16, 1, "n", seed=31)
    texts, images = encoded(model, 6, 200, seed=31)
    index = ann.ANNIndex.from_items(model, images, progress=False)
    exh = retrieve.exhaustive_search(model, texts, images, 4)
    assert torch.equal(ann.two_stage_search_ann(model, texts, images, index, 4, shortlist=4).indices, exh.indices)


def test_layer2_mean_is_the_model_score_when_the_partners_attention_is_the_mean():
    """logit = <q, v> + b exactly for a pair whose layer-1 attentions are the reference means."""
    model = make_model(24, 2, "n", seed=11)
    texts, images = encoded(model, 4, 4, seed=11)
    full = retrieve.score_pairs(model, texts, images)
    b = model.head.fc.bias.detach()
    for t in range(4):
        for i in range(4):
            ref = {"text": texts.attention[t], "image": images.attention[i]}
            q = ann.stage1_vectors(model, texts.subset([t]), "layer2-mean", ref)
            v = ann.stage1_vectors(model, images.subset([i]), "layer2-mean", ref)
            torch.testing.assert_close((q @ v.T)[0, 0] + b[0], full[t, i], rtol=1e-12, atol=1e-12)
    # another reference changes the proxy (so the reference is really used)
    ref = ann.reference_attention(texts, images)
    q = ann.stage1_vectors(model, texts.subset([0]), "layer2-mean", ref)
    assert not torch.allclose(
        q @ ann.stage1_vectors(model, images.subset([0]), "layer2-mean", ref).T + b, full[:1, :1], rtol=1e-6, atol=1e-6
    )


def test_layer2_mean_errors_and_whole_collection_exactness():
    one = make_model(16, 1, "n", seed=2)
    t1, _ = encoded(one, 2, 2, seed=2)
    with pytest.raises(ValueError, match="2 co-attention layers"):
        ann.stage1_vectors(one, t1, "layer2-mean", {"text": t1.attention[0], "image": t1.attention[0]})
    model = make_model(16, 2, "n", seed=4)
    texts, images = encoded(model, 5, 60, seed=4)
    with pytest.raises(ValueError, match="reference"):
        ann.stage1_vectors(model, texts, "layer2-mean")
    with pytest.raises(ValueError, match="stage-1 score"):
        ann.stage1_vectors(model, texts, "layer3")
    ref = ann.reference_attention(texts, images)
    index = ann.ANNIndex.from_items(model, images, stage1="layer2-mean", reference=ref, progress=False)
    exh = retrieve.exhaustive_search(model, texts, images, 10)
    two = ann.two_stage_search_ann(model, texts, images, index, 10, shortlist=len(images))
    assert torch.equal(two.indices, exh.indices)


# ----------------------------------------------------------------------------------------- approximate
# Stated recall@10 against the exact top 10 on 20,000 clustered vectors (d = 32, 100 overlapping clusters),
# default parameters: IVF nlist = 500 lists, nprobe = 15 (measured 0.961); HNSW M = 32, ef_search = 128
# (measured 0.996). The thresholds leave a margin for FAISS versions and thread counts.
IVF_RECALL, HNSW_RECALL = 0.93, 0.97


@pytest.fixture(scope="module")
def clustered_collection():
    x, q = clustered(20_000, 32, 100, seed=0)
    exact = ann.ANNIndex.build(batches(x, 4096), 32, "flat", total=len(x), progress=False)
    return x, q, exact.search(q, 10)[1]


@pytest.mark.parametrize("kind,stated", [("ivf", IVF_RECALL), ("hnsw", HNSW_RECALL)])
def test_approximate_indexes_reach_the_stated_recall(clustered_collection, kind, stated):
    x, q, truth = clustered_collection
    index = ann.ANNIndex.build(batches(x, 4096), 32, kind, total=len(x), progress=False)
    assert index.kind == kind and len(index) == len(x)
    r = recall(index.search(q, 10)[1], truth)
    assert r >= stated, f"{kind} recall@10 {r:.3f} < {stated}"
    if kind == "ivf":
        assert index.index.nlist == 500 and index.nprobe == 15
        index.set_search_params(nprobe=1)  # one list: recall must drop (the parameter is live)
        assert recall(index.search(q, 10)[1], truth) < r
        index.set_search_params(nprobe=500)  # every list: exact
        assert recall(index.search(q, 10)[1], truth) == 1.0


def test_auto_chooses_by_size():
    assert ann.choose_kind(10) == "flat" and ann.choose_kind(ann.FLAT_MAX) == "flat"
    assert ann.choose_kind(ann.FLAT_MAX + 1) == "hnsw"
    x, _ = clustered(500, 8, 5, seed=1)
    assert ann.ANNIndex.build(batches(x, 100), 8, "auto", total=500, progress=False).kind == "flat"
    with pytest.raises(ValueError, match="total"):
        ann.ANNIndex.build(batches(x, 100), 8, "auto", progress=False)


def test_build_errors():
    x, _ = clustered(300, 8, 5, seed=2)
    with pytest.raises(ValueError, match="kind"):
        ann.ANNIndex.build(batches(x, 100), 8, "lsh", total=300, progress=False)
    with pytest.raises(ValueError, match=r"\(n, 8\)"):
        ann.ANNIndex.build(batches(x[:, :7], 100), 8, "flat", progress=False)
    with pytest.raises(ValueError, match="announced"):
        ann.ANNIndex.build(batches(x, 100), 8, "flat", total=301, progress=False)
    with pytest.raises(ValueError, match="empty"):
        ann.ANNIndex.build(iter(()), 8, "flat", progress=False)
    with pytest.raises(ValueError, match="nlist=400"):
        ann.ANNIndex.build(batches(x, 100), 8, "ivf", nlist=400, progress=False)
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ann.ANNIndex.build(batches(bad, 100), 8, "flat", progress=False)
    flat = ann.ANNIndex.build(batches(x, 100), 8, "flat", progress=False)
    with pytest.raises(ValueError, match="nprobe"):
        flat.set_search_params(nprobe=4)
    with pytest.raises(ValueError, match="queries"):
        flat.search(np.zeros((2, 9), np.float32), 3)
    assert flat.search(x[:2], 1000)[1].shape == (2, 300)  # k is capped at the collection size


# ------------------------------------------------------------------------------------------------ on disk
@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_save_load_round_trip(tmp_path, kind):
    x, q = clustered(3000, 16, 20, seed=3, n_queries=20)
    ref = {"text": np.linspace(0.5, 1.5, 16), "image": np.full(16, 1.0)}
    index = ann.ANNIndex.build(
        batches(x, 1000),
        16,
        kind,
        total=len(x),
        model_hash="abc123",
        stage1="layer2-mean",
        modality="image",
        reference=ref,
        progress=False,
    )
    path = index.save(ann.ann_path_for(tmp_path / "search.pt"))
    assert path == tmp_path / "search.faiss"
    back = ann.ANNIndex.load(path, expected_hash="abc123")
    assert (
        back.kind,
        back.dim,
        len(back),
        back.model_hash,
        back.stage1,
        back.modality,
        back.nprobe,
        back.ef_search,
    ) == (kind, 16, 3000, "abc123", "layer2-mean", "image", index.nprobe, index.ef_search)
    for m in ("text", "image"):
        assert torch.equal(back.reference[m], index.reference[m])
    s0, i0 = index.search(q, 10)
    s1, i1 = back.search(q, 10)
    assert torch.equal(i0, i1) and torch.equal(s0, s1)
    with pytest.raises(FileExistsError, match="overwrite"):
        index.save(path)
    index.save(path, overwrite=True)


def test_model_hash_mismatch_is_refused(tmp_path):
    model = make_model(16, 2, "n", seed=7)
    _, images = encoded(model, 2, 50, seed=7)
    path = ann.ANNIndex.from_items(model, images, progress=False).save(tmp_path / "i.faiss")
    assert ann.ANNIndex.load(path, model=model).model_hash == retrieve.model_hash(model)
    other = make_model(16, 2, "n", seed=8)
    with pytest.raises(ValueError, match="built with model .* rebuild the index"):
        ann.ANNIndex.load(path, model=other)
    with pytest.raises(ValueError, match="rebuild"):
        ann.ANNIndex.load(path, expected_hash="0" * 16)
    index = ann.ANNIndex.load(path)
    texts, _ = encoded(model, 2, 50, seed=7)
    with pytest.raises(ValueError, match="holds 50 items but the collection has 49"):
        ann.two_stage_search_ann(model, texts, images.subset(slice(0, 49)), index, 5, 10)


def test_corrupt_files_give_clear_errors(tmp_path):
    x, _ = clustered(500, 8, 5, seed=4)
    path = ann.ANNIndex.build(batches(x, 100), 8, "ivf", nlist=10, progress=False).save(tmp_path / "i.faiss")
    data = bytearray(path.read_bytes())
    flipped = tmp_path / "flipped.faiss"
    data[-100] ^= 0xFF  # one byte of the FAISS data
    flipped.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="flipped.faiss is corrupt: its FAISS data"):
        ann.ANNIndex.load(flipped)
    truncated = tmp_path / "truncated.faiss"
    truncated.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="corrupt"):
        ann.ANNIndex.load(truncated)
    header_cut = tmp_path / "header.faiss"
    header_cut.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match="header.faiss is corrupt"):
        ann.ANNIndex.load(header_cut)
    raw = tmp_path / "raw.faiss"  # a bare faiss.write_index file is not ours
    faiss.write_index(faiss.IndexFlatIP(8), str(raw))
    with pytest.raises(ValueError, match="not a SCANet FAISS index"):
        ann.ANNIndex.load(raw)
    with pytest.raises(FileNotFoundError, match="missing.faiss"):
        ann.ANNIndex.load(tmp_path / "missing.faiss")
