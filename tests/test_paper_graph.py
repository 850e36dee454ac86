"""The authors' group's word graph (``graph="paper"``): a directed kNN graph with self loops, in-degree
normalized, lmax 2; corpus word2vec for Wiki; the option's plumbing; and a model trained on the non-symmetric L~.
"""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scanet import data as sdata
from scanet.config import ModelConfig
from scanet.data.graph import (
    directed_knn_graph,
    nearest_neighbours,
    normalized_laplacian,
    word_graph,
)
from scanet.data.languages import train_word2vec
from scanet.laplacian import Laplacian
from scanet.model import SCANet
from test_wiki import WORDS, _write_fixture


@pytest.fixture
def embeddings():
    return np.random.default_rng(3).normal(size=(40, 6)).astype(np.float32)


@pytest.fixture
def vectors_file(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "vectors.txt"
    rows = [
        w + " " + " ".join(f"{v:.4f}" for v in rng.normal(size=8) + (3 if i < 5 else -3)) for i, w in enumerate(WORDS)
    ]
    path.write_text(f"{len(WORDS)} 8\n" + "\n".join(rows))
    return path


# --------------------------------------------------------------------------------------------------- graph
@pytest.mark.parametrize("k", [1, 3, 8])
def test_directed_graph_is_self_plus_k_most_similar(embeddings, k):
    W = directed_knn_graph(embeddings, k)
    assert (np.diff(W.indptr) == k + 1).all(), "exactly k + 1 entries a row before normalisation"
    assert (W.data == 1).all() and (W.diagonal() == 1).all()
    Xn = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    sim = Xn @ Xn.T
    np.fill_diagonal(sim, -np.inf)
    for i in range(len(embeddings)):
        assert set(W[i].indices) == {i} | set(np.argsort(-sim[i])[:k].tolist())
    assert abs(W - W.T).max() > 0, "not symmetrized"
    # the neighbour order is nearest first, as gensim's most_similar
    idx, dist = nearest_neighbours(embeddings, k)
    assert (np.diff(dist, axis=1) >= 0).all() and idx.shape == (len(embeddings), k)


def test_tiny_vocabularies():
    assert directed_knn_graph(np.ones((1, 3)), 8).toarray().tolist() == [[1.0]]
    assert (np.diff(directed_knn_graph(np.eye(3), 8).indptr) == 3).all()  # k capped at V - 1


def test_paper_laplacian_is_in_degree_normalized_and_lmax_two(embeddings):
    k = 4
    Lt, lm = word_graph(embeddings, k, None, "paper")
    assert lm == 2.0
    W = directed_knn_graph(embeddings, k).toarray().astype(np.float64)
    d_in = W.sum(axis=0)  # cnn_graph: d = W.sum(axis=0), the column sums
    assert (d_in >= 1).all() and not np.allclose(d_in, d_in[0])  # in-degrees differ; row sums are all k + 1
    expect = -W / np.sqrt(np.outer(d_in, d_in))  # L~ = L - I = -D^-1/2 W D^-1/2
    np.testing.assert_allclose(Lt.toarray(), expect, rtol=1e-6, atol=1e-7)
    L = normalized_laplacian(sp.csr_matrix(W), degree="column").toarray()
    np.testing.assert_allclose(Lt.toarray(), L - np.eye(len(W)), rtol=1e-6, atol=1e-7)
    assert (np.diff(Lt.indptr) == k + 1).all()  # the diagonal -1/d_i stays: the pattern of W
    assert np.abs(Lt.toarray() - Lt.toarray().T).max() > 1e-3
    assert not Laplacian(Lt).symmetric
    # an explicit number is taken as is; the symmetric default is unchanged (row degree = column degree)
    np.testing.assert_allclose(word_graph(embeddings, k, 2, "paper")[0].toarray(), Lt.toarray())
    Ws = sp.random(9, 9, density=0.4, random_state=0)
    Ws = Ws + Ws.T
    np.testing.assert_allclose(
        normalized_laplacian(Ws, degree="column").toarray(), normalized_laplacian(Ws).toarray(), atol=1e-12
    )
    S, lms = word_graph(embeddings, k, None, "symmetric")
    assert abs(S - S.T).max() < 1e-6 and 0 < lms <= 2


def test_graph_option_errors_name_the_key(embeddings):
    with pytest.raises(ValueError, match="graph must be one of symmetric, paper, got 'directed'"):
        word_graph(embeddings, 3, None, "directed")
    with pytest.raises(ValueError, match="graph='paper'.*lmax"):
        word_graph(embeddings, 3, "exact", "paper")
    with pytest.raises(ValueError, match="degree must be"):
        normalized_laplacian(sp.eye(3), degree="in")


# ------------------------------------------------------------------------------------------- preparation
def _prepare(root, out, vectors_file, **kw):
    kw.setdefault("embeddings", str(vectors_file))
    return sdata.prepare("wiki", root, out, vocab_size=100, knn=3, progress=lambda s: None, **kw)


def test_wiki_paper_graph_option_and_cache_key(tmp_path, vectors_file):
    root = tmp_path / "wiki"
    _write_fixture(root)
    default = _prepare(root, tmp_path / "a", vectors_file)
    paper = _prepare(root, tmp_path / "b", vectors_file, graph="paper")
    assert "graph" not in default.manifest["params"] and default.manifest["params"]["lmax"] == "exact"
    assert paper.manifest["params"]["graph"] == "paper" and paper.manifest["params"]["lmax"] == 2.0
    assert paper.fingerprint != default.fingerprint
    assert paper.vocab == default.vocab and paper.lmax == 2.0
    assert (np.diff(paper.laplacian.indptr) == 4).all()
    assert np.abs(paper.laplacian - paper.laplacian.T).max() > 0
    X = load_vectors(vectors_file, paper.vocab)
    np.testing.assert_allclose(paper.laplacian.toarray(), word_graph(X, 3, None, "paper")[0].toarray())
    # the same folder: switching the option rebuilds (stale), switching back rebuilds the default again
    msgs: list[str] = []
    again = sdata.prepare(
        "wiki",
        root,
        tmp_path / "a",
        vocab_size=100,
        knn=3,
        embeddings=str(vectors_file),
        graph="paper",
        progress=msgs.append,
    )
    assert any("stale" in m for m in msgs) and again.fingerprint == paper.fingerprint


def load_vectors(path, vocab):
    from scanet.data.embeddings import load_text_vectors

    return load_text_vectors(path).lookup(vocab)


def test_wiki_word2vec_is_deterministic_and_keyed(tmp_path, vectors_file):
    root = tmp_path / "wiki"
    _write_fixture(root)
    a = _prepare(root, tmp_path / "a", vectors_file, embeddings="word2vec", graph="paper")
    b = _prepare(root, tmp_path / "b", vectors_file, embeddings="word2vec", graph="paper")
    assert a.manifest["params"]["word2vec"] == {
        "dim": 50,
        "window": 5,
        "epochs": 5,
        "min_count": 5,
        "skip_gram": False,
        "seed": 0,
    }
    assert sorted(a.vocab) == sorted(WORDS)  # every fixture word occurs >= 5 times in the training texts
    assert a.vocab == b.vocab and a.fingerprint == b.fingerprint
    assert np.array_equal(a.laplacian.toarray(), b.laplacian.toarray())
    c = _prepare(root, tmp_path / "c", vectors_file, embeddings="word2vec", graph="paper", w2v_dim=8)
    assert c.fingerprint != a.fingerprint and c.manifest["params"]["word2vec"]["dim"] == 8
    docs = [list(WORDS[i : i + 4]) * 5 for i in range(0, 7)]
    v1, v2 = (train_word2vec(docs, dim=6, min_count=1, epochs=3, seed=5) for _ in range(2))
    assert v1.words == v2.words and np.array_equal(v1.vectors, v2.vectors)
    assert not np.array_equal(v1.vectors, train_word2vec(docs, dim=6, min_count=1, epochs=3, seed=6).vectors)


def test_bad_option_values_name_the_key(tmp_path, vectors_file):
    root = tmp_path / "wiki"
    _write_fixture(root)
    with pytest.raises(ValueError, match="graph must be one of"):
        _prepare(root, tmp_path / "p", vectors_file, graph="bogus")
    with pytest.raises(ValueError, match="graph='paper'.*lmax"):
        _prepare(root, tmp_path / "p", vectors_file, graph="paper", lmax="exact")
    with pytest.raises(ValueError, match="w2v_dim must be a positive integer, got 0"):
        _prepare(root, tmp_path / "p", vectors_file, embeddings="word2vec", w2v_dim=0)
    with pytest.raises(ValueError, match="w2v_sg must be"):
        _prepare(root, tmp_path / "p", vectors_file, w2v_sg="yes")
    with pytest.raises(ValueError, match="has no option 'grph'"):
        _prepare(root, tmp_path / "p", vectors_file, grph="paper")
    assert not (tmp_path / "p").exists(), "a refused option prepares nothing"


def test_train_and_evaluate_take_the_option(tmp_path, vectors_file):
    from scanet.cli._common import parse_options
    from scanet.config import get_preset

    assert parse_options(["graph=paper", "knn=3", "w2v_sg=True"]) == {"graph": "paper", "knn": 3, "w2v_sg": True}
    with pytest.raises(ValueError, match="--option 'graph' is not of the form KEY=VALUE"):
        parse_options(["graph"])
    root = tmp_path / "wiki"
    _write_fixture(root)
    preset = get_preset("wiki")
    opts = {"graph": "paper", "embeddings": str(vectors_file), "vocab_size": 100, "knn": 3}
    ds = sdata.dataset_for_preset(preset, root=root, prepared_dir=tmp_path / "prep", options=opts)
    assert ds.manifest["params"]["graph"] == "paper" and (np.diff(ds.laplacian.indptr) == 4).all()
    with pytest.raises(ValueError, match="do not apply to --data"):
        sdata.dataset_for_preset(preset, data=tmp_path / "prep" / "wiki", options={"graph": "paper"})


def test_cli_prepare_with_the_option(tmp_path, vectors_file, capsys):
    from scanet.cli import main

    root = tmp_path / "wiki"
    _write_fixture(root)
    argv = ["prepare", "wiki", "--root", str(root), "--out", str(tmp_path / "p"), "--knn", "3"]
    argv += ["--embeddings", str(vectors_file), "--option", "graph=paper"]
    assert main(argv) == 0
    from scanet.data.prepared import PreparedDataset

    ds = PreparedDataset.load(tmp_path / "p")
    assert ds.manifest["params"]["graph"] == "paper" and ds.lmax == 2.0
    assert main(argv[:-1] + ["graph=nope"]) == 2
    assert "graph must be one of" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ model on the L~
def _model_grads(model, bow, img, target):
    model.zero_grad()
    loss = torch.nn.functional.binary_cross_entropy(model(bow, img), target)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("path", ["eager", "fused", "native"])
def test_model_on_directed_graph_has_float64_gradients(path, monkeypatch):
    """SCANet on the paper graph's non-symmetric L~: loss and every parameter's gradient against the same model
    in float64 (the eager ops, whose backward is torch's own sparse autograd with L~^T)."""
    from scanet import native

    if path == "native":
        if not native.available():
            pytest.skip(f"native extension unavailable: {native.unavailable_reason()}")
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # fused on CPU without the interpreter: the native op
    V, D, N = 23, 7, 6
    rng = np.random.default_rng(4)
    Lt, _ = word_graph(rng.normal(size=(V, 5)).astype(np.float32), 3, None, "paper")
    cfg = ModelConfig(common_dim=12, cheb_k=3, gcn_channels=(2, 1), coattention_layers=2, dropout=0.0)
    torch.manual_seed(0)
    oracle = SCANet(V, D, Lt, cfg).double()
    model = SCANet(V, D, Lt, cfg, fused=path != "eager")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in oracle.state_dict().items()})
    assert not model.laplacian.symmetric and not oracle.laplacian.symmetric
    bow = torch.from_numpy(rng.poisson(0.7, size=(N, V)).astype(np.float32))
    img = torch.randn(N, D)
    target = torch.from_numpy(rng.integers(0, 2, size=N).astype(np.float32))
    loss64, g64 = _model_grads(oracle, bow.double(), img.double(), target.double())
    loss32, g32 = _model_grads(model, bow, img, target)
    assert set(g32) == set(g64) and any("text_encoder" in n for n in g64)
    torch.testing.assert_close(loss32.double(), loss64, rtol=1e-5, atol=1e-6)
    for n in g64:
        torch.testing.assert_close(g32[n].double(), g64[n], rtol=2e-4, atol=2e-6, msg=n)
    # and the transpose matters: the same gradients with L~ symmetrized differ
    sym = SCANet(V, D, (Lt + Lt.T) / 2, cfg).double()
    sym.load_state_dict({k: v for k, v in oracle.state_dict().items() if not k.startswith("laplacian.")}, strict=False)
    g_sym = _model_grads(sym, bow.double(), img.double(), target.double())[1]
    conv_w = [n for n in g64 if "text_encoder" in n and "weight" in n][0]
    assert not torch.allclose(g_sym[conv_w], g64[conv_w], rtol=1e-3)
