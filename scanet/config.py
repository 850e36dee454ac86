"""Configuration as dataclasses, with one preset per dataset (the paper's hyper-parameters).

Every field of a preset can be overridden from the command line (``scanet train --set epochs=10``).

Every field declares its allowed values once, in its metadata (``_f(default, lo=, hi=, choices=)``), next to
its type; ``check_value`` is the ONE checker and ``validate(preset)`` applies it to every field. It runs on
``apply_overrides`` (``--set``), ``get_preset``, ``preset_from_dict`` (checkpoints) and, through
``arg_type``/``check_setting``, on CLI flags (``--chunk-size``) and dataset.json settings (``knn``), so
``batch_size=0``, ``epochs=abc`` or ``lr=nan`` end in one sentence naming the key, the value and what is
allowed, never in a ZeroDivisionError an epoch later.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field


def _f(default, *, lo=None, hi=None, lo_open=False, hi_open=False, choices=None):
    """A dataclass field with its allowed range (``lo <= v <= hi``, open ends with ``lo_open``/``hi_open``) or
    choices in its metadata; floats must also be finite. Mutable defaults (tuples are fine) are not used."""
    return field(
        default=default, metadata={"lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open, "choices": choices}
    )


@dataclass
class ModelConfig:
    common_dim: int = _f(1024, lo=1)  # N, the common space (paper: 1024 on Wiki)
    cheb_k: int = _f(3, lo=1)  # Chebyshev order K (T0, T1, T2)
    gcn_channels: tuple = _f((1, 1), lo=1)  # output channels of each graph convolution (paper: one channel,
    #                                           two layers); lo applies to every entry, at least one entry
    coattention_layers: int = _f(2, lo=0)  # stacked co-attention layers (paper's best: 2)
    attention_scale: str = _f("n", choices=("n", "1"))  # "n": p * N, uniform attention = identity; "1": the
    #                                                     paper's equations as written
    dropout: float = _f(0.2, lo=0.0, hi=1.0, hi_open=True)  # before the text FC and before the head's FC
    encoder_activation: str = _f("none", choices=("none", "relu", "tanh"))  # after the encoders' FC layers
    # Table 3's encoders (scanet.encoders). text_encoder: "gcn" (ChebConv over the word graph on the bag-of-words,
    # the paper's), "lstm" (bidirectional, over the word embeddings of the text's tokens in order) or "cnn" (Kim
    # 2014, widths 3/4/5); lstm/cnn read the prepared token sequences and start from the prepared word vectors.
    text_encoder: str = _f("gcn", choices=("gcn", "lstm", "cnn"))
    # image_encoder: "fixed" (the prepared feature vectors, standardized, one FC) or "cnn5" (five conv blocks
    # trained end to end on the prepared raw pixels; only datasets with raw images: WebNews, custom).
    image_encoder: str = _f("fixed", choices=("fixed", "cnn5"))
    # lstm/cnn read each text's FIRST max_tokens tokens. 256 covers the whole of 71% of Eng-Wiki's training texts
    # (74..1,092 tokens, median 198) and keeps an LSTM step affordable on CPU (its cost grows linearly in T).
    max_tokens: int = _f(256, lo=1)
    # per direction; the pooled text feature is 2 * lstm_hidden wide. 64: the LSTM's step cost grows with
    # T * H * (d + H); at T = 256 a step of 256 pairs took 200 s on this CPU with 128 (README, Table 3's encoders)
    lstm_hidden: int = _f(64, lo=1)
    cnn_filters: int = _f(100, lo=1)  # feature maps per width (Kim's 100)
    freeze_embeddings: bool = False  # lstm/cnn: False fine-tunes the word vectors (Kim's "non-static")
    # cnn5: pixels are resized (area interpolation, inside the model) to image_size x image_size; None: as
    # prepared (64 x 64). Five 2x poolings need >= 32.
    image_size: int | None = _f(None, lo=32)


@dataclass
class TrainConfig:
    epochs: int = _f(80, lo=1)
    batch_size: int = _f(256, lo=1)
    lr: float = _f(1e-4, lo=0.0, lo_open=True)
    weight_decay: float = _f(0.005, lo=0.0)  # the paper's L2 0.005
    decoupled_weight_decay: bool = True  # True: AdamW; False: L2 in the gradient (Adam weight_decay), see README
    # How weight_decay is applied (README "how the paper was read"): "decoupled" (AdamW, the default here),
    # "coupled" (Adam's L2 in the gradient; decoupled_weight_decay=False is its older spelling), or
    # "loss_fc_only" (the authors' group's code: weight_decay * sum ||w||^2 / 2 over the FC weights and biases
    # added to the loss, the Chebyshev filters excluded, no optimizer decay).
    l2_mode: str = _f("decoupled", choices=("decoupled", "coupled", "loss_fc_only"))
    ground_truth_pairs: bool = False  # True: the positives include every ground-truth (text, its image) pair
    margin: float = _f(0.6, lo=0.0)  # m of eq. 10
    lam: float = _f(0.35, lo=0.0)  # lambda of eq. 10
    positive_pairs: int = _f(40_000, lo=1)
    negative_pairs: int = _f(40_000, lo=1)
    seed: int = _f(0, lo=0, hi=2**63 - 1)
    eval_every: int = _f(1, lo=0)  # epochs between test-set MAP evaluations (0: only at the end)
    score_chunk: int = _f(64, lo=1)  # texts scored at a time in evaluation (bounds memory)
    validation_fraction: float = _f(0.1, lo=0.0, hi=1.0, hi_open=True)  # training items held out (stratified,
    #   seeded) to select the epoch; 0: none
    patience: int = _f(0, lo=0)  # stop after this many epochs without a better validation MAP; 0: never
    precision: str = _f("fp32", choices=("fp32", "bf16", "fp16"))  # the forward passes under torch.autocast
    #   (scanet.precision: what stays float32 and why)


@dataclass
class Preset:
    name: str
    dataset: str  # loader name in scanet.data
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    vocab_size: int | None = _f(10_055, lo=1)  # the paper's Wiki graph has 10,055 words; None: the preparer's default
    knn: int | None = _f(8, lo=1)


PRESETS = {
    "wiki": Preset("wiki", "wiki"),
    # Synthetic (scanet.data.synthetic): 5 epochs of 2k+2k pairs (315 steps) with dropout 0.2 stopped at the
    # pair level (the image's strong signal): the twins stayed at similarity ~0.99, SCANet 0.59 mean MAP = CCA's.
    # The twin signal is weak and noisy and needs steps, not regularization: 20 epochs of 4k+4k pairs without
    # dropout (2,500 steps, README "Synthetic") reach 0.69 (seeds 0-3), well above CCA's 0.57.
    "synthetic": Preset(
        "synthetic",
        "synthetic",
        model=ModelConfig(common_dim=64, dropout=0.0),
        train=TrainConfig(epochs=20, batch_size=64, lr=1e-3, positive_pairs=4000, negative_pairs=4000),
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
        "webnews",
        "webnews",
        model=ModelConfig(common_dim=256, dropout=0.5),
        train=TrainConfig(
            epochs=2, batch_size=256, lr=3e-4, weight_decay=0.0, positive_pairs=80_000, negative_pairs=80_000
        ),
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
    "pascal-sentences": Preset(
        "pascal-sentences", "pascal-sentences", model=ModelConfig(common_dim=256), vocab_size=2000
    ),
    # Any folder in the custom format (docs/custom_format.md). vocab_size/knn None: dataset.json decides.
    # The WebNews schedule is the starting point (a few thousand items, CNN features).
    "custom": Preset(
        "custom",
        "custom",
        model=ModelConfig(common_dim=256, dropout=0.5),
        train=TrainConfig(
            epochs=2, batch_size=256, lr=3e-4, weight_decay=0.0, positive_pairs=80_000, negative_pairs=80_000
        ),
        vocab_size=None,
        knn=None,
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    p = PRESETS[name]  # a copy down to the sections: changing it never changes PRESETS
    return validate(dataclasses.replace(p, model=dataclasses.replace(p.model), train=dataclasses.replace(p.train)))


# ----------------------------------------------------------------------------------------------- checking
_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "tuple": tuple}


def _allowed(kind: type, lo=None, hi=None, lo_open=False, hi_open=False, choices=None, optional=False) -> str:
    """What a value may be, in words: 'an int >= 1', 'a float in [0, 1)', 'one of 'n', '1''."""
    if choices is not None:
        text = "one of " + ", ".join(repr(c) for c in choices)
    else:
        text = {
            int: "an int",
            float: "a finite float",
            str: "a string",
            bool: "True or False",
            tuple: "a non-empty tuple of ints",
        }[kind]
        if lo is not None and hi is not None:
            text += f" in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        elif lo is not None:
            text += f" {'>' if lo_open else '>='} {lo:g}"
        elif hi is not None:
            text += f" {'<' if hi_open else '<='} {hi:g}"
    return text + (" or None" if optional else "")


def check_value(
    key: str,
    value,
    kind: type,
    *,
    lo=None,
    hi=None,
    lo_open=False,
    hi_open=False,
    choices=None,
    optional=False,
    where: str = "",
):
    """THE checker: ``value`` converted to ``kind`` (int -> float, list -> tuple; the text 'nan'/'inf' is read as
    a float so that it is refused for being non-finite, not for being text) and range-checked, else a ValueError
    '{where}{key}={value!r}: {key} must be {allowed}'. Returns the converted value."""

    def fail():
        raise ValueError(
            f"{where}{key}={value!r}: {key} must be {_allowed(kind, lo, hi, lo_open, hi_open, choices, optional)}"
        )

    if value is None:
        if optional:
            return None
        fail()
    if kind is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            fail()
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    elif kind is str:
        ok = isinstance(value, str)
    elif kind is tuple:
        ok = (
            isinstance(value, (list, tuple))
            and len(value) > 0
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        )
    else:
        ok = True
    if not ok:
        fail()
    v = float(value) if kind is float else tuple(value) if kind is tuple else value
    if choices is not None and v not in choices:
        fail()
    entries: tuple = v if isinstance(v, tuple) else (v,)
    for x in entries:
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            if lo is not None and (x < lo or (lo_open and x == lo)):
                fail()
            if hi is not None and (x > hi or (hi_open and x == hi)):
                fail()
    return v


def _field_rule(f: dataclasses.Field) -> dict:
    """The declared type and bounds of a dataclass field, as check_value's keyword arguments."""
    text = str(f.type)
    kind = _TYPES.get(text.split("|")[0].strip())
    rule = {k: v for k, v in f.metadata.items() if k in ("lo", "hi", "lo_open", "hi_open", "choices")}
    return dict(kind=kind, optional="None" in text, **rule)


