"""Data-parallel training helpers: process group from torchrun's environment, rank helpers, epoch sharding.

torchrun starts one process per GPU (or per CPU socket) and sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; ``init_from_env`` joins the group they describe (NCCL for CUDA, gloo for CPU). Without WORLD_SIZE
(a plain ``python -m scanet train``) nothing is initialized and every helper answers as for one process, so
the training loop has one code path.

Exactness. The SCANet loss is a statistic of the whole batch (scanet.loss.distributed_scanet_loss computes it
from moments all-reduced across ranks), so N ranks reproduce one process of global batch B exactly when each
step's B pairs are the same pairs: every rank draws the SAME (seed, epoch) permutation as the one-process loop
(``epoch_order``), cuts it into the same global batches of B, and takes its contiguous piece of each
(``shard_batches``: torch.tensor_split, so B need not divide by N; pieces differ by at most one pair). The union
over ranks of one step is that step's global batch, and over an epoch every pair is visited exactly once.
Dropout masks are the one thing that cannot match a one-process run (each rank draws its own); with dropout
the runs are equal in distribution, without it equal to rounding.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: a single process, no group

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, env) -> int:
    value = env.get(name)
    if value is None:
        raise ValueError(
            f"environment variable {name} is not set: start the run with torchrun (it sets {', '.join(ENV_VARS)})"
        )
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_from_env(device: str | torch.device = "cpu", backend: str | None = None, env=None) -> DistInfo:
    """Join the process group torchrun describes; one process (no WORLD_SIZE, or 1) initializes nothing.

    backend: default "nccl" for a CUDA ``device`` (which is then set to cuda:LOCAL_RANK), "gloo" otherwise.
    """
    env = os.environ if env is None else env
    if env.get("WORLD_SIZE") in (None, "", "1"):
        return DistInfo()
    world, rank, local = _env_int("WORLD_SIZE", env), _env_int("RANK", env), _env_int("LOCAL_RANK", env)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not env.get(name):
            raise ValueError(f"environment variable {name} is not set: start the run with torchrun")
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} must be in [0, WORLD_SIZE={world})")
    device = torch.device(device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError("backend 'nccl' needs CUDA; use the gloo backend (a CPU device) on this machine")
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world)  # env:// (MASTER_ADDR, MASTER_PORT)
    return DistInfo(rank, world, local, backend)


def device_for(info: DistInfo, device: str | torch.device) -> torch.device:
    """The device of this rank: cuda:LOCAL_RANK for a CUDA run under torchrun, ``device`` otherwise."""
    device = torch.device(device)
    if device.type == "cuda" and info.distributed:
        return torch.device("cuda", info.local_rank)
    return device


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes checkpoints, metrics, plots and logs."""
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def destroy() -> None:
    if is_initialized():
        # A DistributedDataParallel wrapper kept alive by a reference cycle (or by a traceback's frames) would
        # outlive its group and be torn down at interpreter exit, where gloo aborted once (tests/test_distributed.py
        # frees its wrapper explicitly): collect it while the group still exists.
        gc.collect()
        dist.destroy_process_group()


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (e.g. a decision taken on rank 0 only)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# --------------------------------------------------------------------------------------------------- sharding
def epoch_order(n_pairs: int, seed: int, epoch: int) -> torch.Tensor:
    """The epoch's pair order: the permutation scanet.train draws from (seed, epoch), the same on every rank."""
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be >= 1, got {n_pairs}")
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n_pairs, generator=gen)


def shard_batches(
    order: torch.Tensor, batch_size: int, rank: int, world_size: int, drop_last: bool = False
) -> list[torch.Tensor]:
    """This rank's piece of every global batch of ``order``: batch s is order[s B:(s + 1) B], cut into
    world_size contiguous pieces (sizes differ by at most one; a piece may be empty in a short last batch)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
    if order.dim() != 1:
        raise ValueError(f"order must be a 1-d permutation, got shape {tuple(order.shape)}")
    n = order.shape[0]
    steps = n // batch_size if drop_last else -(-n // batch_size)
    return [torch.tensor_split(order[s * batch_size : (s + 1) * batch_size], world_size)[rank] for s in range(steps)]
