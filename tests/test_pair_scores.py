"""All-pairs scoring (scanet.fused.pair_scores, scanet.kernels.pair_scores) against the model itself.

The oracle is ``SCANet.logits`` / ``forward`` run on every (text, image) pair of a float64 model: exactly what
retrieval ranks. CPU runs the Triton kernel under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
so item counts stay tiny and N large only with 2-3 items a side; CUDA, when present, runs the same cases and
a retrieval-sized one.
"""

import warnings

import pytest
import torch

from conftest import devices
from helpers import encode, make_items, make_model
from scanet import reference as impl
from scanet.fused import pair_scores

CUDA = torch.cuda.is_available()

# max |fused - float64| / max |float64 logit - head bias|, the part of the logit that depends on the pair.
# Measured on CPU (interpreter, fp32 kernel): <= 8e-6 for N <= 1024; the bound leaves room for other summation
# orders on a GPU. With scale "1" that part can be ~1e-4 of the bias, so the fp32 rounding of the logit itself
# (2^-24 of |logit|) is allowed on top: FP32_FLOOR * max |logit|.
TOL = 3e-5
FP32_FLOOR = 5e-7


@torch.no_grad()
def per_pair_reference(model, bow, image):
    """(Nt, Ni) logits and similarities from the model's own forward on each pair (float64)."""
    ti, ii = torch.meshgrid(torch.arange(len(bow)), torch.arange(len(image)), indexing="ij")
    ti, ii = ti.reshape(-1).to(bow.device), ii.reshape(-1).to(bow.device)
    logits = model.logits(bow[ti], image[ii]).reshape(len(bow), len(image))
    sims = model(bow[ti], image[ii]).reshape(len(bow), len(image))
    return logits, sims


def rel_err(actual, expected, model):
    """max |actual - expected| / max |expected - b|, less the fp32 rounding floor of the logits."""
    b = model.head.fc.bias.detach().item()
    actual, expected = actual.double().cpu(), expected.double().cpu()
    err = ((actual - expected).abs().max() - FP32_FLOOR * expected.abs().max()).clamp_min(0.0)
    return (err / (expected - b).abs().max().clamp_min(1e-30)).item()


# (N, Nt, Ni): N of one N-tile (7, ragged), several (256: two CPU tiles; 500: ragged last tile; 1024);
# item counts that are not powers of two; one item on a side (tiles of 1 x 16 and 32 x 1 pairs); large N only
# with 2-3 items a side (interpreter cost).
CASES = [(7, 5, 3), (7, 1, 1), (7, 20, 1), (256, 5, 7), (500, 3, 2), (1024, 2, 3)]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("scale", ["n", "1"])
@pytest.mark.parametrize("layers", [0, 1, 2])
@pytest.mark.parametrize("N,n_text,n_image", CASES)
def test_matches_forward_on_every_pair(device, scale, layers, N, n_text, n_image):
    model = make_model(N, layers, scale, seed=N + layers, device=device)
    bow, image = make_items(n_text, n_image, seed=N, device=device)
    ref_logits, ref_sims = per_pair_reference(model, bow, image)
    f_t, f_i = encode(model, bow, image)
    out = pair_scores(model, f_t.float(), f_i.float())  # the fp32 inputs the kernel computes with
    assert out.shape == (n_text, n_image) and out.dtype == torch.float32
    assert rel_err(out, ref_logits, model) < TOL
    # forward = sigmoid(logit), and sigmoid' <= 1/4: the logit bound carries over.
    b = model.head.fc.bias.detach().item()
    atol = 0.25 * (TOL * (ref_logits - b).abs().max().item() + FP32_FLOOR * ref_logits.abs().max().item())
    assert (torch.sigmoid(out.double()) - ref_sims).abs().max().item() <= atol
    if layers == 2 and N <= 500:  # the pair-list layout of the same kernel
        out_list = pair_scores(model, f_t, f_i, layout="list")
        assert out_list.dtype == torch.float64 and rel_err(out_list, ref_logits, model) < TOL


