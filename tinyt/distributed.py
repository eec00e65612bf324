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

import math
import os
import sys
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
# Seconds the processes of a hand-launched world (RANK, WORLD_SIZE, MASTER_ADDR and
# MASTER_PORT set without torchrun) wait for each other to start, unless the environment
# variable below says otherwise: a rank that never comes should not hang the others for hours.
RENDEZVOUS_TIMEOUT_S = 600.0
RENDEZVOUS_TIMEOUT_VARIABLE = "TINYT_DIST_TIMEOUT"


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
        _join(world, backend, device if device.type == "cuda" else None)
    return device


def _join(world: World, backend: str, device_id: torch.device | None,
          environ: dict[str, str] | None = None) -> None:
    """Join the process group. Under torchrun its agent has already gathered every process,
    so the usual `env://` initialisation is immediate. Launched by hand, the processes meet
    at MASTER_ADDR:MASTER_PORT, waiting at most `rendezvous_timeout` seconds for each other
    (and saying so on stderr), not the two hours that the collectives may take later."""
    env = os.environ if environ is None else environ
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not env.get(name)]
    if missing:
        raise TinytError(f"RANK and WORLD_SIZE are set but {' and '.join(missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} not; torchrun sets all of "
                         "them (torchrun --nproc_per_node N -m tinyt train ...). To train as one "
                         "process, unset RANK and WORLD_SIZE")
    host, port_text = env["MASTER_ADDR"], env["MASTER_PORT"]
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise TinytError(f"MASTER_PORT={port_text[:20]!r} is not a port number (1-65535)")
    if env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT, device_id=device_id)
        return
    timeout = rendezvous_timeout(env)
    address = f"{host}:{port_text}"
    processes = f"{world.world_size} process{'es' if world.world_size > 1 else ''}"
    print(f"{'' if world.is_main else f'rank {world.rank}: '}waiting for {processes} at "
          f"{address} (timeout {timeout:g} s, set {RENDEZVOUS_TIMEOUT_VARIABLE} to change it)",
          file=sys.stderr, flush=True)
    try:
        store = dist.TCPStore(host, int(port_text), world.world_size, is_master=world.is_main,
                              timeout=timedelta(seconds=timeout), wait_for_workers=True)
    except RuntimeError as exc:  # torch's DistStoreError and DistNetworkError
        if "EADDRINUSE" in str(exc) or "address already in use" in str(exc).lower():
            raise TinytError(f"MASTER_PORT {port_text} is already in use on this machine; "
                             "choose a free port for MASTER_PORT") from None
        who = ("not every process joined" if world.is_main else
               "no rank 0 answered there")
        raise TinytError(f"gave up after {timeout:g} s waiting for {processes} at {address}: "
                         f"{who}. Start all WORLD_SIZE processes with the same "
                         "MASTER_ADDR and MASTER_PORT (torchrun does this), or give them longer "
                         f"with {RENDEZVOUS_TIMEOUT_VARIABLE}=SECONDS") from None
    store.set_timeout(COLLECTIVE_TIMEOUT)  # everyone is here; later waits are rank 0's work
    dist.init_process_group(backend, store=store, rank=world.rank,
                            world_size=world.world_size, timeout=COLLECTIVE_TIMEOUT,
                            device_id=device_id)


def rendezvous_timeout(environ: dict[str, str] | None = None) -> float:
    """Seconds hand-launched processes wait for each other: TINYT_DIST_TIMEOUT, else
    RENDEZVOUS_TIMEOUT_S."""
    env = os.environ if environ is None else environ
    text = env.get(RENDEZVOUS_TIMEOUT_VARIABLE)
    if text is None or not text.strip():
        return RENDEZVOUS_TIMEOUT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise TinytError(f"{RENDEZVOUS_TIMEOUT_VARIABLE}={text[:20]!r} is not a number of "
                         "seconds > 0")
    return seconds


def wait_for_all(world: World) -> None:
    """Return once every rank has got here. Called before the group is taken down after a
    run: a rank that tears down its connections while another still uses them can abort the
    other (gloo aborts a process whose peer closed a connection it was reading)."""
    if world.launched:
        dist.barrier()


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
