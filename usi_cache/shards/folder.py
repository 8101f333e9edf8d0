"""`usi shards from-folder`: a folder `SRC/<class>/<file>` streamed into tars at ImageNet scale.

`shards_from_folder` lists `SRC/<class>/<file>` (paths only in memory), sorts the samples by
key, shuffles them with the seed, and has worker processes each build whole tars from their
lists of paths: a worker reads, checks (decodes) and writes one image at a time, so memory is
bounded by the path list plus one image per worker, whatever the dataset's size. Each tar is
written under a temporary name and renamed; then its result (count, sha256, files left out)
goes to a small sidecar `OUT/.ingest/<tar>.json`. A rerun after a kill skips every shard whose
sidecar matches its plan, and `dataset.json` is written last.

The writer is writer.py's `write_planned`, shared with the Hugging Face source (`hf.HFSource`);
this module is the folder's part: listing it (`list_folder`) and reading it (`FolderSource`).
Existing tars are indexed by index.py.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

from usi_cache.shards.images import IMAGE_EXTS, Rejected, check_image
from usi_cache.shards.manifest import Manifest, ShardError
from usi_cache.shards.tars import Sample, sanitize_key
from usi_cache.shards.writer import Entry, plan_shards, write_planned


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
