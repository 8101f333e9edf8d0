"""The cache-wide checks of `usi verify`: attributes and dataset before the shards are read,
the invalid list and the replay fingerprint after. Each returns its problems as
(shard or None for the whole cache, message) pairs; the driver (run.py) files them under the
check's name."""
from __future__ import annotations

from pathlib import Path

from usi_cache.checks import replay as replay_check
from usi_cache import cache_format as schema
from usi_cache.config.errors import ConfigError
from usi_cache.views.randaugment import OP_NAMES, parse_policy
from usi_cache.shards.manifest import Manifest, ShardError, ShardInfo, fingerprint, load_manifest

Found = list[tuple[int | None, str]]


def _short(x) -> str:
    s = str(x)
    return s if len(s) <= 24 else s[:12] + "…"


def check_attributes(group, attrs: dict) -> tuple[Found, schema.Layout | None]:
    """The `usi_cache` attribute is self-consistent (its dataset fingerprint matches the fields
    it summarises; C, k, V and the op table agree) and fits the arrays. Also the Layout, or None
    when the arrays cannot be interpreted with it."""
    found: Found = []
    try:
        layout = schema.Layout.from_attrs(attrs)
        ds = attrs["dataset"]
        infos = [ShardInfo(s["name"], int(s["count"]), s["sha256"]) for s in ds["shards"]]
        own = fingerprint(ds["classes"], ds["per_shard"], infos)
        teacher_c = {m["num_classes"] for m in schema.teacher_members(attrs)}  # every teacher of an ensemble
        teacher_c = teacher_c.pop() if len(teacher_c) == 1 else sorted(teacher_c)
        int(attrs["seed"])
    except (KeyError, TypeError, ValueError) as e:
        return [(None, f"malformed {schema.ATTR} attribute ({type(e).__name__}: {e})")], None
    if own != ds["fingerprint"]:
        found.append((None, "dataset.fingerprint does not match the dataset fields it summarises "
                            "(classes, per_shard, shards): the attribute was edited"))
    if sum(s.count for s in infos) != ds.get("num_samples"):
        found.append((None, f"dataset.num_samples is {ds.get('num_samples')}, its shards hold "
                            f"{sum(s.count for s in infos)}"))
    for i, s in enumerate(infos):
        if not 0 < s.count <= layout.slots_per_shard:
            found.append((i, f"dataset.shards[{i}].count is {s.count}, outside 1..{layout.slots_per_shard}"))
    if layout.num_classes != len(ds["classes"]) or teacher_c != layout.num_classes:
        found.append((None, f"num_classes {layout.num_classes}, but {len(ds['classes'])} class names "
                            f"and a teacher with {teacher_c} outputs"))
    if not 1 <= layout.topk <= layout.num_classes:
        found.append((None, f"topk {layout.topk} is outside 1..num_classes ({layout.num_classes})"))
    ops = list(attrs.get("op_names", []))
    if ops != list(OP_NAMES[:len(ops)]):
        found.append((None, "op_names differs from this tool's RandAugment op table (append-only): "
                            "the recorded op ids cannot be replayed"))
    try:
        spec = schema.view_spec(attrs)
        spec.validate()
        n = parse_policy(spec.randaugment).num_ops
        if n != layout.op_slots:
            found.append((None, f"op_slots {layout.op_slots}, but the policy {spec.randaugment!r} applies "
                                f"up to {n} ops"))
    except (ConfigError, ValueError) as e:
        return found + [(None, f"view_spec: {e}")], None  # the views cannot be replayed or re-drawn
    misfit = _array_misfits(group, layout)
    return found + misfit, None if misfit else layout


def _array_misfits(group, layout: schema.Layout) -> Found:
    """Arrays whose shape or dtype is not what the attributes say."""
    empty = schema.ShardBlock.empty(layout)
    found: Found = []
    for name in schema.ARRAYS:
        want = (layout.slots, *getattr(empty, name).shape[1:])
        arr = schema.array(group, name, layout)  # all view blocks of a grown cache
        have = tuple(arr.shape)
        if getattr(arr, "misfit", None):  # a grown cache: each view block checked on its own
            found.append((None, f"array {name!r}: {arr.misfit}"))
        elif have != want:
            found.append((None, f"array {name!r} has shape {have}, the attributes (V = {layout.views}, "
                                f"k = {layout.topk}, {layout.num_shards} shards of {layout.slots_per_shard}) "
                                f"say {want}"))
        elif name != "keys" and arr.dtype != getattr(empty, name).dtype:
            found.append((None, f"array {name!r} has dtype {arr.dtype}, expected "
                                f"{getattr(empty, name).dtype}"))
    return found


def check_fingerprint(attrs: dict, shards_dir: str | Path) -> tuple[Found, Manifest | None]:
    """The cache's dataset is these shards: classes, samples per shard, and every shard's name,
    sample count and sha256. Also the shards' manifest, or None when it cannot be read."""
    try:
        m = load_manifest(shards_dir)
    except ShardError as e:
        return [(None, str(e))], None
    found: Found = []
    ds = attrs["dataset"]
    if list(ds["classes"]) != list(m.classes):
        found.append((None, f"class names differ (cache: {_short(ds['classes'])}, shards: "
                            f"{_short(list(m.classes))})"))
    if ds["per_shard"] != m.per_shard:
        found.append((None, f"samples per shard differ (cache {ds['per_shard']}, shards {m.per_shard})"))
    cached = ds["shards"]
    if len(cached) != len(m.shards):
        found.append((None, f"the cache has {len(cached)} shards, {shards_dir} has {len(m.shards)}"))
    for i, (c, s) in enumerate(zip(cached, m.shards)):
        for what, a, b in (("name", c["name"], s.name), ("sample count", c["count"], s.count),
                           ("sha256", c["sha256"], s.sha256)):
            if a != b:
                found.append((i, f"{what} differs: cache has {_short(a)}, {m.path(i)} has {_short(b)}"))
    if ds["fingerprint"] != m.fingerprint and not found:
        found.append((None, f"dataset fingerprint differs (cache {ds['fingerprint'][:12]}, shards "
                            f"{m.fingerprint[:12]})"))
    return found, m


def check_invalid_list(invalid: set[str], stored_invalid: set[str]) -> Found:
    """Every key of the cache's invalid list is stored with label -1 (`stored_invalid`: the
    keys found so, over all shards; meaningful only when every shard is committed)."""
    stray = sorted(invalid - stored_invalid)
    if not stray:
        return []
    return [(None, f"the cache's invalid list names {len(stray)} key(s) that are not stored with label -1: "
                   f"{', '.join(stray[:5])}")]


def check_replay(group, attrs: dict, manifest: Manifest | None, all_committed: bool) -> tuple[Found, str]:
    """This machine re-renders the cache's fingerprint views bit for bit (checks/replay.py).
    Also what was compared, for the report."""
    recorded = attrs.get("replay")
    if not recorded or not recorded.get("sha256"):
        return [], "no fingerprint recorded (a cache made before replay fingerprints)"
    said = f"made with {replay_check.describe(recorded['env'])}"
    if manifest is None or not all_committed:
        return [], said + "; not compared (shards or cache incomplete)"
    try:
        why = replay_check.mismatch(group, attrs, manifest)
    except (ShardError, schema.CacheError, ValueError, IndexError) as e:
        why = f"cannot re-render the fingerprint views ({e})"
    if why:
        return [(None, why)], said
    return [], said + f"; {len(recorded['views'])} views re-rendered bit for bit here"
