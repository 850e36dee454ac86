"""SCANet (Lu, Yu et al., KSEM 2019) in eager PyTorch, one module per part.

    text  bag-of-words (B, V) -> ChebConv -> ChebConv -> dropout -> FC -> f_T (B, N)
    image feature (B, D)      -> FC                              -> f_I (B, N)
    stacked co-attention, layer k (eqs. 4-9):
        p_T = softmax(relu(W_T f_T + b_T)),  p_I = softmax(relu(W_I f_I + b_I))
        f_T <- p_I * f_T,  f_I <- p_T * f_I                 (Hadamard; both use the layer's inputs)
    head: dropout -> FC(f_T * f_I) -> one logit -> sigmoid = similarity of the pair

``SCANet(..., fused=True)`` builds the same model from the drop-in modules of ``scanet.fused`` (same
constructor arguments and state_dict), so a checkpoint moves freely between the two.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from scanet import reference
from scanet.config import ModelConfig


class ChebConv(nn.Module):
    """Chebyshev graph convolution (Defferrard et al. 2016): act(sum_k T_k(L~) x W_k + b).

    The Laplacian is not a parameter: it is prepared once (scanet.data.graph) and passed to ``forward``,
    as in PyG's ChebConv. x: (B, V, in_channels) -> (B, V, out_channels).
    """

    op = staticmethod(reference.cheb_conv)

    def __init__(self, in_channels: int, out_channels: int, K: int = 3, bias: bool = True,
                 activation: str | None = "relu"):
        super().__init__()
        if K < 1 or in_channels < 1 or out_channels < 1:
            raise ValueError(f"ChebConv needs K, in_channels, out_channels >= 1, got {K}, {in_channels}, {out_channels}")
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

    def forward(self, x: torch.Tensor, laplacian_csr: torch.Tensor) -> torch.Tensor:
        return type(self).op(laplacian_csr, x, self.weight, self.bias, self.activation)

    def extra_repr(self):
        return f"{self.in_channels}, {self.out_channels}, K={self.K}, activation={self.activation}"


def _activation(name: str) -> nn.Module:
    table = {"none": nn.Identity, "relu": nn.ReLU, "tanh": nn.Tanh}
    if name not in table:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(table)}")
    return table[name]()


class TextEncoder(nn.Module):
    """Graph convolutions over the word graph, then dropout and one FC layer into the common space."""

    def __init__(self, vocab_size: int, out_dim: int, channels=(1, 1), K: int = 3, dropout: float = 0.2,
                 activation: str = "none", conv_cls=ChebConv):
        super().__init__()
        self.vocab_size = vocab_size
        dims = (1,) + tuple(channels)
        self.convs = nn.ModuleList(conv_cls(dims[i], dims[i + 1], K) for i in range(len(channels)))
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(vocab_size * dims[-1], out_dim)
        self.act = _activation(activation)

    def forward(self, bow: torch.Tensor, laplacian_csr: torch.Tensor) -> torch.Tensor:
        x = bow.unsqueeze(-1)                                     # (B, V, 1): one signal per text
        for conv in self.convs:
            x = conv(x, laplacian_csr)
        return self.act(self.fc(self.dropout(x.flatten(1))))


class ImageEncoder(nn.Module):
    """Standardize the fixed CNN (or SIFT) feature, then one FC layer into the common space.

    The per-dimension mean and standard deviation are buffers set once from the training images
    (``set_input_statistics``), so they travel with the checkpoint. Raw SIFT-BoVW histograms sum to 1 (entries
    near 1/128): unstandardized, the image path would start 100x smaller than the text path.
    """

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
        new_i = op(f_t, f_i, self.text_fc[k].weight, self.text_fc[k].bias, scale=self.scale)   # p_T * f_I
        new_t = op(f_i, f_t, self.image_fc[k].weight, self.image_fc[k].bias, scale=self.scale)  # p_I * f_T
        return new_t, new_i

    def attention(self, k: int, modality: str, f: torch.Tensor) -> torch.Tensor:
        """The (scaled) attention map of layer k computed from one modality's features: (M, N)."""
        fc = (self.text_fc if modality == "text" else self.image_fc)[k]
        return torch.softmax(torch.relu(fc(f)), dim=-1) * self.scale

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


def _laplacian_arrays(laplacian) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    if isinstance(laplacian, torch.Tensor):
        if laplacian.layout != torch.sparse_csr:
            laplacian = laplacian.to_sparse_csr()
        return (laplacian.crow_indices().long(), laplacian.col_indices().long(),
                laplacian.values().float(), laplacian.shape[0])
    import scipy.sparse as sp

    if not sp.issparse(laplacian):
        raise ValueError(f"laplacian must be a scipy sparse matrix or a torch sparse CSR tensor, got {type(laplacian).__name__}")
    csr = sp.csr_matrix(laplacian)
    csr.sort_indices()
    return (torch.from_numpy(csr.indptr.astype(np.int64)), torch.from_numpy(csr.indices.astype(np.int64)),
            torch.from_numpy(csr.data.astype(np.float32)), csr.shape[0])


