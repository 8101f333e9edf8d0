"""`usi shards reshard SRC OUT`: existing tars rewritten into shuffled shards, in bounded memory.

SRC is anything `usi shards index` accepts (a folder or URL prefix, a glob, a brace pattern).
Every sample keeps its key and its original bytes; only which shard holds it, and where, change.

The algorithm (docs/shards.md): the N samples, numbered source by source in SRC's order, are
permuted with a seeded global permutation π (N int64s per process); output shard j holds the
samples with π(n) in [j·S, (j+1)·S), in π order. Output shards form G ≤ GROUPS groups of K
consecutive shards.

* Pass 1, one task per source shard: read the shard (one shard in memory), sort its samples by π
  and write them, split by output group, as spill tars SPILL/g<group>/<source>.tar (each in π
  order); then a marker SPILL/pass1/<source>.json (its count and class counts).
* Pass 2, one task per output group: for each of its output shards, in π order, take the next
  sample from the spill of the source shard that π says it comes from. Every spill is read
  front to back once, streamed, so a task holds one sample plus a read buffer per spill it has
  open. Each output shard is written under a temporary name and renamed (`write_tar`), then
  its result goes to OUT/.reshard/shards/<name>.json.

Both passes run in `workers` processes. A rerun after a kill reuses every pass-1 marker and every
finished output shard of the same plan. `dataset.json` (with class counts) is written last; the
spills are removed only then. The output depends on (SRC, seed, per_shard) only, not on workers.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import resource
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from usi_cache import storage
from usi_cache.shards.class_spread import Spread, measure
from usi_cache.shards.writer import _run_parallel, default_workers, read_class_names
from usi_cache.shards.index import find_shards
from usi_cache.shards.manifest import (MANIFEST, Manifest, ShardError, ShardInfo, load_manifest, output_folder,
                                       write_manifest)
from usi_cache.progress import progress_bar
from usi_cache.shards.tars import read_shard, scan_shard, write_tar

STATE = ".reshard"  # OUT/.reshard: run.json (the plan), shards/<name>.json (finished output shards)
GROUPS = 32  # output groups at most: spill tars <= source shards x GROUPS, pass-2 tasks = groups


@dataclass(frozen=True)
class Plan:
    """Everything the output depends on; two runs of the same plan write the same bytes."""

    sources: tuple[str, ...]  # source tars (paths or URLs), in SRC's order
    counts: tuple[int, ...]  # samples of each
    seed: int
    per_shard: int  # S
    classes: tuple[str, ...]

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.per_shard)

    @property
    def per_group(self) -> int:
        """K: output shards per group."""
        return -(-self.num_shards // GROUPS)

    @property
    def num_groups(self) -> int:
        return -(-self.num_shards // self.per_group)

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)])

    def name(self, j: int) -> str:
        return f"shard-{j:06d}.tar"

    def ident(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


_perm: dict = {}  # this process's (seed, N) -> (π, π⁻¹): N int64s each, built once per process


def permutation(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """π (sample number -> output position) and its inverse."""
    if _perm.get("key") != (seed, n):
        perm = np.random.default_rng(seed).permutation(n)
        inv = np.empty_like(perm)
        inv[perm] = np.arange(n)
        _perm.update(key=(seed, n), value=(perm, inv))
    return _perm["value"]


# ---------------------------------------------------------------- pass 1
def _spill_path(spill: str, group: int, source: int) -> str:
    return os.path.join(spill, f"g{group:05d}", f"{source:06d}.tar")


def _marker(spill: str, source: int) -> str:
    return os.path.join(spill, "pass1", f"{source:06d}.json")


def _spill_source(task: tuple) -> dict:
    """Worker: scatter source shard `i` into its spills (one per output group it feeds), sorted by π."""
    plan, spill, i = task
    perm, _ = permutation(plan.seed, plan.num_samples)
    path, lo, n = plan.sources[i], int(plan.offsets[i]), plan.counts[i]
    samples = list(read_shard(path))  # one source shard in memory
    if len(samples) != n:
        raise ShardError(f"{path}: holds {len(samples)} samples, expected {n} (counted when the reshard "
                         f"started: was it changed?)")
    target = perm[lo:lo + n]
    order = np.argsort(target, kind="stable")
    group = target[order] // (plan.per_group * plan.per_shard)
    for g in np.unique(group):
        write_tar(_spill_path(spill, int(g), i), [samples[k] for k in order[group == g]])
    result = {"plan": plan.ident(), "count": n,
              "class_counts": sorted(Counter(s.cls for s in samples).items())}
    Path(_marker(spill, i)).write_text(json.dumps(result))
    return result


def _spilled(plan: Plan, spill: str) -> dict[int, dict]:
    """Source shards whose pass 1 a previous run finished (marker present, readable, same plan)."""
    done = {}
    for i in range(len(plan.sources)):
        try:
            result = json.loads(Path(_marker(spill, i)).read_text())
        except (OSError, ValueError):
            continue
        if result.get("plan") == plan.ident():
            done[i] = result
    return done


# ---------------------------------------------------------------- pass 2
def _sidecar(out: str, name: str) -> str:
    return storage.join(out, STATE, "shards", f"{name}.json")


class _Spills:
    """Pass 2's reading side for one output group: the next sample of each source's spill, each
    spill opened when first needed and closed (checked for extra samples) after its last one."""

    def __init__(self, plan: Plan, spill: str, group: int, sources: np.ndarray):
        self.plan, self.spill, self.group = plan, spill, group
        self.left = Counter(sources.tolist())  # samples still to take from each source's spill
        self.open: dict[int, Iterator] = {}

    def take(self, i: int):
        path = _spill_path(self.spill, self.group, i)
        it = self.open.get(i)
        if it is None:
            it = self.open[i] = read_shard(path)
        sample = next(it, None)
        if sample is None:
            raise ShardError(f"{path}: spill ends early (damaged? remove {self.spill} and rerun)")
        self.left[i] -= 1
        if self.left[i] == 0:
            if next(self.open.pop(i), None) is not None:
                raise ShardError(f"{path}: spill holds more samples than planned (remove {self.spill} and rerun)")
        return sample


def _build_group(task: tuple) -> list[dict]:
    """Worker: write the output shards of group `g` that are not finished yet (the finished ones'
    samples are read past), each from the spills in π order."""
    plan, spill, out, g, todo = task
    _, inv = permutation(plan.seed, plan.num_samples)
    S, N = plan.per_shard, plan.num_samples
    t0, t1 = g * plan.per_group * S, min(N, (g + 1) * plan.per_group * S)
    # the source shard of each output position of the group
    sources = np.searchsorted(plan.offsets, inv[t0:t1], side="right") - 1
    spills = _Spills(plan, spill, g, sources)
    results = []
    for j in range(t0 // S, -(-t1 // S)):
        a, b = j * S - t0, min((j + 1) * S, N) - t0
        if j not in todo:
            for k in range(a, b):
                spills.take(int(sources[k]))
            continue
        classes = Counter()

        def samples(a=a, b=b, classes=classes, j=j):
            keys = set()  # a repeated key would make a tar no reader accepts: refuse it by name
            for k in range(a, b):
                s = spills.take(int(sources[k]))
                if s.key in keys:
                    raise ShardError(f"{plan.sources[int(sources[k])]}: sample key {s.key!r} occurs twice in "
                                     f"the source shards (it would be written twice into {plan.name(j)}): "
                                     f"keys must be unique")
                keys.add(s.key)
                classes[s.cls] += 1
                yield s
        name = plan.name(j)
        count, digest = write_tar(storage.join(out, name), samples())
        result = {"plan": plan.ident(), "name": name, "count": count, "sha256": digest,
                  "class_counts": sorted(classes.items())}
        storage.write_bytes(_sidecar(out, name), json.dumps(result).encode())
        results.append(result)
    return results


def _finished(plan: Plan, out: str) -> dict[int, dict]:
    """Output shards a previous run finished: tar present, sidecar readable and of the same plan."""
    present = set(storage.listdir(out))
    sidecars = set(storage.listdir(storage.join(out, STATE, "shards")))
    done = {}
    for j in range(plan.num_shards):
        name = plan.name(j)
        if name not in present or f"{name}.json" not in sidecars:
            continue
        try:
            result = json.loads(storage.read_bytes(_sidecar(out, name)))
        except ValueError:
            continue
        if result.get("plan") == plan.ident():
            done[j] = result
    return done


# ---------------------------------------------------------------- the command
def _sources(src: str, classes_file: str | None, workers: int, progress: bool
             ) -> tuple[str, list[str], list[int], tuple[str, ...]]:
    """(the sources' folder, source tars, samples of each, class names). A folder or prefix with
    a dataset.json is the dataset it lists (wherever its tars are; their counts are then checked
    as they are read); anything else is what `find_shards` finds, each tar read once (in
    parallel) to count its samples, as `usi shards index` does."""
    if not any(c in str(src) for c in "*?[{") and storage.is_file(storage.join(src, MANIFEST)):
        m = load_manifest(storage.resolve(src))  # absolute: the plan must not depend on the cwd
        names = read_class_names(classes_file) if classes_file else m.classes
        return m.root, [m.path(i) for i in range(len(m.shards))], [s.count for s in m.shards], tuple(names)
    root, paths = find_shards(src)
    bar = progress_bar(progress, f"counting the samples of {len(paths)} shards", "shard", total=len(paths))
    found = {}
    for path, (count, _, classes) in _run_parallel(_count, paths, min(workers, len(paths))):
        if count == 0:
            raise ShardError(f"{path}: holds no samples")
        found[path] = (count, max(classes))
        bar.update(1)
    bar.close()
    top = max(t for _, t in found.values())
    if classes_file:
        names = read_class_names(classes_file)
        if top >= len(names):
            path = next(p for p in paths if found[p][1] == top)
            raise ShardError(f"{path}: holds cls {top}, but {classes_file} names {len(names)} classes")
    else:
        names = [str(c) for c in range(top + 1)]
    return root, paths, [found[p][0] for p in paths], tuple(names)


def _count(path: str):
    return path, scan_shard(path)


def _check_out(out: str, root: str, plan_id: str | None) -> str | None:
    """Refuse an OUT that holds another dataset or another reshard; the plan id recorded there."""
    if not storage.is_url(out) and os.path.abspath(out) == os.path.abspath(root):
        raise ShardError(f"{out}: OUT is the source folder; give a new folder")
    run = storage.join(out, STATE, "run.json")
    if storage.is_file(run):
        try:
            recorded = json.loads(storage.read_bytes(run)).get("plan")
        except ValueError:
            recorded = None
        if plan_id is not None and recorded != plan_id:
            raise ShardError(f"{out}: holds a reshard of another source, seed or --per-shard ({run}); "
                             f"remove it or give another OUT")
        return recorded
    names = storage.listdir(out)
    if MANIFEST in names or any(n.endswith(".tar") for n in names):
        raise ShardError(f"{out}: already holds a dataset (dataset.json or .tar files); give a new folder")
    return None


def _raise_open_files() -> None:
    """Pass 2 keeps a spill open per source shard feeding its group: allow what the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _check_open_files(plan: "Plan", out: str) -> None:
    """Refuse pass 2 in one line when a worker could not hold a spill open for every source shard
    feeding one output group (the limit would otherwise surface as a damaged spill)."""
    need = min(len(plan.sources), plan.per_group * plan.per_shard) + 64  # + the process's own files
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and need > soft:
        raise ShardError(f"{out}: pass 2 keeps up to {need - 64} spills open per worker, the open-file limit is "
                         f"{soft}: raise it (`ulimit -n {need}`) and rerun (pass 1's spills are kept)")


@dataclass(frozen=True)
class Resharded:
    manifest: Manifest
    before: Spread | None  # the source's class spread, from pass 1 (None when a rerun found it all done)
    after: Spread


def reshard(src: str, out: str, *, per_shard: int = 1000, seed: int = 0, workers: int | None = None,
            classes_file: str | None = None, spill_dir: str | None = None, batch: int = 128,
            buffer: int = 1000, progress: bool = True) -> Resharded:
    """Rewrite the tars of `src` into shuffled shards of `per_shard` in `out` (a folder or URL).

    Spills go to OUT/.reshard/spill for a local OUT, else to `spill_dir` (default: a folder in the
    system's temporary directory named after OUT); they must be local files. `batch` and `buffer`
    are the stage-2 settings the reported class spread assumes.
    """
    if per_shard < 1:
        raise ShardError(f"per_shard: expected a positive integer, got {per_shard}")
    if seed < 0:
        raise ShardError(f"seed: expected a non-negative integer, got {seed}")
    workers = workers or default_workers()
    out = str(out).rstrip("/") if storage.is_url(out) else str(out)
    _check_out(out, str(src), None)  # before any reading
    root, paths, counts, classes = _sources(src, classes_file, workers, progress)
    plan = Plan(tuple(paths), tuple(counts), seed, per_shard, tuple(classes))
    recorded = _check_out(out, root, plan.ident())
    out = output_folder(out)
    if recorded is None:
        storage.write_bytes(storage.join(out, STATE, "run.json"),
                            json.dumps({"plan": plan.ident(), **asdict(plan)}, indent=1).encode())
    if spill_dir is None:
        spill_dir = (os.path.join(tempfile.gettempdir(), "usi-reshard-" + hashlib.sha256(out.encode()).hexdigest()[:12])
                     if storage.is_url(out) else os.path.join(out, STATE, "spill"))
    spill = str(spill_dir)
    for tmp in glob.glob(os.path.join(glob.escape(spill), "**", "*.tar.tmp-*"), recursive=True):
        os.unlink(tmp)  # tars a killed run was writing (write_tar's temporary names)
    if not storage.is_url(out):
        for tmp in Path(out).glob("shard-*.tar.tmp-*"):
            tmp.unlink()
    for folder in ["pass1", *(f"g{g:05d}" for g in range(plan.num_groups))]:
        os.makedirs(os.path.join(spill, folder), exist_ok=True)

    done = _finished(plan, out)
    spilled = _spilled(plan, spill) if len(done) < plan.num_shards else {}
    todo1 = [i for i in range(len(paths)) if i not in spilled] if len(done) < plan.num_shards else []
    N = plan.num_samples
    bar = progress_bar(progress, f"pass 1 of 2: {len(todo1)} of {len(paths)} source shards to spills", "img",
                       total=N, initial=N - sum(counts[i] for i in todo1))
    for result in _run_parallel(_spill_source, ((plan, spill, i) for i in todo1), min(workers, max(len(todo1), 1))):
        bar.update(result["count"])
    bar.close()
    spilled = _spilled(plan, spill)
    if len(done) < plan.num_shards and len(spilled) < len(paths):  # a worker's error stopped the pool
        raise ShardError(f"{spill}: pass 1 incomplete ({len(spilled)} of {len(paths)} source shards); rerun")

    _raise_open_files()
    _check_open_files(plan, out)
    groups = {}
    for j in range(plan.num_shards):
        if j not in done:
            groups.setdefault(j // plan.per_group, set()).add(j)
    bar = progress_bar(progress, f"pass 2 of 2: {plan.num_shards - len(done)} of {plan.num_shards} shards to {out}",
                       "shard", total=plan.num_shards, initial=len(done))
    tasks = ((plan, spill, out, g, todo) for g, todo in sorted(groups.items()))
    for results in _run_parallel(_build_group, tasks, min(workers, max(len(groups), 1))):
        for r in results:
            done[int(r["name"][len("shard-"):-len(".tar")])] = r
        bar.update(len(results))
    bar.close()

    results = [done[j] for j in range(plan.num_shards)]
    infos = [ShardInfo(r["name"], r["count"], r["sha256"]) for r in results]
    after_counts = [dict(r["class_counts"]) for r in results]
    m = write_manifest(out, classes, per_shard, infos, after_counts)
    if os.path.isdir(spill):
        shutil.rmtree(spill)  # only now: a kill before this point loses no finished work
    before_counts = [dict(spilled[i]["class_counts"]) for i in range(len(paths))] if len(spilled) == len(paths) \
        else None
    after = measure(after_counts, len(classes), batch, buffer)
    before = measure(before_counts, len(classes), batch, buffer) if before_counts else None
    return Resharded(m, before, after)
