"""The encoders of the paper's Table 3 besides today's GCN text encoder and fixed-feature image encoder.

Why over 400 lines: one table's encoders (two text, three image) behind one interface, plus the
torchvision-format weight loader they share; each class is short, and splitting them apart would scatter one job.

Every encoder maps one input tensor to (B, N) features in the common space, so it drops into SCANet's
``encode_text`` / ``encode_image`` (and hence ``score_all``) unchanged:

    text   token ids (B, T), 0 = padding (scanet.data.tokens)
           TextLSTM   embedding -> bidirectional LSTM (packed) -> masked mean (or last states) -> dropout -> FC
           TextCNN    embedding -> Conv1d widths 3/4/5 -> ReLU -> max over time -> concat -> dropout -> FC
    image  pixels (B, 3, H, W)
           ImageCNN5  five conv3x3-BN-ReLU-maxpool blocks, trained end to end -> global average pool -> FC
    fixed image features, computed once, then read by the existing fixed-feature image encoder:
           VGG19.fc7 (4096-d) and ResNet50.pool5 (2048-d), plain torch with torchvision's state_dict keys, so a
           local torchvision weights file loads (``load_vgg19`` / ``load_resnet50``, weights_only, strict).

Word embeddings: row i + 1 of the embedding holds word ``vocab[i]``; pass the (V, d) matrix of pretrained
vectors for the vocabulary (GloVe rows for Wiki, the corpus word2vec for WebNews) and the padding row 0 is
prepended as zeros. ``freeze_embeddings=True`` keeps them fixed (Kim's "static"), False fine-tunes them
("non-static", Kim's better variant on most of his tasks, and the default here).

Padding never changes a result: the LSTM runs on packed sequences and pools only over real tokens, the CNN
zeroes padded embeddings and max-pools only over windows that touch a real token, so a text padded to 10 or to
20 gives the same features (tested). A text with no token (WebNews has a few) gets zero pooled features, so
its common-space features are the FC bias.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

PAD_ID = 0  # as scanet.data.tokens.PAD_ID (not imported: nothing in the model layer reads the data layer)

_ACTIVATIONS = {"none": nn.Identity, "relu": nn.ReLU, "tanh": nn.Tanh}  # as ModelConfig.encoder_activation


def _activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


# ============================================================================================ text encoders
class TokenEmbedding(nn.Module):
    """Word embedding with a zero padding row 0, from a (V, d) pretrained matrix or random (N(0, 1), torch's
    default), trainable or frozen. ``forward(tokens, lengths=None)`` -> (x (B, T, d) with padded positions
    exactly zero, mask (B, T) bool, lengths (B,) int64).

    Without ``lengths`` a text's length is its count of non-zero ids (ids are left-aligned, 0 only as padding:
    scanet.data.tokens guarantees both).
    """

    def __init__(self, vocab_size: int, embeddings=None, embedding_dim: int | None = None, freeze: bool = False):
        super().__init__()
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        if embeddings is not None:
            w = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
            if w.dim() != 2 or w.shape[0] != vocab_size:
                raise ValueError(f"embeddings must be a (vocab_size={vocab_size}, d) matrix, got {tuple(w.shape)}")
            if embedding_dim is not None and embedding_dim != w.shape[1]:
                raise ValueError(f"embedding_dim={embedding_dim} but the embedding matrix has {w.shape[1]} columns")
            if not torch.isfinite(w).all():
                raise ValueError("the embedding matrix contains NaN or inf")
            embedding_dim = w.shape[1]
        elif embedding_dim is None or embedding_dim < 1:
            raise ValueError("give either an embedding matrix or embedding_dim >= 1")
        self.vocab_size, self.embedding_dim = vocab_size, embedding_dim
        self.embedding = nn.Embedding(vocab_size + 1, embedding_dim, padding_idx=PAD_ID)  # zero row 0
        if embeddings is not None:
            with torch.no_grad():
                self.embedding.weight[1:].copy_(w)
        self.embedding.weight.requires_grad_(not freeze)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None):
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be a (B, T) integer tensor of ids, got {tuple(tokens.shape)} {tokens.dtype}")
        T = tokens.shape[1]
        if lengths is None:
            lengths = (tokens != PAD_ID).sum(1)
        else:
            lengths = torch.as_tensor(lengths, device=tokens.device).long()
            if lengths.shape != tokens.shape[:1]:
                raise ValueError(f"lengths must be (B,) = ({tokens.shape[0]},), got {tuple(lengths.shape)}")
            if lengths.numel() and (int(lengths.min()) < 0 or int(lengths.max()) > T):
                raise ValueError(f"lengths must lie in 0..T={T}, got {int(lengths.min())}..{int(lengths.max())}")
        mask = torch.arange(T, device=tokens.device) < lengths.unsqueeze(1)
        x = self.embedding(tokens) * mask.unsqueeze(-1).to(self.embedding.weight.dtype)
        return x, mask, lengths

    def extra_repr(self):
        return (
            f"{self.vocab_size} words (+ padding), dim {self.embedding_dim}, "
            f"{'trainable' if self.embedding.weight.requires_grad else 'frozen'}"
        )


class TextLSTM(nn.Module):
    """Bidirectional LSTM over the word embeddings of a text's tokens in order, pooled, then dropout and FC to N.

    pooling="mean" (default): the mean over the text's real tokens of [h_fwd(t); h_bwd(t)]. Wiki texts run
    from 74 to 1,092 vocabulary tokens (median 198); the last forward state of such a sequence is dominated by
    its final few dozen words (and the last backward state by its first), while the mean gives every position
    a share and its gradient reaches every token directly. pooling="last": [h_fwd(L-1); h_bwd(0)], the final
    state of each direction, for comparison. Pooled width 2 * hidden_size. tokens (B, T) -> (B, out_dim).
    """

    def __init__(
        self,
        vocab_size: int,
        out_dim: int,
        embeddings=None,
        embedding_dim: int | None = None,
        freeze_embeddings: bool = False,
        hidden_size: int = 256,
        num_layers: int = 1,
        pooling: str = "mean",
        dropout: float = 0.2,
        activation: str = "none",
    ):
        super().__init__()
        if pooling not in ("mean", "last"):
            raise ValueError(f"pooling must be 'mean' or 'last', got {pooling!r}")
        if hidden_size < 1 or num_layers < 1 or out_dim < 1:
            raise ValueError(
                f"hidden_size, num_layers, out_dim must be >= 1, got {hidden_size}, {num_layers}, {out_dim}"
            )
        self.pooling = pooling
        self.embed = TokenEmbedding(vocab_size, embeddings, embedding_dim, freeze_embeddings)
        self.lstm = nn.LSTM(self.embed.embedding_dim, hidden_size, num_layers, batch_first=True, bidirectional=True)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * hidden_size, out_dim)
        self.act = _activation(activation)

    def pooled(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 2 * hidden_size) text features before dropout and FC; zero for an empty text."""
        x, mask, lengths = self.embed(tokens, lengths)
        # pack_padded_sequence refuses length 0: run an empty text over one (zero) padding step, zero it below.
        packed = pack_padded_sequence(x, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        out, (h, _) = self.lstm(packed)
        nonempty = (lengths > 0).to(x.dtype).unsqueeze(1)
        if self.pooling == "last":
            # h: (num_layers * 2, B, H) in the batch's original order; the last layer's two directions.
            return torch.cat([h[-2], h[-1]], dim=1) * nonempty
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])  # zeros past L
        return out.sum(1) / lengths.clamp(min=1).unsqueeze(1).to(x.dtype) * nonempty

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        return self.act(self.fc(self.dropout(self.pooled(tokens, lengths))))


