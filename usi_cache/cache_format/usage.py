"""A cache's disk usage per array (`disk_usage`, for `usi inspect`) and per view (`bytes_per_view`),
and the chunk files a shard owns (`chunk_keys`, `chunk_files`, for `usi verify`'s missing-chunk
check).
"""
from __future__ import annotations

from pathlib import Path

from usi_cache import storage
from usi_cache.cache_format.spec import ARRAYS, BLOCKS_GROUP, MIX_ARRAYS, PER_SLOT, Layout, _array_specs


def disk_usage(path: str | Path) -> dict[str, int]:
    """Bytes stored per array (and 'total'), for a local or remote cache."""
    files = storage.sizes(path)
    out = {}
    for name in ARRAYS + MIX_ARRAYS:
        found = [size for rel, size in files.items() if _array_of(rel) == name]
        if found or name in ARRAYS:
            out[name] = sum(found)
    out["total"] = sum(files.values())
    return out


def bytes_per_view(path: str | Path, attrs: dict) -> float:
    """Bytes on disk per stored view (every file of the cache over samples × V), as stage 1
    reports it; `attrs` are the cache's attributes."""
    return disk_usage(path)["total"] / max(attrs["dataset"]["num_samples"] * attrs["views"], 1)


def _array_of(rel: str) -> str:
    """The array a file of the cache belongs to (`logits/c/...` and `blocks/1/logits/c/...`)."""
    parts = rel.split("/")
    return parts[2] if parts[0] == BLOCKS_GROUP and len(parts) > 2 else parts[0]


def chunk_keys(name: str, shard: int, layout: Layout) -> list[str]:
    """The store keys (paths relative to the cache) of one shard's block of array `name`: one
    per view block for a per-view array."""
    if name in PER_SLOT:
        return [f"{name}/c/{shard}"]
    zeros = ["0"] * (len(_array_specs(layout)[name]["shape"]) - 1)
    return ["/".join([b.path(name), "c", str(shard), *zeros]) for b in layout.blocks]


def chunk_files(path: str | Path, name: str, shard: int, layout: Layout) -> list[str]:
    """The file(s) or object(s) holding one shard's block of array `name` (for verification tools)."""
    return [storage.join(path, *key.split("/")) for key in chunk_keys(name, shard, layout)]
