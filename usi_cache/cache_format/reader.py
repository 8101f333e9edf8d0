"""Reading a cache: `open_cache` (refusing unknown versions), one (slots, V, ...) array per
name across the view blocks (`array`, `open_arrays`, `BlockedArray`), a shard's block
(`read_block`, `read_array`), the one decoding of stored logits into log-probabilities
(`log_probs`) and which shards are committed (`completed_shards`). The format itself is in
spec.py.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from usi_cache import storage
from usi_cache.cache_format.spec import (
    ARRAYS,
    ATTR,
    BLOCK_MARKER,
    COMMIT_ARRAY,
    COMMITS,
    MIX_ARRAYS,
    NOT_WRITTEN,
    PER_SLOT,
    PER_VIEW,
    READABLE_VERSIONS,
    CacheError,
    Layout,
    ShardBlock,
    ViewBlock,
)


def exists(path: str | Path) -> bool:
    return storage.is_file(storage.join(path, "zarr.json"))


def open_cache(path: str | Path, mode: str = "r") -> tuple[zarr.Group, dict]:
    """Open a cache (a folder or URL); returns the group and its `usi_cache` attribute."""
    if not exists(path):
        raise CacheError(f"{path}: no cache here (expected a Zarr group with zarr.json)")
    try:
        group = zarr.open_group(storage.zarr_store(path, read_only=mode == "r"), mode=mode, zarr_format=3)
        attrs = dict(group.attrs[ATTR])
    except KeyError:
        raise CacheError(f"{path}: Zarr group has no {ATTR!r} attribute: not a usi-cache cache") from None
    except storage.StorageError:
        raise
    except Exception as e:  # zarr raises many types for a damaged zarr.json
        raise CacheError(f"{path}: cannot open as a Zarr v3 group ({type(e).__name__}: {e})") from None
    if attrs.get("schema_version") not in READABLE_VERSIONS:
        raise CacheError(f"{path}: schema_version {attrs.get('schema_version')!r}, "
                         f"this tool reads versions {', '.join(map(str, READABLE_VERSIONS))}")
    wanted = list(ARRAYS + (MIX_ARRAYS if attrs.get("mix", "none") == "paired" else ()))
    try:
        layout = Layout.from_attrs(attrs)
        wanted += [b.path(n) for b in layout.blocks[1:] for n in layout.per_view]
    except (KeyError, TypeError, ValueError):
        pass  # a malformed attribute: `usi verify` names the field
    missing = [n for n in wanted if n not in group]
    if missing:
        raise CacheError(f"{path}: array {missing[0]!r} is missing")
    return group, attrs


class BlockedArray:
    """One per-view array of a grown cache read as a single (slots, V, ...) array: `[rows]` reads
    every view block, `[rows, view]` only the block holding `view` (one inner chunk per shard)."""

    def __init__(self, parts: list[zarr.Array], blocks: tuple[ViewBlock, ...]):
        self.parts, self.blocks = parts, blocks
        first = parts[0]
        # from the parts, so that a block of another shape shows (verify compares with the attributes)
        self.shape = (first.shape[0], sum(p.shape[1] for p in parts), *first.shape[2:])
        expected = [(first.shape[0], b.count, *first.shape[2:]) for b in blocks]
        self.misfit = next((f"view block {b.start}..{b.start + b.count - 1} is stored with shape "
                            f"{tuple(p.shape)}, expected {want}"
                            for p, b, want in zip(parts, blocks, expected) if tuple(p.shape) != want), None)
        self.dtype, self.fill_value, self.store = first.dtype, first.fill_value, first.store

    def __getitem__(self, index):
        rows, view = index if isinstance(index, tuple) else (index, None)
        if view is None:
            return np.concatenate([part[rows] for part in self.parts], axis=1)
        view = int(view)
        for part, block in zip(self.parts, self.blocks):
            if view in block.views:
                return part[rows, view - block.start]
        raise IndexError(f"view {view} is outside the cache's {self.shape[1]} views")


def array(group: zarr.Group, name: str, layout: Layout | None = None):
    """Array `name` of a cache as one array over all its committed views (a zarr.Array, or a
    `BlockedArray` when the cache grew); a path such as `blocks/1/committed` as it is. `layout`
    defaults to the group's attributes."""
    if name not in PER_VIEW + MIX_ARRAYS:  # per-slot arrays, and paths inside a block
        return group[name]
    blocks = (layout or Layout.from_attrs(dict(group.attrs[ATTR]))).blocks
    if len(blocks) == 1:
        return group[name]
    return BlockedArray([group[b.path(name)] for b in blocks], blocks)


