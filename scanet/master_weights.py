"""bf16 FC weights for the forward, float32 master weights in the optimizer: CPU bf16 training without
autocast's per-step weight casts into fresh tensors.

Under ``torch.autocast`` with float32 parameters every step pays two casts per FC weight, each into a tensor
allocated afresh: autocast rounds the weight to bf16 for the GEMM (forward), and autograd's ToCopyBackward0
widens the bf16 weight gradient to float32 (backward). For the Wiki text FC (1024 x 10,055: 41 MB float32,
20 MB bf16) the fresh 41 MB gradient page-faults every step. Here the native step (below) replaces both casts
with one pass that reads the bf16 gradient and writes the bf16 copy; the unfused step casts into tensors
allocated once.

``MasterWeights(model, optimizer)`` keeps the ORIGINAL float32 Parameter objects where they are (in the
model, and in the optimizer, which was built on them: its state_dict is unchanged) and holds one bf16 copy of
each FC weight and bias, made once. Per step:

    with autocast_context(device, "bf16"), weights.in_forward():   # the bf16 copies sit in the FC layers
        sim = model(...)                                           # the graph's leaves are the bf16 copies
    loss = ...
    weights.zero_grad(set_to_none=True)     # the optimizer's (float32) grads and the copies' (bf16) grads
    loss.backward()                         # bf16 weight gradients land on the copies
    weights.step()                          # native (scanet.adam_bf16): one pass per FC master, bf16 grad
                                            # in, master, AdamW moments and bf16 copy out; unfused:
                                            # master.grad <- bf16 grad widened into a persistent float32
                                            # buffer; optimizer.step() on the masters; copies <- masters

Storage order (``transposed``, by default on with the native step): before the copies are made, each FC
weight (out, in) is stored transposed in memory, strides (1, out), with its optimizer state
(``store_fc_weights_transposed``; the same Parameter objects, values, shapes and state_dict keys). The copies,
the bf16 grads (autograd lays a leaf's grad out as the leaf) and the Adam moments follow. Autograd's backward of
F.linear then hands oneDNN dX^T = W^T dY^T and dW^T = X^T dY with the large operand row-major on the left, the
forms its bf16 AMX kernels run fastest. Measured in the whole Wiki step (bench_train_step.py's fused_bf16_master
against fused_bf16_master_row_major, same rounds): 67.4 against 74.6 ms
(bench/results/2026-12-01-cpu-2core-train-step-transposed-quiet.json); the text FC's backward alone 1.23x
(bench/bench_fc_layout.py). Not for float32 or the unfused step: torch's fused AdamW runs 4-5x slower on a
transposed parameter (35 against 7.7 ms for the text FC, same file), while the native pass runs at the same
speed on either layout. Checkpoints are written contiguous (scanet.checkpoint): a file does not depend on it.
A loop of your own that saves ``optimizer.state_dict()`` with torch.save directly keeps the moments transposed:
load that into an optimizer whose parameters are transposed too (build MasterWeights after loading: it lays the
state out with the masters), or make the tensors contiguous before saving, as scanet.checkpoint does.

``in_forward`` swaps the copies in for the forward only (two dict entries per layer: no copy), so everything
outside it (state_dict and checkpoints, evaluation, load_state_dict on resume, the L2 term of
l2_mode="loss_fc_only") sees the float32 masters, exactly as without this class.

The step. Native (the default when the extension is built and the optimizer is torch's fused Adam / AdamW with
amsgrad, maximize, capturable off and a float lr; ``native_off_reason`` says why not): the FC masters that got a
bf16 grad are stepped by ``scanet_native::adam_bf16_step`` (28 B a weight in one pass, the optimizer's own
state tensors, so state_dict and checkpoints are unchanged; a float32 grad already on the master, the L2 term,
is added in the same pass), and ``optimizer.step()`` steps the other parameters. Unfused (``native=False``):
widen, ``optimizer.step()``, refresh, three passes.

Numerics, unfused: the same as autocast's step, bit for bit (tests/test_master_weights.py). Native: torch's
fused AdamW bit for bit but for one rounding of exp_avg_sq in a tensor's last numel % 16 elements
(scanet/adam_bf16.py), so within float32 noise of autocast's run, and resume is exact on either path.
Why the unfused step is bitwise: autocast rounds the float32 weight to bf16 with ``.to(bfloat16)`` (round to
nearest even); ``copy_`` into the bf16 copy is the same conversion. The GEMMs then see the same bf16 operands, so
they produce the same bf16 gradient, and widening bf16 -> float32 is exact either way. A second gradient term on
a master (the L2 term) is added to it in float32 as autograd would (a + b == b + a).

Which layers: every ``nn.Linear`` of the model (text/image encoder FCs, the co-attention FCs, the head; the
lstm/cnn text encoders' output FC too). Not the Chebyshev filters: the recursion's weights stay float32 by
design (csrc/cheb_conv.cpp, scanet.precision); not the word embeddings, the LSTM or the convolutions (autocast
keeps casting those, as before: they are small or not on the measured path).

Where it is used (``use_master_weights``): CPU bf16 training only. Not for fp32 (nothing is cast) or fp16
(CUDA's, and it trains without loss scaling: unmeasured); not on CUDA (unmeasured: no GPU here); not under
DistributedDataParallel (its gradient hooks and buckets are registered on the masters at construction, the
gradients would land on the copies); not with CUDA graphs (the capture would record the swap once) or
torch.compile (its guards see the layers' parameters change dtype and identity at every step: recompiles,
untested); not with image_encoder="cnn5" (it converts pixels to the FC weight's dtype: bf16 copies would change
its arithmetic). Each refusal says why, and the run trains on the plain autocast path.

Measured on the shared 2-core VM. Unfused (bench/results/2026-12-01-cpu-2core-{train-step,wiki-epoch}-master-
weights.json): the same speed as autocast. A Wiki bf16 epoch's page faults fall from 3.0-3.5 M to 0.5-0.9 M and its
system time from 8-9 s to 4-5 s, but the epoch takes as long (79.9 / 79.4 s against 76.1 / 81.1 s); inside a step
the two in-place casts stream the 18.7 M FC weights from DRAM (~11 ms widening + ~12 ms refreshing): that
traffic, not the allocation, is what autocast's casts cost. Native (bench/results/2026-12-01-cpu-2core-adam-bf16-
optimizer-step.json, bench/bench_adam_bf16.py): the optimizer step of the Wiki FCs alone 38-39 ms against
71-82 ms unfused (1.89-1.97x per round), about as long as torch's fused AdamW pass alone with float32 grads ready
(34-44 ms: the same 28 B a weight); the Wiki-shaped step of bench/bench_train_step.py (bench/results/2026-12-01-
cpu-2core-train-step-adam-bf16.json, 15 interleaved rounds): fused_bf16_master 1.135x fused_bf16 and 2.03x
fused_fp32_today (fused_bf16_master_unfused 1.006x fused_bf16); on a quiet machine
(bench/results/2026-12-01-cpu-2core-train-step-final.json) 88.2 ms, 1.13x fused_bf16. One Eng-Wiki epoch on the
native step: 26.4 s in bf16 against 47.2 s in fp32 (docs/results/wiki-epoch-bf16-native-adam-2026-12-01-cpu.json).

Memory (Wiki, N = 1024: 10.3 M text FC + 4.2 M image FC + 4.2 M co-attention weights): the bf16 copies
2 B x 18.7 M = 37 MB, and for the unfused step only the float32 gradient buffers 4 B x 18.7 M = 75 MB, held for
the run; autocast's path allocated the same amounts afresh every step.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from scanet.adam_bf16 import is_dense, native_unsupported, step_with_bf16_grads


def use_master_weights(
    model: nn.Module,
    device,
    precision: str,
    *,
    distributed: bool = False,
    cuda_graphs: bool = False,
    compile: bool = False,
) -> tuple[bool, str]:
    """(whether MasterWeights applies to this run, why not when it does not); see the module docstring."""
    config = getattr(model, "config", None)
    reasons = (
        (precision != "bf16", f"precision {precision!r} (bf16 only)"),
        (torch.device(device).type != "cpu", f"device {device} (CPU only: unmeasured elsewhere)"),
        (distributed, "DistributedDataParallel (its gradient hooks are on the masters)"),
        (cuda_graphs, "CUDA graphs"),
        (compile, "torch.compile (its guards would see the parameters swap every step)"),
        (
            getattr(config, "image_encoder", None) == "cnn5",
            "image_encoder='cnn5' (converts pixels to its FC weight's dtype)",
        ),
    )
    for off, why in reasons:
        if off:
            return False, why
    return True, ""


def transposed_layout(t: torch.Tensor) -> torch.Tensor:
    """``t`` (2-D) with the same values stored transposed, strides (1, rows): itself when it is already so."""
    return t.t().contiguous().t()


@torch.no_grad()
def store_fc_weights_transposed(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Store every ``nn.Linear`` weight of ``model`` (out, in) transposed in memory, strides (1, out), with its
    grad and its ``optimizer`` state tensors of the same shape (exp_avg, exp_avg_sq): the same Parameter objects,
    values, shapes and state_dict; only their storage order changes (``p.data`` is replaced). Weights with a
    dimension of 1 (the head's) are left as they are. Returns how many weights were re-laid.

    Why, and where it pays (bf16 with the native Adam step only): the module docstring. The optimizer state must
    be laid out as its parameter: torch's fused Adam silently mixes up elements whose strides differ, so both
    move together here, and checkpoints are written contiguous (scanet.checkpoint).
    """
    done = 0
    for module in model.modules():
        w = module._parameters.get("weight") if isinstance(module, nn.Linear) else None
        if w is None or 1 in w.shape:
            continue
        relaid = transposed_layout(w.data)  # w.data itself (a view) when it is stored so already
        if relaid.data_ptr() != w.data_ptr():
            w.data = relaid
            done += 1
        if w.grad is not None:
            w.grad = transposed_layout(w.grad)
        state = optimizer.state.get(w, {}) if optimizer is not None else {}
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.shape == w.shape:
                state[key] = transposed_layout(value)
    return done


