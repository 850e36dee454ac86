"""The Table 3 encoders (scanet.encoders): float64 oracles for the text encoders' packing, padding and pooling,
the image encoders' shapes, the torchvision-format loaders (random weights, saved and loaded), and a few
training steps of each encoder with the project's loss that must lower it."""

import pickle

import numpy as np
import pytest
import torch
from torch import nn

from scanet.data.tokens import token_ids
from scanet.encoders import (
    VGG19,
    ImageCNN5,
    ResNet50,
    TextCNN,
    TextLSTM,
    TokenEmbedding,
    load_resnet50,
    load_torchvision_weights,
    load_vgg19,
)
from scanet.loss import scanet_loss

V, D_EMB, N = 40, 6, 12


def _lstm(pooling="mean", **kw):
    return TextLSTM(V, N, embedding_dim=D_EMB, hidden_size=5, pooling=pooling, **kw)


def _cnn(**kw):
    return TextCNN(V, N, embedding_dim=D_EMB, filters=4, **kw)


TEXT_ENCODERS = {
    "lstm-mean": lambda: _lstm("mean"),
    "lstm-last": lambda: _lstm("last"),
    "cnn": _cnn,
    "lstm-2-layers": lambda: _lstm("mean", num_layers=2),
}


def _ragged(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, V + 1, (L,), generator=g) for L in lengths]


def _pad(seqs, T):
    out = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


# ------------------------------------------------------------------------------------------ word embedding
def test_embedding_rows_come_from_the_matrix_and_padding_is_zero():
    w = np.random.default_rng(0).normal(size=(V, D_EMB)).astype(np.float32)
    emb = TokenEmbedding(V, w)
    assert emb.embedding.weight.shape == (V + 1, D_EMB)
    assert torch.equal(emb.embedding.weight[0], torch.zeros(D_EMB))
    assert torch.equal(emb.embedding.weight[1:], torch.from_numpy(w))  # word vocab[i] has id i + 1
    x, mask, lengths = emb(torch.tensor([[3, 1, 0, 0], [0, 0, 0, 0]]))
    assert lengths.tolist() == [2, 0] and mask.tolist() == [[True, True, False, False], [False] * 4]
    assert torch.equal(x[0, 0], torch.from_numpy(w[2])) and not x[0, 2:].any() and not x[1].any()


@pytest.mark.parametrize("freeze", [True, False])
def test_embeddings_frozen_or_trained_by_flag(freeze):
    w = np.random.default_rng(1).normal(size=(V, D_EMB)).astype(np.float32)
    enc = TextCNN(V, N, embeddings=w, freeze_embeddings=freeze, filters=4)
    before = enc.embed.embedding.weight.detach().clone()
    opt = torch.optim.SGD([p for p in enc.parameters() if p.requires_grad], lr=0.5)
    enc(_pad(_ragged([5, 3]), 8)).square().sum().backward()
    opt.step()
    after = enc.embed.embedding.weight.detach()
    assert torch.equal(after[0], torch.zeros(D_EMB))  # padding row never moves
    assert torch.equal(after, before) == freeze


def test_bad_embedding_arguments_are_value_errors():
    with pytest.raises(ValueError, match="vocab_size=40"):
        TokenEmbedding(V, np.zeros((V + 1, 3)))
    with pytest.raises(ValueError, match="embedding_dim"):
        TokenEmbedding(V)
    with pytest.raises(ValueError, match="NaN"):
        TokenEmbedding(V, np.full((V, 3), np.nan))
    with pytest.raises(ValueError, match="integer"):
        _lstm()(torch.rand(2, 3))
    with pytest.raises(ValueError, match="lengths must lie"):
        _cnn()(torch.ones(2, 3, dtype=torch.long), torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="pooling"):
        _lstm("max")


# ------------------------------------------------------------------------- text encoders: float64 oracles
LENGTHS = [10, 1, 0, 7, 2, 4]  # full length, shorter than every CNN width, empty


@pytest.mark.parametrize("name", sorted(TEXT_ENCODERS))
def test_text_features_do_not_depend_on_padding_length(name):
    torch.manual_seed(0)
    enc = TEXT_ENCODERS[name]().double().eval()
    seqs = _ragged(LENGTHS)
    a, b = enc(_pad(seqs, 10)), enc(_pad(seqs, 20))
    assert a.shape == (len(LENGTHS), N) and a.dtype == torch.float64
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    lengths = torch.tensor(LENGTHS)
    torch.testing.assert_close(enc(_pad(seqs, 20), lengths), a, rtol=0, atol=1e-12)  # explicit lengths agree
    torch.testing.assert_close(enc(_pad(seqs[:1], 10))[0], a[0], rtol=0, atol=1e-12)  # batch-independent
    # An empty text has zero pooled features: its features are the FC bias.
    torch.testing.assert_close(a[2], enc.fc.bias, rtol=0, atol=1e-12)


