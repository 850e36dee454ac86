"""What one SCANet training step costs with each of Table 3's encoders, at the shapes training uses.

Run: ``PYTHONPATH=. nice -n 5 python3 bench/encoder_training_step.py --wiki-prepared DIR [--webnews RAW]
[--rounds 3] [--out bench/results/encoder_training_step.json]``

1. Text encoders on prepared Eng-Wiki (format 2, e.g. ``scanet prepare wiki --root ../shared/data/wiki --out
   DIR``): the whole step of ``scanet.train`` (forward, loss, backward, AdamW) of the wiki preset (N = 1024,
   two co-attention layers, B = 256 pairs of training texts and SIFT images) with text_encoder gcn, lstm and
   cnn at the keys' defaults (max_tokens, lstm_hidden, cnn_filters) and the variants given by ``--lstm``.
2. CNN-5 on WebNews pixels (``--webnews``: the raw folder): 256 of its images decoded to S x S by
   scanet.data.pixels, the image side of a step (ImageCNN5 forward + a loss on its output + backward + AdamW),
   S = 64 (the prepared size) and 32 (``image_size=32``).
Providers interleaved round by round (bench/_script.interleaved): a shared, loaded 2-core machine gives noisy
figures; read the ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _script import interleaved, write_summary


def text_steps(prepared: Path, lstm_variants: list[str]) -> dict:
    from scanet.checkpoint import build_model
    from scanet.config import apply_overrides, get_preset
    from scanet.data.prepared import PreparedDataset
    from scanet.inputs import model_inputs
    from scanet.loss import scanet_loss
    from scanet.pairs import make_pairs

    ds = PreparedDataset.load(prepared)
    configs = {"gcn": [], "lstm": ["text_encoder=lstm"], "cnn": ["text_encoder=cnn"]}
    for v in lstm_variants:  # "max_tokens=128,lstm_hidden=64"
        configs[f"lstm {v}"] = ["text_encoder=lstm"] + v.split(",")
    steps = {}
    for name, overrides in configs.items():
        preset = apply_overrides(get_preset("wiki"), overrides)
        torch.manual_seed(0)
        model = build_model(preset, ds).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.005, fused=True)
        texts, images = model_inputs(ds.train, preset.model)
        ti, ii, y = (torch.as_tensor(a[:256]) for a in make_pairs(ds.train.labels, 128, 128, 0))
        xt, xi = texts[ti], images[ii]

        def step(model=model, opt=opt, xt=xt, xi=xi, y=y):
            loss, _ = scanet_loss(model(xt, xi), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        m = preset.model
        label = name
        if m.text_encoder != "gcn":
            extra = f", lstm_hidden={m.lstm_hidden}" if m.text_encoder == "lstm" else f", cnn_filters={m.cnn_filters}"
            label = f"{name} (T={xt.shape[1]}{extra})"
        steps[label] = step
    return steps


def cnn5_steps(raw: Path) -> dict:
    from scanet.data.images import choose_images
    from scanet.data.lists import read_list
    from scanet.data.pixels import pixels_for, stack_pixels
    from scanet.data.webnews import read_categories
    from scanet.encoders import ImageCNN5

    entries = read_list(raw / "trainset_txt_img_cat.list")
    classes = read_categories(raw, entries)
    choices = [c for c in choose_images(raw / "images", entries, classes).values() if c.path][:300]
    px = pixels_for(raw / "images", choices, 64, progress=True)
    ids = list(px)[:256]
    pixels = torch.as_tensor(stack_pixels(px, ids))
    steps = {}
    for S in (64, 32):
        torch.manual_seed(0)
        enc = ImageCNN5(1024).train()
        opt = torch.optim.AdamW(enc.parameters(), lr=1e-4, fused=True)
        x = pixels.float() / 127.5 - 1.0
        if S != 64:
            x = torch.nn.functional.interpolate(x, size=(S, S), mode="bilinear", antialias=True)

        def step(enc=enc, opt=opt, x=x):
            loss = enc(x).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        steps[f"cnn5 image side, B=256, {S}x{S}"] = step
    return steps


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wiki-prepared", type=Path)
    ap.add_argument("--webnews", type=Path)
    ap.add_argument(
        "--lstm", action="append", default=[], help="extra lstm variant, e.g. max_tokens=128,lstm_hidden=64"
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench/results/encoder_training_step.json"))
    args = ap.parse_args(argv)
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    steps = {}
    if args.wiki_prepared:
        steps.update(text_steps(args.wiki_prepared, args.lstm))
    if args.webnews:
        steps.update(cnn5_steps(args.webnews))
    times = interleaved(steps, args.rounds)
    rows = []
    for name, ts in times.items():
        rows.append(
            {
                "config": name,
                "median_ms": round(1000 * statistics.median(ts), 1),
                "all_ms": [round(1000 * t) for t in ts],
            }
        )
        print(f"{name:45s} {rows[-1]['median_ms']:>9.1f} ms/step  {rows[-1]['all_ms']}")
    write_summary(args.out, "bench/encoder_training_step.py", argv, rows, load)


if __name__ == "__main__":
    main()
