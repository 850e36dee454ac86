"""SCANet (Lu, Yu et al., KSEM 2019) in eager PyTorch, one module per part.

    text  bag-of-words (B, V) -> ChebConv -> ChebConv -> dropout -> FC -> f_T (B, N)
    image feature (B, D)      -> FC                              -> f_I (B, N)
    stacked co-attention, layer k (eqs. 4-9):
        p_T = softmax(relu(W_T f_T + b_T)),  p_I = softmax(relu(W_I f_I + b_I))
        f_T <- p_I * f_T,  f_I <- p_T * f_I                 (Hadamard; both use the layer's inputs)
    head: dropout -> FC(f_T * f_I) -> one logit -> sigmoid = similarity of the pair

Table 3's other encoders (``ModelConfig.text_encoder`` / ``image_encoder``, scanet.encoders) replace the first
two lines: text token ids (B, T) -> TextLSTM or TextCNN -> f_T; pixels (B, 3, S, S) -> ImageCNN5 -> f_I. The
rest (co-attention, head, all-pairs scoring) is the same; scanet.inputs decides which input a split gives.

``SCANet(..., fused=True)`` builds the same model from the drop-in modules of ``scanet.fused`` (same
constructor arguments and state_dict), so a checkpoint moves freely between the two.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from scanet import reference
from scanet.config import ModelConfig, check_value
from scanet.encoders import ImageCNN5, TextCNN, TextLSTM
from scanet.laplacian import Laplacian
from scanet.layers import ChebConv, ImageEncoder, SimilarityHead, StackedCoAttention, TextEncoder

SCORERS = ("auto", "fused", "eager")
ENCODE_CHUNK = 256  # items encoded at a time in score_all: CNN-5 on 1,696 images at once would hold ~3 GB of maps
DEFAULT_EMBEDDING_DIM = 50  # lstm/cnn without prepared word vectors (random start): GloVe-50's width
# Checkpoints written before scanet.laplacian kept the Laplacian as three top-level buffers.
_OLD_LAPLACIAN_KEYS = {
    "laplacian_crow": "laplacian.crow",
    "laplacian_col": "laplacian.col",
    "laplacian_values": "laplacian.values",
}


class SCANet(nn.Module):
    """The whole model. ``forward(bow, image)`` returns the similarity (B,) of each (text, image) pair.

    ``forward(texts, image, text_index=idx)`` is ``forward(texts[idx], image)`` for a fixed (N, V) text matrix
    (the training loop's): on the native CPU backend the first graph convolution then runs from a per-text
    cache of its Chebyshev basis (scanet.fused._basis_cache: no SpMM, no gather), else texts[idx] is gathered.

    ``laplacian``: the rescaled word-graph Laplacian L~ (scipy sparse, torch CSR or a scanet.laplacian.Laplacian);
    the model owns it as ``self.laplacian`` (a Laplacian module: buffers laplacian.crow / .col / .values in the
    state_dict; ``model.laplacian()`` is its torch CSR). The lstm/cnn text encoders do not read it; it is kept
    so that every checkpoint has the same layout.

    ``word_vectors`` (V, d): the start of the lstm/cnn word embeddings (prepared with the dataset); without them
    the embeddings start random with ``embedding_dim`` columns (default 50), as when a checkpoint is rebuilt
    before its weights are loaded.
    """

    def __init__(
        self,
        vocab_size: int,
        image_dim: int,
        laplacian: object,
        config: ModelConfig | None = None,
        fused: bool = False,
        *,
        word_vectors: Any = None,
        embedding_dim: int | None = None,
    ):
        super().__init__()
        self.config = config = config or ModelConfig()
        self.fused = fused
        conv_cls, coatt_cls, head_cls, image_cls = ChebConv, StackedCoAttention, SimilarityHead, ImageEncoder
        if fused:
            from scanet import fused as fused_modules

            conv_cls, coatt_cls = fused_modules.ChebConv, fused_modules.StackedCoAttention
            head_cls, image_cls = fused_modules.SimilarityHead, fused_modules.ImageEncoder
        # A Laplacian given is owned as is (not copied, not re-checked): it moves with the model's .to(device).
        self.laplacian = Laplacian.of(laplacian)
        if self.laplacian.size != vocab_size:
            V = self.laplacian.size
            raise ValueError(f"the Laplacian is {V}x{V} but vocab_size is {vocab_size}")
        N = config.common_dim
        scale = {"n": float(N), "1": 1.0}.get(str(config.attention_scale).lower())
        if scale is None:
            raise ValueError(f"attention_scale must be 'n' or '1', got {config.attention_scale!r}")
        self.text_encoder: nn.Module
        self.image_encoder: nn.Module
        act = config.encoder_activation
        if config.text_encoder == "gcn":
            self.text_encoder = TextEncoder(
                vocab_size, N, config.gcn_channels, config.cheb_k, config.dropout, act, conv_cls=conv_cls
            )
        elif config.text_encoder in ("lstm", "cnn"):
            if word_vectors is None and embedding_dim is None:
                embedding_dim = DEFAULT_EMBEDDING_DIM
            common = dict(
                embeddings=word_vectors,
                embedding_dim=embedding_dim,
                freeze_embeddings=config.freeze_embeddings,
                dropout=config.dropout,
                activation=act,
            )
            self.text_encoder = (
                TextLSTM(vocab_size, N, hidden_size=config.lstm_hidden, **common)
                if config.text_encoder == "lstm"
                else TextCNN(vocab_size, N, filters=config.cnn_filters, **common)
            )
        else:
            raise ValueError(f"text_encoder must be 'gcn', 'lstm' or 'cnn', got {config.text_encoder!r}")
        if config.image_encoder == "fixed":
            self.image_encoder = image_cls(image_dim, N, act)
        elif config.image_encoder == "cnn5":
            self.image_encoder = ImageCNN5(N, dropout=config.dropout, activation=act)
        else:
            raise ValueError(f"image_encoder must be 'fixed' or 'cnn5', got {config.image_encoder!r}")
        self.coattention = coatt_cls(N, config.coattention_layers, scale)
        self.head = head_cls(N, config.dropout)
        self._register_load_state_dict_pre_hook(_rename_old_laplacian_keys)

    # -- parts ------------------------------------------------------------------------------------------------
    def encode_text(self, texts: torch.Tensor, text_index: torch.Tensor | None = None) -> torch.Tensor:
        """texts: bag-of-words features (B, V) for gcn, padded token ids (B, T) int64 for lstm/cnn.
        ``text_index``: the rows of ``texts`` to encode (the same as ``texts[text_index]``; the gcn encoder can
        then run its first layer from a per-text cache, scanet.fused._basis_cache)."""
        if self.config.text_encoder == "gcn":
            return self.text_encoder(texts, self.laplacian, text_index)
        return self.text_encoder(texts if text_index is None else texts[text_index])

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """image: features (B, D) for fixed, pixels (B, 3, S, S) (uint8, or floats in [-1, 1]) for cnn5. cnn5
        maps uint8 to [-1, 1] and resizes to ``config.image_size`` here, so a checkpoint scores as it trained."""
        if self.config.image_encoder == "cnn5":
            x = image
            if x.dtype == torch.uint8:
                x = x.to(self.head.fc.weight.dtype) / 127.5 - 1.0
            S = self.config.image_size
            if S is not None and tuple(x.shape[-2:]) != (S, S):
                x = F.interpolate(x, size=(S, S), mode="bilinear", align_corners=False, antialias=True)
            return self.image_encoder(x)
        return self.image_encoder(image)

    def logits(self, bow: torch.Tensor, image: torch.Tensor, text_index: torch.Tensor | None = None) -> torch.Tensor:
        f_t, f_i = self.coattention(self.encode_text(bow, text_index), self.encode_image(image))
        return self.head(f_t, f_i)

    def forward(self, bow: torch.Tensor, image: torch.Tensor, text_index: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.logits(bow, image, text_index)  # bf16 under bf16 autocast: the loss gets float32 similarities
        return torch.sigmoid(logits.to(reference.statistics_dtype(logits.dtype)))

    # -- all pairs --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def score_all(
        self,
        texts: torch.Tensor,
        images: torch.Tensor,
        chunk_size: int = 64,
        progress: bool = False,
        logits: bool = False,
        scorer: str = "auto",
    ) -> torch.Tensor:
        """Similarity of every text with every image: (Nt, Ni), equal to ``forward`` on each pair.

        Co-attention layer 1 depends on one modality only, so its attention maps are computed once per item;
        with one layer the whole score is a GEMM. Layers >= 2 are per pair: the eager oracle
        (``reference.pair_logits``) runs over ``chunk_size`` texts at a time, so peak memory is
        O(Nt * Ni + chunk_size * Ni * N). ``logits=True`` returns the logits: the same ranking, without the
        float32 sigmoid's saturation to exactly 1.0 (ties) above a logit of ~16.

        ``scorer``: "auto" (the fused scorer ``scanet.fused.pair_scores`` for two layers on CUDA float32,
        else the eager oracle), "fused" (the fused scorer wherever its kernel can run: also CPU under
        TRITON_INTERPRET=1; a model with another number of layers keeps the oracle), or "eager".
        """
        chunk_size = check_value("chunk_size", chunk_size, int, lo=1)  # 0 once left the scores unwritten
        was_training = self.training
        self.eval()
        try:
            f_t = _in_chunks(self.encode_text, texts)
            f_i = _in_chunks(self.encode_image, images)
            out = pair_logits(
                self, f_t, f_i, scorer=scorer, chunk_pairs=chunk_size * max(1, len(f_i)), progress=progress
            )
            return out if logits else torch.sigmoid(out)
        finally:
            self.train(was_training)


def _in_chunks(encode: Any, x: torch.Tensor, chunk: int = ENCODE_CHUNK) -> torch.Tensor:
    """``encode(x)`` ENCODE_CHUNK rows at a time (eval mode: the same result as one call)."""
    if x.shape[0] <= chunk:
        return encode(x)
    return torch.cat([encode(x[s : s + chunk]) for s in range(0, x.shape[0], chunk)])


def use_fused_scorer(model: SCANet, features: torch.Tensor, scorer: str = "auto") -> bool:
    """THE rule for scoring pairs: the fused kernel for two co-attention layers, on CUDA float32, bfloat16 or
    float16 features ("auto"; low-precision features, i.e. autocast, mean bf16/tf32 GEMM operands), or
    wherever the kernel can run ("fused"); never for "eager"."""
    if scorer not in SCORERS:
        raise ValueError(f"scorer must be one of {SCORERS}, got {scorer!r}")
    if model.coattention.num_layers != 2 or scorer == "eager":
        return False
    if scorer == "fused":
        from scanet.fused import kernels_can_run

        return kernels_can_run(features.device)
    return features.is_cuda and features.dtype in reference.MIXABLE  # bf16/fp16 (autocast): bf16/tf32 GEMMs


@torch.no_grad()
def pair_logits(
    model: SCANet,
    f_t: torch.Tensor,
    f_i: torch.Tensor,
    *,
    scorer: str = "auto",
    precision: str = "fp32",
    chunk_pairs: int = 16384,
    progress: bool = False,
    **kw: Any,
) -> torch.Tensor:
    """Logits of all pairs (Nt, Ni), or of the listed pairs (text_index=, image_index=: (P,)), by the scorer
    ``use_fused_scorer`` picks: ``scanet.fused.pair_scores`` or its oracle ``reference.pair_logits``."""
    if use_fused_scorer(model, f_t, scorer):
        from scanet.fused import pair_scores

        return pair_scores(model, f_t, f_i, precision=precision, **kw)
    return reference.pair_logits(model, f_t, f_i, chunk_pairs=chunk_pairs, progress=progress, **kw)


def _rename_old_laplacian_keys(state_dict: dict, prefix: str, *args: object) -> None:
    for old, new in _OLD_LAPLACIAN_KEYS.items():
        if prefix + old in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)