def test_lstm_pooling_matches_one_sequence_at_a_time():
    """Packed batch vs each text alone through the same nn.LSTM without packing or padding (float64)."""
    torch.manual_seed(1)
    for pooling in ("mean", "last"):
        enc = _lstm(pooling).double().eval()
        seqs = _ragged([9, 1, 5, 3], seed=2)
        got = enc.pooled(_pad(seqs, 12))
        for i, s in enumerate(seqs):
            out, (h, _) = enc.lstm(enc.embed.embedding(s).unsqueeze(0))  # (1, L, 2H), h: (2, 1, H)
            want = out[0].mean(0) if pooling == "mean" else torch.cat([h[-2, 0], h[-1, 0]])
            if pooling == "last":  # h_bwd(0) is the backward direction's output at t = 0
                torch.testing.assert_close(h[-1, 0], out[0, 0, 5:], rtol=0, atol=1e-12)
            torch.testing.assert_close(got[i], want, rtol=0, atol=1e-12)


def test_cnn_pooling_matches_kim_on_each_text_alone():
    """Each text alone: wide conv (w - 1 zeros both ends), ReLU, max over all L + w - 1 windows (float64)."""
    torch.manual_seed(2)
    enc = _cnn().double().eval()
    seqs = _ragged([9, 1, 2, 6], seed=3)
    got = enc.pooled(_pad(seqs, 15))
    for i, s in enumerate(seqs):
        x = enc.embed.embedding(s).T.unsqueeze(0)  # (1, d, L)
        want = []
        for w, conv in zip(enc.widths, enc.convs, strict=True):
            y = torch.nn.functional.conv1d(x, conv.weight, conv.bias, padding=w - 1)
            assert y.shape[-1] == len(s) + w - 1
            want.append(torch.relu(y)[0].amax(-1))
        torch.testing.assert_close(got[i], torch.cat(want), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", sorted(TEXT_ENCODERS))
def test_text_gradients_do_not_depend_on_padding(name):
    """Backward through a padded batch equals the sum of each text's backward alone (float64)."""
    torch.manual_seed(3)
    enc = TEXT_ENCODERS[name]().double().eval()
    seqs = _ragged([8, 3, 0, 5], seed=4)
    weights = torch.randn(len(seqs), N, dtype=torch.float64)

    def grads(loss):
        enc.zero_grad()
        loss.backward()
        return {k: p.grad.clone() for k, p in enc.named_parameters()}

    batch = grads((enc(_pad(seqs, 16)) * weights).sum())
    alone = [grads((enc(_pad([s], max(len(s), 1))) * weights[i]).sum()) for i, s in enumerate(seqs)]
    for k, g in batch.items():
        torch.testing.assert_close(g, sum(a[k] for a in alone), rtol=1e-10, atol=1e-12)


def test_token_sequences_feed_the_encoders():
    """scanet.data.tokens' padded batches go straight in; the lengths it returns are the ones derived."""
    vocab = [f"w{i}" for i in range(V)]
    docs = [["w3", "zzz", "w5", "w3"], [], ["w39"] * 12]
    toks = token_ids(docs, vocab)
    ids, lengths = toks.padded(max_length=10)
    enc = _lstm().eval()
    ids_t = torch.from_numpy(ids)
    torch.testing.assert_close(enc(ids_t), enc(ids_t, torch.from_numpy(lengths)), rtol=0, atol=0)
    assert lengths.tolist() == [3, 0, 10]


# ------------------------------------------------------------------------------------------ image encoders
def test_cnn5_shapes_input_types_and_batch_independence():
    torch.manual_seed(4)
    enc = ImageCNN5(N, channels=(4, 4, 8, 8, 8)).eval()
    pix = torch.randint(0, 256, (3, 3, 48, 40), dtype=torch.uint8)
    out = enc(pix)
    assert out.shape == (3, N)
    torch.testing.assert_close(out, enc(pix.float() / 127.5 - 1.0), rtol=0, atol=1e-6)  # uint8 -> [-1, 1]
    torch.testing.assert_close(enc(pix[1:2])[0], out[1], rtol=0, atol=1e-5)  # eval: BN running stats
    assert len([m for m in enc.modules() if isinstance(m, nn.Conv2d)]) == 5
    full = ImageCNN5(N)
    assert sum(m.weight.numel() for m in full.modules() if isinstance(m, nn.Conv2d)) == 977_760
    assert full(torch.zeros(2, 3, 128, 128)).shape == (2, N)
    with pytest.raises(ValueError, match="at least 32"):
        enc(torch.zeros(1, 3, 16, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        enc(torch.zeros(1, 1, 64, 64))


def test_cnn5_float64_gradients():
    torch.manual_seed(5)
    enc = ImageCNN5(3, channels=(2, 2, 2, 2, 2), in_channels=1, dropout=0.0).double().eval()
    x = torch.randn(1, 1, 32, 32, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: enc(t), (x,), eps=1e-6, atol=1e-6)


def _random_torchvision_state(model_cls, seed=0, drop_batch_counters=False):
    """He-scaled random weights in the model's (= torchvision's) key format, as a torchvision file holds them."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        meta = model_cls()
    state = {}
    for k, v in meta.state_dict().items():
        if k.endswith("num_batches_tracked"):
            if not drop_batch_counters:
                state[k] = torch.tensor(0)
        elif k.endswith("running_var"):
            state[k] = torch.ones(v.shape)
        elif k.endswith("running_mean") or k.endswith("bias"):
            state[k] = 0.01 * torch.randn(v.shape, generator=g)
        elif v.dim() == 1:  # BatchNorm weight
            state[k] = 1.0 + 0.1 * torch.randn(v.shape, generator=g)
        else:
            fan_in = v[0].numel()
            state[k] = torch.randn(v.shape, generator=g) * (2.0 / fan_in) ** 0.5
    return state


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("vgg") / "vgg19-random.pth"
    torch.save(_random_torchvision_state(VGG19), path)  # 548 MB, written once for this module
    return path


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("resnet") / "resnet50-random.pth"
    torch.save(_random_torchvision_state(ResNet50, seed=1, drop_batch_counters=True), path)  # as the V1 file
    return path


def test_architectures_have_torchvisions_parameter_counts():
    """torchvision's published counts: VGG19_Weights 143,667,240; ResNet50_Weights 25,557,032."""
    with torch.device("meta"):
        vgg, resnet = VGG19(), ResNet50()
    assert sum(p.numel() for p in vgg.parameters()) == 143_667_240
    assert sum(p.numel() for p in resnet.parameters()) == 25_557_032
    assert len(vgg.state_dict()) == 38 and len(resnet.state_dict()) == 320  # 53 BN x 5 + 53 conv + fc
    assert {"features.34.weight", "classifier.6.bias"} <= set(vgg.state_dict())
    assert {"layer1.0.downsample.0.weight", "layer4.2.bn3.running_var", "fc.weight"} <= set(resnet.state_dict())


def test_vgg19_loads_a_torchvision_file_and_gives_fc7(vgg_file):
    model = load_vgg19(vgg_file)
    state = torch.load(vgg_file, weights_only=True)
    own = model.state_dict()
    assert set(own) == set(state) and all(torch.equal(own[k], state[k]) for k in state)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fc7, logits = model.fc7(x), model(x)
    assert fc7.shape == (2, 4096) and logits.shape == (2, 1000)
    assert (fc7 >= 0).all() and fc7.std() > 0  # after the ReLU, not constant


def test_resnet50_loads_a_file_without_batch_counters(resnet_file):
    model = load_resnet50(resnet_file)
    state = torch.load(resnet_file, weights_only=True)
    assert not any(k.endswith("num_batches_tracked") for k in state)
    own = model.state_dict()
    assert len(own) == 320 and all(torch.equal(own[k], state[k]) for k in state)
    assert int(own["bn1.num_batches_tracked"]) == 0 and own["bn1.num_batches_tracked"].device.type == "cpu"
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        pool5, logits = model.pool5(x), model(x)
    assert pool5.shape == (3, 2048) and logits.shape == (3, 1000) and pool5.std() > 0
    torch.testing.assert_close(logits, pool5 @ state["fc.weight"].T + state["fc.bias"])


class _NotWeights:
    pass


def test_wrong_weights_files_are_clear_value_errors(tmp_path, resnet_file):
    with pytest.raises(ValueError, match="missing keys.*unexpected keys"):
        load_vgg19(resnet_file)  # a ResNet file for VGG
    with pytest.raises(ValueError, match="not found"):
        load_resnet50(tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file at all")
    with pytest.raises(ValueError, match="junk.pth is not a torch weights file"):
        load_resnet50(junk)
    code = tmp_path / "code.pth"
    with code.open("wb") as fh:
        pickle.dump(_NotWeights(), fh, protocol=2)  # needs code to unpickle
    with pytest.raises(ValueError, match="code.pth is not a torch weights file"):
        load_resnet50(code)
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(ValueError, match="does not hold a state_dict"):
        load_resnet50(listed)
    state = _random_torchvision_state(ResNet50)
    state["fc.weight"], state["fc.bias"] = torch.zeros(10, 2048), torch.zeros(10)  # a 10-class head
    shaped = tmp_path / "shape.pth"
    torch.save(state, shaped)
    with pytest.raises(ValueError, match=r"1 wrong shapes|2 wrong shapes"):
        load_resnet50(shaped)
    assert load_torchvision_weights(ResNet50, shaped, num_classes=10).fc.weight.shape == (10, 2048)


# ------------------------------------------------------------ a few training steps with the project's loss
class PairHead(nn.Module):
    """SCANet's head on its own (scanet.model.SimilarityHead): logit = FC(f_T * f_I)."""

    def __init__(self, dim):
        super().__init__()
        self.fc = nn.Linear(dim, 1)

    def forward(self, f_t, f_i):
        return self.fc(f_t * f_i).squeeze(-1)


def _synthetic_items(n=48, classes=4, seed=0):
    """Texts: class words (ids 1 + c*8 .. 8 + c*8) mixed with background words, ragged lengths 3..14; images:
    a per-class template plus noise (32 x 32 uint8); labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    seqs = []
    for c in labels:
        L = int(rng.integers(3, 15))
        own = rng.integers(1 + 8 * c, 9 + 8 * c, L)
        background = rng.integers(33, V + 1, L)
        seqs.append(torch.from_numpy(np.where(rng.random(L) < 0.6, own, background)))
    templates = rng.integers(0, 256, (classes, 3, 32, 32))
    noise = rng.integers(-40, 41, (n, 3, 32, 32))
    pixels = torch.from_numpy(np.clip(templates[labels] + noise, 0, 255).astype(np.uint8))
    return _pad(seqs, 16), pixels, torch.from_numpy(labels)


def _pairs(labels, count=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    i = torch.randint(0, len(labels), (4 * count,), generator=g)
    j = torch.randint(0, len(labels), (4 * count,), generator=g)
    same = labels[i] == labels[j]
    keep = torch.cat([torch.nonzero(same)[: count // 2, 0], torch.nonzero(~same)[: count // 2, 0]])
    return i[keep], j[keep], same[keep].double()


def _train(text_enc, text_in, image_enc, image_in, labels, steps=40, lr=1e-2):
    head = PairHead(N)
    params = [p for m in (text_enc, image_enc, head) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    ti, ii, target = _pairs(labels)

    def loss(train):
        for m in (text_enc, image_enc, head):
            m.train(train)
        sim = torch.sigmoid(head(text_enc(text_in)[ti], image_enc(image_in)[ii]))
        return scanet_loss(sim.float(), target.float())[0]

    with torch.no_grad():
        before = loss(False).item()
    for _ in range(steps):
        opt.zero_grad()
        loss(True).backward()
        opt.step()
    with torch.no_grad():
        after = loss(False).item()
    return before, after


class FixedFeatures(nn.Module):
    """The fixed-feature image path (as scanet.model.ImageEncoder): standardize, then FC to N."""

    def __init__(self, feats):
        super().__init__()
        self.register_buffer("mean", feats.mean(0))
        self.register_buffer("std", feats.std(0).clamp_min(1e-6))
        self.fc = nn.Linear(feats.shape[1], N)

    def forward(self, x):
        return self.fc((x - self.mean) / self.std)


@pytest.mark.parametrize("name", ["lstm-mean", "lstm-last", "cnn"])
def test_text_encoder_trains_and_lowers_the_loss(name):
    torch.manual_seed(6)
    tokens, pixels, labels = _synthetic_items()
    onehot = torch.nn.functional.one_hot(labels, 4).float() + 0.3 * torch.randn(len(labels), 4)
    before, after = _train(TEXT_ENCODERS[name](), tokens, FixedFeatures(onehot), onehot, labels)
    print(f"loss {before:.4f} -> {after:.4f}")
    assert after < 0.7 * before, (before, after)


def test_cnn5_trains_end_to_end_and_lowers_the_loss():
    torch.manual_seed(7)
    tokens, pixels, labels = _synthetic_items()
    before, after = _train(_cnn(), tokens, ImageCNN5(N, channels=(8, 8, 16, 16, 16)), pixels, labels, lr=3e-3)
    print(f"loss {before:.4f} -> {after:.4f}")
    assert after < 0.7 * before, (before, after)


@pytest.mark.parametrize("which", ["vgg19", "resnet50"])
def test_fixed_cnn_features_train_and_lower_the_loss(which, request):
    """VGG-19 fc7 / ResNet-50 pool5 of the (random-weight) file, computed once, then the fixed-feature path."""
    torch.manual_seed(8)
    path = request.getfixturevalue("vgg_file" if which == "vgg19" else "resnet_file")
    model = load_vgg19(path) if which == "vgg19" else load_resnet50(path)
    tokens, pixels, labels = _synthetic_items()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        x = (pixels.float() / 255 - mean) / std
        feats = model.fc7(x) if which == "vgg19" else model.pool5(x)
    assert feats.shape == (len(labels), 4096 if which == "vgg19" else 2048)
    before, after = _train(_lstm(), tokens, FixedFeatures(feats), feats, labels)
    print(f"loss {before:.4f} -> {after:.4f}")
    assert after < 0.7 * before, (before, after)
