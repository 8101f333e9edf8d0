"""THE cache schema: the only module that names Zarr arrays and attributes.

Layout (Zarr v3, one group). Rows are *slots*: `slot = shard_index * slots_per_shard +
position_in_shard`, so WebDataset shard i owns rows [i*S, (i+1)*S). Per-view arrays use the
sharding codec with one Zarr shard per WebDataset shard (all V views) and inner chunks of one
view; per-slot arrays have one chunk per WebDataset shard. Every chunk ends in a CRC32C
checksum, so a corrupted chunk fails on read instead of returning garbage.

| array          | shape         | dtype   | meaning                                            |
|----------------|---------------|---------|----------------------------------------------------|
| logits         | (slots, V, k) | float16 | teacher top-k log-probabilities z - lse, descending|
| classes        | (slots, V, k) | uint16* | their class indices (*int32 when C > 65535)        |
| lse            | (slots, V)    | float32 | log-sum-exp over all C logits                      |
| boxes          | (slots, V, 4) | int32   | crop (top, left, height, width), decoded pixels    |
| flips          | (slots, V)    | uint8   | 1 = horizontal flip applied                        |
| aug_ops        | (slots, V, n) | int8    | RandAugment op ids (OP_NAMES in attrs), -1 = none  |
| aug_levels     | (slots, V, n) | float16 | signed magnitude each op was applied with          |
| aug_resample   | (slots, V, n) | uint8   | PIL resample filter of each op                     |
| keys           | (slots,)      | string  | sample key; "" for a slot past the shard's end     |
| labels         | (slots,)      | int32   | ground truth; -1 = empty/undecodable slot          |

| mix_partner    | (slots, V)    | int32   | paired caches only: partner slot (same shard), -1  |
| mix_kind       | (slots, V)    | uint8   | paired only: 0 none, 1 mixup, 2 cutmix             |
| mix_lam        | (slots, V)    | float32 | paired only: weight of the sample itself           |
| mix_box        | (slots, V, 4) | float32 | paired only: cutmix (top, left, bottom, right) as  |
|                |               |         | fractions of the view's side                       |

n is the RandAugment policy's number of ops (at least 1; unused slots hold -1). In a paired
cache (`mix: paired`, schema version 2) the teacher saw view v of the sample mixed with view v
of its partner (see mixing.py); its logits are of that mixed image. `labels` is written
last for each shard: it is the commit marker. Its fill value `NOT_WRITTEN` (-2) marks a shard
that is incomplete; a complete shard has only labels >= -1.

Schema 3 stores log-probabilities log p_i = z_i - lse in `logits` (computed in float64, then
rounded down to float16, see `encode_log_probs`): float16 keeps about 3 significant digits of
any value, so log p of the top class (near 0 for a sharp teacher) keeps its precision, each
p_i is within a relative 2^-10 |log p_i| below the exact one, and sum_i p_i <= 1 always. Versions 1 and 2 stored the raw logits z, whose float16 rounding
(a spacing of 2^-6 at |z| = 20, 0.5 at |z| = 1000) made sum_i p_i exceed 1 for sharp teachers.
`log_probs` is the one place that turns either into log-probabilities; every reader uses it
(`read_block` fills `ShardBlock.log_probs` with it).

Schema 4 lets a cache grow by N views without rewriting a byte of it (`usi cache --add-views`).
The views come in *view blocks*: the V made at creation, then the N of each grow (attribute
`view_blocks`, e.g. [2, 3] for V = 5). Block 0 is the arrays above, as in schema 3; block b >= 1
holds its own per-view arrays in group `blocks/<b>/` (shape (slots, N_b, ...), one Zarr shard
per (WebDataset shard, block), inner chunks of one view) and a commit marker `blocks/<b>/committed`
(num_shards,) uint8, one chunk per WebDataset shard, written after the shard's per-view arrays.
A grow in progress is named by the attribute `growing` (N) and is invisible to readers: `views`
and `view_blocks` count committed blocks only, and grow when every shard of the new block is
committed. Readers see one (slots, V, ...) array per name through `array`/`open_arrays`, which
send a view index to the one block that holds it, so reading one view of a shard is still one
inner chunk. Why blocks of the views one run added, and not one view per Zarr shard: at ImageNet
size (~1,300 WebDataset shards, 8 per-view arrays) one view per file would make 1,300 x 8 x V files
(4.2 M objects at V = 400, and V times more write requests per shard in stage 1); blocks keep the
schema-3 count (x the number of grows), any N works, and an epoch's read is the same one inner
chunk per (shard, view) per array. Version 3 caches are block 0 alone: they grow too (and become
version 4); versions 1 and 2 (raw logits) do not.

Root attribute `usi_cache`: see `make_attrs`.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from . import storage
from .config import ViewSpec, from_dict

SCHEMA_VERSION = 4  # 2 added paired caches (mix_* arrays); 3 stores log-probabilities in `logits`;
# 4 adds view blocks (caches that grow)
READABLE_VERSIONS = (1, 2, 3, 4)  # 1 is read as plain; 1 and 2 hold raw logits (see `log_probs`)
GROWABLE_VERSIONS = (3, 4)  # block 0 alike: these resume and grow; 1 and 2 store raw logits (a grown
# block would mix two encodings)
LOG_PROB_VERSION = 3  # the first version whose `logits` array holds log-probabilities
ATTR = "usi_cache"
FP16_MAX = 65504.0  # largest finite float16
NOT_WRITTEN = -2  # labels fill value: the shard's block has not been committed
INVALID = -1  # label of an empty or undecodable slot
COMMIT_ARRAY = "labels"  # block 0's commit marker
BLOCKS_GROUP = "blocks"  # grown view blocks: blocks/<b>/<array>, b >= 1
BLOCK_MARKER = "committed"  # blocks/<b>/committed: 1 once shard i's views of block b are written
COMMITS = "commits"  # (num_shards, 3) float64 per view block: (unix time, part, parts) of each shard's
# commit, written just before its marker (part -1, parts 0: not a --part run); absent in older caches
PARTS_DIR = "parts"  # claims of independent parts (parts.py): who creates the cache, who starts a grow
# Written in this order; the commit marker last.
TEACHER_OUTPUTS = ("logits", "classes", "lse")
VIEW_PARAMS = ("boxes", "flips", "aug_ops", "aug_levels", "aug_resample")  # the augmentation of each view
PER_VIEW = TEACHER_OUTPUTS + VIEW_PARAMS
MIX_ARRAYS = ("mix_partner", "mix_kind", "mix_lam", "mix_box")  # paired caches only
PER_SLOT = ("keys", "labels")
ARRAYS = PER_VIEW + PER_SLOT  # every cache has these
# Attribute fields that may legitimately differ between runs writing to the same cache
# (the checkpoint's path may move; its sha256 is what identifies the teacher).
VOLATILE_ATTRS = ("created", "tool_version", "invalid", "teacher.checkpoint", "dataset.root", "audit", "replay",
                  "decoders",  # decoders: compared on their own (cache.py), so older caches still resume
                  "view_blocks", "growing")  # how the views were added, not what they are


class CacheError(ValueError):
    """The cache is missing, damaged, or does not match what it is used with."""


@dataclass(frozen=True)
class Layout:
    num_shards: int
    slots_per_shard: int  # S = the dataset's samples per shard
    views: int  # V
    topk: int  # k
    num_classes: int  # C
    op_slots: int  # n: RandAugment ops per view
    paired: bool = False  # the mix_* arrays exist: the teacher saw mixed images
    stores_log_probs: bool = True  # `logits` holds z - lse (schema >= 3), not raw logits z
    view_blocks: tuple[int, ...] = ()  # views of each committed view block; () = one block of V

    @property
    def arrays(self) -> tuple[str, ...]:
        """This cache's arrays in writing order (the commit marker last)."""
        return self.per_view + PER_SLOT

    @property
    def per_view(self) -> tuple[str, ...]:
        """The arrays with a view axis (each view block has its own)."""
        return PER_VIEW + (MIX_ARRAYS if self.paired else ())

    @property
    def blocks(self) -> tuple["ViewBlock", ...]:
        """The committed view blocks, in view order."""
        sizes = self.view_blocks or (self.views,)
        starts = np.cumsum((0, *sizes))
        return tuple(ViewBlock(b, int(starts[b]), n) for b, n in enumerate(sizes))

    def block_layout(self, block: "ViewBlock") -> "Layout":
        """The layout of one view block's arrays: this cache with V = the block's views."""
        return replace(self, views=block.count, view_blocks=())

    @property
    def slots(self) -> int:
        return self.num_shards * self.slots_per_shard

    def rows(self, shard: int) -> slice:
        return slice(shard * self.slots_per_shard, (shard + 1) * self.slots_per_shard)

    @property
    def class_dtype(self) -> str:
        return "uint16" if self.num_classes <= 65535 else "int32"

    @classmethod
    def from_attrs(cls, a: dict) -> "Layout":
        blocks = tuple(int(n) for n in a.get("view_blocks") or (a["views"],))
        if sum(blocks) != a["views"] or min(blocks) < 1:
            raise CacheError(f"{ATTR}.view_blocks {list(blocks)} does not add up to views = {a['views']}")
        return cls(num_shards=len(a["dataset"]["shards"]), slots_per_shard=a["dataset"]["per_shard"],
                   views=a["views"], topk=a["topk"], num_classes=a["num_classes"], op_slots=a["op_slots"],
                   paired=a.get("mix", "none") == "paired",
                   stores_log_probs=a.get("schema_version", SCHEMA_VERSION) >= LOG_PROB_VERSION,
                   view_blocks=blocks if len(blocks) > 1 else ())

    def value_bytes(self, topk: int | None = None) -> int:
        """Uncompressed bytes one view costs, from the arrays' dtypes, with k = `topk`
        (default this cache's k): the teacher outputs plus the view parameters (and the
        mixing record of a paired cache)."""
        specs = _array_specs(self if topk is None else replace(self, topk=topk))
        return sum(np.dtype(specs[n]["dtype"]).itemsize * int(np.prod(specs[n]["chunks"][2:], dtype=np.int64))
                   for n in self.per_view)


