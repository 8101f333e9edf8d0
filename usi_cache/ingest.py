"""Datasets into shards at ImageNet scale: a folder streamed into tars, or existing tars indexed.

`shards_from_folder` lists `SRC/<class>/<file>` (paths only in memory), sorts the samples by
key, shuffles them with the seed, and has worker processes each build whole tars from their
lists of paths: a worker reads, checks (decodes) and writes one image at a time, so memory is
bounded by the path list plus one image per worker, whatever the dataset's size. Each tar is
written under a temporary name and renamed; then its result (count, sha256, files left out)
goes to a small sidecar `OUT/.ingest/<tar>.json`. A rerun after a kill skips every shard whose
sidecar matches its plan, and `dataset.json` is written last.

`write_planned` is that writer for any source of Entries: a folder (`FolderSource`) or a
Hugging Face dataset split read by row index (`hf.HFSource`).

`index_shards` writes `dataset.json` for WebDataset tars made elsewhere, without rewriting them.
"""
from __future__ import annotations

import glob
import hashlib
import json
import multiprocessing
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Iterator

import numpy as np

from . import storage
from .class_spread import check_spread
from .shards import (IMAGE_EXTS, Manifest, Rejected, Sample, ShardError, ShardInfo, progress_bar,
                     check_image, output_folder, sanitize_key, scan_shard, write_manifest, write_tar)

SIDECARS = ".ingest"  # OUT/.ingest/<tar name>.json: one finished shard's result, for resuming
# (sample key, locator, class index): all a shard needs; the locator is what the source reads
# (a path relative to SRC for a folder, a row index for a Hugging Face dataset)
Entry = tuple[str, str | int, int]


def default_workers() -> int:
    """The CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _files_under(folder: Path) -> list[str]:
    """Every file below `folder`, as relative POSIX paths in Path order (what `sorted(rglob)` gives)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        rel = os.path.relpath(dirpath, folder)
        found += [f if rel == "." else f"{rel}/{f}".replace(os.sep, "/") for f in filenames]
    return sorted(found, key=lambda r: r.split("/"))


def list_folder(src: str | Path, *, allow_empty_classes: bool = False
                ) -> tuple[tuple[str, ...], list[Entry], list[Rejected]]:
    """The class names (sorted folder names), one Entry per image file, and the files left out
    because their extension is not an image's. Reads no file: decoding is the workers' job.

    Keys are `<class>_<path without extension>` made WebDataset-safe, numbered `_2`, `_3`, ...
    where two files would get the same key.
    """
    src = Path(src)
    if not src.is_dir():
        raise ShardError(f"{src}: source folder not found")
    class_dirs = sorted(p for p in src.iterdir() if p.is_dir())
    if not class_dirs:
        raise ShardError(f"{src}: no class folders (expected SRC/<class>/<image>)")
    entries: list[Entry] = []
    rejected, used, empty = [], set(), []
    for cls, cdir in enumerate(class_dirs):
        before = len(entries)
        for rel in _files_under(cdir):
            p = PurePosixPath(rel)
            if p.suffix.lower().lstrip(".") not in IMAGE_EXTS:
                rejected.append(Rejected(str(cdir / rel), "not an image file"))
                continue
            key = base = sanitize_key(f"{cdir.name}_{p.with_suffix('')}")
            n = 1
            while key in used:
                n += 1
                key = f"{base}_{n}"
            used.add(key)
            entries.append((key, f"{cdir.name}/{rel}", cls))
        if len(entries) == before:
            empty.append(cdir.name)
    if not entries:
        raise ShardError(f"{src}: no readable images found ({len(rejected)} files left out)")
    if empty and not allow_empty_classes:
        shown = ", ".join(str(src / e) for e in empty[:3]) + (f" and {len(empty) - 3} more" if len(empty) > 3 else "")
        raise ShardError(f"{shown}: class folder without image files (expected SRC/<class>/<image>; "
                         f"--allow-empty-classes keeps it as a class with no samples)")
    return tuple(p.name for p in class_dirs), entries, rejected


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


@dataclass(frozen=True)
class FolderSource:
    """Images under `src`, read by path: an Entry's locator is the file's path relative to `src`."""

    src: str

    def samples(self, shard: list[Entry], rejected: list) -> Iterator[Sample]:
        for key, rel, cls in shard:
            path = os.path.join(self.src, rel)
            with open(path, "rb") as f:  # an unreadable file (permissions, I/O) stops the run
                data = f.read()
            try:
                check_image(data)
            except ValueError as e:
                rejected.append([path, str(e)])
                continue
            ext = PurePosixPath(rel).suffix.lower().lstrip(".")
            yield Sample(key, "jpg" if ext == "jpeg" else ext, data, cls)


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


