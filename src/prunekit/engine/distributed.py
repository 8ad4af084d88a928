"""One training code path for a single process and for `torchrun`.

Under `torchrun` the environment carries RANK, WORLD_SIZE and LOCAL_RANK; `init_distributed`
joins the default process group (nccl on CUDA, gloo on CPU) and `train` wraps the model in
DistributedDataParallel.

How data is split: every rank iterates the *same* loader, which yields *global* batches
(same order on every rank: seed its shuffle by epoch, as `set_epoch` does), and each rank keeps
rows `rank::world_size` of each batch (`shard_batch`). This needs no distributed sampler and makes
a run on N processes compute exactly the step of one process on the same global batch: each rank
scales its summed loss by `world_size / global_batch`, DDP averages gradients over ranks, and
the result is the mean loss of the global batch. The price is that every rank loads whole
batches; with GPU-resident or cheap loaders that cost is small.

Only rank 0 writes logs and checkpoints; metrics are summed over ranks with `all_reduce_sums`.

>>> ctx = DistContext()          # no torchrun: a single process
>>> ctx.enabled, ctx.is_main
(False, True)
>>> shard_batch(torch.arange(5), DistContext(rank=1, world_size=2)).tolist()
[1, 3]
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ..core.errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank, the number of processes, its local (per-node) rank.

    `owns_group` is True when `init_distributed` created the process group (so `train` also
    destroys it at the end); a group the caller set up is left alone.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_ranks() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the torchrun environment; (0, 1, 0) without it."""
    values = []
    for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
        raw = os.environ.get(name)
        try:
            values.append(default if raw is None else int(raw))
        except ValueError:
            raise ConfigError(f"environment variable {name}={raw!r} is not an integer; "
                              "launch with torchrun or unset it") from None
    rank, world, local = values
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} / WORLD_SIZE={world} are inconsistent; "
                          "need WORLD_SIZE >= 1 and 0 <= RANK < WORLD_SIZE")
    return rank, world, local


def resolve_device(device: str | torch.device | None, local_rank: int = 0) -> torch.device:
    """The device to train on: the given one, else cuda:LOCAL_RANK when CUDA exists, else CPU."""
    if device is not None:
        return _existing_device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _existing_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device; ConfigError when torch does not know it, or it is a CUDA
    device this machine lacks."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"device={device!r} is not a device torch knows; "
                          "use 'cpu', 'cuda' or 'cuda:<index>'") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (dev.index is not None and dev.index >= count):
            have = f"{count} CUDA device{'s' if count != 1 else ''}" if count else "no CUDA"
            raise ConfigError(f"device={str(device)!r} but this machine has {have}; use device='cpu'"
                              + (f" or an index below {count}" if count else ""))
    return dev


def init_distributed(device: torch.device) -> DistContext:
    """Join the process group described by the environment, or report a single process.

    Reuses a group that is already initialised. Creates one (nccl on CUDA, gloo otherwise,
    rendezvous through MASTER_ADDR/MASTER_PORT as torchrun sets them) when WORLD_SIZE > 1.
    """
    if dist.is_available() and dist.is_initialized():
        _, _, local = env_ranks()
        return DistContext(dist.get_rank(), dist.get_world_size(), local, owns_group=False)
    rank, world, local = env_ranks()
    if world == 1:
        return DistContext()
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed; "
                          "run a single process or install a torch with distributed support")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistContext(rank, world, local, owns_group=True)


def shutdown(ctx: DistContext) -> None:
    """Destroy the process group if `init_distributed` created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def shard_batch(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """This rank's rows of a global batch: rows rank, rank + world, rank + 2*world, ..."""
    if not ctx.enabled:
        return t
    return t[ctx.rank :: ctx.world_size]


def all_reduce_sums(values: Sequence[float | torch.Tensor], ctx: DistContext,
                    device: torch.device) -> list[float]:
    """Sum each value over all ranks (float64, one collective); identity for one process."""
    flat = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).detach().reshape(())
                        for v in values])
    if ctx.enabled:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    return flat.tolist()


def broadcast_buffers(module: nn.Module, ctx: DistContext) -> None:
    """Copy rank 0's buffers (BatchNorm running stats) to every rank.

    DDP syncs buffers at the start of each forward, so after the last step each rank holds its
    own update; evaluation and the checkpoint must agree on one set, rank 0's.
    """
    if ctx.enabled:
        for buf in module.buffers():
            dist.broadcast(buf.data, src=0)


def wrap_model(model: nn.Module, ctx: DistContext, device: torch.device, ignore: Sequence[str] = ()) -> nn.Module:
    """DistributedDataParallel around `model` when distributed, else `model` itself.

    `ignore` names parameters DDP must neither broadcast nor average (a hook steps them itself),
    on top of any the model already lists. DDP reads that list only here, so the model gets its
    own list back at once: a later run that does not own these parameters synchronises them.
    """
    if not ctx.enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    attr = "_ddp_params_and_buffers_to_ignore"
    before = getattr(model, attr, None)
    if ignore:
        names = list(before or []) + [n for n in ignore if n not in (before or [])]
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    try:
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    finally:
        if before is not None:
            setattr(model, attr, before)
        elif hasattr(model, attr):
            delattr(model, attr)


def free_port() -> int:
    """A TCP port on localhost that was free a moment ago (for a local rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(fn: Callable[..., Any], world_size: int, *args: Any, port: int | None = None) -> None:
    """Run `fn(*args)` in `world_size` fresh processes set up as torchrun would on one node.

    Each process gets RANK = LOCAL_RANK = its index, WORLD_SIZE, MASTER_ADDR=127.0.0.1 and a
    free MASTER_PORT, so code that calls `train` inside `fn` joins the group by itself. `fn`
    must be picklable (a module-level function). An exception in any process is raised here.

    >>> def work(out_dir): ...          # doctest: +SKIP
    >>> launch_local(work, 2, "/tmp/run")  # doctest: +SKIP
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"world_size={world_size!r} is invalid; use a positive integer")
    port = port if port is not None else free_port()
    mp.spawn(_local_worker, args=(world_size, port, fn, args), nprocs=world_size, join=True)


def _local_worker(rank: int, world_size: int, port: int, fn: Callable[..., Any],
                  args: tuple[Any, ...]) -> None:
    os.environ.update({
        "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
    })
    fn(*args)
