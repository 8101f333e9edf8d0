"""The dataset manifest `dataset.json`: the classes, the shards with their sample counts and
sha256, and their fingerprint. `load_manifest` reads it (checking every field),
`write_manifest` writes it last, so a folder without one is never taken for a complete set of
shards.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from usi_cache import storage

MANIFEST = "dataset.json"


MANIFEST_FORMAT = "usi-cache-shards/1"


class ShardError(ValueError):
    """Bad shard input: an empty source, a missing manifest, a damaged tar."""


@dataclass(frozen=True)
class ShardInfo:
    name: str  # tar file name relative to the shard folder, or a full path / URL (indexed shards elsewhere)
    count: int  # samples in this shard
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """What `dataset.json` says about a folder of shards."""

    root: str  # the folder (or URL prefix) holding dataset.json
    classes: tuple[str, ...]
    per_shard: int  # the largest shard's count (or more); also the cache's slots per shard
    shards: tuple[ShardInfo, ...]
    fingerprint: str  # sha256 over classes, per_shard and every shard's name, count and sha256

    @property
    def num_samples(self) -> int:
        return sum(s.count for s in self.shards)

    def path(self, index: int) -> str:
        """Shard `index`'s tar: a local path or a URL (see `shard_path`)."""
        return shard_path(self.root, self.shards[index].name)

    def check_count(self, index: int, count: int) -> None:
        """A shard read to its end must hold what dataset.json says (a tar cut between members
        reads without error)."""
        expected = self.shards[index].count
        if count != expected:
            raise ShardError(f"{self.path(index)}: holds {count} samples, "
                             f"{storage.join(self.root, MANIFEST)} says {expected}")

    def to_dict(self) -> dict:
        return {
            "format": MANIFEST_FORMAT,
            "classes": list(self.classes),
            "per_shard": self.per_shard,
            "num_samples": self.num_samples,
            "shards": [{"name": s.name, "count": s.count, "sha256": s.sha256} for s in self.shards],
            "fingerprint": self.fingerprint,
        }


def shard_path(root: str, name: str) -> str:
    """Where a manifest's shard `name` points: a URL or an absolute path as it is, anything else
    (`shard-000000.tar`, `sub/x.tar`) relative to the folder or prefix `root` holding dataset.json."""
    if storage.is_url(name) or os.path.isabs(name):
        return name
    return storage.join(root, name)


def fingerprint(classes: Iterable[str], per_shard: int, shards: Iterable[ShardInfo]) -> str:
    payload = json.dumps({"classes": list(classes), "per_shard": per_shard,
                          "shards": [[s.name, s.count, s.sha256] for s in shards]},
                         sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def load_manifest(root: str | Path) -> Manifest:
    """Read and check `ROOT/dataset.json` (ROOT a folder or a URL); every listed shard must exist.
    Shard names are relative to ROOT, or full paths / URLs (`usi shards index --out`)."""
    root = str(root).rstrip("/") if storage.is_url(root) else str(root)
    path = storage.join(root, MANIFEST)
    if not storage.is_dir(root):
        raise ShardError(f"{root}: shard folder not found")
    if not storage.is_file(path):
        raise ShardError(f"{path}: no dataset manifest (make shards with `usi shards ...`)")
    try:
        d = json.loads(storage.read_bytes(path))
        shards = tuple(ShardInfo(s["name"], int(s["count"]), s["sha256"]) for s in d["shards"])
        m = Manifest(root, tuple(d["classes"]), int(d["per_shard"]), shards, d["fingerprint"])
    except (ValueError, KeyError, TypeError) as e:
        raise ShardError(f"{path}: not a valid dataset manifest ({type(e).__name__}: {e})") from None
    if not m.shards:
        raise ShardError(f"{path}: lists no shards")
    present = set(storage.listdir(root))  # one listing, not a request per shard
    for i, s in enumerate(m.shards):
        if s.name not in present and ("/" not in s.name or not storage.is_file(m.path(i))):
            raise ShardError(f"{m.path(i)}: shard listed in {MANIFEST} is missing")
    if fingerprint(m.classes, m.per_shard, m.shards) != m.fingerprint:
        raise ShardError(f"{path}: fingerprint does not match its own contents (edited by hand?)")
    return m


def write_manifest(out: str, classes: Iterable[str], per_shard: int, infos: Iterable[ShardInfo],
                   class_counts: Iterable[dict[int, int]] | None = None) -> Manifest:
    """Write `OUT/dataset.json` for shards already written; call it last, so that a folder
    without one is never taken for a complete set of shards. `class_counts` (per shard, {class:
    samples}) are stored for the class-order check (class_spread.py), one line per shard; they are
    not part of the fingerprint (they follow from the shards' bytes) nor of `Manifest`."""
    classes, infos = tuple(classes), tuple(infos)
    m = Manifest(out, classes, per_shard, infos, fingerprint(classes, per_shard, infos))
    d = m.to_dict()
    if class_counts is not None:  # [class, count, class, count, ...], classes ascending
        for s, c in zip(d["shards"], class_counts, strict=True):
            s["class_counts"] = [int(x) for k in sorted(c) for x in (k, c[k])]
    shards = ",\n".join("  " + json.dumps(s, separators=(",", ":")) for s in d.pop("shards"))
    text = json.dumps(d, indent=1)[:-2] + f',\n "shards": [\n{shards}\n ]\n}}\n'
    storage.write_bytes(storage.join(out, MANIFEST), text.encode())
    return m


def output_folder(out: str | Path) -> str:
    """`out` as the manifest's root (a URL without its trailing slash); a local folder is created."""
    if storage.is_url(out):
        return str(out).rstrip("/")
    Path(out).mkdir(parents=True, exist_ok=True)
    return str(out)
