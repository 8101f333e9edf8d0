"""The streaming parallel shard writer that every large source uses (a folder, a Hugging Face
split): `plan_shards` cuts a sorted, seeded shuffle of Entries into shards; `write_planned` has
worker processes each build whole tars from their plans, reading one image at a time, with a
sidecar per finished shard so a rerun after a kill skips it; `dataset.json` is written last.
"""
from __future__ import annotations

import glob
import hashlib
import json
import multiprocessing
import os
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from usi_cache import storage
from usi_cache.progress import progress_bar
from usi_cache.shards.images import Rejected
from usi_cache.shards.manifest import Manifest, ShardError, ShardInfo, output_folder, write_manifest
from usi_cache.shards.tars import write_tar

SIDECARS = ".ingest"  # OUT/.ingest/<tar name>.json: one finished shard's result, for resuming


# (sample key, locator, class index): all a shard needs; the locator is what the source reads
# (a path relative to SRC for a folder, a row index for a Hugging Face dataset)
Entry = tuple[str, str | int, int]


def default_workers() -> int:
    """The CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def plan_shards(entries: list[Entry], per_shard: int, seed: int) -> list[list[Entry]]:
    """Sorted by key, shuffled with `seed`, cut into shards of `per_shard`: depends on the input only."""
    entries = sorted(entries)
    order = np.random.default_rng(seed).permutation(len(entries))
    return [[entries[j] for j in order[i:i + per_shard]] for i in range(0, len(entries), per_shard)]


def _plan_id(shard: list[Entry]) -> str:
    """What a shard is made of; a sidecar is reused only for the same plan."""
    return hashlib.sha256(json.dumps(shard, separators=(",", ":")).encode()).hexdigest()


def _sidecar(out: str, name: str) -> str:
    return storage.join(out, SIDECARS, f"{name}.json")


def _build_shard(task: tuple) -> dict:
    """Worker: read, check and write one shard's images into its tar, then its sidecar.

    `source.samples(shard, rejected)` yields the shard's Samples one at a time, in plan order,
    and appends [where, why] for each one it leaves out.
    """
    source, out, name, shard = task
    rejected: list = []
    classes = Counter()
    samples = (classes.update((s.cls,)) or s for s in source.samples(shard, rejected))
    count, digest = write_tar(storage.join(out, name), samples)
    result = {"name": name, "plan": _plan_id(shard), "count": count, "sha256": digest, "rejected": rejected,
              "class_counts": sorted(classes.items())}
    storage.write_bytes(_sidecar(out, name), json.dumps(result).encode())
    return result


def _finished(out: str, names: list[str], plans: list[str]) -> dict[int, dict]:
    """Shards a previous run completed: tar present, sidecar readable and of the same plan."""
    present = set(storage.listdir(out))
    sidecars = set(storage.listdir(storage.join(out, SIDECARS)))
    done = {}
    for i, (name, plan) in enumerate(zip(names, plans)):
        if name not in present or f"{name}.json" not in sidecars:
            continue
        try:
            result = json.loads(storage.read_bytes(_sidecar(out, name)))
        except ValueError:  # cut short by a kill: build the shard again
            continue
        if result.get("plan") == plan:
            done[i] = result
    return done


def _run_parallel(fn: Callable, tasks: Iterable, workers: int) -> Iterator:
    """`fn` over `tasks`, results in completion order; in this process when workers <= 1.

    Workers are spawned, not forked: the parent may hold threads (tqdm, fsspec's event loop)
    that a fork would copy in a locked state.
    """
    if workers <= 1:
        yield from map(fn, tasks)
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap_unordered(fn, tasks, chunksize=1)


def write_planned(source, plan: list[list[Entry]], classes: Iterable[str], out: str | Path, *, per_shard: int,
                  workers: int | None, prefix: str, progress: bool, rejected: list[Rejected],
                  what: str) -> tuple[Manifest, list[Rejected]]:
    """Write the shards of `plan` into `out` with worker processes, resuming a killed run, then
    `dataset.json`; returns the manifest and `rejected` plus every sample the workers left out.

    `source` is small and picklable (a worker gets it with each shard) and has
    `samples(shard, rejected)` (see `_build_shard`): workers read the images themselves, so the
    parent holds the plan only, and each worker one sample at a time. `what` names the input
    in the error raised when no sample is left.
    """
    out = output_folder(out)
    names = [f"{prefix}-{i:06d}.tar" for i in range(len(plan))]
    done = _finished(out, names, [_plan_id(s) for s in plan])
    if not storage.is_url(out):  # tars a killed run was writing (write_tar's temporary names)
        for tmp in Path(out).glob(f"{glob.escape(prefix)}-*.tar.tmp-*"):
            tmp.unlink()
    todo = [i for i in range(len(plan)) if i not in done]
    n_images = sum(len(s) for s in plan)
    bar = progress_bar(progress, f"{len(todo)} of {len(plan)} shards to {out}", "img", total=n_images,
                       initial=n_images - sum(len(plan[i]) for i in todo))
    tasks = ((source, out, names[i], plan[i]) for i in todo)
    index = {name: i for i, name in enumerate(names)}
    for result in _run_parallel(_build_shard, tasks, min(workers or default_workers(), len(todo))):
        done[index[result["name"]]] = result
        bar.update(result["count"] + len(result["rejected"]))
    bar.close()
    results = [done[i] for i in range(len(plan))]
    rejected = rejected + sorted((Rejected(*r) for res in results for r in res["rejected"]), key=lambda r: r.path)
    infos = [ShardInfo(r["name"], r["count"], r["sha256"]) for r in results if r["count"]]
    if not infos:
        raise ShardError(f"{what}: no readable images found ({len(rejected)} left out)")
    # class counts for the class-order check (a sidecar written before they were kept has none)
    counts = [dict(r["class_counts"]) for r in results if r["count"]] \
        if all("class_counts" in r for r in results) else None
    return write_manifest(out, classes, per_shard, infos, counts), rejected


def read_class_names(path: str) -> list[str]:
    """One class name per line (trailing blank lines ignored)."""
    try:
        names = storage.read_bytes(path).decode().splitlines()
    except UnicodeDecodeError:
        raise ShardError(f"{path}: expected a text file with one class name per line") from None
    while names and not names[-1].strip():
        names.pop()
    names = [n.strip() for n in names]
    if not names or not all(names):
        raise ShardError(f"{path}: expected one non-empty class name per line")
    return names