class SCANet(nn.Module):
    """The whole model. ``forward(bow, image)`` returns the similarity (B,) of each (text, image) pair."""

    def __init__(self, vocab_size: int, image_dim: int, laplacian, config: ModelConfig | None = None,
                 fused: bool = False):
        super().__init__()
        self.config = config = config or ModelConfig()
        self.fused = fused
        conv_cls, coatt_cls = ChebConv, StackedCoAttention
        if fused:
            from scanet import fused as fused_modules

            conv_cls, coatt_cls = fused_modules.ChebConv, fused_modules.StackedCoAttention
        crow, col, val, V = _laplacian_arrays(laplacian)
        if V != vocab_size:
            raise ValueError(f"the Laplacian is {V}x{V} but vocab_size is {vocab_size}")
        # Buffers, not parameters: they move with .to(device) and travel in the checkpoint.
        self.register_buffer("laplacian_crow", crow)
        self.register_buffer("laplacian_col", col)
        self.register_buffer("laplacian_values", val)
        N = config.common_dim
        scale = {"n": float(N), "1": 1.0}.get(str(config.attention_scale).lower())
        if scale is None:
            raise ValueError(f"attention_scale must be 'n' or '1', got {config.attention_scale!r}")
        self.text_encoder = TextEncoder(vocab_size, N, config.gcn_channels, config.cheb_k, config.dropout,
                                        config.encoder_activation, conv_cls=conv_cls)
        self.image_encoder = ImageEncoder(image_dim, N, config.encoder_activation)
        self.coattention = coatt_cls(N, config.coattention_layers, scale)
        self.head = SimilarityHead(N, config.dropout)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        if self.fused:
            from scanet.fused._cheb import clear_cheb_cache

            clear_cheb_cache()   # the Laplacian buffers were overwritten in place: forget checks keyed on them

    # -- parts ------------------------------------------------------------------------------------------------
    def laplacian(self) -> torch.Tensor:
        V = self.laplacian_crow.numel() - 1
        return torch.sparse_csr_tensor(self.laplacian_crow, self.laplacian_col,
                                       self.laplacian_values.to(self.image_encoder.fc.weight.dtype), (V, V),
                                       check_invariants=False)

    def encode_text(self, bow: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(bow, self.laplacian())

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(image)

    def logits(self, bow: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        f_t, f_i = self.coattention(self.encode_text(bow), self.encode_image(image))
        return self.head(f_t, f_i)

    def forward(self, bow: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(bow, image))

    # -- all pairs --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def score_all(self, texts: torch.Tensor, images: torch.Tensor, chunk_size: int = 64,
                  progress: bool = False, logits: bool = False) -> torch.Tensor:
        """Similarity of every text with every image: (Nt, Ni), equal to ``forward`` on each pair.

        Co-attention layer 1 depends on one modality only, so its attention maps are computed once per item;
        with one layer the whole score is a GEMM. Layers >= 2 are per pair: they run over ``chunk_size`` texts
        at a time, so peak memory is O(Nt * Ni + chunk_size * Ni * N). ``logits=True`` returns the logits: the
        same ranking, without the float32 sigmoid's saturation to exactly 1.0 (ties) above a logit of ~16.
        """
        was_training = self.training
        self.eval()
        try:
            f_t = self.encode_text(texts)
            f_i = self.encode_image(images)
            out = self._pair_logits(f_t, f_i, chunk_size, progress)
            return out if logits else torch.sigmoid(out)
        finally:
            self.train(was_training)

    def _pair_logits(self, f_t, f_i, chunk_size, progress=False):
        L = self.coattention.num_layers
        # Two layers: the fused Triton scorer (scanet.fused.pair_scores, layer 2 streamed, no per-pair tensors).
        # model.pair_scorer = "auto" (default): on CUDA float32 tensors; "always": also on CPU under
        # TRITON_INTERPRET=1 (tests); "never": the chunked eager path below.
        scorer = getattr(self, "pair_scorer", "auto")
        if L == 2 and (scorer == "always" or (scorer == "auto" and f_t.is_cuda and f_t.dtype == torch.float32)):
            from scanet.fused._pair_scores import pair_scores

            return pair_scores(self, f_t, f_i)
        w = self.head.fc.weight.squeeze(0)
        b = self.head.fc.bias
        if L == 0:
            return (f_t * w) @ f_i.T + b
        a_t = self.coattention.attention(0, "text", f_t)      # p_T of layer 1, per text
        a_i = self.coattention.attention(0, "image", f_i)     # p_I of layer 1, per image
        if L == 1:
            # f_T1[i,j] = a_i[j] * f_t[i], f_I1[i,j] = a_t[i] * f_i[j]: the head's sum factorizes.
            return (f_t * a_t * w) @ (f_i * a_i).T + b
        Nt, Ni, N = f_t.shape[0], f_i.shape[0], f_t.shape[1]
        out = torch.empty(Nt, Ni, dtype=f_t.dtype, device=f_t.device)
        starts = range(0, Nt, max(1, chunk_size))
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc="scoring", unit="chunk")
        for s in starts:
            e = min(s + chunk_size, Nt)
            pt = (a_i.unsqueeze(0) * f_t[s:e].unsqueeze(1)).reshape(-1, N)   # f_T after layer 1, per pair
            pi = (a_t[s:e].unsqueeze(1) * f_i.unsqueeze(0)).reshape(-1, N)   # f_I after layer 1, per pair
            for k in range(1, L):
                pt, pi = self.coattention.layer(k, pt, pi)
            out[s:e] = ((pt * pi) @ w + b).reshape(e - s, Ni)
        return out
