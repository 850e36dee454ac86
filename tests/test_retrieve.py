"""Two-stage retrieval, the search index and ``scanet search`` (scanet.retrieve).

Exactness checks use random float64 models (tests/helpers.py's make_model); the shortlist report and
the CLI run end to end on the synthetic dataset with a tiny model trained here (3 epochs, 189 steps).
"""

import dataclasses
import json

import numpy as np
import pytest
import torch

from helpers import make_items, make_model
from scanet import index as index_mod
from scanet import reference, retrieve
from scanet.checkpoint import load_checkpoint, load_model, save_checkpoint
from scanet.cli import main
from scanet.config import get_preset
from scanet.data import images as data_images
from scanet.data import synthetic
from scanet.data.text import bag_of_words, text_features
from scanet.train import train


def encoded(model, n_text, n_image, seed):
    bow, image = make_items(n_text, n_image, seed)
    return (retrieve.encode_items(model, "text", bow), retrieve.encode_items(model, "image", image))


# ------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("direction", ["text2image", "image2text"])
def test_two_stage_with_whole_collection_equals_exhaustive(layers, direction):
    model = make_model(24, layers, "n", seed=layers)
    texts, images = encoded(model, 9, 11, seed=layers)
    queries, collection = (texts, images) if direction == "text2image" else (images, texts)
    k = len(collection)
    exh = retrieve.exhaustive_search(model, queries, collection, k)
    two = retrieve.two_stage_search(model, queries, collection, k, shortlist=len(collection))
    assert torch.equal(two.indices, exh.indices)
    torch.testing.assert_close(two.logits, exh.logits, rtol=1e-12, atol=1e-12)
    # ... and the exhaustive ranking is the model's own: forward on every pair, sorted (ties by index).
    ref = model.score_all(*make_items(9, 11, seed=layers))
    ref = ref if direction == "text2image" else ref.T
    assert torch.equal(exh.indices, ref.argsort(dim=1, descending=True, stable=True))
    # the fused kernel (interpreter) re-ranks the same shortlist to the same order
    fused = retrieve.two_stage_search(model, queries, collection, 5, shortlist=len(collection), scorer="fused")
    if layers == 2:
        assert torch.equal(fused.indices, exh.indices[:, :5])
        torch.testing.assert_close(fused.logits, exh.logits[:, :5], rtol=1e-5, atol=1e-5)


def test_layer1_shortlist_is_the_exact_score_of_a_one_layer_model():
    """For one co-attention layer the stage-1 GEMM IS the model's score, so any shortlist >= k is exact."""
    model = make_model(16, 1, "n", seed=31)
    texts, images = encoded(model, 5, 30, seed=31)
    u, v = retrieve.stage1_vectors(model, texts), retrieve.stage1_vectors(model, images)
    full = retrieve.score_pairs(model, texts, images)
    torch.testing.assert_close(u @ v.T + model.head.fc.bias.detach(), full, rtol=1e-12, atol=1e-12)
    exh = retrieve.exhaustive_search(model, texts, images, 4)
    two = retrieve.two_stage_search(model, texts, images, 4, shortlist=4)
    assert torch.equal(two.indices, exh.indices)


def test_top_k_inner_product_in_chunks():
    gen = torch.Generator().manual_seed(3)
    q, keys = (
        torch.randn(5, 8, generator=gen, dtype=torch.float64),
        torch.randn(37, 8, generator=gen, dtype=torch.float64),
    )
    full = q @ keys.T
    for chunk in (1, 4, 37, 100):
        s, i = retrieve.top_k_inner_product(q, keys, 7, chunk=chunk)
        assert torch.equal(i, full.argsort(dim=1, descending=True)[:, :7])
        torch.testing.assert_close(s, full.gather(1, i))
    s, i = retrieve.top_k_inner_product(q, keys, 100)  # k larger than the collection: all of it
    assert i.shape == (5, 37)
    with pytest.raises(ValueError, match="k must be >= 1"):
        retrieve.top_k_inner_product(q, keys, 0)
    with pytest.raises(ValueError, match=r"\(Q, N\) and \(C, N\)"):
        retrieve.top_k_inner_product(q, keys[:, :3], 2)


