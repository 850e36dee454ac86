"""Training: one readable loop (nanoGPT style), atomic checkpoints with exact resume, metrics as JSON and PNG.

Pairs: ``positive_pairs`` (text i, image j) of the same class (sharing a label, for multi-label data) and
``negative_pairs`` of different classes, drawn once from the training split with the run's seed (the paper:
40k + 40k). Every epoch visits all pairs in a fresh order drawn from (seed, epoch), and dropout's random stream
is reseeded from (seed, epoch) too, so a run resumed from the checkpoint of epoch e continues exactly as the
uninterrupted run would have.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from scanet.config import Preset
from scanet.data.prepared import PreparedDataset
from scanet.evaluate import evaluate_model, plot_pr_curves
from scanet.loss import scanet_loss
from scanet.model import SCANet

CHECKPOINT_FORMAT = "scanet-checkpoint-v1"


# ----------------------------------------------------------------------------------------------------- pairs
def make_pairs(labels: np.ndarray, n_pos: int, n_neg: int, seed: int):
    """(text_index, image_index, target) arrays: n_pos matching and n_neg non-matching pairs, shuffled."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    n = labels.shape[0]
    if labels.ndim == 1:
        by_class = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
        ti = rng.integers(0, n, n_pos)
        ii = np.array([rng.choice(by_class[labels[t]]) for t in ti], dtype=np.int64)
    else:
        rel = (labels.astype(np.float32) @ labels.astype(np.float32).T) > 0
        ti = rng.integers(0, n, n_pos)
        ii = np.array([rng.choice(np.flatnonzero(rel[t])) if rel[t].any() else t for t in ti], dtype=np.int64)

    def matches(a, b):
        return (labels[a] == labels[b]) if labels.ndim == 1 else (labels[a] & labels[b]).any(axis=-1)

    nt, ni = rng.integers(0, n, n_neg), rng.integers(0, n, n_neg)
    for _ in range(1000):                                        # redraw the pairs that happen to match
        bad = np.flatnonzero(matches(nt, ni))
        if bad.size == 0:
            break
        nt[bad] = rng.integers(0, n, bad.size)   # redraw both: an item may share a label with every other
        ni[bad] = rng.integers(0, n, bad.size)
    else:
        raise ValueError("could not draw non-matching pairs: does every training item share a class?")
    text = np.concatenate([ti, nt]).astype(np.int64)
    image = np.concatenate([ii, ni]).astype(np.int64)
    target = np.concatenate([np.ones(n_pos), np.zeros(n_neg)]).astype(np.float32)
    order = rng.permutation(len(text))
    return text[order], image[order], target[order]


# ------------------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write atomically: a temporary file in the same folder, fsync, then rename over the old checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # torch raises many types for a truncated or foreign file
        raise ValueError(f"checkpoint {path} is corrupt or not a SCANet checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a SCANet checkpoint (format {CHECKPOINT_FORMAT!r} expected)")
    return state


def preset_from_dict(d: dict) -> Preset:
    from scanet.config import ModelConfig, TrainConfig

    model = ModelConfig(**{**d["model"], "gcn_channels": tuple(d["model"]["gcn_channels"])})
    return Preset(**{**d, "model": model, "train": TrainConfig(**d["train"])})


def build_model(preset: Preset, dataset: PreparedDataset, fused: bool = False) -> SCANet:
    """A fresh model for the dataset, its image standardization fitted on the training images."""
    model = SCANet(dataset.vocab_size, dataset.image_dim, dataset.laplacian, preset.model, fused=fused)
    model.image_encoder.set_input_statistics(dataset.train.images)
    return model


