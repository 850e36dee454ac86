"""What a model reads of a split: THE one place that turns a prepared Split into model input tensors.

    text_encoder  gcn        bag-of-words features (n, V) float32 (scanet.data.text.text_features)
                  lstm, cnn  token ids (n, T) int64, 0-padded, each text's first ``max_tokens`` tokens
    image_encoder fixed      image features (n, D) float32
                  cnn5       pixels (n, 3, S, S) uint8 (the model maps them to [-1, 1] and resizes them itself)

Training (scanet.train), evaluation (scanet.evaluate), the search index (scanet.index) all go through
``model_inputs``/``text_input``/``image_input``, so a model never meets the input of another encoder. A split
without the tokens or pixels an encoder needs is a ValueError naming what is missing (``where`` names the split).
Memory of one Eng-Wiki training split (2,173 texts): bag-of-words 87 MB (float32, V = 10,055), tokens at
T = 256: 4.5 MB (int64).
"""

from __future__ import annotations

import numpy as np
import torch

from scanet.config import ModelConfig
from scanet.data.prepared import Split

TEXT_ENCODERS = ("gcn", "lstm", "cnn")
IMAGE_ENCODERS = ("fixed", "cnn5")


def text_input(split: Split, config: ModelConfig, sparse: bool = False, where: str = "split"):
    """The texts' model input as a numpy array; ``sparse=True`` returns the bag-of-words CSR itself for gcn
    (scanet.retrieve encodes it batch by batch without a dense (n, V) matrix)."""
    enc = config.text_encoder
    if enc == "gcn":
        return split.bow if sparse else split.text_matrix()
    if enc not in TEXT_ENCODERS:
        raise ValueError(f"unknown text_encoder {enc!r}; choose one of {', '.join(TEXT_ENCODERS)}")
    if split.tokens is None:
        raise ValueError(
            f"{where} has no token sequences: text_encoder={enc!r} needs them (prepared format 2 from raw "
            "texts); use text_encoder=gcn"
        )
    ids, _ = split.tokens.padded(max_length=config.max_tokens)
    return ids


def image_input(split: Split, config: ModelConfig, where: str = "split") -> np.ndarray:
    enc = config.image_encoder
    if enc == "fixed":
        return split.images
    if enc not in IMAGE_ENCODERS:
        raise ValueError(f"unknown image_encoder {enc!r}; choose one of {', '.join(IMAGE_ENCODERS)}")
    if split.pixels is None:
        raise ValueError(
            f"{where} has no raw pixels: image_encoder='cnn5' needs them (datasets prepared from raw images: "
            "WebNews, custom folders with images/); use image_encoder=fixed"
        )
    return split.pixels


def as_model_tensor(a, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A model input on ``device``: floating arrays in ``dtype``, token ids and pixels keep their integer type."""
    t = torch.as_tensor(np.asarray(a))
    return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device=device)


def model_inputs(
    split: Split, config: ModelConfig, device=None, dtype: torch.dtype = torch.float32, where: str = "split"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(texts, images) of ``split`` as the configured encoders read them, on ``device``."""
    return (
        as_model_tensor(text_input(split, config, where=where), device, dtype),
        as_model_tensor(image_input(split, config, where=where), device, dtype),
    )