def test_faiss_backend():
    q, keys = torch.randn(3, 8), torch.randn(20, 8)
    if retrieve._faiss() is None:
        with pytest.raises(ValueError, match="faiss-cpu"):
            retrieve.top_k_inner_product(q, keys, 3, backend="faiss")
        pytest.skip("faiss is not installed: checked the clear error; the FAISS path itself is untested here")
    s, i = retrieve.top_k_inner_product(q, keys, 5, backend="faiss")
    assert torch.equal(i, retrieve.top_k_inner_product(q, keys, 5)[1])


def test_rank_breaks_ties_by_candidate_index():
    scores = torch.tensor([[1.0, 2.0, 2.0, 0.5, 2.0]])
    cand = torch.tensor([[9, 7, 3, 1, 5]])
    s, c = retrieve.rank(scores, cand, 4)
    assert c.tolist() == [[3, 5, 7, 9]] and s.tolist() == [[2.0, 2.0, 2.0, 1.0]]


def test_cross_modal_only():
    model = make_model(8, 2, "n", seed=1)
    texts, _ = encoded(model, 3, 3, seed=1)
    with pytest.raises(ValueError, match="text queries over images or image queries over texts"):
        retrieve.exhaustive_search(model, texts, texts, 2)


# ------------------------------------------------------------------------------ trained synthetic model
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A synthetic dataset prepared into a temporary folder and a model trained on it for 3 epochs."""
    base = tmp_path_factory.mktemp("search")
    dataset = synthetic.prepare(base / "prepared", progress=lambda *a: None)
    preset = get_preset("synthetic")
    preset = dataclasses.replace(preset, train=dataclasses.replace(preset.train, epochs=3, eval_every=0))
    train(preset, dataset, base / "run", progress=False, log=lambda *a: None)
    model, _ = load_model(base / "run" / "last.pt", dataset)
    return dict(
        base=base, dataset=dataset, data=str(base / "prepared"), ckpt=str(base / "run" / "last.pt"), model=model.eval()
    )


def test_shortlist_report(trained):
    model, ds = trained["model"], trained["dataset"]
    texts = retrieve.encode_items(model, "text", ds.test.text_matrix())
    images = retrieve.encode_items(model, "image", ds.test.images)
    report = retrieve.shortlist_report(
        model, texts, images, ds.test.labels, ds.test.labels, k=10, shortlists=(10, 40, len(images))
    )
    rows = report["two_stage"]
    recalls = [r["recall_at_k"] for r in rows]
    assert recalls == sorted(recalls) and 0.0 < recalls[0] and recalls[-1] == 1.0
    # the whole collection as shortlist: the exhaustive ranking, the exhaustive MAP
    assert rows[-1]["map"] == pytest.approx(report["exhaustive"]["map"], abs=1e-12)
    assert rows[-1]["map_at_k"] == pytest.approx(report["exhaustive"]["map_at_k"], abs=1e-12)
    assert all(0.0 <= r["map"] <= 1.0 and r["seconds"] > 0 for r in rows)
    # exhaustive MAP is the evaluation code's MAP of the model's all-pairs logits (reference.pair_logits; logits,
    # not fp32 sigmoids, which saturate into ties near 1)
    from scanet.evaluate import mean_average_precision

    with torch.no_grad():
        logits = reference.pair_logits(model, texts.features, images.features)
    assert report["exhaustive"]["map"] == pytest.approx(
        mean_average_precision(logits, ds.test.labels, ds.test.labels), abs=1e-12
    )
    assert report["exhaustive"]["map"] > 0.3  # well above chance (1/6): the model learned something
    back = retrieve.shortlist_report(model, images, texts, ds.test.labels, ds.test.labels, k=10, shortlists=(20,))
    assert back["direction"] == "image2text"
    assert back["exhaustive"]["map"] == pytest.approx(
        mean_average_precision(logits.T, ds.test.labels, ds.test.labels), abs=1e-12
    )


@pytest.fixture(scope="module")
def indexes(trained):
    out = {}
    for side in ("images", "texts"):
        path = trained["base"] / f"{side}.pt"
        assert main(index_argv(trained, side, "--split", "test", "--out", str(path))) == 0
        out[side] = str(path)
    return out


def index_argv(trained, side, *args):
    """``scanet search index`` over the trained fixture's data, one side, with the given options."""
    return ["search", "index", "--checkpoint", trained["ckpt"], "--data", trained["data"], "--side", side, *args]