def shards_from_folder(src: str | Path, out: str | Path, *, per_shard: int = 1000, seed: int = 0,
                       workers: int | None = None, allow_empty_classes: bool = False,
                       prefix: str = "shard", progress: bool = True) -> tuple[Manifest, list[Rejected]]:
    """Shard `SRC/<class>/<image>` into `out` (a folder or URL); returns the manifest and every
    file left out (not an image, or undecodable), so shards may hold fewer than `per_shard`.

    The tars depend only on the input, `per_shard` and `seed` (not on `workers` or on resumes).
    """
    if per_shard < 1:
        raise ShardError(f"per_shard: expected a positive integer, got {per_shard}")
    classes, entries, rejected = list_folder(src, allow_empty_classes=allow_empty_classes)
    plan = plan_shards(entries, per_shard, seed)
    del entries
    # workers inherit the working directory: a relative SRC stays valid
    return write_planned(FolderSource(str(src)), plan, classes, out, per_shard=per_shard, workers=workers,
                         prefix=prefix, progress=progress, rejected=rejected, what=str(src))


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


# ---------------------------------------------------------------- bring your own shards
def find_shards(spec: str) -> tuple[str, list[str]]:
    """The tars named by `spec` and the folder they share: `spec` is a folder or URL prefix
    (its `*.tar`), a glob (`/data/train-*.tar`) or a brace pattern (`train-{000000..001281}.tar`)."""
    spec = str(spec)
    if "{" in spec:
        import braceexpand
        paths = list(braceexpand.braceexpand(spec))
    elif any(c in spec for c in "*?["):
        if storage.is_url(spec):
            fs, pattern = storage.filesystem(spec)
            proto = spec.split("://", 1)[0]
            with storage.errors(spec, "listing"):
                paths = [f"{proto}://{p}" for p in fs.glob(pattern)]
        else:
            paths = glob.glob(spec)
        paths = sorted(paths)
        if not paths:
            raise ShardError(f"{spec}: matches no files")
    else:
        if not storage.is_dir(spec):
            raise ShardError(f"{spec}: shard folder not found")
        root = storage.resolve(spec) if not storage.is_url(spec) else spec.rstrip("/")
        paths = [storage.join(root, n) for n in storage.listdir(root) if n.endswith(".tar")]
        if not paths:
            raise ShardError(f"{spec}: no .tar shards in this folder")
        return root, paths
    if not storage.is_url(spec):
        paths = [os.path.abspath(p) for p in paths]
    return _common_folder(paths), paths


def _common_folder(paths: list[str]) -> str:
    if storage.is_url(paths[0]):
        parts = [p.rsplit("/", 1)[0] for p in paths]
        common = os.path.commonprefix([p + "/" for p in parts])
        return common.rstrip("/") if common.endswith("/") else common.rsplit("/", 1)[0]
    return os.path.commonpath([os.path.dirname(p) for p in paths])


def _relative_name(root: str, path: str) -> str:
    """The manifest's name of a shard: relative to dataset.json's folder when inside it, else the
    full path or URL (Manifest.path reads both)."""
    prefix = root.rstrip("/") + "/" if storage.is_url(root) else os.path.join(os.path.abspath(root), "")
    if storage.is_url(root) != storage.is_url(path):
        return path
    full = path if storage.is_url(path) else os.path.abspath(path)
    return full[len(prefix):].replace(os.sep, "/") if full.startswith(prefix) else full


def _scan(path: str) -> tuple[str, int, str, int]:
    return (path, *scan_shard(path))


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


def index_shards(spec: str, *, out: str | None = None, classes_file: str | None = None,
                 workers: int | None = None, progress: bool = True, allow_ordered: bool = False,
                 batch: int = 128, buffer: int = 1000) -> Manifest:
    """Write `dataset.json` for existing WebDataset tars (see `find_shards`), read once each.

    Shards may differ in size: `per_shard` (the cache's slots per shard) is the largest count.
    Classes come from `classes_file` or are named 0..max(cls). Class-ordered shards (a stage-2
    batch of `batch` through a shuffle buffer of `buffer` would hold few classes) are refused
    with class_spread.ClassOrderError, writing nothing, unless `allow_ordered`.
    """
    root, paths = find_shards(spec)
    root = output_folder(out) if out else root
    counts = {}
    bar = progress_bar(progress, f"indexing {len(paths)} shards", "shard", total=len(paths))
    for path, count, digest, top in _run_parallel(_scan, paths, min(workers or default_workers(), len(paths))):
        if count == 0:
            raise ShardError(f"{path}: holds no samples")
        counts[path] = (count, digest, top)
        bar.update(1)
    bar.close()
    top = max(max(c[2]) for c in counts.values())
    if classes_file:
        classes = read_class_names(classes_file)
        if top >= len(classes):
            path = next(p for p in paths if max(counts[p][2]) == top)
            raise ShardError(f"{path}: holds cls {top}, but {classes_file} names {len(classes)} classes")
    else:
        classes = [str(c) for c in range(top + 1)]
    infos = [ShardInfo(_relative_name(root, p), *counts[p][:2]) for p in paths]
    names = [i.name for i in infos]
    if len(set(names)) != len(names):
        raise ShardError(f"{spec}: a shard is listed twice")
    class_counts = [counts[p][2] for p in paths]
    check_spread(spec, class_counts, len(classes), batch, buffer, allow_ordered=allow_ordered)
    return write_manifest(root, classes, max(i.count for i in infos), infos, class_counts)
