"""The image-model registry: which extractors exist (``IMAGE_MODELS``), their preprocessing, how to load them,
an identifier of their weights, and whether they can run on this machine (nothing is ever downloaded).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from scanet.features.efficientnet import (
    FoldedEfficientNetLite,
    efficientnet_lite0_weights_path,
    load_efficientnet_lite0,
)
from scanet.io import sha256_file

DEFAULT_MODEL = "efficientnet-lite0"


# ======================================================================================== model registry
class ImageModelUnavailable(ValueError):
    """The extractor cannot run on this machine (a package or its weights are missing); the message says why.
    A ValueError, so that the command line reports it as an error message rather than a traceback."""


@dataclass(frozen=True)
class ImageModelSpec:
    name: str
    dim: int
    description: str
    # preprocessing: the central square of side crop_fraction * short side, resized to size x size, then
    # (pixel - mean) / std per channel on the 0..255 scale.
    size: int
    crop_fraction: float
    resample: str
    mean: tuple
    std: tuple
    load: Callable[[], tuple[Callable, Callable | None]]  # -> (images -> features, features -> logits)
    weights: Callable[[], str]  # an identifier of the weights (a hash or a name)

    @property
    def preprocessing(self) -> dict:
        return {
            "size": self.size,
            "crop_fraction": self.crop_fraction,
            "resample": self.resample,
            "mean": list(self.mean),
            "std": list(self.std),
            "exif_transpose": True,
            "alpha": "composite on white",
            "version": 1,
        }


def _lite0_weights_path_or_unavailable() -> Path:
    try:
        return efficientnet_lite0_weights_path()
    except (ImportError, FileNotFoundError) as e:
        raise ImageModelUnavailable(str(e)) from e


def _lite0_loader():
    model = FoldedEfficientNetLite(load_efficientnet_lite0(_lite0_weights_path_or_unavailable()))
    return model.features, model.classify


def _lite0_weights_id() -> str:
    return "sha256:" + sha256_file(_lite0_weights_path_or_unavailable())


def _torchvision_models():
    try:
        import torchvision.models as tvm
    except Exception as e:  # ImportError, or RuntimeError "operator torchvision::nms does not exist" on a mismatch
        raise ImageModelUnavailable(f"torchvision is not importable here ({type(e).__name__}: {e})") from e
    return tvm


def _torchvision_weights(enum_name: str):
    """The torchvision ImageNet weights, only from the local torch hub cache: nothing is downloaded."""
    tvm = _torchvision_models()
    weights = getattr(tvm, enum_name).IMAGENET1K_V1
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not cached.is_file():
        raise ImageModelUnavailable(
            f"{enum_name} ImageNet weights are not in the torch hub cache ({cached}); "
            "put the file there (this code never downloads)"
        )
    return tvm, weights, cached


def _vgg19_loader():
    tvm, weights, _ = _torchvision_weights("VGG19_Weights")
    net = tvm.vgg19(weights=weights).eval()

    def feats(x):
        x = torch.flatten(net.avgpool(net.features(x)), 1)
        return net.classifier[:5](x)  # fc6, ReLU, dropout (identity in eval), fc7, ReLU -> fc7

    return feats, lambda f: net.classifier[5:](f)


def _resnet50_loader():
    tvm, weights, _ = _torchvision_weights("ResNet50_Weights")
    net = tvm.resnet50(weights=weights).eval()

    def feats(x):
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool"):
            x = getattr(net, name)(x)
        return torch.flatten(x, 1)

    return feats, net.fc


_IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
_IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)

IMAGE_MODELS: dict[str, ImageModelSpec] = {
    # TF EfficientNet-Lite evaluation: central crop of 224/(224+32) of the short side, bicubic, (x - 127) / 128.
    "efficientnet-lite0": ImageModelSpec(
        "efficientnet-lite0",
        1280,
        "EfficientNet-Lite0 (ImageNet-1k), pooled 1280-d before the classifier",
        224,
        224 / 256,
        "bicubic",
        (127.0, 127.0, 127.0),
        (128.0, 128.0, 128.0),
        _lite0_loader,
        _lite0_weights_id,
    ),
    "vgg19-fc7": ImageModelSpec(
        "vgg19-fc7",
        4096,
        "VGG-19 fc7 after ReLU (torchvision ImageNet weights), as in the SCANet paper",
        224,
        224 / 256,
        "bilinear",
        _IMAGENET_MEAN,
        _IMAGENET_STD,
        _vgg19_loader,
        lambda: "torchvision:" + _torchvision_weights("VGG19_Weights")[1].url.rsplit("/", 1)[-1],
    ),
    "resnet50": ImageModelSpec(
        "resnet50",
        2048,
        "ResNet-50 pooled 2048-d (torchvision ImageNet weights)",
        224,
        224 / 256,
        "bilinear",
        _IMAGENET_MEAN,
        _IMAGENET_STD,
        _resnet50_loader,
        lambda: "torchvision:" + _torchvision_weights("ResNet50_Weights")[1].url.rsplit("/", 1)[-1],
    ),
}


def get_image_model(name: str) -> ImageModelSpec:
    if name not in IMAGE_MODELS:
        raise ValueError(f"unknown image model {name!r}; known: {', '.join(IMAGE_MODELS)}")
    return IMAGE_MODELS[name]


def model_availability() -> dict[str, str | None]:
    """name -> None when the extractor can run here, else the reason it cannot."""
    out: dict[str, str | None] = {}
    for name, spec in IMAGE_MODELS.items():
        try:
            spec.weights()
            out[name] = None
        except (ImportError, FileNotFoundError, ImageModelUnavailable) as e:
            out[name] = str(e)
    return out


def load_image_model(spec: ImageModelSpec):
    try:
        return spec.load()
    except ImageModelUnavailable as e:
        raise ImageModelUnavailable(f"image model {spec.name!r} is not available: {e}") from e
