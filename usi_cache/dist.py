"""torch.distributed set-up shared by both stages: a plain `python` run is a world of one."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_world() -> World:
    """Join the torchrun process group when launched by torchrun (NCCL on CUDA, gloo on CPU).

    `USI_DIST_TIMEOUT` (seconds, default 1800) bounds every collective, so a lost rank
    fails the run instead of hanging it.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if size > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get("USI_DIST_TIMEOUT", "1800")))
        backend = "nccl" if device.type == "cuda" else "gloo"
        # torchrun keeps one store for all restarts (--max-restarts): the process group's keys
        # (each rank's address) would survive from the failed attempt, and a restarted rank
        # could connect to a dead peer's port. A prefix per attempt keeps the attempts apart.
        store, _, _ = next(dist.rendezvous("env://", rank, size, timeout=timeout))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"usi_cache/attempt_{attempt}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout)
    return World(rank, size, local_rank, device)


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def broadcast_object(world: World, obj):
    """Rank 0's `obj` on every rank."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(world: World, obj) -> list:
    if not world.distributed:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
