"""Writing a cache: `create` (the arrays of spec.py, empty), `write_block` (one shard's views,
its commit marker last), the attributes set after creation (`set_invalid`, `set_replay`,
`set_audit`), the one encoding of teacher logits as stored log-probabilities
(`encode_log_probs`), and the grow protocol (`begin_grow`, `commit_grow`: a view block invisible
to readers until every shard of it is committed).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from usi_cache import storage
from usi_cache.cache_format.spec import (
    ATTR,
    BLOCK_MARKER,
    BLOCKS_GROUP,
    COMMIT_ARRAY,
    COMMITS,
    FP16_MAX,
    Layout,
    ShardBlock,
    ViewBlock,
    _array_specs,
    written_version,
)


def create(path: str | Path, attrs: dict, layout: Layout, *, clear: bool = True) -> zarr.Group:
    """Create a new, empty cache at `path` (a folder or URL; the caller has checked it may).
    clear=False (independent parts, stage1/parts.py): delete nothing, keep arrays that exist
    already and write the attributes last, so that creating twice at once is harmless and a reader
    that finds the attributes finds every array."""
    with storage.errors(str(path), "creating the cache"):
        return _create(path, attrs, layout) if clear else _create_missing(path, attrs, layout)


def _create(path: str | Path, attrs: dict, layout: Layout) -> zarr.Group:
    storage.remove_tree(path)
    # attributes with the group: a failure while creating the arrays leaves a recognisable cache
    group = zarr.open_group(storage.zarr_store(path, read_only=False), mode="w", zarr_format=3,
                            attributes={ATTR: attrs})
    for name, spec in _array_specs(layout).items():
        group.create_array(name, shape=spec["shape"], dtype=spec["dtype"], chunks=spec["chunks"],
                           shards=spec["shards"], fill_value=spec["fill_value"],
                           compressors=[ZstdCodec(level=5), Crc32cCodec()])
    _create_commits(group, layout)
    group.attrs[ATTR] = attrs
    return group


def _create_missing(path: str | Path, attrs: dict, layout: Layout) -> zarr.Group:
    group = zarr.open_group(storage.zarr_store(path, read_only=False), mode="a", zarr_format=3)
    for name, spec in _array_specs(layout).items():
        if name not in group:
            group.create_array(name, shape=spec["shape"], dtype=spec["dtype"], chunks=spec["chunks"],
                               shards=spec["shards"], fill_value=spec["fill_value"],
                               compressors=[ZstdCodec(level=5), Crc32cCodec()])
    if COMMITS not in group:
        _create_commits(group, layout)
    group.attrs[ATTR] = attrs
    return group


def _create_commits(group: zarr.Group, layout: Layout) -> None:
    """The commit record of a view block's group (one chunk per WebDataset shard)."""
    group.create_array(COMMITS, shape=(layout.num_shards, 3), dtype="float64", chunks=(1, 3), fill_value=0.0,
                       compressors=[ZstdCodec(level=5), Crc32cCodec()])


def set_invalid(group: zarr.Group, invalid: list[str]) -> None:
    attrs = dict(group.attrs[ATTR])
    attrs["invalid"] = invalid
    group.attrs[ATTR] = attrs


def set_replay(group: zarr.Group, replay: dict) -> None:
    """Record the decoder environment and replay fingerprint (checks/replay.py) of a finished cache."""
    attrs = dict(group.attrs[ATTR])
    attrs["replay"] = replay
    group.attrs[ATTR] = attrs


def set_audit(group: zarr.Group, audit: dict) -> None:
    """Record a fidelity audit (checks/audit.py) in the attributes, replacing an earlier one."""
    attrs = dict(group.attrs[ATTR])
    attrs["audit"] = audit
    group.attrs[ATTR] = attrs