@dataclass(frozen=True)
class ViewBlock:
    """Views start .. start+count-1 of every sample, as one run added them (block 0: creation)."""

    index: int
    start: int
    count: int

    @property
    def views(self) -> range:
        return range(self.start, self.start + self.count)

    def path(self, name: str) -> str:
        """Where array `name` of this block lives in the group."""
        return name if self.index == 0 else f"{BLOCKS_GROUP}/{self.index}/{name}"


@dataclass
class ShardBlock:
    """All cached values of one WebDataset shard (S slots × V views)."""

    logits: np.ndarray  # (S, V, k) float16 as stored: log-probabilities (schema >= 3) or raw logits
    classes: np.ndarray  # (S, V, k) uint16/int32
    lse: np.ndarray  # (S, V) float32
    boxes: np.ndarray  # (S, V, 4) int32
    flips: np.ndarray  # (S, V) uint8
    aug_ops: np.ndarray  # (S, V, n) int8
    aug_levels: np.ndarray  # (S, V, n) float16
    aug_resample: np.ndarray  # (S, V, n) uint8
    keys: np.ndarray  # (S,) str
    labels: np.ndarray  # (S,) int32
    mix_partner: np.ndarray | None = None  # (S, V) int32 slot, paired caches only
    mix_kind: np.ndarray | None = None  # (S, V) uint8
    mix_lam: np.ndarray | None = None  # (S, V) float32
    mix_box: np.ndarray | None = None  # (S, V, 4) float32
    log_probs: np.ndarray | None = None  # (S, V, k) float32 log p_i, any schema: filled by read_block

    @classmethod
    def empty(cls, layout: Layout) -> "ShardBlock":
        S, V, k, n = layout.slots_per_shard, layout.views, layout.topk, layout.op_slots
        return cls(
            logits=np.zeros((S, V, k), np.float16),
            classes=np.zeros((S, V, k), layout.class_dtype),
            lse=np.zeros((S, V), np.float32),
            boxes=np.zeros((S, V, 4), np.int32),
            flips=np.zeros((S, V), np.uint8),
            aug_ops=np.full((S, V, n), -1, np.int8),
            aug_levels=np.zeros((S, V, n), np.float16),
            aug_resample=np.zeros((S, V, n), np.uint8),
            keys=np.array([""] * S, dtype=object),
            labels=np.full((S,), INVALID, np.int32),
            **(dict(mix_partner=np.full((S, V), -1, np.int32), mix_kind=np.zeros((S, V), np.uint8),
                    mix_lam=np.ones((S, V), np.float32), mix_box=np.zeros((S, V, 4), np.float32))
               if layout.paired else {}),
        )


