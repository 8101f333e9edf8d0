"""`usi shards index`: `dataset.json` for WebDataset tars made elsewhere, written without
rewriting them (`find_shards` expands a brace pattern or folder; each tar is scanned in
parallel).
"""
from __future__ import annotations

import glob
import os

from usi_cache import storage
from usi_cache.progress import progress_bar
from usi_cache.shards.class_spread import check_spread
from usi_cache.shards.manifest import Manifest, ShardError, ShardInfo, output_folder, write_manifest
from usi_cache.shards.tars import scan_shard
from usi_cache.shards.writer import _run_parallel, default_workers, read_class_names


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


def _scan(path: str) -> tuple[str, int, str, dict[int, int]]:
    return (path, *scan_shard(path))


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
    for path, count, digest, classes in _run_parallel(_scan, paths, min(workers or default_workers(), len(paths))):
        if count == 0:
            raise ShardError(f"{path}: holds no samples")
        counts[path] = (count, digest, classes)
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
