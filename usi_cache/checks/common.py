"""What the report commands (`usi inspect`, `usi verify`, `usi audit`) share, so that none of
them imports another: when to show progress, and finding a cache's own shards."""
from __future__ import annotations

from pathlib import Path

from . import schema, storage
from .shards import Manifest, load_manifest

# Show a progress bar when reading at least this many shards: below it the bar only flickers.
PROGRESS_MIN_SHARDS = 8


def shards_for(attrs: dict, shards_dir: str | Path | None) -> Manifest:
    """The shard folder's manifest (default: the folder the cache recorded), refused (naming
    the field) unless it is the cache's dataset."""
    if shards_dir is None:
        shards_dir = attrs["dataset"].get("root")
        if shards_dir is None:
            raise schema.CacheError("the cache's attributes do not record where its shards are: "
                                    "give --shards DIR")
        if not storage.is_dir(shards_dir):
            raise schema.CacheError(f"the cache's shards were at {shards_dir}, which is gone: give --shards DIR")
    manifest = load_manifest(shards_dir)
    diff = schema.attrs_difference(attrs["dataset"], manifest.to_dict(), "dataset.")
    if diff:
        raise schema.CacheError(f"{shards_dir}: these shards are not the cache's dataset: {diff}")
    return manifest
