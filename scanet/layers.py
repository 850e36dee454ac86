"""The eager layers of SCANet, one module per part (PyG-style operator classes over scanet.reference's ops).

    ChebConv            act(sum_k T_k(L~) x W_k + b): Chebyshev graph convolution over the word graph
    TextEncoder         ChebConv stack -> dropout -> FC: bag-of-words (B, V) -> f_T (B, N)
    ImageEncoder        standardize -> FC: image feature (B, D) -> f_I (B, N)
    StackedCoAttention  eqs. 4-9: p_T = softmax(relu(W_T f_T + b_T)), f_I <- p_T * f_I (and symmetrically)
    SimilarityHead      dropout -> FC(f_T * f_I) -> one logit

scanet.model assembles them into SCANet; scanet.fused subclasses ChebConv and StackedCoAttention with the fused
ops (same constructor, parameters and state_dict). Imports: reference -> layers -> {model, fused}.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from scanet import reference


class ChebConv(nn.Module):
    """Chebyshev graph convolution (Defferrard et al. 2016): act(sum_k T_k(L~) x W_k + b).

    The Laplacian is not a parameter: it is prepared once (scanet.data.graph, then a scanet.laplacian.Laplacian
    owned by the model) and passed to ``forward``, as in PyG's ChebConv; a raw torch CSR works too.
    x: (B, V, in_channels) -> (B, V, out_channels).
    """

    op: Callable[..., torch.Tensor] = staticmethod(reference.cheb_conv)  # fused/ swaps in its own

    def __init__(
        self, in_channels: int, out_channels: int, K: int = 3, bias: bool = True, activation: str | None = "relu"
    ):
        super().__init__()
        if K < 1 or in_channels < 1 or out_channels < 1:
            raise ValueError(
                f"ChebConv needs K, in_channels, out_channels >= 1, got {K}, {in_channels}, {out_channels}"
            )
        self.in_channels, self.out_channels, self.K, self.activation = in_channels, out_channels, K, activation
        self.weight = nn.Parameter(torch.empty(K, in_channels, out_channels))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        # Glorot per term, plus the identity on T_0: with one channel a random negative T_0 weight would let the
        # ReLU zero the whole (non-negative) bag-of-words signal at step 0.
        bound = math.sqrt(6.0 / (self.in_channels + self.out_channels)) / self.K
        nn.init.uniform_(self.weight, -bound, bound)
        with torch.no_grad():
            d = min(self.in_channels, self.out_channels)
            self.weight[0, :d, :d] += torch.eye(d)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, laplacian) -> torch.Tensor:
        return type(self).op(laplacian, x, self.weight, self.bias, self.activation)

    def extra_repr(self):
        return f"{self.in_channels}, {self.out_channels}, K={self.K}, activation={self.activation}"


def _native(conv, x) -> bool:
    """Does this (fused) ChebConv run the native op on x (dropout in its epilogue, a chosen output dtype)?"""
    return getattr(conv, "fuses_dropout", None) is not None and conv.fuses_dropout(x)


def _activation(name: str) -> nn.Module:
    table = {"none": nn.Identity, "relu": nn.ReLU, "tanh": nn.Tanh}
    if name not in table:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(table)}")
    return table[name]()


class TextEncoder(nn.Module):
    """Graph convolutions over the word graph, then dropout and one FC layer into the common space.

    When the last convolution can apply the dropout itself (a fused ChebConv on the native CPU backend:
    ``conv.fuses_dropout(x)``), it does, in its epilogue, with ``self.dropout.p`` and ``self.training``: the same
    distribution as ``nn.Dropout`` without its separate mask pass (13% of the Wiki step), reproducible by seed
    (the mask's seed is drawn from torch's default generator). Otherwise ``self.dropout`` runs as before. The
    module and its state_dict are the same either way (nn.Dropout has no state). Under autocast on that backend
    the hidden layers' outputs stay float32 (only the last one, which feeds the bf16 FC, is bf16).

    ``forward(texts, laplacian, text_index=idx)`` is ``forward(texts[idx], laplacian)`` for a fixed (N, V) text
    matrix. With two or more layers, a first conv that offers ``on_cached_basis`` (the fused ChebConv on the
    native backend) computes layer 1 from its per-text Chebyshev basis cache (scanet.fused._basis_cache): no
    SpMM, no gather, the same numbers (tested bitwise). Otherwise texts[idx] is gathered and run as before.
    """

    def __init__(
        self,
        vocab_size: int,
        out_dim: int,
        channels=(1, 1),
        K: int = 3,
        dropout: float = 0.2,
        activation: str = "none",
        conv_cls=ChebConv,
    ):
        super().__init__()
        self.vocab_size = vocab_size
        dims = (1,) + tuple(channels)
        self.convs = nn.ModuleList(conv_cls(dims[i], dims[i + 1], K) for i in range(len(channels)))
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(vocab_size * dims[-1], out_dim)
        self.act = _activation(activation)

    def forward(self, bow: torch.Tensor, laplacian, text_index: torch.Tensor | None = None) -> torch.Tensor:
        convs = list(self.convs)
        x = None
        if text_index is not None:  # bow is the whole (N, V) text matrix; the batch is bow[text_index]
            on_cache = getattr(convs[0], "on_cached_basis", None)
            if on_cache is not None and len(convs) > 1:  # one layer keeps its fused dropout: the SpMM path
                x = on_cache(bow, laplacian, text_index)
            if x is None:
                bow = bow[text_index]
            else:
                convs = convs[1:]
        if x is None:
            x = bow.unsqueeze(-1)  # (B, V, 1): one signal per text
        for conv in convs[:-1]:
            if _native(conv, x) and x.dtype != torch.float64 and torch.is_autocast_enabled(x.device.type):
                x = conv(x, laplacian, out_dtype=torch.float32)  # hidden signal float32: read in place
            else:
                x = conv(x, laplacian)
        last = convs[-1]
        if self.dropout.p > 0.0 and _native(last, x):
            h = last(x, laplacian, dropout_p=self.dropout.p, training=self.training).flatten(1)
        else:
            h = self.dropout(last(x, laplacian).flatten(1))
        return self.act(self.fc(h))


class ImageEncoder(nn.Module):
    """Standardize the fixed CNN (or SIFT) feature, then one FC layer into the common space.

    The per-dimension mean and standard deviation are buffers set once from the training images
    (``set_input_statistics``), so they travel with the checkpoint. Raw SIFT-BoVW histograms sum to 1 (entries
    near 1/128): unstandardized, the image path would start 100x smaller than the text path.
    """

    input_mean: torch.Tensor  # buffers (register_buffer), declared for the type checker
    input_std: torch.Tensor

    def __init__(self, in_dim: int, out_dim: int, activation: str = "none"):
        super().__init__()
        self.register_buffer("input_mean", torch.zeros(in_dim))
        self.register_buffer("input_std", torch.ones(in_dim))
        self.fc = nn.Linear(in_dim, out_dim)
        self.act = _activation(activation)

    @torch.no_grad()
    def set_input_statistics(self, images) -> None:
        x = torch.as_tensor(images, dtype=self.input_mean.dtype, device=self.input_mean.device)
        self.input_mean.copy_(x.mean(0))
        self.input_std.copy_(x.std(0).clamp_min(1e-6) if x.shape[0] > 1 else torch.ones_like(self.input_std))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc((image - self.input_mean) / self.input_std))


class StackedCoAttention(nn.Module):
    """``num_layers`` co-attention layers, exactly eqs. 4-9 (times ``scale``, see below).

    Layer k: p_T = softmax(relu(text_fc[k](f_T))), p_I = softmax(relu(image_fc[k](f_I))),
    then f_T <- p_I * f_T and f_I <- p_T * f_I. Each step is ``reference.coattention(f, g, W, b)``.

    ``scale`` multiplies each attention map. The paper's equations have scale 1, so every layer shrinks the
    features by about 1/N (a softmax over N=1024 entries averages 1/N) and two layers leave the head's input
    near 1e-12 of its start. With scale N, a uniform attention is the identity and training is well
    conditioned; ``ModelConfig.attention_scale`` chooses ("n", the default, or "1").
    """

    op = staticmethod(reference.coattention)

    def __init__(self, dim: int, num_layers: int = 2, scale: float = 1.0):
        super().__init__()
        self.dim, self.num_layers, self.scale = dim, num_layers, float(scale)
        self.text_fc = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_layers))
        self.image_fc = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_layers))

    def layer(self, k: int, f_t: torch.Tensor, f_i: torch.Tensor):
        op = type(self).op
        new_i = op(f_t, f_i, self.text_fc[k].weight, self.text_fc[k].bias, scale=self.scale)  # p_T * f_I
        new_t = op(f_i, f_t, self.image_fc[k].weight, self.image_fc[k].bias, scale=self.scale)  # p_I * f_T
        return new_t, new_i

    def attention(self, k: int, modality: str, f: torch.Tensor) -> torch.Tensor:
        """The (scaled) attention map of layer k computed from one modality's features: (M, N)."""
        if modality not in ("text", "image"):
            raise ValueError(f"modality must be 'text' or 'image', got {modality!r}")
        fc = (self.text_fc if modality == "text" else self.image_fc)[k]
        return reference.attention_map(f, fc.weight, fc.bias, self.scale)

    def forward(self, f_t: torch.Tensor, f_i: torch.Tensor):
        for k in range(self.num_layers):
            f_t, f_i = self.layer(k, f_t, f_i)
        return f_t, f_i


class SimilarityHead(nn.Module):
    """Similarity of a pair: dropout, then one FC layer on the Hadamard product f_T * f_I, one logit.

    The paper combines the two attended features with "an inner product layer" and a sigmoid. In its
    TF/Caffe vocabulary an inner-product layer is a fully connected layer; the same group's public code
    (SCKR, 2019) scores a pair as FC(d1 * d2). We read it the same way: logit = w . (f_T * f_I) + b, a
    learned weighted inner product. Being linear in the Hadamard product, it lets all-pairs scoring stream.
    """

    def __init__(self, dim: int, dropout: float = 0.2):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, 1)

    def forward(self, f_t: torch.Tensor, f_i: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(f_t * f_i)).squeeze(-1)