def _array_specs(layout: Layout) -> dict[str, dict]:
    """Shape, dtype, inner chunk, shard shape and fill value of every array."""
    S, V, k, n = layout.slots_per_shard, layout.views, layout.topk, layout.op_slots
    N = layout.slots
    specs = {}
    for name, tail, dtype, fill in (
        ("logits", (k,), "float16", 0), ("classes", (k,), layout.class_dtype, 0),
        ("lse", (), "float32", 0), ("boxes", (4,), "int32", 0), ("flips", (), "uint8", 0),
        ("aug_ops", (n,), "int8", -1), ("aug_levels", (n,), "float16", 0),
        ("aug_resample", (n,), "uint8", 0),
    ):
        specs[name] = dict(shape=(N, V, *tail), dtype=dtype, chunks=(S, 1, *tail),
                           shards=(S, V, *tail), fill_value=fill)
    if layout.paired:
        for name, tail, dtype, fill in (("mix_partner", (), "int32", -1), ("mix_kind", (), "uint8", 0),
                                        ("mix_lam", (), "float32", 1.0), ("mix_box", (4,), "float32", 0.0)):
            specs[name] = dict(shape=(N, V, *tail), dtype=dtype, chunks=(S, 1, *tail),
                               shards=(S, V, *tail), fill_value=fill)
    specs["keys"] = dict(shape=(N,), dtype=str, chunks=(S,), shards=None, fill_value="")
    specs["labels"] = dict(shape=(N,), dtype="int32", chunks=(S,), shards=None, fill_value=NOT_WRITTEN)
    return specs


