"""Helpers shared by several test modules (test modules never import each other).

``make_model`` / ``make_items`` / ``encode``: random float64 SCANet models and items for the all-pairs scoring
and retrieval tests.
"""

import numpy as np
import scipy.sparse as sp
import torch

from scanet.config import ModelConfig
from scanet.model import SCANet

V, D = 10, 5  # vocabulary and image feature sizes of the test models


def make_model(N, layers=2, scale="n", seed=0, device="cpu"):
    """A float64 SCANet with random weights: encoder FC weights ~ N(0, 1) so that items differ clearly;
    co-attention weights random normal, scaled so that every layer's pre-activations have std 2 on sample items
    (attention maps peaked but not one-hot: the regime a trained model is in); biases ~ N(0, 0.5^2) (the
    head's too), so no term of the logit is negligible."""
    torch.manual_seed(seed)  # the modules' own initialization (ChebConv weights, ...)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    A = sp.random(V, V, density=0.3, random_state=rng)
    model = SCANet(
        V,
        D,
        sp.csr_matrix(0.2 * (A + A.T)),
        ModelConfig(common_dim=N, coattention_layers=layers, attention_scale=scale, dropout=0.5),
    )
    model = model.double()
    with torch.no_grad():
        for fc in (model.text_encoder.fc, model.image_encoder.fc):  # items that differ clearly
            fc.weight.copy_(torch.randn(fc.weight.shape, generator=gen, dtype=torch.float64))
        for fc in list(model.coattention.text_fc) + list(model.coattention.image_fc):
            fc.weight.copy_(torch.randn(N, N, generator=gen, dtype=torch.float64) * (2.0 / N**0.5))
            fc.bias.copy_(0.5 * torch.randn(N, generator=gen, dtype=torch.float64))
        model.head.fc.weight.copy_(torch.randn(1, N, generator=gen, dtype=torch.float64) / N**0.5)
        f_t, f_i = encode(model, *make_items(8, 8, seed=seed + 1))  # 8 sample pairs (text k, image k)
        for k in range(layers):
            for fc, f in ((model.coattention.text_fc[k], f_t), (model.coattention.image_fc[k], f_i)):
                fc.weight.mul_(2.0 / (f @ fc.weight.T).std().clamp_min(1e-12))
            f_t, f_i = model.coattention.layer(k, f_t, f_i)
        # With scale "1" the pair-dependent part of the logit is ~|f|^2 / N^4 (each layer shrinks the features
        # by ~1/N): a bias of 0.5 would swamp it in fp32, so those models get none.
        model.head.fc.bias.fill_(float(0.5 * torch.randn(1, generator=gen)) if scale == "n" else 0.0)
    return model.eval().to(device)


def make_items(n_text, n_image, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed + 1000)
    bow = torch.rand(n_text, V, generator=gen, dtype=torch.float64)
    image = torch.randn(n_image, D, generator=gen, dtype=torch.float64)
    return bow.to(device), image.to(device)


@torch.no_grad()
def encode(model, bow, image):
    return model.encode_text(bow), model.encode_image(image)


def synthetic_preset(**train):
    """The synthetic preset with its TrainConfig fields replaced (tests/test_train.py, test_model_selection.py)."""
    import dataclasses

    from scanet.config import get_preset

    p = get_preset("synthetic")
    return dataclasses.replace(p, train=dataclasses.replace(p.train, **train))
