"""Data-parallel training across processes with `torch.distributed`, launched by torchrun.

    torchrun --nproc_per_node 8 -m tinyt train --config configs/X.yaml

torchrun starts one process per device and tells each who it is through environment
variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Every process builds the
same model from the same seed, trains on its own share of every step's batches, and
DistributedDataParallel averages the gradients, so all replicas take identical updates.
Rank 0 alone writes files and shows progress; the others wait where it does one-off work
(tokenizer training, token caching, validation) and receive its results.

A plain `tinyt train` (no torchrun) is a world of one process and makes no collective calls.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from tinyt.errors import MainProcessFailed, TinytError

T = TypeVar("T")

# One-off work on rank 0 (tokenizing a large corpus, validating) can keep the other ranks
# waiting in a collective far longer than torch's default timeout allows.
COLLECTIVE_TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # index of this process on its own machine: its GPU
    launched: bool = False  # started by torchrun (even with one process): use DDP

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_environment(environ: dict[str, str] | None = None) -> World:
    """Read the process's rank from torchrun's environment variables; a process that was not
    started by torchrun is the only one of its world."""
    env = os.environ if environ is None else environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return World()
    try:
        rank, size = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
    except ValueError:
        raise TinytError("RANK, WORLD_SIZE and LOCAL_RANK must be integers; launch distributed "
                         "training with torchrun") from None
    if not 0 <= rank < size:
        raise TinytError(f"RANK={rank} is outside WORLD_SIZE={size}; launch with torchrun")
    return World(rank, size, local, launched=True)


def start(world: World, device: torch.device) -> torch.device:
    """Join the process group (NCCL on CUDA, gloo on the CPU) and return this rank's device:
    with CUDA, GPU number LOCAL_RANK."""
    if not world.launched:
        return device
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise TinytError(f"LOCAL_RANK {world.local_rank} but this machine has "
                             f"{torch.cuda.device_count()} GPU(s); use --nproc_per_node "
                             f"{torch.cuda.device_count()} or fewer")
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT,
                                device_id=device if device.type == "cuda" else None)
    return device


def stop(world: World) -> None:
    """Leave the process group (after the last collective call)."""
    if world.launched and dist.is_initialized():
        dist.destroy_process_group()


def broadcast(world: World, value: T) -> T:
    """Rank 0's `value`, on every rank (any picklable object)."""
    if not world.launched:
        return value
    box = [value if world.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(world: World, value: Any) -> list[Any] | None:
    """Every rank's `value`, in rank order, on rank 0; None on the others."""
    if not world.launched:
        return [value]
    out: list[Any] | None = [None] * world.world_size if world.is_main else None
    dist.gather_object(value, out, dst=0)
    return out


def any_rank(world: World, flags: list[bool], device: torch.device) -> list[bool]:
    """Element-wise OR of `flags` over all ranks, so that every rank takes the same decision
    (stop now, save now) even when only one of them saw the reason (a signal, the clock)."""
    if not world.launched:
        return flags
    t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def sum_over_ranks(world: World, value: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over ranks, in place (for logging a global loss)."""
    if world.launched:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def main_first(world: World, work: Callable[[], T], then: Callable[[], T] | None = None) -> T:
    """Run `work` on rank 0 while the others wait, then `then` (default: `work` again, which
    finds rank 0's results in the cache) on the others.

    A TinytError on rank 0 stops every rank: rank 0 raises it and the others raise
    MainProcessFailed, instead of waiting forever for a result that will not come.
    """
    if not world.launched:
        return work()
    result: T | None = None
    failure: str | None = None
    if world.is_main:
        try:
            result = work()
        except TinytError as exc:
            failure = str(exc)
            broadcast(world, failure)
            raise
    failure = broadcast(world, failure)
    if failure is not None:
        raise MainProcessFailed(failure)
    if not world.is_main:
        result = (then or work)()
    return result  # type: ignore[return-value]
