"""The versioned cache format (cache_format/spec.py; reader.py, writer.py and usage.py hold the code
that reads, writes and measures it): with them, the only place that names Zarr arrays and attributes.

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
of its partner (see views/mixing.py); its logits are of that mixed image. `labels` is written
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

Ensembles (several teachers, models/ensemble.py) change no array and no version: `logits` holds
the top-k of the mixture's log-probabilities log p, p = sum_m w_m softmax(z_m), and `lse` holds
sum_m w_m logsumexp(z_m) (log p + lse are the mixture's logits). Readers of schema >= 3 need only
`logits`; the attribute `teachers` (instead of `teacher`) lists the members with their weights,
and `teacher_members` reads either.

Root attribute `usi_cache`: see `make_attrs`.
"""
from __future__ import annotations

import datetime
import re
from dataclasses import dataclass, replace

import numpy as np

from usi_cache.config.parser import from_dict
from usi_cache.config.stages import ViewSpec

SCHEMA_VERSION = 4  # 2 added paired caches (mix_* arrays); 3 stores log-probabilities in `logits`;
# 4 adds view blocks (caches that grow); a one-teacher cache is written as 4
ENSEMBLE_VERSION = 5  # an ensemble: `teachers` in place of `teacher`, `lse` = sum_m w_m lse_m. Its
# arrays read as 4's, but a tool that knows only 4 would look for `teacher`: it refuses 5 instead
READABLE_VERSIONS = (1, 2, 3, 4, 5)  # 1 is read as plain; 1 and 2 hold raw logits (see `log_probs`)
GROWABLE_VERSIONS = (3, 4, 5)  # block 0 alike: these resume and grow; 1 and 2 store raw logits (a grown
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
PARTS_DIR = "parts"  # claims of independent parts (stage1/parts.py): who creates the cache, who starts a grow
# Written in this order; the commit marker last.
TEACHER_OUTPUTS = ("logits", "classes", "lse")
VIEW_PARAMS = ("boxes", "flips", "aug_ops", "aug_levels", "aug_resample")  # the augmentation of each view
PER_VIEW = TEACHER_OUTPUTS + VIEW_PARAMS
MIX_ARRAYS = ("mix_partner", "mix_kind", "mix_lam", "mix_box")  # paired caches only
PER_SLOT = ("keys", "labels")
ARRAYS = PER_VIEW + PER_SLOT  # every cache has these
# Attribute fields that may legitimately differ between runs writing to the same cache
# (the checkpoint's path may move; its sha256 is what identifies the teacher).
VOLATILE_ATTRS = ("created", "tool_version", "invalid", "teacher.checkpoint", "teachers.checkpoint", "dataset.root",
                  "audit", "replay",
                  "decoders",  # decoders: compared on their own (stage1/run.py), so older caches still resume
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


def make_attrs(*, teacher: dict | list[dict], num_classes: int, topk: int, views: int, view_spec: dict,
               op_names: list[str], op_slots: int, seed: int, manifest: dict,
               tool_version: str, mix: dict | None = None) -> dict:
    """The root `usi_cache` attribute: everything a reader needs to trust and replay the cache.

    teacher: the one teacher's description (attribute `teacher`), or a list of several, each with
    its `weight` in the mixture (attribute `teachers`, and no `teacher`); a list of one is one
    teacher, recorded exactly as a lone teacher is."""
    if isinstance(teacher, list) and len(teacher) == 1:
        teacher = {k: v for k, v in teacher[0].items() if k != "weight"}
    who = {"teachers": teacher} if isinstance(teacher, list) else {"teacher": teacher}
    return {
        "schema_version": written_version(who),
        # teacher: timm name, checkpoint sha256, mean/std, input size, interpolation, precision;
        # teachers (an ensemble): a list of those, each with its weight (summing to 1)
        **who,
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
        # "audit": added by `set_audit` (checks/audit.py): the top-k fidelity table, when one was run
        # "decoders": set by stage 1 when it creates the cache (replay_check.decoder_env)
        # "replay": added by `set_replay` (checks/replay.py): decoder environment + pixel fingerprint
        # "growing": N while a grow by N views runs (`begin_grow`); gone once it is committed
    }


def written_version(attrs: dict) -> int:
    """The version this tool writes a cache with these attributes as: 5 for an ensemble, else 4."""
    return ENSEMBLE_VERSION if attrs.get("teachers") else SCHEMA_VERSION


def teacher_members(attrs: dict) -> list[dict]:
    """The teachers a cache was made with, each with its weight: the `teachers` list of an
    ensemble, or the lone `teacher` (weight 1)."""
    if attrs.get("teachers"):
        return [dict(m) for m in attrs["teachers"]]
    return [{**attrs["teacher"], "weight": 1.0}]


def view_size(attrs: dict) -> int:
    """The side at which readers render a stored view to show or fingerprint it: the teacher's
    input size (an ensemble: its largest member's)."""
    return max(int(m["input_size"]) for m in teacher_members(attrs))


def view_spec(attrs: dict) -> ViewSpec:
    """The ViewSpec the cache was made with (from its attributes)."""
    return from_dict(ViewSpec, dict(attrs["view_spec"]), "view_spec")


def attrs_difference(found: dict, expected: dict, prefix: str = "") -> str | None:
    """Name the first field where two attribute dicts differ (volatile fields ignored)."""
    if not prefix and ("teachers" in found) != ("teachers" in expected):
        n = lambda a: len(a["teachers"]) if "teachers" in a else 1  # noqa: E731
        return f"teachers (the cache has {n(found)} teacher(s), this run has {n(expected)})"
    for key in sorted(set(found) | set(expected)):
        where = f"{prefix}{key}"
        if re.sub(r"\[\d+\]", "", where) in VOLATILE_ATTRS:
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
        elif (isinstance(a, list) and isinstance(b, list) and a and b
              and all(isinstance(x, dict) for x in a + b)):  # the teachers of an ensemble
            if len(a) != len(b):
                return f"{where} (the cache has {len(a)}, this run has {len(b)})"
            for i, (x, y) in enumerate(zip(a, b)):
                sub = attrs_difference(x, y, f"{where}[{i}].")
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