@pytest.mark.parametrize("device", devices())
def test_many_programs_ragged_tiles_and_groups(device):
    """Forced small tiles: 3 x 2 programs in groups of 2 text blocks (the last group ragged), 3 N-tiles with a
    ragged last one (online-softmax rescaling across tiles), 3 K-tiles; then 5 x 1 programs of 2 x 8 pairs."""
    N, n_text, n_image = 40, 9, 7
    model = make_model(N, 2, "n", seed=3, device=device)
    bow, image = make_items(n_text, n_image, seed=3, device=device)
    ref, _ = per_pair_reference(model, bow, image)
    f_t, f_i = encode(model, bow, image)
    blocks = dict(BLOCK_I=4, BLOCK_J=4, BLOCK_N=16, BLOCK_K=16, GROUP_I=2)
    assert rel_err(pair_scores(model, f_t, f_i, block_sizes=blocks), ref, model) < TOL
    blocks = dict(BLOCK_I=2, BLOCK_J=8, BLOCK_N=16, BLOCK_K=16, GROUP_I=8)
    assert rel_err(pair_scores(model, f_t, f_i, block_sizes=blocks), ref, model) < TOL


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("layers", [0, 1, 2])
def test_pair_list(device, layers):
    """Arbitrary pairs (repeats, any order, more than one program) equal the matching entries of all pairs."""
    N, n_text, n_image = 33, 6, 9
    model = make_model(N, layers, "n", seed=5, device=device)
    bow, image = make_items(n_text, n_image, seed=5, device=device)
    ref, _ = per_pair_reference(model, bow, image)
    f_t, f_i = encode(model, bow, image)
    gen = torch.Generator().manual_seed(7)
    ti = torch.randint(0, n_text, (37,), generator=gen).to(device)
    ii = torch.randint(0, n_image, (37,), generator=gen).to(device)
    out = pair_scores(model, f_t, f_i, text_index=ti, image_index=ii, block_sizes=dict(BLOCK_I=16, BLOCK_J=1))
    assert out.shape == (37,)
    assert rel_err(out, ref[ti, ii], model) < TOL
    eager = impl.pair_logits(model, f_t, f_i, text_index=ti, image_index=ii, chunk_pairs=5)
    torch.testing.assert_close(eager.cpu(), ref[ti, ii].cpu(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", devices())
def test_precomputed_attention_is_used(device):
    """a1_t / a1_i given (as a search index stores them) give the same scores as computing them; wrong ones
    change the scores (so they are really used)."""
    model = make_model(24, 2, "n", seed=11, device=device)
    f_t, f_i = encode(model, *make_items(4, 5, seed=11, device=device))
    a1_t, a1_i = impl.layer1_attention(model, f_t, "text"), impl.layer1_attention(model, f_i, "image")
    base = pair_scores(model, f_t, f_i)
    torch.testing.assert_close(pair_scores(model, f_t, f_i, a1_t=a1_t, a1_i=a1_i), base)
    assert not torch.allclose(pair_scores(model, f_t, f_i, a1_t=a1_t.flip(0), a1_i=a1_i), base)


@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
def test_chunked_cpu_path(chunk_size):
    """SCANet.score_all's eager chunked path (the CPU default) equals per-pair forward for any chunk size, and
    the fused scorer equals it; scorer="fused" routes score_all through the kernel."""
    N, n_text, n_image = 64, 7, 5
    model = make_model(N, 2, "n", seed=13)
    bow, image = make_items(n_text, n_image, seed=13)
    ref_logits, ref_sims = per_pair_reference(model, bow, image)
    eager = model.score_all(bow, image, chunk_size=chunk_size)  # "auto" on CPU: the eager path
    torch.testing.assert_close(eager, ref_sims, rtol=1e-12, atol=1e-12)
    fused = model.score_all(bow, image, chunk_size=chunk_size, scorer="fused")
    torch.testing.assert_close(fused, ref_sims, rtol=0, atol=1e-5)
    assert not torch.equal(fused, eager)  # it really went through the fp32 kernel
    torch.testing.assert_close(
        model.score_all(bow, image, chunk_size=chunk_size, scorer="eager"), eager, rtol=0, atol=0
    )
    with pytest.raises(ValueError, match="scorer must be one of"):
        model.score_all(bow, image, scorer="always")


def test_eager_chunks_any_size():
    f_model = make_model(16, 2, "1", seed=17)
    f_t, f_i = encode(f_model, *make_items(5, 4, seed=17))
    ref = impl.pair_logits(f_model, f_t, f_i, chunk_pairs=10**6)
    for chunk in (1, 3, 4, 7):
        torch.testing.assert_close(impl.pair_logits(f_model, f_t, f_i, chunk_pairs=chunk), ref, rtol=1e-13, atol=1e-13)


def test_three_layers_fall_back_to_eager():
    model = make_model(12, 3, "n", seed=19)
    bow, image = make_items(4, 3, seed=19)
    ref, _ = per_pair_reference(model, bow, image)
    f_t, f_i = encode(model, bow, image)
    with pytest.warns(UserWarning, match="this model has 3; scoring with the eager chunked path"):
        out = pair_scores(model, f_t, f_i)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    with warnings.catch_warnings():  # score_all keeps the eager path for L = 3
        warnings.simplefilter("error")
        torch.testing.assert_close(
            model.score_all(bow, image, scorer="fused"), torch.sigmoid(ref), rtol=1e-12, atol=1e-12
        )


def test_bad_inputs_raise_clear_errors(monkeypatch):
    model = make_model(8, 2, "n", seed=23)
    f_t, f_i = encode(model, *make_items(3, 4, seed=23))
    with pytest.raises(ValueError, match="N = 8 columns"):
        pair_scores(model, f_t[:, :5], f_i)
    with pytest.raises(ValueError, match=r"f_i must have shape \(items, N\)"):
        pair_scores(model, f_t, f_i[0])
    with pytest.raises(ValueError, match="one dtype"):
        pair_scores(model, f_t, f_i.float())
    with pytest.raises(ValueError, match="precision must be one of"):
        pair_scores(model, f_t, f_i, precision="fp8")
    with pytest.raises(ValueError, match=r"image_index has entries out of range \[0, 4\)"):
        pair_scores(model, f_t, f_i, text_index=torch.tensor([0, 1]), image_index=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="given together"):
        pair_scores(model, f_t, f_i, text_index=torch.tensor([0]))
    with pytest.raises(ValueError, match="a1_t must be a tensor of the shape"):
        pair_scores(model, f_t, f_i, a1_t=f_t[:2])
    with pytest.raises(ValueError, match="BLOCK_N must be a power of two"):
        pair_scores(model, f_t, f_i, block_sizes=dict(BLOCK_N=24))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors, or TRITON_INTERPRET=1"):
        pair_scores(model, f_t, f_i, strict=True)
    # not strict: CPU without the interpreter falls back to the oracle, like the other fused ops
    torch.testing.assert_close(pair_scores(model, f_t, f_i), impl.pair_logits(model, f_t, f_i), rtol=0, atol=0)


@pytest.mark.skipif(not CUDA, reason="tf32/bf16 GEMM inputs and retrieval-sized shapes need a CUDA device")
@pytest.mark.parametrize("precision,tol", [("fp32", TOL), ("tf32", 5e-3), ("bf16", 2e-2)])
def test_cuda_retrieval_size_and_precisions(precision, tol):
    """693 x 693 pairs at N = 1024 against the eager chunked path in float64 on the GPU."""
    model = make_model(1024, 2, "n", seed=29, device="cuda")
    f_t, f_i = encode(model, *make_items(693, 693, seed=29, device="cuda"))
    ref = impl.pair_logits(model, f_t, f_i, chunk_pairs=1 << 16)
    out = pair_scores(model, f_t.float(), f_i.float(), precision=precision)
    assert rel_err(out, ref, model) < tol
    top_ref = ref.argsort(dim=1, descending=True)[:, :10]
    top = out.double().argsort(dim=1, descending=True)[:, :10]
    assert (top == top_ref).float().mean() > (0.99 if precision == "fp32" else 0.8)