def open_arrays(group: zarr.Group, layout: Layout) -> dict:
    """The layout's arrays, opened once: read_array/read_block accept this in place of the
    group, and then read only chunks (on object storage, each `group[name]` is a metadata
    request, which would double the requests of a per-shard read)."""
    return {name: array(group, name, layout) for name in layout.arrays}


def read_array(group: zarr.Group | dict, name: str, rows: slice, view: int | None = None) -> np.ndarray:
    """Read rows of one array (optionally one view), naming the array and rows on corruption.
    `group` is the cache's group or its `open_arrays`."""
    try:
        arr = group[name] if isinstance(group, dict) else array(group, name)
        return arr[rows] if view is None or name in PER_SLOT else arr[rows, view]
    except Exception as e:
        url = _store_url(group)
        if url and storage.is_client_error(e):  # the network, not the chunk: not "damaged"
            raise storage.StorageError(f"{url}: reading array {name!r} rows {rows.start}:{rows.stop} failed "
                                       f"({type(e).__name__}: {str(e).strip()[:200]})") from None
        raise CacheError(f"array {name!r} rows {rows.start}:{rows.stop}"
                         f"{'' if view is None else f' view {view}'}: unreadable chunk "
                         f"({type(e).__name__}: {e})") from None


def _store_url(group) -> str | None:
    """The URL of a cache opened from object storage (None for a local one)."""
    store = getattr(group, "store", None) or getattr(next(iter(group.values()), None), "store", None)
    fs = getattr(store, "fs", None)
    if fs is None:
        return None
    return f"{fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol}://{store.path}"


def read_block(group: zarr.Group | dict, layout: Layout, shard: int, view: int | None = None) -> ShardBlock:
    """Read one shard's block: all views, or only `view` (then per-view arrays lose axis 1).
    `log_probs` holds the top-k log-probabilities whatever the schema version."""
    rows = layout.rows(shard)
    block = ShardBlock(**{name: read_array(group, name, rows, view) for name in layout.arrays})
    block.log_probs = log_probs(block.logits, block.lse, layout)
    return block


def log_probs(values: np.ndarray, lse: np.ndarray, layout: Layout) -> np.ndarray:
    """Top-k log-probabilities log p_i (..., k) float32 from the `logits` array's `values`
    (..., k) and `lse` (...): as stored for schema >= 3; z - lse (in float64) for schema 1-2."""
    if layout.stores_log_probs:
        return np.asarray(values, dtype=np.float32)
    return (values.astype(np.float64) - np.asarray(lse, np.float64)[..., None]).astype(np.float32)


def read_commits(group: zarr.Group, layout: Layout, view_block: ViewBlock) -> np.ndarray | None:
    """(num_shards, 3) float64 (unix time, part, parts) of each shard's commit in `view_block`
    (time 0: none recorded); None for a cache made before commit times were recorded."""
    path = view_block.path(COMMITS)
    if path not in group:
        return None
    return read_array(group, path, slice(0, layout.num_shards))


def completed_shards(group: zarr.Group, layout: Layout, view_block: ViewBlock | None = None) -> np.ndarray:
    """Bool per shard: True when its commit marker was written (block 0's `labels`, or the
    marker of a grown `view_block`; the committed blocks of a cache are whole by construction)."""
    if view_block is not None and view_block.index > 0:
        return read_array(group, view_block.path(BLOCK_MARKER), slice(0, layout.num_shards)) == 1
    labels = read_array(group, COMMIT_ARRAY, slice(0, layout.slots))
    return (labels.reshape(layout.num_shards, layout.slots_per_shard) != NOT_WRITTEN).all(axis=1)
