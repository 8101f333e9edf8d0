"""torch.distributed set-up shared by both stages: a plain `python` run is a world of one.

`map_shards` spreads per-shard work over torchrun ranks and processes on each machine (the
checks of `usi verify`, the statistics of `usi inspect`).
"""
from __future__ import annotations

import datetime
import multiprocessing
import os
from dataclasses import dataclass
from typing import Callable

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


def on_main(world: World, fn: Callable):
    """fn() run on rank 0, its result on every rank. What it raises is raised on every rank, so
    no rank waits for a result that never comes."""
    if not world.distributed:
        return fn()
    result = error = None
    if world.is_main:
        try:
            result = fn()
        except Exception as e:  # re-raised below, on every rank
            error = e
    result, error = broadcast_object(world, (result, error))
    if error is not None:
        raise error
    return result


def all_gather_objects(world: World, obj) -> list:
    if not world.distributed:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def gather_objects(world: World, obj) -> list | None:
    """Every rank's `obj`, in rank order, on rank 0; None on the other ranks."""
    if not world.distributed:
        return [obj]
    out = [None] * world.size if world.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# per-shard work over ranks and local processes


def map_shards(fn: Callable, shards, init: Callable, *, world: World, workers: int = 1,
               progress: bool = False, desc: str = "shards") -> list | None:
    """[fn(state, i) for i in shards], on rank 0 (None on the other ranks).

    Ranks take shards[rank::size]; on each rank `workers` processes take them one at a time.
    `state = init()` is built once per process, on its first shard (open a store, load a model:
    what cannot travel between processes), so `init` and `fn` must be picklable (module-level
    functions, `functools.partial`). Only the per-shard results travel back, and they come back
    in the order of `shards` whatever the split: a caller that merges them in that order gets
    the same floating-point sums for any worker count or world size. A tqdm bar over rank 0's
    shards shows progress and an ETA on a terminal. Worker processes are spawned, not forked: a forked child
    would inherit torch's thread pools and CUDA state, which are not fork-safe.
    """
    mine = list(shards)[world.rank::world.size]
    bar = None
    if progress and world.is_main and mine:
        from tqdm import tqdm
        bar = tqdm(total=len(mine), unit="shard", dynamic_ncols=True, leave=False, disable=None,
                   desc=desc if not world.distributed else f"{desc} (rank 0 of {world.size})")
    results = {}
    try:
        if workers <= 1 or len(mine) <= 1:
            state = init()
            for i in mine:
                results[i] = fn(state, i)
                if bar is not None:
                    bar.update(1)
        else:
            n = min(workers, len(mine))
            threads = max(1, torch.get_num_threads() // n)  # the processes share this machine's cores
            pool = multiprocessing.get_context("spawn").Pool(n, _worker_start, (init, threads))
            with pool:
                for i, r in pool.imap_unordered(_WorkerCall(fn), mine):
                    results[i] = r
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    gathered = gather_objects(world, results)
    if gathered is None:
        return None
    merged = {i: r for part in gathered for i, r in part.items()}
    return [merged[i] for i in shards]


_worker: dict = {}  # a worker process's init and, after its first shard, its state


def _worker_start(init: Callable, threads: int) -> None:
    # no work here: an exception raised in a Pool initializer kills the worker, and the pool
    # starts another forever; raised from the first call it reaches the caller instead
    torch.set_num_threads(threads)
    _worker["init"] = init


class _WorkerCall:
    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, i: int):
        if "state" not in _worker:
            _worker["state"] = _worker["init"]()
        return i, self.fn(_worker["state"], i)