def query(capsys, trained, index, *args):
    rc = main(["search", "query", "--index", index, "--checkpoint", trained["ckpt"], *args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_query_by_text_id_is_the_model_ranking(capsys, trained, indexes):
    model, ds = trained["model"], trained["dataset"]
    rc, out, _ = query(capsys, trained, indexes["images"], "--text-id", "te5", "--top-k", "7", "--json")
    assert rc == 0
    res = json.loads(out)
    assert res["mode"] == "exhaustive" and res["query"]["class"] == ds.classes[ds.test.labels[5]]
    # rank by logits: a trained model's float32 similarities saturate to 1.0 and tie
    logits = model.score_all(torch.as_tensor(ds.test.text_matrix()[5:6]), torch.as_tensor(ds.test.images), logits=True)[
        0
    ]
    sims = torch.sigmoid(logits)
    order = logits.argsort(descending=True, stable=True)[:7]
    assert [r["id"] for r in res["results"]] == [ds.test.image_ids[i] for i in order]
    np.testing.assert_allclose([r["similarity"] for r in res["results"]], sims[order].numpy(), rtol=1e-5)
    assert [r["class"] for r in res["results"]] == [ds.classes[ds.test.labels[i]] for i in order]


def test_query_by_image_id_and_table_output(capsys, trained, indexes):
    model, ds = trained["model"], trained["dataset"]
    rc, out, _ = query(capsys, trained, indexes["texts"], "--image-id", "te7", "--top-k", "5")
    assert rc == 0
    logits = model.score_all(torch.as_tensor(ds.test.text_matrix()), torch.as_tensor(ds.test.images[7:8]), logits=True)[
        :, 0
    ]
    sims = torch.sigmoid(logits)
    order = logits.argsort(descending=True, stable=True)[:5]
    lines = out.strip().splitlines()
    assert lines[0] == f"query: image id te7 ({ds.classes[ds.test.labels[7]]})"
    table = lines[-5:]
    for line, i in zip(table, order.tolist(), strict=True):
        rank, tid, sim, logit, cls = line.split()
        assert tid == ds.test.text_ids[i] and cls == ds.classes[ds.test.labels[i]]
        assert float(sim) == pytest.approx(sims[i].item(), abs=2e-6)


def test_query_free_text(capsys, trained, indexes):
    model, ds = trained["model"], trained["dataset"]
    words = [w for w in ds.vocab if w.endswith("_t2")][:6]
    rc, out, _ = query(
        capsys, trained, indexes["images"], "--text", " ".join(words + ["zebra", "Qwerty"]), "--top-k", "10"
    )
    assert rc == 0
    assert "unknown words (not in the model's vocabulary, ignored): qwerty, zebra" in out
    assert "(6 known words)" in out
    rc, out, _ = query(capsys, trained, indexes["images"], "--text", " ".join(words), "--json")
    res = json.loads(out)
    # the same text preparation as training: bag-of-words over the vocabulary, then text_features
    x = torch.as_tensor(text_features(bag_of_words([words], ds.vocab)))
    order = model.score_all(x, torch.as_tensor(ds.test.images), logits=True)[0].argsort(descending=True, stable=True)[
        :10
    ]
    assert [r["id"] for r in res["results"]] == [ds.test.image_ids[i] for i in order]
    # class-2 words find class-2 images (or their twins, class 3, whose images are close by design)
    assert sum(r["class"] in ("class2", "class3") for r in res["results"]) >= 7


def test_query_errors(capsys, trained, indexes, tmp_path):
    rc, _, err = query(capsys, trained, indexes["images"], "--text", "zebra qwerty")
    assert rc == 2 and "has no word of the model's vocabulary" in err and "unknown: qwerty, zebra" in err
    rc, _, err = query(capsys, trained, indexes["images"], "--image-id", "te1")
    assert rc == 2 and "this index holds images: an image query needs an index built with --side texts" in err
    rc, _, err = query(capsys, trained, indexes["images"], "--text-id", "nope")
    assert rc == 2 and "text id 'nope' is not in the index" in err
    # another model (one weight changed) is refused
    state = load_checkpoint(trained["ckpt"])
    state["model"]["head.fc.bias"] = state["model"]["head.fc.bias"] + 1e-3
    other = tmp_path / "other.pt"
    save_checkpoint(other, state)
    rc = main(["search", "query", "--index", indexes["images"], "--checkpoint", str(other), "--text-id", "te1"])
    err = capsys.readouterr().err
    assert rc == 2 and "was built with model" in err and "rebuild the index" in err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not an index")
    rc, _, err = query(capsys, trained, str(bad), "--text-id", "te1")
    assert rc == 2 and "not a search index" in err


def test_two_stage_query_and_contact_sheet(capsys, trained, indexes, tmp_path):
    import matplotlib.pyplot as plt

    ds = trained["dataset"]
    rc, out, _ = query(capsys, trained, indexes["images"], "--text-id", "te3", "--top-k", "5", "--json")
    exhaustive = json.loads(out)
    root = tmp_path / "raw"
    first = exhaustive["results"][0]
    (root / "images" / first["class"]).mkdir(parents=True)
    plt.imsave(root / "images" / first["class"] / f"{first['id']}.png", np.random.default_rng(0).random((12, 16, 3)))
    sheet = tmp_path / "sheet.png"
    rc, out, _ = query(
        capsys,
        trained,
        indexes["images"],
        "--text-id",
        "te3",
        "--top-k",
        "5",
        "--shortlist",
        "60",
        "--stage1",
        "layer1",
        "--contact-sheet",
        str(sheet),
        "--root",
        str(root),
        "--json",
    )
    assert rc == 0
    res = json.loads(out)
    assert res["mode"] == "two-stage (layer1 shortlist of 60)"
    assert res["contact_sheet"] == str(sheet)
    img = plt.imread(sheet)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert data_images.find_image_file(root, first["id"], first["class"]) is not None
    # a two-stage top 5 is a re-ranked subset: its scores are exact full-model scores
    by_id = {r["id"]: r["similarity"] for r in exhaustive["results"]}
    for r in res["results"]:
        if r["id"] in by_id:
            assert r["similarity"] == pytest.approx(by_id[r["id"]], abs=1e-7)
    assert len(ds.test) == 200


# ----------------------------------------------------------------------------------------------- helpers
def test_prepare_query_text_english():
    vocab = ["river", "bank", "money", "the"]
    q = index_mod.prepare_query_text("The river-bank, the MONEY! zebra a", vocab, "en", {"the"})
    assert q["known"] == ["river", "bank", "money"]
    assert q["unknown_words"] == ["zebra"] and q["stopwords_ignored"] == ["the"]
    np.testing.assert_allclose(q["features"], text_features(bag_of_words([["river", "bank", "money"]], vocab)))
    with pytest.raises(ValueError, match="no word of the model's vocabulary.*stop words ignored: the"):
        index_mod.prepare_query_text("the the", vocab, "en", {"the"})


def test_find_image_file(tmp_path):
    (tmp_path / "images" / "art").mkdir(parents=True)
    (tmp_path / "images" / "art" / "x1.jpg").write_bytes(b"")
    (tmp_path / "images" / "x2.PNG").write_bytes(b"")
    assert data_images.find_image_file(tmp_path, "x1", "art") == tmp_path / "images" / "art" / "x1.jpg"
    assert data_images.find_image_file(tmp_path, "x1", "music") is None
    assert data_images.find_image_file(tmp_path, "x2", "art") == tmp_path / "images" / "x2.PNG"
    assert data_images.find_image_file(tmp_path, "../images/x2", None) is None
    assert data_images.find_image_file(None, "x1", "art") is None


def test_model_hash_tracks_weights():
    a = make_model(8, 2, "n", seed=1)
    b = make_model(8, 2, "n", seed=1)
    assert index_mod.model_hash(a) == index_mod.model_hash(b)
    with torch.no_grad():
        b.head.fc.bias += 1e-9
    assert index_mod.model_hash(a) != index_mod.model_hash(b)


# ----------------------------------------------------------------------------- FAISS beside the search index
def test_faiss_index_beside_the_search_index_returns_the_exhaustive_top_k(capsys, trained, indexes, tmp_path):
    pytest.importorskip("faiss")  # in [dev]: the tests run it
    from scanet.ann import ann_path_for
    from scanet.index import load_index

    index = load_index(indexes["images"])  # built by the fixture with the default --ann auto: flat here
    assert index["ann"]["kind"] == "flat" and index["ann"]["stage1"] == "layer2-mean"
    assert ann_path_for(indexes["images"]).is_file() and index["reference_attention"]["text"].shape == (
        index["common_dim"],
    )
    hnsw = str(tmp_path / "hnsw.pt")
    assert main(index_argv(trained, "images", "--out", hnsw, "--ann", "hnsw")) == 0
    assert "FAISS hnsw index of 200 layer2-mean vectors" in capsys.readouterr().out
    for qid in ("te0", "te3", "te11", "te42", "te150"):
        rc, out, _ = query(
            capsys, trained, indexes["images"], "--text-id", qid, "--top-k", "10", "--shortlist", "0", "--json"
        )
        exhaustive = json.loads(out)
        assert rc == 0 and exhaustive["mode"] == "exhaustive"
        for path, kind in ((indexes["images"], "flat"), (hnsw, "hnsw")):
            rc, out, _ = query(capsys, trained, path, "--text-id", qid, "--top-k", "10", "--shortlist", "60", "--json")
            res = json.loads(out)
            assert rc == 0 and res["mode"] == f"two-stage (FAISS {kind} layer2-mean shortlist of 60)"
            assert [r["id"] for r in res["results"]] == [r["id"] for r in exhaustive["results"]], (qid, kind)
        # the flat FAISS shortlist is the exact GEMM shortlist of the same score
        rc, out, _ = query(
            capsys, trained, indexes["images"], "--text-id", qid, "--top-k", "10", "--shortlist", "20", "--json"
        )
        faiss_top = json.loads(out)
        rc, out, _ = query(
            capsys,
            trained,
            indexes["images"],
            "--text-id",
            qid,
            "--top-k",
            "10",
            "--shortlist",
            "20",
            "--no-ann",
            "--stage1",
            "layer2-mean",
            "--json",
        )
        gemm_top = json.loads(out)
        assert gemm_top["mode"] == "two-stage (layer2-mean shortlist of 20)"
        assert [r["id"] for r in faiss_top["results"]] == [r["id"] for r in gemm_top["results"]]


def test_faiss_index_of_another_model_or_index_is_refused(capsys, trained, indexes, tmp_path):
    pytest.importorskip("faiss")
    import shutil

    from scanet.index import load_ann, load_index

    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    for path, kind in ((a, "flat"), (b, "hnsw")):
        assert main(index_argv(trained, "images", "--out", str(path), "--ann", kind)) == 0
    capsys.readouterr()
    # other weights: ANNIndex.load's model-hash check
    model, _ = load_model(trained["ckpt"], trained["dataset"])
    with torch.no_grad():
        model.head.fc.bias += 1e-3
    with pytest.raises(ValueError, match="was built with model .* rebuild the index"):
        load_ann(load_index(a), a, model)
    # a FAISS file that is not the one built with this search index (same model, another index)
    shutil.copy(b.with_suffix(".faiss"), a.with_suffix(".faiss"))
    rc, _, err = query(capsys, trained, str(a), "--text-id", "te1", "--shortlist", "30")
    assert rc == 2 and "is not the FAISS index built with" in err
    rc, out, _ = query(capsys, trained, str(a), "--text-id", "te1", "--shortlist", "30", "--no-ann", "--json")
    assert rc == 0 and json.loads(out)["mode"] == "two-stage (layer1 shortlist of 30)"
    a.with_suffix(".faiss").unlink()
    rc, _, err = query(capsys, trained, str(a), "--text-id", "te1", "--shortlist", "30")
    assert rc == 2 and "which is missing" in err
    # --ann none: no FAISS index recorded, the exact GEMM shortlist
    c = tmp_path / "c.pt"
    assert main(index_argv(trained, "images", "--out", str(c), "--ann", "none")) == 0
    capsys.readouterr()
    assert load_index(c)["ann"] is None and not c.with_suffix(".faiss").exists()
    rc, out, _ = query(capsys, trained, str(c), "--text-id", "te1", "--shortlist", "30", "--json")
    assert rc == 0 and json.loads(out)["mode"] == "two-stage (layer1 shortlist of 30)"