def make_attrs(*, teacher: dict, num_classes: int, topk: int, views: int, view_spec: dict,
               op_names: list[str], op_slots: int, seed: int, manifest: dict,
               tool_version: str, mix: dict | None = None) -> dict:
    """The root `usi_cache` attribute: everything a reader needs to trust and replay the cache."""
    return {
        "schema_version": SCHEMA_VERSION,
        "teacher": teacher,  # timm name, checkpoint sha256, mean/std, input size, interpolation
        "num_classes": num_classes,
        "topk": topk,
        "views": views,  # V: committed views (the sum of view_blocks)
        "view_blocks": [views],  # views added by each run: creation, then each grow (schema 4)
        "view_spec": view_spec,
        "op_names": op_names,  # RandAugment op table: aug_ops values index this list
        "op_slots": op_slots,
        "seed": seed,
        "mix": "paired" if mix else "none",  # paired: the teacher saw mixed images (mix_* arrays)
        "mix_spec": mix or {},  # paired: mixup/cutmix alphas, prob, switch (per view)
        "dataset": manifest,  # the shards' dataset.json (fingerprint included) + where they were
        "tool_version": tool_version,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "invalid": [],  # keys of undecodable samples, filled in when the run completes
        # "audit": added by `set_audit` (audit.py): the top-k fidelity table, when one was run
        # "decoders": set by stage 1 when it creates the cache (replay_check.decoder_env)
        # "replay": added by `set_replay` (replay_check.py): decoder environment + pixel fingerprint
        # "growing": N while a grow by N views runs (`begin_grow`); gone once it is committed
    }


