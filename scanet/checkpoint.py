"""Checkpoints: the format, atomic save, safe load, and rebuilding a model from one.

A checkpoint is a dict saved with torch.save and read with ``torch.load(weights_only=True)`` (scanet.io: a file
can carry tensors and plain containers, never code):
    format               "scanet-checkpoint-v1"
    model, optimizer     state_dicts (the model's includes its Laplacian: laplacian.crow/.col/.values; files
                         written before scanet.laplacian name them laplacian_crow/_col/_values, still read)
    epoch, history       epochs done, one metrics row per epoch
    preset               the Preset as a plain dict (dataclasses.asdict), see ``preset_from_dict``
    dataset_fingerprint, dataset_name, vocab_size, image_dim, classes
``load_model`` refuses a dataset whose fingerprint differs from the training data's. The preset's
``model.text_encoder`` / ``image_encoder`` say which encoders to rebuild (a checkpoint written before they existed
has neither key: gcn and fixed, as it was trained); the lstm/cnn embedding width is read off the weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from scanet.config import ModelConfig, Preset, TrainConfig, validate
from scanet.data.prepared import PreparedDataset
from scanet.io import atomic_torch_save, safe_torch_load
from scanet.laplacian import Laplacian
from scanet.model import _OLD_LAPLACIAN_KEYS, SCANet

CHECKPOINT_FORMAT = "scanet-checkpoint-v1"


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write atomically: a temporary file in the same folder, fsync, then rename over the old checkpoint.
    Every tensor is written contiguous, whatever its layout in memory (a bf16 run keeps its FC weights and
    their Adam moments transposed, scanet.master_weights): a file loads the same into any model, and an
    optimizer state never arrives laid out unlike its freshly built parameter (torch's fused Adam would mix
    up its elements)."""
    atomic_torch_save(path, _contiguous(state))


def _contiguous(obj):
    """``obj`` with every tensor in its dicts, lists and tuples made contiguous (no copy where it is)."""
    if isinstance(obj, torch.Tensor):
        return obj.contiguous()
    if isinstance(obj, dict):
        return {k: _contiguous(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_contiguous(v) for v in obj)
    return obj


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state = safe_torch_load(path, "SCANet checkpoint", map_location)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a SCANet checkpoint (format {CHECKPOINT_FORMAT!r} expected)")
    train_cfg = state.get("preset", {}).get("train") if isinstance(state.get("preset"), dict) else None
    if isinstance(train_cfg, dict):
        train_cfg.setdefault("precision", "fp32")  # written before the precision setting: trained in fp32
    return state


def preset_from_dict(d: dict, where: str = "checkpoint ") -> Preset:
    """The Preset of a checkpoint's plain dict, every field type- and range-checked (scanet.config.validate)."""
    try:
        model = ModelConfig(**{**d["model"], "gcn_channels": tuple(d["model"]["gcn_channels"])})
        preset = Preset(**{**d, "model": model, "train": TrainConfig(**d["train"])})
    except (KeyError, TypeError) as e:
        raise ValueError(f"{where}configuration is malformed ({type(e).__name__}: {e})") from None
    return validate(preset, where=where + "setting ")


def build_model(preset: Preset, dataset: PreparedDataset, fused: bool = False) -> SCANet:
    """A fresh model for the dataset: the fixed-feature image standardization fitted on the training images, the
    lstm/cnn word embeddings started from the prepared word vectors. A ValueError names the dataset when the
    configured encoders need inputs it lacks (token sequences, pixels)."""
    dataset.require_inputs(preset.model)
    model = SCANet(
        dataset.vocab_size,
        dataset.image_dim,
        dataset.laplacian,
        preset.model,
        fused=fused,
        word_vectors=dataset.word_vectors if preset.model.text_encoder != "gcn" else None,
    )
    if preset.model.image_encoder == "fixed":
        model.image_encoder.set_input_statistics(dataset.train.images)  # type: ignore[operator]
    return model


def load_model(
    checkpoint: str | Path | dict, dataset: PreparedDataset | None = None, device="cpu", fused: bool = False
) -> tuple[SCANet, dict]:
    """Rebuild the model of a checkpoint; refuse a dataset whose fingerprint differs from the training data's."""
    state = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    preset = preset_from_dict(state["preset"])
    if (
        dataset is not None
        and state.get("dataset_fingerprint")
        and dataset.fingerprint
        and state["dataset_fingerprint"] != dataset.fingerprint
    ):
        raise ValueError(
            f"checkpoint was trained on prepared data {state['dataset_fingerprint']} but the given "
            f"dataset is {dataset.fingerprint} (different vocabulary, graph or features)"
        )
    weights = state["model"]
    arrays = [weights.get(new, weights.get(old)) for old, new in _OLD_LAPLACIAN_KEYS.items()]
    if any(a is None for a in arrays):
        raise ValueError("checkpoint has no Laplacian (laplacian.crow/.col/.values) in its model weights")
    try:
        laplacian = Laplacian.from_arrays(*arrays)
    except ValueError as e:
        raise ValueError(f"checkpoint holds a malformed Laplacian: {e}") from e
    embedding = weights.get("text_encoder.embed.embedding.weight")  # lstm/cnn: (V + 1, d)
    model = SCANet(
        state["vocab_size"],
        state["image_dim"],
        laplacian,
        preset.model,
        fused=fused,
        embedding_dim=int(embedding.shape[1]) if embedding is not None and embedding.dim() == 2 else None,
    )
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ValueError(f"checkpoint does not match the model it describes: {e}") from e
    return model.to(device), state
