"""The eager model: score_all equals per-pair scoring, attention scale, errors."""

import pytest
import scipy.sparse as sp
import torch

from scanet.config import ModelConfig
from scanet.model import ChebConv, SCANet, StackedCoAttention


def _model(L=2, N=12, V=15, D=6, scale="n", seed=0):
    torch.manual_seed(seed)
    A = sp.random(V, V, density=0.3, random_state=seed)
    lap = 0.2 * (A + A.T) - 0.1 * sp.identity(V)
    cfg = ModelConfig(common_dim=N, coattention_layers=L, attention_scale=scale, dropout=0.2)
    return SCANet(V, D, lap, cfg).double().eval()


@pytest.mark.parametrize("layers", [0, 1, 2, 3])
@pytest.mark.parametrize("scale", ["n", "1"])
def test_score_all_equals_per_pair_scores(layers, scale):
    m = _model(L=layers, scale=scale)
    g = torch.Generator().manual_seed(1)
    texts = torch.rand(7, 15, generator=g, dtype=torch.float64)
    images = torch.randn(5, 6, generator=g, dtype=torch.float64)
    per_pair = torch.stack([m(texts[i].expand(5, -1), images) for i in range(7)])
    for chunk in (1, 3, 64):
        torch.testing.assert_close(m.score_all(texts, images, chunk_size=chunk), per_pair, rtol=1e-10, atol=1e-12)


def test_score_all_restores_training_mode_and_ignores_dropout():
    m = _model().train()
    t, i = torch.rand(3, 15, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    a = m.score_all(t, i)
    b = m.score_all(t, i)
    assert m.training
    torch.testing.assert_close(a, b)


def test_coattention_layer_is_the_paper_equations():
    co = StackedCoAttention(4, num_layers=1, scale=1.0).double()
    f_t, f_i = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    p_t = torch.softmax(torch.relu(co.text_fc[0](f_t)), -1)
    p_i = torch.softmax(torch.relu(co.image_fc[0](f_i)), -1)
    new_t, new_i = co(f_t, f_i)
    torch.testing.assert_close(new_t, p_i * f_t)
    torch.testing.assert_close(new_i, p_t * f_i)


def test_chebconv_starts_near_identity_on_t0():
    conv = ChebConv(1, 1, K=3)
    assert conv.weight[0, 0, 0] > 0.5  # the ReLU cannot zero a non-negative signal at step 0


def test_model_errors():
    with pytest.raises(ValueError, match="vocab_size"):
        SCANet(10, 4, sp.identity(9), ModelConfig(common_dim=4))
    with pytest.raises(ValueError, match="attention_scale"):
        SCANet(9, 4, sp.identity(9), ModelConfig(common_dim=4, attention_scale="x"))
    with pytest.raises(ValueError, match="activation"):
        SCANet(9, 4, sp.identity(9), ModelConfig(common_dim=4, encoder_activation="gelu"))