class MasterWeights:
    """bf16 copies of a model's FC weights for the forward; the optimizer steps the float32 originals.

    ``model``: the module whose ``nn.Linear`` layers get bf16 copies (their parameters must be float32 and
    require grad; others are left alone). ``optimizer``: built on the model's own (float32) parameters.
    ``zero_grad`` and ``step`` stand in for the optimizer's in the training loop; ``in_forward()`` is the
    context the forward runs in. Build it after any ``load_state_dict`` (resume): the copies are made from
    the masters' values at construction (and after every ``step``). ``transposed``: first store the FC weights
    (in, out) in memory (``store_fc_weights_transposed``: the masters and their optimizer state, so the copies
    and grads too), for the faster bf16 GEMMs; None (default): when the native step runs; False keeps the
    layout the model was built with.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        dtype: torch.dtype = torch.bfloat16,
        *,
        native: bool = True,
        transposed: bool | None = None,
    ):
        self.optimizer, self.dtype = optimizer, dtype
        stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self.slots: list[tuple[nn.Module, str]] = []  # (layer, "weight" | "bias"), one per swapped parameter
        self.masters: list[nn.Parameter] = []  # a parameter shared by two layers is one master
        for module in model.modules():
            if not isinstance(module, nn.Linear):
                continue
            for name in ("weight", "bias"):
                p = module._parameters.get(name)
                if p is None or not p.requires_grad or p.dtype != torch.float32:
                    continue
                if id(p) not in stepped:
                    raise ValueError(f"MasterWeights: the optimizer does not step {type(module).__name__}.{name}")
                if all(p is not m for m in self.masters):
                    self.masters.append(p)
                self.slots.append((module, name))
        # The one-pass native step (scanet.adam_bf16) when it can stand in for this optimizer; else why not.
        self.native_off_reason: str | None = (
            "native=False"
            if not native
            else ("bf16 only" if dtype != torch.bfloat16 else native_unsupported(optimizer))
        )
        if self.native_off_reason is None and not all(is_dense(p) and p.device.type == "cpu" for p in self.masters):
            self.native_off_reason = "a master weight is not a dense CPU tensor"
        # Transposed storage only with the native step: torch's fused AdamW runs 4-5x slower on a transposed
        # parameter (bench/bench_fc_layout.py); the native pass does not care.
        self.transposed = self.native_off_reason is None if transposed is None else bool(transposed)
        if self.transposed:  # before the copies are made: .to(dtype) keeps the masters' strides
            store_fc_weights_transposed(model, optimizer)
        self.copies: list[nn.Parameter] = [nn.Parameter(p.detach().to(dtype)) for p in self.masters]
        copy_of = {id(m): c for m, c in zip(self.masters, self.copies, strict=True)}
        self._slot_copy = [copy_of[id(module._parameters[name])] for module, name in self.slots]
        self._slot_master = [module._parameters[name] for module, name in self.slots]
        # unfused step: float32 gradient buffers, allocated once: master.grad points at one of them after backward
        self.grad_buffers = (
            []
            if self.native_off_reason is None
            else [torch.empty_like(p) for p in self.masters]  # laid out as the master: torch's fused AdamW
            # runs elementwise over memory and silently mixes up elements whose strides differ
        )
        self._groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}

    @contextlib.contextmanager
    def in_forward(self):
        """The FC layers hold the bf16 copies inside the block and their float32 masters again after it
        (the autograd graph built inside keeps the copies as its leaves: backward may run outside)."""
        for (module, name), copy in zip(self.slots, self._slot_copy, strict=True):
            module._parameters[name] = copy
        try:
            yield self
        finally:
            for (module, name), master in zip(self.slots, self._slot_master, strict=True):
                module._parameters[name] = master

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The optimizer's zero_grad (the masters' float32 grads) and the copies' bf16 grads set to None."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        for c in self.copies:
            c.grad = None

    @property
    def native(self) -> bool:
        """Whether ``step`` runs the one-pass native optimizer step (``native_off_reason`` says why not)."""
        return self.native_off_reason is None

    @torch.no_grad()
    def step(self) -> None:
        """The native one-pass step when available (``_step_native``), else ``_step_unfused``."""
        if self.native_off_reason is None:
            self._step_native()
        else:
            self._step_unfused()

    @torch.no_grad()
    def _step_native(self) -> None:
        """Masters with a bf16 grad: one native pass each (bf16 grad + any float32 grad already on the master,
        e.g. the L2 term, in; master, moments and bf16 copy out), their .grad left None. The optimizer's own
        step runs on the other parameters (those with a grad: the Chebyshev filters, ...), masters with only a
        float32 grad included, whose copies are then refreshed."""
        work, refresh = [], []
        for master, copy in zip(self.masters, self.copies, strict=True):
            if copy.grad is not None:
                work.append((master, copy.grad, master.grad, copy))
                master.grad = copy.grad = None  # torch's step skips a parameter without a grad
            elif master.grad is not None:
                refresh.append((master, copy))
        self.optimizer.step()
        step_with_bf16_grads(self.optimizer, work, self._groups)
        for master, copy in refresh:
            copy.copy_(master)

    @torch.no_grad()
    def _step_unfused(self) -> None:
        """Widen each copy's bf16 grad into the master's float32 buffer (or add it to a grad the master already
        has), step the optimizer on the masters, then round the masters into the copies (in place)."""
        for master, copy, buf in zip(self.masters, self.copies, self.grad_buffers, strict=True):
            if copy.grad is None:
                continue  # the layer took no part in the loss: as with autocast, the master has no grad from it
            if master.grad is None:
                master.grad = buf.copy_(copy.grad)
            else:  # e.g. the L2 term of l2_mode="loss_fc_only", computed on the master outside the forward
                master.grad.add_(copy.grad)
            copy.grad = None
        self.optimizer.step()
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """copies <- masters, rounded to nearest even (autocast's cast), into the existing bf16 storage."""
        for master, copy in zip(self.masters, self.copies, strict=True):
            copy.copy_(master)
