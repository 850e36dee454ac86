"""Training: one readable loop (nanoGPT style), atomic checkpoints with exact resume, metrics as JSON and PNG.

Pairs (scanet.pairs): ``positive_pairs`` matching and ``negative_pairs`` non-matching (text, image) pairs,
drawn once from the training split with the run's seed. Checkpoints are scanet.checkpoint's. Every epoch visits all pairs in a fresh order drawn from (seed, epoch), and dropout's random stream
is reseeded from (seed, epoch) too, so a run resumed from the checkpoint of epoch e continues exactly as the
uninterrupted run would have.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from scanet.checkpoint import (CHECKPOINT_FORMAT, build_model, load_checkpoint, load_model,  # noqa: F401
                               preset_from_dict, save_checkpoint)
from scanet.config import Preset
from scanet.data.prepared import PreparedDataset
from scanet.evaluate import evaluate_model
from scanet.loss import scanet_loss
from scanet.pairs import make_pairs  # noqa: F401  (scanet.train.make_pairs: where it used to live)
from scanet.plots import plot_pr_curves, plot_training_curve
from scanet.precision import autocast_context


# ----------------------------------------------------------------------------------------------------- train
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
        with autocast_context(device, tc.precision):           # the forward only: sim (and the loss) float32
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
            report, _ = evaluate_model(model, dataset, "test", tc.score_chunk, precision=tc.precision)
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
        plot_training_curve(history, out / "training_curve.png")
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            break

    if report is None:                                            # the last epoch was not evaluated
        report, _ = evaluate_model(model, dataset, "test", tc.score_chunk, precision=tc.precision)
    (out / "evaluation.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    plot_pr_curves({"SCANet": report}, out / "pr_curves.png", title=dataset.name)
    return {"history": history, "report": report}
