"""Benchmarks of the co-attention step (op "coattention") and of a whole SCANet training step ("train_step").

    pytest bench/bench_coattention.py --benchmark [--bench-full] [-s]

Providers, timed side by side in one run:
  eager    scanet.reference.coattention (F.linear + relu + softmax + two multiplies), autograd backward
  compile  torch.compile of the reference (Inductor: an extern addmm and one fused softmax * mul loop)
  fused    scanet.fused.coattention (Triton; CUDA only: the CPU interpreter measures nothing useful)
           fused-tf32 / fused-bf16 (N = 1024 only): the precision option; fused-tlgemm: fp32 with the
           backward GEMMs in Triton instead of cuBLAS (kernels.coattention.BACKWARD_GEMM = "triton")
  gemm     the bare GEMMs the step contains, torch.matmul in fp32: f @ W.T (forward), dh.T @ f and dh @ W
           (backward). No kernel that computes the step can beat this floor by much.

Modes: fwd (a training forward: inputs require grad, so what backward needs is kept), bwd (the backward of
one retained forward), fwd+bwd.

FLOP model: 2 M N^2 per GEMM (1 forward, 2 backward). Byte model (fp32, what a fully fused step must move):
  fwd      4 (3MN + N^2 + N)   read f, g, W, b; write out
  bwd      4 (6MN + 2N^2 + N)  read dout, g, f, the one saved (M, N) tensor, W; write df, dg, dW, db
  fwd+bwd  4 (10MN + 3N^2 + 2N) both, plus writing the saved tensor
The same model is used for every provider of a case, so GB/s compares like with like.

Sweep: M in (256, 4096, 65536) x N in (256, 500, 1024, 4096) on CUDA or with --bench-full; on CPU by default
a reduced sweep (M in 256, 4096; N in 256, 1024) that takes a few minutes on 2 cores.

train_step: the Wiki preset (batch 256, N = 1024, V = 10,055 words on a random k = 8 nearest-neighbour-like
graph, 128-d image features, dropout 0.2, Adam with the paper's lr and weight decay, the SCANet loss), eager
vs torch.compile vs fused (SCANet(fused=True), CUDA only). Each row records projected_80_epochs_s =
80 epochs x 80,000 pairs / 256 pairs a step x the median step time.
"""

from __future__ import annotations

import pytest
import torch

from scanet import reference
from scanet.data.graph import random_graph_laplacian

M_FULL = (256, 4096, 65536)
N_FULL = (256, 500, 1024, 4096)
M_REDUCED = (256, 4096)
N_REDUCED = (256, 1024)
MODES = ("fwd", "bwd", "fwd+bwd")
PROVIDERS = ("eager", "compile", "fused", "fused-tf32", "fused-bf16", "fused-tlgemm", "gemm")

WIKI_PAIRS_PER_EPOCH = 80_000
WIKI_EPOCHS = 80


def flops_model(M: int, N: int, mode: str) -> int:
    return 2 * M * N * N * {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[mode]


def bytes_model(M: int, N: int, mode: str) -> int:
    elems = {"fwd": 3 * M * N + N * N + N, "bwd": 6 * M * N + 2 * N * N + N, "fwd+bwd": 10 * M * N + 3 * N * N + 2 * N}[
        mode
    ]
    return 4 * elems


def _inputs(M, N, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)  # generated in place: M = 65536 is 1 GB a tensor

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    f, g = randn(M, N), randn(M, N)
    weight = randn(N, N) / N**0.5
    bias = 0.1 * randn(N)
    dout = randn(M, N)
    return [t.requires_grad_() for t in (f, g, weight, bias)], dout


_COMPILED: dict = {}


def _compiled_reference(M, N):
    """One static-shape compile per (M, N), reused by the three modes; dynamo is reset between shapes so
    that its per-function recompile limit never sends a shape back to eager."""
    key = (M, N)
    if key not in _COMPILED:
        _COMPILED.clear()
        torch._dynamo.reset()
        _COMPILED[key] = torch.compile(reference.coattention, dynamic=False)
    return _COMPILED[key]


def _step_fn(provider, M, N, mode, leaves, dout):
    f, g, weight, bias = leaves
    scale = float(N)
    if provider == "gemm":
        fd, wd, dh = f.detach(), weight.detach(), dout
        if mode == "fwd":
            return lambda: torch.matmul(fd, wd.t())
        if mode == "bwd":
            return lambda: (torch.matmul(dh.t(), fd), torch.matmul(dh, wd))
        return lambda: (torch.matmul(fd, wd.t()), torch.matmul(dh.t(), fd), torch.matmul(dh, wd))

    if provider == "eager":
        op = reference.coattention
    elif provider == "compile":
        op = _compiled_reference(M, N)
    else:
        import scanet.fused as fused

        precision = {"fused-tf32": "tf32", "fused-bf16": "bf16"}.get(provider, "fp32")

        def op(*args, scale):
            return fused.coattention(*args, scale=scale, precision=precision)

    if mode == "fwd":
        return lambda: op(f, g, weight, bias, scale=scale)
    if mode == "bwd":
        out = op(f, g, weight, bias, scale=scale)
        return lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True)
    return lambda: torch.autograd.grad(op(f, g, weight, bias, scale=scale), leaves, dout)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("M,N", [(m, n) for m in M_FULL for n in N_FULL])
