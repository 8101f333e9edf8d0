"""The cache format: the only package that names Zarr arrays and attributes.

spec.py is the versioned format (arrays, attributes, layout; what changes with SCHEMA_VERSION),
apart from the code that reads it (reader.py), writes and grows it (writer.py) and measures it
(usage.py). Everything else imports the package, `from usi_cache import cache_format as schema`,
and asks it: the names below are the format's whole interface.
"""
from usi_cache.cache_format.reader import (BlockedArray, array, completed_shards, exists, log_probs, open_arrays,
                                           open_cache, read_array, read_block, read_commits)
from usi_cache.cache_format.spec import (ARRAYS, ATTR, BLOCK_MARKER, BLOCKS_GROUP, COMMIT_ARRAY, COMMITS,
                                         ENSEMBLE_VERSION, FP16_MAX, GROWABLE_VERSIONS, INVALID, LOG_PROB_VERSION,
                                         MIX_ARRAYS, NOT_WRITTEN, PARTS_DIR, PER_SLOT, PER_VIEW, READABLE_VERSIONS,
                                         SCHEMA_VERSION, TEACHER_OUTPUTS, VIEW_PARAMS, VOLATILE_ATTRS, CacheError,
                                         Layout, ShardBlock, ViewBlock, attrs_difference, make_attrs, teacher_members,
                                         view_size, view_spec)
from usi_cache.cache_format.usage import bytes_per_view, chunk_files, chunk_keys, disk_usage
from usi_cache.cache_format.writer import (begin_grow, commit_grow, create, encode_log_probs, set_audit,
                                           set_invalid, set_replay, write_block)

__all__ = [
    "ARRAYS", "ATTR", "BLOCK_MARKER", "BLOCKS_GROUP", "COMMIT_ARRAY", "COMMITS", "ENSEMBLE_VERSION", "FP16_MAX",
    "GROWABLE_VERSIONS", "INVALID", "LOG_PROB_VERSION", "MIX_ARRAYS", "NOT_WRITTEN", "PARTS_DIR", "PER_SLOT", "PER_VIEW",
    "READABLE_VERSIONS", "SCHEMA_VERSION",
    "TEACHER_OUTPUTS", "VIEW_PARAMS", "VOLATILE_ATTRS", "CacheError", "Layout", "ShardBlock", "ViewBlock",
    "attrs_difference", "make_attrs", "teacher_members", "view_size", "view_spec",
    "BlockedArray", "array", "completed_shards", "exists", "log_probs", "open_arrays", "open_cache", "read_array",
    "read_block", "read_commits",
    "begin_grow", "commit_grow", "create", "encode_log_probs", "set_audit", "set_invalid", "set_replay", "write_block",
    "bytes_per_view", "chunk_files", "chunk_keys", "disk_usage",
]