def check_field(obj, name: str, value, key: str | None = None, where: str = ""):
    """``value`` checked against field ``name`` of dataclass ``obj`` (type and declared bounds); returned converted."""
    f = {f.name: f for f in dataclasses.fields(obj)}[name]
    rule = _field_rule(f)
    if rule["kind"] is None:
        return value
    return check_value(key or name, value, where=where, **rule)


def validate(preset: Preset, where: str = "") -> Preset:
    """Every field of the preset (and its model and train sections) checked in place; returns the preset."""
    for obj in (preset, preset.model, preset.train):
        for f in dataclasses.fields(obj):
            if f.name in ("model", "train"):
                continue
            setattr(obj, f.name, check_field(obj, f.name, getattr(obj, f.name), where=where))
    return preset


def arg_type(section, name: str, flag: str | None = None):
    """An argparse ``type=`` for a CLI flag ``flag`` that sets the same thing as dataclass field
    ``section.name`` (``--chunk-size`` is ``TrainConfig.score_chunk``): the same type and bounds, an argparse
    error otherwise. (None is never a flag's value: leaving the flag out is.)"""
    f = {f.name: f for f in dataclasses.fields(section)}[name]
    return flag_type(**dict(_field_rule(f), optional=False), name=flag or name)


def parse_value(text: str):
    """A command-line value (``--set``, ``--option``, a typed flag): a Python literal where it is one (8, 2.0,
    (2, 1)), ``true``/``false`` in any case as a bool (what a shell user types; 1 and yes stay what they are),
    else the plain word as a string (paper, word2vec). The field's or option's checker decides what is allowed."""
    import ast

    if text.strip().lower() in ("true", "false"):
        return text.strip().lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def flag_type(kind: type, name: str = "value", **bounds):
    """An argparse ``type=`` checked by ``check_value`` (for flags that are no dataclass field: --top-k)."""
    import argparse

    def parse(text: str):
        try:
            return check_value(name, parse_value(text), kind, **bounds)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def check_setting(key: str, value, kind: type, where: str = "", **bounds):
    """A setting outside the dataclasses (dataset.json, a preparer's options): the same checker."""
    return check_value(key, value, kind, where=where, **bounds)