class TextCNN(nn.Module):
    """Kim (2014): Conv1d of each width over the word embeddings, ReLU, max over time, concatenated, dropout, FC.

    Each width w is a "wide" convolution (w - 1 zeros on both ends, as Kim pads each sentence), and the max
    runs over the windows that touch at least one real token: positions 0..L+w-2 of the L+w-1 outputs. Kim
    pads every sentence to the corpus maximum and also maxes over all-padding windows (relu(bias)), which
    makes the result depend on the padding length; here it does not. Masking with 0 rather than -inf is exact
    because ReLU outputs are >= 0, and gives an empty text the zero vector. Kim's settings are the defaults:
    widths 3/4/5, 100 filters each, dropout 0.5 (his max-norm constraint on the FC is left to weight decay).
    tokens (B, T) -> (B, out_dim).
    """

    def __init__(
        self,
        vocab_size: int,
        out_dim: int,
        embeddings=None,
        embedding_dim: int | None = None,
        freeze_embeddings: bool = False,
        widths=(3, 4, 5),
        filters: int = 100,
        dropout: float = 0.5,
        activation: str = "none",
    ):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if not widths or min(widths) < 1 or filters < 1 or out_dim < 1:
            raise ValueError(
                f"TextCNN needs widths >= 1, filters >= 1, out_dim >= 1; got {widths}, {filters}, {out_dim}"
            )
        self.widths = widths
        self.embed = TokenEmbedding(vocab_size, embeddings, embedding_dim, freeze_embeddings)
        d = self.embed.embedding_dim
        self.convs = nn.ModuleList(nn.Conv1d(d, filters, w, padding=w - 1) for w in widths)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(filters * len(widths), out_dim)
        self.act = _activation(activation)

    def pooled(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """(B, filters * len(widths)) max-pooled feature maps before dropout and FC."""
        x, _, lengths = self.embed(tokens, lengths)
        x = x.transpose(1, 2)  # (B, d, T)
        out = []
        for w, conv in zip(self.widths, self.convs, strict=True):
            y = F.relu(conv(x))  # (B, filters, T + w - 1)
            valid = torch.arange(y.shape[-1], device=y.device) < (lengths + (w - 1)).unsqueeze(1)
            valid &= (lengths > 0).unsqueeze(1)  # an empty text has no window
            out.append(y.masked_fill(~valid.unsqueeze(1), 0.0).amax(-1))
        return torch.cat(out, dim=1)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        return self.act(self.fc(self.dropout(self.pooled(tokens, lengths))))


# =========================================================================================== image encoders
class ImageCNN5(nn.Module):
    """Five conv3x3-BN-ReLU-maxpool2 blocks trained end to end from raw images, global average pool, dropout, FC.

    Channels 32-64-128-256-256 (each stage doubles until 256): about 0.98M conv weights, a model small enough
    to train from scratch on a few thousand images (WebNews: 1,696), unlike an ImageNet-size network. The
    intended input is 128 x 128 RGB: five halvings leave 4 x 4 maps before the average pool; a forward pass
    costs about 0.56 GFLOP per image (224 x 224 would cost 3x that), and the pixels of 1,696 images take 83 MB
    as uint8. Any H, W >= 32 works (the pool is global). Input: (B, 3, H, W), uint8 pixels (mapped to
    [-1, 1]) or floats already normalized; BatchNorm follows every conv, so the exact input scale matters little.
    """

    CHANNELS = (32, 64, 128, 256, 256)

    def __init__(
        self, out_dim: int, channels=CHANNELS, in_channels: int = 3, dropout: float = 0.2, activation: str = "none"
    ):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) != 5 or min(channels) < 1 or out_dim < 1:
            raise ValueError(
                f"ImageCNN5 needs five positive channel counts and out_dim >= 1, got {channels}, {out_dim}"
            )
        self.in_channels = in_channels
        blocks, c_in = [], in_channels
        for c in channels:
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(c_in, c, 3, padding=1, bias=False),
                    nn.BatchNorm2d(c),
                    nn.ReLU(inplace=True),
                    nn.MaxPool2d(2),
                )
            )
            c_in = c
        self.blocks = nn.Sequential(*blocks)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(c_in, out_dim)
        self.act = _activation(activation)

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise ValueError(f"images must be (B, {self.in_channels}, H, W), got {tuple(images.shape)}")
        if min(images.shape[-2:]) < 32:
            raise ValueError(f"images must be at least 32 x 32 (five 2x poolings), got {tuple(images.shape[-2:])}")
        dtype = self.fc.weight.dtype
        x = images.to(dtype) / 127.5 - 1.0 if images.dtype == torch.uint8 else images.to(dtype)
        return self.blocks(x).mean(dim=(-2, -1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(self.dropout(self.pooled(images))))


# ================================================================ VGG-19 and ResNet-50 (torchvision key names)
# Input of both: (B, 3, H, W) float RGB, (pixel / 255 - mean) / std with ImageNet's mean (0.485, 0.456, 0.406)
# and std (0.229, 0.224, 0.225), 224 x 224 as trained (scanet.features' "vgg19-fc7"/"resnet50" preprocessing).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VGG19_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")


class VGG19(nn.Module):
    """VGG-19 (configuration E, no batch norm) as torchvision builds it: ``features.{0..36}`` (conv at 0, 2, 5,
    ..., 34), ``avgpool`` (adaptive 7 x 7), ``classifier.{0,3,6}``: 143,667,240 parameters.

    ``fc7(x)``: the 4096-d output of the second FC layer after its ReLU (dropout is the identity in eval), the
    image feature of the SCANet paper. Inputs smaller than 224 work (the adaptive pool repeats the map).
    """

    feature_dim = 4096

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for v in VGG19_CONFIG:
            if not isinstance(v, int):  # "M"
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(c_in, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                c_in = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(4096, 4096),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(4096, num_classes),
        )

    def fc7(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier[:5](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier[5:](self.fc7(x))


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (torchvision's: the stride sits on the 3x3 conv): 1x1, 3x3, 1x1 (x4), + shortcut."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (
            nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
            if stride != 1 or inplanes != out
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + identity)


class ResNet50(nn.Module):
    """ResNet-50 as torchvision builds it: ``conv1``, ``bn1``, ``layer1..4`` (3, 4, 6, 3 bottlenecks), ``fc``:
    25,557,032 parameters. ``pool5(x)``: the 2048-d global average pool of layer4, the input of ``fc``."""

    feature_dim = 2048
    layer1: nn.Sequential  # set in __init__ by name (torchvision's keys)
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential

    def __init__(self, num_classes: int = 1000, layers=(3, 4, 6, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = 64
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            stage = []
            for b in range(blocks):
                stage.append(Bottleneck(inplanes, planes, stride=(1 if i == 0 or b > 0 else 2)))
                inplanes = planes * Bottleneck.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)

    def pool5(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool5(x))


def load_torchvision_weights(model_cls, path: str | Path, **kwargs) -> nn.Module:
    """``model_cls(**kwargs)`` with the weights of a torchvision-format file, in eval mode and frozen.

    The file is read with ``torch.load(weights_only=True)`` (no code runs) and must match exactly: no missing
    key, no unexpected key, every shape equal; otherwise a ValueError names the file and the first offenders.
    The one tolerated absence is BatchNorm's ``num_batches_tracked`` counter, which torchvision's older files
    (ResNet-50 IMAGENET1K_V1) predate: it is set to 0, as torch itself does for such files. The model is built
    on the meta device and takes the file's tensors (``assign=True``): VGG-19's 548 MB are held once, not twice.
    Call ``.requires_grad_(True)`` on the result to fine-tune.
    """
    path = Path(path)
    name = getattr(model_cls, "__name__", str(model_cls))
    if not path.is_file():
        raise ValueError(f"{name} weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # noqa: TID251 - weights_only, errors below
    except Exception as e:  # noqa: BLE001 - UnpicklingError (code or unknown types in the file), RuntimeError (not a torch file)
        raise ValueError(
            f"{path} is not a torch weights file that loads without executing code "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(
            f"{path} does not hold a state_dict (a mapping of names to tensors) but a {type(state).__name__}"
        )
    with torch.device("meta"):
        model = model_cls(**kwargs)
    expected = model.state_dict()
    state = dict(state)
    for key in expected:
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.tensor(0, dtype=torch.long)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} (want {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path} does not fit {name}: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:3]}, {len(wrong)} wrong shapes {wrong[:3]}"
        )
    for k, v in expected.items():
        if v.is_floating_point():
            if not state[k].is_floating_point():
                raise ValueError(f"{path}: {k} is {state[k].dtype}, expected a floating-point tensor")
            state[k] = state[k].float()
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def load_vgg19(path: str | Path) -> VGG19:
    """VGG-19 from a torchvision ``vgg19-*.pth`` file (e.g. vgg19-dcbb9e9d.pth, IMAGENET1K_V1); see
    load_torchvision_weights."""
    return cast(VGG19, load_torchvision_weights(VGG19, path))


def load_resnet50(path: str | Path) -> ResNet50:
    """ResNet-50 from a torchvision ``resnet50-*.pth`` file (e.g. resnet50-0676ba61.pth, IMAGENET1K_V1, or the
    V2 file); see load_torchvision_weights."""
    return cast(ResNet50, load_torchvision_weights(ResNet50, path))