def view_spec(attrs: dict) -> ViewSpec:
    """The ViewSpec the cache was made with (from its attributes)."""
    return from_dict(ViewSpec, dict(attrs["view_spec"]), "view_spec")


def attrs_difference(found: dict, expected: dict, prefix: str = "") -> str | None:
    """Name the first field where two attribute dicts differ (volatile fields ignored)."""
    for key in sorted(set(found) | set(expected)):
        where = f"{prefix}{key}"
        if where in VOLATILE_ATTRS:
            continue
        if key not in found:
            return f"{where} (missing in the cache)"
        if key not in expected:
            return f"{where} (unexpected in the cache)"
        a, b = found[key], expected[key]
        if isinstance(a, dict) and isinstance(b, dict):
            sub = attrs_difference(a, b, where + ".")
            if sub:
                return sub
        elif _norm(a) != _norm(b):
            return f"{where} (cache has {_short(a)}, this run has {_short(b)})"
    return None


def _norm(x):
    if isinstance(x, (list, tuple)):
        return [_norm(v) for v in x]
    return x


def _short(x) -> str:
    s = repr(x)
    return s if len(s) <= 80 else s[:77] + "..."


def create(path: str | Path, attrs: dict, layout: Layout, *, clear: bool = True) -> zarr.Group:
    """Create a new, empty cache at `path` (a folder or URL; the caller has checked it may).
    clear=False (independent parts, parts.py): delete nothing, keep arrays that exist already and
    write the attributes last, so that creating twice at once is harmless and a reader that finds
    the attributes finds every array."""
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


def read_commits(group: zarr.Group, layout: Layout, view_block: "ViewBlock") -> np.ndarray | None:
    """(num_shards, 3) float64 (unix time, part, parts) of each shard's commit in `view_block`
    (time 0: none recorded); None for a cache made before commit times were recorded."""
    path = view_block.path(COMMITS)
    if path not in group:
        return None
    return read_array(group, path, slice(0, layout.num_shards))


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


def set_invalid(group: zarr.Group, invalid: list[str]) -> None:
    attrs = dict(group.attrs[ATTR])
    attrs["invalid"] = invalid
    group.attrs[ATTR] = attrs


def set_replay(group: zarr.Group, replay: dict) -> None:
    """Record the decoder environment and replay fingerprint (replay_check.py) of a finished cache."""
    attrs = dict(group.attrs[ATTR])
    attrs["replay"] = replay
    group.attrs[ATTR] = attrs


def set_audit(group: zarr.Group, audit: dict) -> None:
    """Record a fidelity audit (audit.py) in the attributes, replacing an earlier one."""
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


def completed_shards(group: zarr.Group, layout: Layout, view_block: ViewBlock | None = None) -> np.ndarray:
    """Bool per shard: True when its commit marker was written (block 0's `labels`, or the
    marker of a grown `view_block`; the committed blocks of a cache are whole by construction)."""
    if view_block is not None and view_block.index > 0:
        return read_array(group, view_block.path(BLOCK_MARKER), slice(0, layout.num_shards)) == 1
    labels = read_array(group, COMMIT_ARRAY, slice(0, layout.slots))
    return (labels.reshape(layout.num_shards, layout.slots_per_shard) != NOT_WRITTEN).all(axis=1)


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
    `view_blocks`, the cache becomes schema 4. Returns the new attributes. Rank 0 only."""
    attrs = dict(group.attrs[ATTR])
    if "growing" not in attrs:  # another part committed it a moment ago (parts.py)
        return attrs
    count = attrs.pop("growing")
    attrs["view_blocks"] = [*(attrs.get("view_blocks") or [attrs["views"]]), count]
    attrs["views"] += count
    attrs["schema_version"] = SCHEMA_VERSION
    group.attrs[ATTR] = attrs
    return attrs


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