def test_coattention(benchmark, measure, bench_device, full_sweep, monkeypatch, M, N, mode, provider):
    if not full_sweep and (M not in M_REDUCED or N not in N_REDUCED):
        pytest.skip("outside the reduced CPU sweep (M in 256, 4096; N in 256, 1024): pass --bench-full")
    if provider.startswith("fused") and bench_device.type != "cuda":
        pytest.skip("the fused kernels are timed on CUDA only (on CPU they run in the Triton interpreter)")
    if provider in ("fused-tf32", "fused-bf16", "fused-tlgemm") and N != 1024:
        pytest.skip(f"{provider} is measured at N = 1024 only (the paper's N), to keep the sweep short")
    if provider == "fused-tlgemm":
        if mode == "fwd":
            pytest.skip("fused-tlgemm differs from fused in the backward GEMMs only")
        from scanet.kernels import coattention as kernels

        monkeypatch.setattr(kernels, "BACKWARD_GEMM", "triton")
    leaves, dout = _inputs(M, N, bench_device)
    fn = _step_fn(provider, M, N, mode, leaves, dout)
    measure(
        benchmark,
        fn,
        op="coattention",
        case=f"M={M} N={N} {mode}",
        provider=provider,
        device=bench_device,
        bytes=bytes_model(M, N, mode),
        flops=flops_model(M, N, mode),
    )


# ----------------------------------------------------------------------------------------- training step
@pytest.mark.parametrize("provider", ("eager", "compile", "fused"))
def test_train_step(benchmark, measure, bench_device, provider):
    from scanet.config import get_preset
    from scanet.model import SCANet

    try:
        from scanet.loss import scanet_loss
    except ImportError as exc:
        pytest.skip(f"scanet.loss.scanet_loss is not available: {exc}")
    if provider == "fused":
        if bench_device.type != "cuda":
            pytest.skip("the fused model is timed on CUDA only (on CPU its kernels run in the interpreter)")
        import scanet.fused as fused

        if not hasattr(fused, "ChebConv"):
            pytest.skip("SCANet(fused=True) needs scanet.fused.ChebConv")

    preset = get_preset("wiki")
    V, B, D = preset.vocab_size, preset.train.batch_size, 128
    torch.manual_seed(0)
    lap = random_graph_laplacian(V, preset.knn)
    net = SCANet(V, D, lap, preset.model, fused=(provider == "fused")).to(bench_device)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=preset.train.lr, weight_decay=preset.train.weight_decay)
    gen = torch.Generator().manual_seed(1)
    bow = (torch.rand(B, V, generator=gen) < 0.01).float().to(bench_device)  # ~100 distinct words a text
    image = torch.randn(B, D, generator=gen).to(bench_device)
    target = (torch.rand(B, generator=gen) < 0.5).float().to(bench_device)
    forward = torch.compile(net) if provider == "compile" else net

    def step():
        opt.zero_grad(set_to_none=True)
        loss, _ = scanet_loss(forward(bow, image), target, preset.train.margin, preset.train.lam)
        loss.backward()
        opt.step()
        return loss

    steps_80_epochs = WIKI_EPOCHS * WIKI_PAIRS_PER_EPOCH / B
    case = f"wiki B={B} N={preset.model.common_dim} V={V} k={preset.knn} D={D}"
    median = measure(
        benchmark,
        step,
        op="train_step",
        case=case,
        provider=provider,
        device=bench_device,
        steps_80_epochs=steps_80_epochs,
        derived={"projected_80_epochs_s": lambda m: steps_80_epochs * m},
    )
    projected = steps_80_epochs * median
    print(
        f"\ntrain_step {provider}: {median * 1e3:.1f} ms a step -> 80 epochs ~ {projected / 3600:.2f} h "
        f"({steps_80_epochs:.0f} steps)"
    )
