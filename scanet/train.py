"""Training: one readable loop (nanoGPT style), atomic checkpoints with exact resume, metrics as JSON and PNG.

Pairs (scanet.pairs): ``positive_pairs`` matching and ``negative_pairs`` non-matching (text, image) pairs,
drawn once from the training split with the run's seed. Checkpoints are scanet.checkpoint's. Every epoch visits
all pairs in a fresh order drawn from (seed, epoch), and dropout's random stream is reseeded from (seed, epoch)
too, so a run resumed from the checkpoint of epoch e continues exactly as the uninterrupted run would have.

Data-parallel (torchrun, scanet.distributed): every rank draws the same epoch order and takes its piece of each
global batch (shard_batches); the loss is the global batch's, from moments all-reduced across ranks
(distributed_scanet_loss), and DistributedDataParallel averages the gradients, so N ranks of B/N pairs step as
one process of B. Rank 0 alone evaluates and writes (checkpoints, metrics, plots, evaluation.json); the other
ranks receive each epoch's row and the early-stop decision from it, so every rank runs the same epochs.

Model selection never looks at the test split: ``validation_fraction`` of the training items (stratified by class,
seeded; scanet.data.splits) are held out before the pairs are drawn, their MAP (text->image and image->text,
all validation items as candidates) is measured after every epoch, the best epoch is saved as ``best.pt`` beside
``last.pt``, and ``patience`` epochs without a better validation MAP stop the run. The final report is the
selected (best) model's test MAP under both protocols (scanet.evaluate.PROTOCOLS); the test MAP of other epochs
(``eval_every``) is recorded for the curves only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from scanet import distributed as sd
from scanet.checkpoint import (  # noqa: F401
    CHECKPOINT_FORMAT,
    build_model,
    load_checkpoint,
    load_model,
    preset_from_dict,
    save_checkpoint,
)
from scanet.config import Preset
from scanet.data.prepared import PreparedDataset, Split
from scanet.data.splits import carve_validation
from scanet.evaluate import evaluate_model, evaluate_protocols, model_scorer, retrieval_report
from scanet.inputs import model_inputs
from scanet.loss import distributed_scanet_loss, scanet_loss
from scanet.master_weights import MasterWeights, use_master_weights
from scanet.pairs import make_pairs
from scanet.plots import plot_pr_curves, plot_training_curve
from scanet.precision import autocast_context
from scanet.run_folder import claim as claim_run_folder
from scanet.run_folder import config_differences


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
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_loss = torch.empty(0, device=device)  # the captured step's loss (set at capture)
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
        self.graph.replay()  # capture records without running: run this batch's step now
        return self.static_loss


def train(
    preset: Preset,
    dataset: PreparedDataset,
    out_dir: str | Path,
    device: str | torch.device = "cpu",
    fused: bool = False,
    resume: bool = False,
    compile: bool = False,
    cuda_graphs: bool = False,
    progress: bool = True,
    stop_after_epoch: int | None = None,
    log=print,
    force: bool = False,
    master_weights: bool = True,
    scores_out: dict | None = None,
) -> dict:
    """Train, evaluate on the test split, checkpoint every epoch. Returns the last metrics row.

    ``stop_after_epoch`` ends the run early (for tests of resume); ``resume`` continues from out_dir/last.pt;
    ``force`` replaces a run already in out_dir (scanet.run_folder.claim decides, before anything is trained).
    ``compile`` runs the model under torch.compile; ``cuda_graphs`` captures the whole step in a CUDA graph
    (CUDA only; each epoch then drops its last partial batch, see GraphedStep). ``master_weights``: CPU bf16
    runs keep bf16 copies of the FC weights for the forward and step float32 masters (scanet.master_weights:
    within float32 rounding of autocast's step, bitwise with its unfused step); False keeps autocast's per-step
    casts (for comparisons). ``scores_out``, a dict, receives the selected model's score matrices of the final
    evaluation ({(text split, image split): matrix}, see evaluate_protocols), for paired comparisons.
    """
    out = Path(out_dir)
    # Writable, locked, leftovers removed, saved work never overwritten silently (scanet.run_folder).
    run = claim_run_folder(out, preset, dataset.fingerprint, resume=resume, force=force, log=log)
    resume = run.resume
    tc = preset.train
    info = sd.init_from_env(device)
    device = sd.device_for(info, device)
    if cuda_graphs and device.type != "cuda":
        raise ValueError(f"--cuda-graphs needs a CUDA device, got {device}")
    if cuda_graphs and preset.model.text_encoder == "lstm":
        raise ValueError("--cuda-graphs cannot capture text_encoder=lstm (packed sequences read lengths on the host)")
    if cuda_graphs and info.distributed:
        raise ValueError("--cuda-graphs is not supported under torchrun (one process per device without graphs)")
    main = sd.is_main()
    progress = progress and main
    if not main:
        log = _silent
    torch.manual_seed(tc.seed)
    model = build_model(preset, dataset, fused=fused).to(device)
    # fused=True: one multi-tensor kernel instead of a loop over parameters (on CPU the default Adam costs a
    # fifth of the Wiki step); it supports capturable for CUDA graphs.
    l2_mode = tc.l2_mode if tc.decoupled_weight_decay else "coupled"
    adam = torch.optim.AdamW if l2_mode == "decoupled" else torch.optim.Adam
    l2_params = l2_loss_parameters(model) if l2_mode == "loss_fc_only" else []
    opt = adam(
        model.parameters(),
        lr=tc.lr,
        weight_decay=0.0 if l2_mode == "loss_fc_only" else tc.weight_decay,
        capturable=cuda_graphs,
        fused=device.type in ("cpu", "cuda"),
    )
    history: list[dict] = []
    start_epoch = 0
    best = {"epoch": 0, "val_mean_map": -math.inf}
    ckpt_path, best_path = out / "last.pt", out / "best.pt"
    if resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path, map_location=device)
        if state.get("dataset_fingerprint") != dataset.fingerprint:
            raise ValueError(
                f"{ckpt_path} was trained on other prepared data "
                f"({state.get('dataset_fingerprint')} vs {dataset.fingerprint})"
            )
        if config_differences(state["preset"], preset).keys() - {"train.epochs"}:  # claim() named them
            raise ValueError(
                f"{ckpt_path} was trained with another configuration; resume needs the same one "
                f"(saved: {state['preset']})"
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_epoch, history = state["epoch"], state["history"]
        best = state.get("best", best)
        log(f"resuming from {ckpt_path} after epoch {start_epoch}")

    # CPU bf16: the forward's FC weights are bf16 copies, written from the float32 masters by every step (the
    # native one-pass Adam step, else widen / step / refresh); the model and the checkpoints hold the masters.
    weights = None
    if master_weights and tc.precision == "bf16":
        ok, why = use_master_weights(
            model, device, tc.precision, distributed=info.distributed, cuda_graphs=cuda_graphs, compile=compile
        )
        if not ok:
            log(f"bf16 master weights off: {why}; autocast casts the FC weights every step")
        else:
            weights = MasterWeights(model, opt)
            if not weights.native:
                log(f"bf16 master weights: the unfused optimizer step ({weights.native_off_reason})")
    stepper: Any = weights or opt  # zero_grad() and step(): the optimizer's, or the scheme's around it
    forward_weights = weights.in_forward if weights is not None else contextlib.nullcontext

    # The buffers (input statistics, the word graph) are fixed, identical on every rank: synced once at
    # construction, not before every forward.
    net = (
        torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False
        )
        if info.distributed
        else model
    )
    step_model = torch.compile(net) if compile else net
    batch_loss = distributed_scanet_loss if info.distributed else scanet_loss
    tr, val = dataset.train, None
    if tc.validation_fraction > 0:
        tr, val = carve_validation(dataset.train, tc.validation_fraction, tc.seed)
    # what the configured encoders read (scanet.inputs): bag-of-words or token ids, features or pixels
    texts, images = model_inputs(tr, preset.model, device, where=f"{dataset.name!r} training split")

    ti, ii, target = (
        torch.as_tensor(a, device=device)
        for a in make_pairs(tr.labels, tc.positive_pairs, tc.negative_pairs, tc.seed, tc.ground_truth_pairs)
    )
    n_pairs = len(target)

    def step_fn(idx, zero_grad=True):
        with autocast_context(device, tc.precision), forward_weights():  # the forward only: sim float32
            sim = step_model(texts, images[ii[idx]], text_index=ti[idx])  # layer 1 from a per-text cache
        loss, _ = batch_loss(sim, target[idx], tc.margin, tc.lam)
        if l2_params:  # l2_mode="loss_fc_only": the same term on every rank, so DDP's mean gradient is exact
            loss = loss + 0.5 * tc.weight_decay * sum(p.pow(2).sum() for p in l2_params)
        if zero_grad:
            stepper.zero_grad(set_to_none=True)
        loss.backward()
        stepper.step()
        return loss.detach()

    step_fn.zero_grad = lambda: stepper.zero_grad(set_to_none=True)  # type: ignore[attr-defined]  # read by GraphedStep
    graphed = GraphedStep(step_fn, tc.batch_size, device) if cuda_graphs else None

    report, test_scores = None, None
    for epoch in range(start_epoch, tc.epochs):
        model.train()
        order = sd.epoch_order(n_pairs, tc.seed, epoch)  # the same permutation on every rank
        batches = [
            b.to(device)
            for b in sd.shard_batches(order, tc.batch_size, info.rank, info.world_size, drop_last=cuda_graphs)
        ]
        steps = len(batches)
        # dropout's stream, reproducible on resume; each rank its own (rank 0: the one-process stream)
        torch.manual_seed(tc.seed * 100_003 + epoch + 7_919 * info.rank)
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        bar: Any = range(steps)  # or its tqdm wrapper
        if progress:
            from tqdm import tqdm

            bar = tqdm(bar, desc=f"epoch {epoch + 1}/{tc.epochs}", unit="step", leave=False)
        for s in bar:
            idx = batches[s]
            loss = graphed(idx) if graphed is not None else step_fn(idx)
            loss_sum += loss
            if progress and s % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
        if device.type == "cuda":
            torch.cuda.synchronize()
        row = {"epoch": epoch + 1, "loss": float(loss_sum) / steps, "epoch_seconds": time.perf_counter() - t0}
        if not math.isfinite(row["loss"]):
            raise FloatingPointError(
                f"training diverged at epoch {epoch + 1} (loss {row['loss']}); lower the learning rate"
            )
        last = epoch + 1 == tc.epochs
        report, test_scores = None, None
        if not main:  # rank 0 evaluates and writes; the others follow its row and decision
            row, best, stop = sd.broadcast_object(None)
            history.append(row)
            sd.barrier()
            if stop:
                break
            continue
        if (tc.eval_every and (epoch + 1) % tc.eval_every == 0) or last:
            t1 = time.perf_counter()
            report, test_scores = evaluate_model(model, dataset, "test", tc.score_chunk, precision=tc.precision)
            row.update(
                text2image_map=report["text2image"]["map"],
                image2text_map=report["image2text"]["map"],
                mean_map=report["mean_map"],
                eval_seconds=time.perf_counter() - t1,
            )
        improved = False
        if val is not None:
            t1 = time.perf_counter()
            vrep = split_report(model, val, tc.score_chunk)
            row.update(
                val_text2image_map=vrep["text2image"]["map"],
                val_image2text_map=vrep["image2text"]["map"],
                val_mean_map=vrep["mean_map"],
                val_seconds=time.perf_counter() - t1,
            )
            improved = row["val_mean_map"] > best["val_mean_map"]
            if improved:
                best = {"epoch": epoch + 1, "val_mean_map": row["val_mean_map"]}
        history.append(row)
        stop = stop_after_epoch is not None and epoch + 1 >= stop_after_epoch
        patience_out = val is not None and tc.patience and epoch + 1 - best["epoch"] >= tc.patience
        sd.broadcast_object((row, best, bool(stop or patience_out)))
        log(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}))
        state = {
            "format": CHECKPOINT_FORMAT,
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "epoch": epoch + 1,
            "history": history,
            "preset": dataclasses.asdict(preset),
            "best": best,
            "dataset_fingerprint": dataset.fingerprint,
            "dataset_name": dataset.name,
            "vocab_size": dataset.vocab_size,
            "image_dim": dataset.image_dim,
            "classes": dataset.classes,
        }
        if improved:
            save_checkpoint(best_path, state)
        save_checkpoint(ckpt_path, state)
        (out / "metrics.json").write_text(json.dumps(history, indent=1), encoding="utf-8")
        plot_training_curve(history, out / "training_curve.png")
        sd.barrier()  # the epoch's files exist before any rank goes on
        if stop:
            break
        if patience_out:
            log(
                f"early stop after epoch {epoch + 1}: no better validation MAP for {tc.patience} epochs "
                f"(best: epoch {best['epoch']}, {best['val_mean_map']:.4f})"
            )
            break

    selected_epoch = history[-1]["epoch"] if history else 0
    if not main:  # rank 0 reports; evaluation.json is its file
        return {
            "history": history,
            "report": None,
            "selected_epoch": best["epoch"] if val is not None and best["epoch"] else selected_epoch,
        }
    if val is not None and best["epoch"] and best_path.is_file():
        model.load_state_dict(load_checkpoint(best_path, map_location=device)["model"])
        selected_epoch = best["epoch"]
        report, test_scores = None, None
    if report is None or selected_epoch != history[-1]["epoch"]:
        report, test_scores = evaluate_model(model, dataset, "test", tc.score_chunk, precision=tc.precision)
    protocols = evaluate_protocols(
        model_scorer(model, tc.score_chunk, precision=tc.precision),
        dataset,
        "both",
        known={("test", "test"): test_scores},
        scores_out=scores_out,
    )
    report = {
        **report,
        "selected_epoch": selected_epoch,
        "selected_by": "validation MAP" if val is not None else "last epoch (no validation split)",
        "protocols": protocols,
    }
    (out / "evaluation.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    plot_pr_curves({"SCANet": report}, out / "pr_curves.png", title=dataset.name)
    return {"history": history, "report": report, "selected_epoch": selected_epoch}


def _silent(*args, **kwargs) -> None:
    pass


# Not FC layers: the Chebyshev filters or TextCNN's convolutions, the word embeddings, the LSTM, CNN-5's blocks.
_NOT_FC = ("text_encoder.convs.", "text_encoder.embed.", "text_encoder.lstm.", "image_encoder.blocks.")


def l2_loss_parameters(model) -> list:
    """The weights and biases of every FC layer (text and image encoders, co-attention, head): what the authors'
    group's code puts in its L2 term; the Chebyshev filters (text_encoder.convs) are left out, and so are the
    other encoders' non-FC parts (``_NOT_FC``)."""
    return [p for name, p in model.named_parameters() if not name.startswith(_NOT_FC)]


def split_report(model, split: Split, chunk_size: int = 64) -> dict:
    """Standard-protocol retrieval report within one split (its texts vs its images): the validation MAP."""
    scores = model_scorer(model, chunk_size)(split, split)
    return retrieval_report(scores, split.labels, split.labels)