def load_model(checkpoint: str | Path | dict, dataset: PreparedDataset | None = None, device="cpu",
               fused: bool = False) -> tuple[SCANet, dict]:
    """Rebuild the model of a checkpoint; refuse a dataset whose fingerprint differs from the training data's."""
    state = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    preset = preset_from_dict(state["preset"])
    if dataset is not None and state.get("dataset_fingerprint") and dataset.fingerprint and \
            state["dataset_fingerprint"] != dataset.fingerprint:
        raise ValueError(f"checkpoint was trained on prepared data {state['dataset_fingerprint']} but the given "
                         f"dataset is {dataset.fingerprint} (different vocabulary, graph or features)")
    V = state["vocab_size"]
    crow = state["model"]["laplacian_crow"]
    model = SCANet(V, state["image_dim"], torch.sparse_csr_tensor(
        crow, state["model"]["laplacian_col"], state["model"]["laplacian_values"], (V, V)), preset.model, fused=fused)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ValueError(f"checkpoint does not match the model it describes: {e}") from e
    return model.to(device), state


# ----------------------------------------------------------------------------------------------------- train
def _plot_history(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    ep = [h["epoch"] for h in history]
    a1.plot(ep, [h["loss"] for h in history], marker="o", ms=3)
    a1.set_xlabel("epoch")
    a1.set_ylabel("training loss (eq. 10)")
    a1.grid(alpha=0.3)
    ev = [h for h in history if "text2image_map" in h]
    if ev:
        for key, name in (("text2image_map", "text -> image"), ("image2text_map", "image -> text"),
                          ("mean_map", "mean")):
            a2.plot([h["epoch"] for h in ev], [h[key] for h in ev], marker="o", ms=3, label=name)
        a2.legend()
    a2.set_xlabel("epoch")
    a2.set_ylabel("test MAP")
    a2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class GraphedStep:
    """The whole training step (forward, loss, backward, Adam) captured once in a CUDA graph and replayed.

    Only the batch's pair indices change between steps: they are copied into a static index tensor, and the
    step gathers its texts, images and targets from the device-resident training set. The first
    ``warmup`` steps run eagerly on a side stream (they are real steps on real batches: they compile the Triton
    kernels, fill Adam's state and the Laplacian checks) and then the step is captured. Shapes must not change,
    so with graphs each epoch drops its last partial batch. Needs Adam(capturable=True).
    """

    def __init__(self, step_fn, batch_size: int, device, warmup: int = 3):
        self.step_fn, self.warmup, self.calls = step_fn, warmup, 0
        self.static_idx = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.graph, self.static_loss = None, None
        self.side = torch.cuda.Stream(device=device)

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        self.static_idx.copy_(idx)
        if self.graph is not None:
            self.graph.replay()
            return self.static_loss
        self.calls += 1
        if self.calls <= self.warmup:
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                loss = self.step_fn(self.static_idx, zero_grad=True)
            torch.cuda.current_stream().wait_stream(self.side)
            return loss
        self.step_fn.zero_grad()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_loss = self.step_fn(self.static_idx, zero_grad=False)
        self.graph.replay()                    # capture records without running: run this batch's step now
        return self.static_loss


def train(preset: Preset, dataset: PreparedDataset, out_dir: str | Path, device: str = "cpu",
          fused: bool = False, resume: bool = False, compile: bool = False, cuda_graphs: bool = False,
          progress: bool = True, stop_after_epoch: int | None = None, log=print) -> dict:
    """Train, evaluate on the test split, checkpoint every epoch. Returns the last metrics row.

    ``stop_after_epoch`` ends the run early (for tests of resume); ``resume`` continues from out_dir/last.pt.
    ``compile`` runs the model under torch.compile; ``cuda_graphs`` captures the whole step in a CUDA graph
    (CUDA only; each epoch then drops its last partial batch, see GraphedStep).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tc = preset.train
    device = torch.device(device)
    if cuda_graphs and device.type != "cuda":
        raise ValueError(f"--cuda-graphs needs a CUDA device, got {device}")
    torch.manual_seed(tc.seed)
    model = build_model(preset, dataset, fused=fused).to(device)
    # fused=True: one multi-tensor kernel instead of a loop over parameters (on CPU the default Adam costs a
    # fifth of the Wiki step); it supports capturable for CUDA graphs.
    adam = torch.optim.AdamW if tc.decoupled_weight_decay else torch.optim.Adam
    opt = adam(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, capturable=cuda_graphs,
               fused=device.type in ("cpu", "cuda"))
    history: list[dict] = []
    start_epoch = 0
    ckpt_path = out / "last.pt"
    if resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path, map_location=device)
        if state.get("dataset_fingerprint") != dataset.fingerprint:
            raise ValueError(f"{ckpt_path} was trained on other prepared data "
                             f"({state.get('dataset_fingerprint')} vs {dataset.fingerprint})")
        if state["preset"] != dataclasses.asdict(preset):
            raise ValueError(f"{ckpt_path} was trained with another configuration; resume needs the same one "
                             f"(saved: {state['preset']})")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_epoch, history = state["epoch"], state["history"]
        log(f"resuming from {ckpt_path} after epoch {start_epoch}")

    step_model = torch.compile(model) if compile else model
    tr = dataset.train
    texts = torch.as_tensor(tr.text_matrix(), device=device, dtype=torch.float32)
    images = torch.as_tensor(tr.images, device=device, dtype=torch.float32)

    ti, ii, target = (torch.as_tensor(a, device=device) for a in
                      make_pairs(tr.labels, tc.positive_pairs, tc.negative_pairs, tc.seed))
    n_pairs = len(target)
    steps = n_pairs // tc.batch_size if cuda_graphs else math.ceil(n_pairs / tc.batch_size)

    def step_fn(idx, zero_grad=True):
        sim = step_model(texts[ti[idx]], images[ii[idx]])
        loss, _ = scanet_loss(sim, target[idx], tc.margin, tc.lam)
        if zero_grad:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    step_fn.zero_grad = lambda: opt.zero_grad(set_to_none=True)
    graphed = GraphedStep(step_fn, tc.batch_size, device) if cuda_graphs else None

    report = None
    for epoch in range(start_epoch, tc.epochs):
        model.train()
        gen = torch.Generator().manual_seed(tc.seed * 100_003 + epoch)
        order = torch.randperm(n_pairs, generator=gen).to(device)
        torch.manual_seed(tc.seed * 100_003 + epoch)             # dropout's stream, reproducible on resume
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        bar = range(steps)
        if progress:
            from tqdm import tqdm

            bar = tqdm(bar, desc=f"epoch {epoch + 1}/{tc.epochs}", unit="step", leave=False)
        for s in bar:
            idx = order[s * tc.batch_size:(s + 1) * tc.batch_size]
            loss = graphed(idx) if graphed is not None else step_fn(idx)
            loss_sum += loss
            if progress and s % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
        if device.type == "cuda":
            torch.cuda.synchronize()
        row = {"epoch": epoch + 1, "loss": float(loss_sum) / steps, "epoch_seconds": time.perf_counter() - t0}
        if not math.isfinite(row["loss"]):
            raise FloatingPointError(f"training diverged at epoch {epoch + 1} (loss {row['loss']}); "
                                     "lower the learning rate")
        last = epoch + 1 == tc.epochs
        report = None
        if (tc.eval_every and (epoch + 1) % tc.eval_every == 0) or last:
            t1 = time.perf_counter()
            report, _ = evaluate_model(model, dataset, "test", tc.score_chunk)
            row.update(text2image_map=report["text2image"]["map"], image2text_map=report["image2text"]["map"],
                       mean_map=report["mean_map"], eval_seconds=time.perf_counter() - t1)
        history.append(row)
        log(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}))
        save_checkpoint(ckpt_path, {
            "format": CHECKPOINT_FORMAT, "model": model.state_dict(), "optimizer": opt.state_dict(),
            "epoch": epoch + 1, "history": history, "preset": dataclasses.asdict(preset),
            "dataset_fingerprint": dataset.fingerprint, "dataset_name": dataset.name,
            "vocab_size": dataset.vocab_size, "image_dim": dataset.image_dim, "classes": dataset.classes,
        })
        (out / "metrics.json").write_text(json.dumps(history, indent=1), encoding="utf-8")
        _plot_history(history, out / "training_curve.png")
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            break

    if report is None:                                            # the last epoch was not evaluated
        report, _ = evaluate_model(model, dataset, "test", tc.score_chunk)
    (out / "evaluation.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    plot_pr_curves({"SCANet": report}, out / "pr_curves.png", title=dataset.name)
    return {"history": history, "report": report}