def _typed(obj, name: str, key: str, raw: str, value):
    """``value`` checked against the field's declared type and bounds (nanoGPT's configurator: an override must
    have the type of the field it replaces); ints are accepted for floats, lists for tuples, raw text for strings."""
    field_type = {f.name: f.type for f in dataclasses.fields(obj)}[name]
    if _TYPES.get(str(field_type).split("|")[0].strip()) is str and not isinstance(value, str):
        value = raw
    return check_field(obj, name, value, key, where="override ")


def apply_overrides(preset: Preset, overrides: list[str]) -> Preset:
    """Apply ``key=value`` overrides; keys are fields of the preset, ``model.x`` or ``train.x`` (or bare x).

    Values are read by ``parse_value`` (``epochs=10``, ``gcn_channels=(2,1)``, ``decoupled_weight_decay=false``;
    text needs no quotes) and must have the field's type and lie in its declared bounds: a ValueError names the
    key, the value and what is allowed.
    """
    preset = dataclasses.replace(
        preset, model=dataclasses.replace(preset.model), train=dataclasses.replace(preset.train)
    )
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        value = parse_value(raw)
        targets = []
        if "." in key:
            section, name = key.split(".", 1)
            obj = getattr(preset, section, None)
            if obj is None or not dataclasses.is_dataclass(obj):
                raise ValueError(f"unknown config section {section!r} in {item!r}")
            targets = [(obj, name)]
        else:
            name = key
            targets = [
                (o, name)
                for o in (preset, preset.model, preset.train)
                if name in {f.name for f in dataclasses.fields(o)}
            ]
        if not targets or name not in {f.name for f in dataclasses.fields(targets[0][0])} or name in ("model", "train"):
            raise ValueError(f"unknown config key {key!r}")
        for obj, name in targets:
            setattr(obj, name, _typed(obj, name, key, raw, value))
    return validate(preset)