def write_block(group: zarr.Group, layout: Layout, shard: int, block: ShardBlock,
                view_block: ViewBlock | None = None, commit: tuple[float, int, int] | None = None) -> None:
    """Write one shard's block: every array in order, the commit marker (labels) last. With a
    grown `view_block` (index >= 1), `block` holds that block's views (layout: `block_layout`)
    and only its per-view arrays are written, then its marker; per-slot arrays are block 0's.
    `commit` (unix time, part, parts) goes to the block's COMMITS record just before the marker
    (skipped for a cache made before the record existed)."""
    rows = layout.rows(shard)
    if view_block is not None and view_block.index > 0:
        for name in layout.per_view:
            group[view_block.path(name)][rows] = getattr(block, name)
        _record_commit(group, view_block, shard, commit)
        group[view_block.path(BLOCK_MARKER)][shard] = 1
        return
    for name in layout.arrays:
        value = getattr(block, name)
        if name == "keys":  # object or StringDType arrays both become Zarr's variable-length strings
            value = np.array([str(v) for v in value], dtype=np.dtypes.StringDType())
        if name == COMMIT_ARRAY:
            _record_commit(group, ViewBlock(0, 0, layout.views), shard, commit)
        group[name][rows] = value


def _record_commit(group: zarr.Group, view_block: ViewBlock, shard: int, commit) -> None:
    if commit is not None and view_block.path(COMMITS) in group:
        group[view_block.path(COMMITS)][shard] = commit


def encode_log_probs(log_p: np.ndarray) -> np.ndarray:
    """What schema 3 stores for float64 log-probabilities (..., k): float16 rounded DOWN (toward
    -inf), so that no stored p_i exceeds the exact one and sum_i p_i <= 1 holds for every row
    (rounding to nearest still pushed the sum above 1 on a third of the rows of a confident
    teacher, whose tail is below the rounding of log p_1); clamped to float16's range (a log p
    below -65504 is a probability of 0 in every float type). Order is kept: rounding is monotone."""
    x = np.clip(np.asarray(log_p, np.float64), -FP16_MAX, 0.0)
    h = x.astype(np.float16)
    up = h.astype(np.float64) > x
    h[up] = np.nextafter(h[up], np.float16(-np.inf))
    return h


def begin_grow(group: zarr.Group, layout: Layout, count: int) -> ViewBlock:
    """Start (or, when the same grow is recorded as running, resume) adding `count` views:
    record `growing`, then create the new block's arrays that do not exist yet. Readers keep
    seeing the committed views only. Rank 0 only."""
    attrs = dict(group.attrs[ATTR])
    block = ViewBlock(len(layout.blocks), layout.views, count)
    base = f"{BLOCKS_GROUP}/{block.index}"
    if attrs.get("growing") != count:
        if base in group:  # left by a grow that never recorded itself: nothing in it is committed
            del group[base]
        attrs["growing"] = count
        group.attrs[ATTR] = attrs  # first: a kill from here on resumes this grow
    sub = group.require_group(BLOCKS_GROUP).require_group(str(block.index))
    specs = _array_specs(layout.block_layout(block))
    specs[BLOCK_MARKER] = dict(shape=(layout.num_shards,), dtype="uint8", chunks=(1,), shards=None, fill_value=0)
    for name in layout.per_view + (COMMITS, BLOCK_MARKER):
        if name == COMMITS:
            if name not in sub:
                _create_commits(sub, layout)
        elif name not in sub:
            spec = specs[name]
            sub.create_array(name, shape=spec["shape"], dtype=spec["dtype"], chunks=spec["chunks"],
                             shards=spec["shards"], fill_value=spec["fill_value"],
                             compressors=[ZstdCodec(level=5), Crc32cCodec()])
    return block


def commit_grow(group: zarr.Group) -> dict:
    """Make a finished grow visible (every shard's marker is written): V += N, the block joins
    `view_blocks`, the cache becomes schema 4 (5 for an ensemble). Returns the new attributes. Rank 0 only."""
    attrs = dict(group.attrs[ATTR])
    if "growing" not in attrs:  # another part committed it a moment ago (stage1/parts.py)
        return attrs
    count = attrs.pop("growing")
    attrs["view_blocks"] = [*(attrs.get("view_blocks") or [attrs["views"]]), count]
    attrs["views"] += count
    attrs["schema_version"] = written_version(attrs)
    group.attrs[ATTR] = attrs
    return attrs
