"""`usi verify`: check that a cache belongs to its shards and that every value in it is sane.

Every check runs on every shard, and every problem is recorded with its shard and check name:
verification never stops at the first damaged chunk. The per-shard checks run in parallel
(`--workers` processes, torchrun ranks) and rank 0 merges them in shard order, so the report does
not depend on the split. The checks, in report order:

* attributes  — the `usi_cache` attribute is self-consistent (its dataset fingerprint matches
                the dataset fields it summarises, C / k / V / op table agree) and fits the arrays.
* fingerprint — the cache's dataset is these shards: classes, samples per shard, and every
                shard's name, sample count and sha256.
* complete    — every shard's block is committed (its commit marker was written).
* chunk files — every committed shard has the chunk file of every array. Zarr does not write a
                chunk that holds only fill values, so a missing file is a problem only when the
                block cannot be all fill values (e.g. flips are legitimately absent with hflip 0).
* checksums   — every chunk reads back: each chunk ends in a CRC32C, and a damaged one raises on
                read; the damaged views are named.
* keys        — every key is in place (cache row = tar position) and the counts agree.
* labels      — labels equal the shards' classes; -1 exactly for the undecodable images.
* finite, class range, sorted, top-k mass — logits and lse are finite, class indices are < C
                and distinct per view, the stored values descend, and sum_i p_i <= 1 up to the
                float16 rounding of what is stored (log-probabilities from schema 3 on, raw
                logits z in schema 1-2: p_i = exp(z_i - lse)).
* boxes       — crop boxes lie inside the images (sizes read from the shards' image headers).
* view params — boxes, flips and RandAugment records equal what the seeded sampler draws for
                (seed, key, view): the views really are the cache's replayable views.
* recompute   — (`--recompute N`) the teacher re-run (at the cache's recorded precision) on N
                random replayed views reproduces the cached top-k classes exactly, except where
                near-tied logits swap places, and the log-probabilities within one float16
                spacing of the stored value (its rounding down; half a spacing for the rounded-
                to-nearest logits of schema 1-2) + 2 atol + rtol (|z| + |lse|)
                (the teacher's own run-to-run noise: a float32 sum's last bits depend on the
                thread count and batch shape, a half-precision teacher's on more). The lse is
                compared within atol + rtol |lse|.
"""
from __future__ import annotations

import contextlib
import functools
import io
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from . import replay_check, schema, storage
from .config import ConfigError
from .dist import World, init_world, map_shards, on_main
from .inspect_cache import BIG
from .randaugment import OP_NAMES, parse_policy
from .shards import Manifest, ShardError, ShardInfo, decode_image, fingerprint, load_manifest, read_shard
from .render import render_stored, stored_view
from .mixing import NO_MIX, PartnerImages, pair_rng, sample_pair
from .views import encode_ops, sample_view, view_rng

CHECKS = ("attributes", "fingerprint", "complete", "chunk files", "checksums", "keys", "labels", "finite",
          "class range", "sorted", "top-k mass", "boxes", "view params", "replay", "recompute")
SHOWN = 8  # problems listed per check; the rest are counted


@dataclass
class Problem:
    check: str  # one of CHECKS
    shard: int | None  # None: about the whole cache
    message: str


@dataclass
class VerifyReport:
    cache: str
    shards_dir: str
    problems: list[Problem] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)  # checks that ran (a check can be skipped)
    shards: int = 0
    complete: int = 0
    samples: int = 0
    views: int = 0
    valid: int = 0  # valid samples in committed shards
    compared: int = 0  # of which compared with their image in the shards (key in place)
    recompute: dict | None = None
    replay: str = ""  # what the replay check compared

    @property
    def ok(self) -> bool:
        return not self.problems and bool(self.ran)

    def add(self, check: str, shard: int | None, message: str) -> None:
        self.problems.append(Problem(check, shard, message))


def verify_cache(path: str | Path, shards_dir: str | Path, *, recompute: int = 0,
                 teacher_checkpoint: str | None = None, device: str | None = None, atol: float = 1e-3,
                 rtol: float = 1e-3, seed: int = 0, progress: bool = True, workers: int = 1,
                 world: World | None = None) -> VerifyReport | None:
    """Run every check; returns the report (its `.ok` is the verdict) on rank 0, None on others.

    The shards are checked by `workers` processes on each torchrun rank (`dist.map_shards`); the
    cache-wide checks run once, on rank 0, which merges the per-shard results in shard order, so
    the report is the same whatever the worker count or world size (the --recompute views are
    drawn from `seed` alone, before the shards are split)."""
    world = world or init_world()
    rep, ctx = on_main(world, functools.partial(_prepare, path, shards_dir, recompute, teacher_checkpoint,
                                                device, atol, rtol, seed))
    if ctx is None:
        return rep  # the arrays cannot be interpreted: nothing more to check
    parts = map_shards(_check_one_shard, range(ctx.layout.num_shards),
                       functools.partial(_open_context, replace(ctx, device=_rank_device(ctx.device, world))),
                       world=world, workers=workers, progress=progress and ctx.layout.num_shards >= BIG,
                       desc="verifying")
    if not world.is_main:
        return None
    seen_invalid: set[str] = set()
    for part, undecodable in parts:  # in shard order
        _merge(rep, part)
        seen_invalid |= undecodable
    stray = sorted(ctx.invalid - seen_invalid)
    if stray and rep.complete == ctx.layout.num_shards:
        rep.add("labels", None, f"the cache's invalid list names {len(stray)} key(s) that are not stored with "
                                f"label -1: {', '.join(stray[:5])}")
    group, _ = schema.open_cache(path)
    _check_replay(rep, group, ctx.attrs, ctx.manifest, ctx.layout)
    if rep.recompute is not None and rep.recompute["views"] == 0:
        rep.add("recompute", None, "no view could be re-run (no committed, intact sample)")
    return rep


def _prepare(path, shards_dir, recompute: int, teacher_checkpoint, device, atol, rtol, seed):
    """Rank 0: the cache-wide checks, then (report, the context every process checks shards
    with), or (report, None) when the arrays cannot be interpreted."""
    rep = VerifyReport(cache=str(path), shards_dir=str(shards_dir))
    try:
        group, attrs = schema.open_cache(path)
    except schema.CacheError as e:
        rep.ran.append("attributes")
        rep.add("attributes", None, str(e))
        return rep, None
    layout = _check_attrs(rep, group, attrs)
    manifest = _check_dataset(rep, attrs, shards_dir)
    if layout is None:
        return rep, None
    rep.shards, rep.samples = layout.num_shards, int(attrs["dataset"]["num_samples"])
    ctx = _Context(path=str(path), stored=set(storage.sizes(path)), attrs=attrs, layout=layout, manifest=manifest,
                   spec=schema.view_spec(attrs), invalid=set(attrs.get("invalid", [])), atol=atol, rtol=rtol)
    if recompute:
        from .teacher import cache_teacher_mismatch
        mismatch = cache_teacher_mismatch(attrs, teacher_checkpoint)
        if mismatch:
            rep.add("recompute", None, mismatch)
        import torch
        ctx.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        ctx.checkpoint = teacher_checkpoint
        # a half-precision re-run differs from the original by its own rounding (a batch of another
        # shape may take other kernels): two of its spacings, relative to the logits; caches from
        # before the precision was recorded ran bf16 autocast on CUDA
        precision = attrs["teacher"].get("precision") or ("bf16" if torch.device(ctx.device).type == "cuda" else "fp32")
        ctx.rtol = rtol = max(rtol, {"bf16": 2 ** -7, "fp16": 2 ** -10}.get(precision, 0.0))
        ctx.picks = pick_views(group, layout, recompute, seed)
        rep.recompute = {"requested": recompute, **_recompute_counts(), "atol": atol, "rtol": rtol,
                         "device": ctx.device}
    rep.ran += [c for c in CHECKS[2:] if c != "recompute" or recompute]
    return rep, ctx


def _check_one_shard(ctx: _Context, i: int) -> tuple[VerifyReport, set[str]]:
    """Shard i's part of the report (problems, counts, recompute counts) and its undecodable keys."""
    part = VerifyReport(cache=ctx.path, shards_dir="")
    if ctx.device is not None:
        part.recompute = _recompute_counts()
        if ctx.teacher is None and i in ctx.picks:  # loaded by the processes that re-run views only
            from .teacher import load_cache_teacher
            ctx.teacher, _ = load_cache_teacher(ctx.attrs, ctx.checkpoint, ctx.device)  # the mismatch is rank 0's
    return part, _check_shard(part, ctx, i)


def _merge(rep: VerifyReport, part: VerifyReport) -> None:
    rep.problems += part.problems
    for name in ("complete", "views", "valid", "compared"):
        setattr(rep, name, getattr(rep, name) + getattr(part, name))
    if part.recompute is not None:
        rc, pr = rep.recompute, part.recompute
        for name in ("views", "skipped", "class_mismatches", "near_ties"):
            rc[name] += pr[name]
        for name in ("max_logit_diff", "max_lse_diff"):
            rc[name] = max(rc[name], pr[name])


def _recompute_counts() -> dict:
    return {"views": 0, "skipped": 0, "max_logit_diff": 0.0, "max_lse_diff": 0.0, "class_mismatches": 0,
            "near_ties": 0}


# ---------------------------------------------------------------------------------------------
# cache-wide checks


def _check_attrs(rep: VerifyReport, group, attrs: dict) -> schema.Layout | None:
    """Self-consistency of the attribute and its fit to the arrays; the Layout when usable."""
    rep.ran.append("attributes")
    try:
        layout = schema.Layout.from_attrs(attrs)
        ds = attrs["dataset"]
        infos = [ShardInfo(s["name"], int(s["count"]), s["sha256"]) for s in ds["shards"]]
        own = fingerprint(ds["classes"], ds["per_shard"], infos)
        teacher_c = attrs["teacher"]["num_classes"]
        int(attrs["seed"])
    except (KeyError, TypeError, ValueError) as e:
        rep.add("attributes", None, f"malformed {schema.ATTR} attribute ({type(e).__name__}: {e})")
        return None
    if own != ds["fingerprint"]:
        rep.add("attributes", None, "dataset.fingerprint does not match the dataset fields it summarises "
                                    "(classes, per_shard, shards): the attribute was edited")
    if sum(s.count for s in infos) != ds.get("num_samples"):
        rep.add("attributes", None, f"dataset.num_samples is {ds.get('num_samples')}, its shards hold "
                                    f"{sum(s.count for s in infos)}")
    for i, s in enumerate(infos):
        if not 0 < s.count <= layout.slots_per_shard:
            rep.add("attributes", i, f"dataset.shards[{i}].count is {s.count}, outside 1..{layout.slots_per_shard}")
    if layout.num_classes != len(ds["classes"]) or teacher_c != layout.num_classes:
        rep.add("attributes", None, f"num_classes {layout.num_classes}, but {len(ds['classes'])} class names "
                                    f"and a teacher with {teacher_c} outputs")
    if not 1 <= layout.topk <= layout.num_classes:
        rep.add("attributes", None, f"topk {layout.topk} is outside 1..num_classes ({layout.num_classes})")
    ops = list(attrs.get("op_names", []))
    if ops != list(OP_NAMES[:len(ops)]):
        rep.add("attributes", None, "op_names differs from this tool's RandAugment op table (append-only): "
                                    "the recorded op ids cannot be replayed")
    try:
        spec = schema.view_spec(attrs)
        spec.validate()
        n = parse_policy(spec.randaugment).num_ops
        if n != layout.op_slots:
            rep.add("attributes", None, f"op_slots {layout.op_slots}, but the policy "
                                        f"{spec.randaugment!r} applies up to {n} ops")
    except (ConfigError, ValueError) as e:
        rep.add("attributes", None, f"view_spec: {e}")
        return None  # the views cannot be replayed or re-drawn
    empty = schema.ShardBlock.empty(layout)
    fits = True
    for name in schema.ARRAYS:
        want = (layout.slots, *getattr(empty, name).shape[1:])
        arr = schema.array(group, name, layout)  # all view blocks of a grown cache
        have = tuple(arr.shape)
        if have != want:
            fits = False
            rep.add("attributes", None, f"array {name!r} has shape {have}, the attributes (V = {layout.views}, "
                                        f"k = {layout.topk}, {layout.num_shards} shards of "
                                        f"{layout.slots_per_shard}) say {want}")
        elif name != "keys" and arr.dtype != getattr(empty, name).dtype:
            fits = False
            rep.add("attributes", None, f"array {name!r} has dtype {arr.dtype}, expected "
                                        f"{getattr(empty, name).dtype}")
    return layout if fits else None


def _check_dataset(rep: VerifyReport, attrs: dict, shards_dir) -> Manifest | None:
    """The cache's dataset against the shard folder's manifest, shard by shard."""
    rep.ran.append("fingerprint")
    try:
        m = load_manifest(shards_dir)
    except ShardError as e:
        rep.add("fingerprint", None, str(e))
        return None
    ds = attrs["dataset"]
    if list(ds["classes"]) != list(m.classes):
        rep.add("fingerprint", None, f"class names differ (cache: {_short(ds['classes'])}, shards: "
                                     f"{_short(list(m.classes))})")
    if ds["per_shard"] != m.per_shard:
        rep.add("fingerprint", None, f"samples per shard differ (cache {ds['per_shard']}, shards {m.per_shard})")
    cached = ds["shards"]
    if len(cached) != len(m.shards):
        rep.add("fingerprint", None, f"the cache has {len(cached)} shards, {shards_dir} has {len(m.shards)}")
    for i, (c, s) in enumerate(zip(cached, m.shards)):
        for what, a, b in (("name", c["name"], s.name), ("sample count", c["count"], s.count),
                           ("sha256", c["sha256"], s.sha256)):
            if a != b:
                rep.add("fingerprint", i, f"{what} differs: cache has {_short(a)}, {m.path(i)} has {_short(b)}")
    if ds["fingerprint"] != m.fingerprint and not any(p.check == "fingerprint" for p in rep.problems):
        rep.add("fingerprint", None, f"dataset fingerprint differs (cache {ds['fingerprint'][:12]}, shards "
                                     f"{m.fingerprint[:12]})")
    return m


def _short(x) -> str:
    s = str(x)
    return s if len(s) <= 24 else s[:12] + "…"


# ---------------------------------------------------------------------------------------------
# per-shard checks


@dataclass
class _Context:
    """What checking a shard needs. Built on rank 0 and sent to every process without `group`
    and `teacher`, which each process opens for itself (`_open_context`)."""
    path: str
    stored: set  # keys of the cache's files/objects, listed once (one listing, not a request per chunk)
    attrs: dict
    layout: schema.Layout
    manifest: Manifest | None
    spec: object
    invalid: set
    atol: float
    rtol: float
    device: str | None = None  # --recompute: the teacher's device; None: no re-run
    checkpoint: str | None = None  # --recompute: the teacher's checkpoint
    picks: dict = field(default_factory=dict)  # shard -> (slot positions, views) to re-run
    group: object = None
    teacher: object = None


def _open_context(ctx: _Context) -> _Context:
    """The context of one process: its own handle on the cache (and its own teacher, loaded when
    its first shard with views to re-run comes)."""
    return replace(ctx, group=schema.open_cache(ctx.path)[0])


def _rank_device(device: str | None, world: World) -> str | None:
    """Each torchrun rank re-runs the teacher on its own GPU."""
    if device == "cuda" and world.distributed:
        return f"cuda:{world.local_rank}"
    return device


def _read(rep: VerifyReport, ctx: _Context, shard: int, name: str) -> np.ndarray | None:
    """One shard's block of one array, or None (after naming the damaged views) when unreadable."""
    rows = ctx.layout.rows(shard)
    try:
        return schema.read_array(ctx.group, name, rows)
    except schema.CacheError as e:
        detail = str(e).split("unreadable chunk ", 1)[-1]
        where = "its chunk"
        if name in schema.PER_VIEW:
            bad = []
            for v in range(ctx.layout.views):
                try:
                    schema.read_array(ctx.group, name, rows, v)
                except schema.CacheError:
                    bad.append(v)
            where = ("every view (the shard's index or all its chunks)" if len(bad) == ctx.layout.views
                     else f"view{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))}")
        rep.add("checksums", shard, f"{name}: {where} unreadable {detail}")
        return None


def _tar(rep: VerifyReport, ctx: _Context, shard: int):
    """(keys, classes, (h, w) or None per sample, encoded bytes) of the shard's tar, or None."""
    m = ctx.manifest
    if m is None:
        return None  # reported by the fingerprint check
    if shard >= len(m.shards):
        rep.add("keys", shard, f"{m.root} has no shard {shard} (it has {len(m.shards)})")
        return None
    keys, classes, sizes, data = [], [], [], []
    try:
        for sample in read_shard(m.path(shard)):
            keys.append(sample.key)
            classes.append(sample.cls)
            data.append(sample.data)
            try:  # the header is enough for the size: no full decode of every image
                with Image.open(io.BytesIO(sample.data)) as im:
                    sizes.append((im.height, im.width))
            except Exception:  # PIL raises many types for bytes that are not an image
                sizes.append(None)
    except ShardError as e:
        rep.add("keys", shard, str(e))
        return None
    return keys, classes, sizes, data


def _first(mask: np.ndarray, shard_base: int) -> str:
    """'N view(s), first at slot S view V' for a (S, V) mask."""
    idx = np.argwhere(mask)
    s, v = idx[0][:2]
    return f"{len(idx)} view(s), first at slot {shard_base + int(s)} view {int(v)}"


def _check_shard(rep: VerifyReport, ctx: _Context, i: int) -> set[str]:
    """Every check of shard i; returns the keys stored with label -1 (undecodable)."""
    layout = ctx.layout
    S, V, base = layout.slots_per_shard, layout.views, i * layout.slots_per_shard
    labels = _read(rep, ctx, i, schema.COMMIT_ARRAY)
    if labels is None:
        return set()
    if (labels == schema.NOT_WRITTEN).any():
        rep.add("complete", i, f"not committed ({schema.COMMIT_ARRAY} chunk missing or never written); "
                               "rerunning stage 1 resumes it")
        return set()
    rep.complete += 1
    x = {schema.COMMIT_ARRAY: labels}
    for name in ctx.layout.arrays:  # with the pairing arrays of a paired cache
        if name != schema.COMMIT_ARRAY:
            x[name] = _read(rep, ctx, i, name)
    count = int(ctx.attrs["dataset"]["shards"][i]["count"])
    valid = labels >= 0
    rep.views += int(valid.sum()) * V

    # keys and labels against the tar
    tar = _tar(rep, ctx, i)
    in_place = np.zeros(S, bool)  # slots whose cache key is the tar's key at that position
    sizes: list = [None] * S
    undecodable: set[str] = set()
    if tar is not None and x["keys"] is not None:
        keys, classes, tsizes, data = tar
        if len(keys) != count:
            rep.add("keys", i, f"the tar holds {len(keys)} samples, the cache's dataset says {count}")
        if len(keys) > S:
            rep.add("keys", i, f"the tar holds {len(keys)} samples, more than the {S} slots per shard")
        n = min(len(keys), S)
        stored = [str(k) for k in x["keys"]]
        in_place[:n] = [stored[p] == keys[p] for p in range(n)]
        wrong = [p for p in range(n) if not in_place[p]]
        if wrong:
            p = wrong[0]
            rep.add("keys", i, f"{len(wrong)} key(s) out of place, first at slot {base + p}: cache has "
                               f"{stored[p]!r}, the tar has {keys[p]!r}")
        extra = [p for p in range(n, S) if stored[p] != "" or labels[p] != schema.INVALID]
        if extra:
            rep.add("keys", i, f"{len(extra)} slot(s) past the shard's {n} samples are not empty, first slot "
                               f"{base + extra[0]}")
        bad_label, bad_invalid = [], []
        for p in np.flatnonzero(in_place):
            sizes[p] = tsizes[p]
            if labels[p] >= 0:
                if labels[p] != classes[p]:
                    bad_label.append(f"slot {base + p}: cache {labels[p]}, tar {classes[p]}")
                elif tsizes[p] is None:
                    bad_label.append(f"slot {base + p}: labelled {labels[p]} but the image does not decode")
            elif labels[p] == schema.INVALID:
                undecodable.add(keys[p])
                try:
                    decode_image(data[p])
                    bad_invalid.append(f"slot {base + p} ({keys[p]}) has label -1 but its image decodes")
                except ValueError:
                    if keys[p] not in ctx.invalid:
                        bad_invalid.append(f"slot {base + p} ({keys[p]}) has label -1 but is not in the "
                                           "cache's invalid list")
            else:
                bad_label.append(f"slot {base + p}: label {labels[p]} is not a class, -1 or {schema.NOT_WRITTEN}")
        for problems in (bad_label, bad_invalid):
            if problems:
                rep.add("labels", i, f"{len(problems)} wrong label(s), first {problems[0]}")

    # views as the seeded sampler draws them, where the image is known
    known = valid & in_place & np.array([s is not None for s in sizes])
    rep.compared += int(known.sum())
    rep.valid += int(valid.sum())
    empty = schema.ShardBlock.empty(layout)  # fill values where no view is expected
    expected = {name: getattr(empty, name) for name in schema.VIEW_PARAMS}
    keys_now = x["keys"] if x["keys"] is not None else [""] * S
    for p in np.flatnonzero(known):
        h, w = sizes[p]
        for v in range(V):
            params = sample_view(view_rng(ctx.attrs["seed"], str(keys_now[p]), v), h, w, ctx.spec)
            expected["boxes"][p, v] = params.box
            expected["flips"][p, v] = params.flip
            (expected["aug_ops"][p, v], expected["aug_levels"][p, v],
             expected["aug_resample"][p, v]) = encode_ops(params, layout.op_slots)
    if layout.paired:  # pairings are drawn from the seed too: a partner that decodes, or no mixing
        expected.update({name: getattr(empty, name) for name in schema.MIX_ARRAYS})
        size, mix = int(ctx.attrs["teacher"]["input_size"]), ctx.attrs["mix_spec"]
        for p in np.flatnonzero(known):
            for v in range(V):
                pair = sample_pair(pair_rng(ctx.attrs["seed"], str(keys_now[p]), v), int(p), count, size, **mix)
                if pair.kind != NO_MIX and labels[pair.partner] >= 0:
                    expected["mix_partner"][p, v] = base + pair.partner
                    expected["mix_kind"][p, v], expected["mix_lam"][p, v] = pair.kind, pair.lam
                    expected["mix_box"][p, v] = pair.box

    # chunk files: a missing one reads as fill values, which is fine only when that is the content
    for name in schema.ARRAYS:
        if x.get(name) is None or x[name].size == 0:
            continue
        keys = schema.chunk_keys(name, i, layout)
        if all(k in ctx.stored for k in keys):
            continue
        if name in schema.VIEW_PARAMS:
            fine = known.sum() == valid.sum() and np.array_equal(x[name][valid], expected[name][valid])
        elif name == "classes":
            fine = layout.topk == 1 or not valid.any()  # k >= 2 distinct classes cannot all be 0
        elif name == "keys":
            fine = count == 0
        else:
            fine = not valid.any()
        if not fine:
            rel = ", ".join(k for k in keys if k not in ctx.stored)
            fill = np.asarray(schema.array(ctx.group, name, layout).fill_value).item()
            rep.add("chunk files", i, f"{name}: chunk file {rel} is missing (reads as fill value "
                                      f"{fill!r}: the values are lost)")
            x[name] = None

    # values of the valid slots
    z, c, lse = x["logits"], x["classes"], x["lse"]
    if z is not None:
        zf = z.astype(np.float32)
        bad = valid[:, None] & ~np.isfinite(zf).all(-1)
        if bad.any():
            rep.add("finite", i, f"non-finite logits in {_first(bad, base)}")
        bad = valid[:, None] & (np.diff(zf, axis=-1) > 0).any(-1)
        if bad.any():
            rep.add("sorted", i, f"logits not descending in {_first(bad, base)}")
    if lse is not None:
        bad = valid[:, None] & ~np.isfinite(lse)
        if bad.any():
            rep.add("finite", i, f"non-finite lse in {_first(bad, base)}")
    if c is not None:
        ci = c.astype(np.int64)
        bad = valid[:, None] & (ci >= layout.num_classes).any(-1)
        if bad.any():
            rep.add("class range", i, f"class index >= C = {layout.num_classes} in {_first(bad, base)}")
        bad = valid[:, None] & (np.diff(np.sort(ci, -1), axis=-1) == 0).any(-1)
        if bad.any():
            rep.add("class range", i, f"a class repeated within one view's top-k in {_first(bad, base)}")
    if z is not None and lse is not None:
        # The smallest each p_i can truly be: the stored float16 value moved at most half a
        # float16 spacing (and a raw logit's lse, float32, a relative 2^-24). Even then the
        # mass must not exceed 1.
        z64 = z.astype(np.float64) - np.spacing(np.abs(z)).astype(np.float64) / 2
        l64 = (np.zeros(lse.shape) if ctx.layout.stores_log_probs else
               lse.astype(np.float64) + np.abs(lse.astype(np.float64)) * 2.0 ** -23 + 1e-7)
        with np.errstate(over="ignore", invalid="ignore"):
            mass = np.exp(z64 - l64[..., None]).sum(-1)
        bad = valid[:, None] & ~(mass <= 1 + 1e-9)
        if bad.any():
            s, v = np.argwhere(bad)[0]
            rep.add("top-k mass", i, f"top-k probabilities sum above 1 in {_first(bad, base)} "
                                     f"(sum {mass[s, v]:.6f})")

    # boxes inside the images, and every view parameter equal to the seeded sampler's
    if x["boxes"] is not None and known.any():
        b = x["boxes"].astype(np.int64)
        hw = np.array([sizes[p] if sizes[p] is not None else (0, 0) for p in range(S)])
        inside = ((b[..., 0] >= 0) & (b[..., 1] >= 0) & (b[..., 2] > 0) & (b[..., 3] > 0)
                  & (b[..., 0] + b[..., 2] <= hw[:, None, 0]) & (b[..., 1] + b[..., 3] <= hw[:, None, 1]))
        bad = known[:, None] & ~inside
        if bad.any():
            s, v = np.argwhere(bad)[0]
            rep.add("boxes", i, f"crop box outside the image in {_first(bad, base)} (box {b[s, v].tolist()}, "
                                f"image {hw[s, 0]}x{hw[s, 1]})")
    differ, first = [], None
    for name in schema.VIEW_PARAMS + (schema.MIX_ARRAYS if layout.paired else ()):
        if x.get(name) is None or not known.any():
            continue
        diff = (x[name] != expected[name]).reshape(S, V, -1).any(-1) & known[:, None]
        if diff.any():
            differ.append(f"{name} in {int(diff.sum())} view(s)")
            first = first or _first(diff, base).split(", ", 1)[1]
    if differ:
        rep.add("view params", i, f"not the seeded sampler's views (seed {ctx.attrs['seed']}): "
                                  f"{', '.join(differ)}; {first}")

    if ctx.teacher is not None and i in ctx.picks:
        _recompute(rep, ctx, i, x, known, tar)
    return undecodable


# ---------------------------------------------------------------------------------------------
# re-running the teacher


def pick_views(group, layout: schema.Layout, n: int, seed: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """n seeded random (slot, view) pairs among the valid slots of committed shards, per shard."""
    valid = {}
    for i in range(layout.num_shards):
        try:
            lab = schema.read_array(group, schema.COMMIT_ARRAY, layout.rows(i))
        except schema.CacheError:
            continue  # reported by the shard's own checks
        if not (lab == schema.NOT_WRITTEN).any():
            valid[i] = np.flatnonzero(lab >= 0)
    total = sum(len(v) for v in valid.values()) * layout.views
    chosen = np.sort(np.random.default_rng(seed).choice(total, min(n, total), replace=False)) if total else []
    picks, start = {}, 0
    for i, slots in valid.items():
        size = len(slots) * layout.views
        mine = np.asarray(chosen)[(np.asarray(chosen) >= start) & (np.asarray(chosen) < start + size)] - start
        if len(mine):
            picks[i] = (slots[mine // layout.views], mine % layout.views)
        start += size
    return picks


def _recompute(rep: VerifyReport, ctx: _Context, i: int, x: dict, known: np.ndarray, tar) -> None:
    """Replay the picked views of shard i, re-run the teacher, compare with the cache."""
    import torch
    rc, layout = rep.recompute, ctx.layout
    slots, views = ctx.picks[i]
    usable = [(p, v) for p, v in zip(slots.tolist(), views.tolist()) if known[p]]
    if tar is None or any(x[n] is None for n in schema.PER_VIEW):
        usable = []
    rc["skipped"] += len(slots) - len(usable)
    if not usable:
        return
    size = int(ctx.attrs["teacher"]["input_size"])
    at = PartnerImages(tar[3])  # the shard's encoded images by position, decoded on demand
    images, rendered = [], []
    for p, v in usable:  # the same render as stages 1 and 2: a paired view is mixed with its partner
        try:
            stored = stored_view(x, p, v, i * layout.slots_per_shard, layout.slots_per_shard)
            images.append(render_stored(stored, at.get(p), at.get, size, ctx.spec))
            rendered.append((p, v))
        except ValueError as e:
            rep.add("recompute", i, f"slot {i * layout.slots_per_shard + p} view {v}: the stored view cannot "
                                    f"be rebuilt ({e})")
    usable = rendered
    if not usable:
        return
    with _split_independent_threads(ctx.teacher.device):
        logits = torch.cat([ctx.teacher(torch.from_numpy(np.stack(images[j:j + 64])))
                            for j in range(0, len(images), 64)])
    p_idx, v_idx = np.array(usable).T
    stored = x["logits"][p_idx, v_idx]
    c = torch.from_numpy(x["classes"][p_idx, v_idx].astype(np.int64))
    lse = torch.from_numpy(x["lse"][p_idx, v_idx].astype(np.float64))
    cached = torch.from_numpy(schema.log_probs(stored, x["lse"][p_idx, v_idx], layout).astype(np.float64))
    logits = logits.double()
    rerun_lse = torch.logsumexp(logits, 1)
    vals, idx = torch.topk(logits, layout.topk, dim=1)
    at_cached = logits.gather(1, c)  # the re-run teacher's logits at the cached classes
    noise = 2 * ctx.atol + ctx.rtol * (at_cached.abs() + rerun_lse.abs()[:, None])  # the teacher's own
    # + the float16 rounding: half a spacing (schema 1-2 round to nearest), a whole one (schema 3 rounds down)
    tol = torch.from_numpy(np.spacing(np.abs(stored)).astype(np.float64)) * (1.0 if layout.stores_log_probs else 0.5) + noise
    diff = (at_cached - rerun_lse[:, None] - cached).abs()  # in log-probabilities
    lse_diff = (rerun_lse - lse).abs()
    mismatch = (idx != c).any(1)
    tie = mismatch & ((at_cached - vals).abs() <= noise).all(1)  # order of near-equal logits swapped
    rc["views"] += len(usable)
    rc["max_logit_diff"] = max(rc["max_logit_diff"], float(diff.max()))
    rc["max_lse_diff"] = max(rc["max_lse_diff"], float(lse_diff.max()))
    rc["class_mismatches"] += int(mismatch.sum())
    rc["near_ties"] += int(tie.sum())
    base = i * layout.slots_per_shard
    hard = torch.nonzero(mismatch & ~tie).flatten().tolist()
    if hard:
        j = hard[0]
        rep.add("recompute", i, f"top-k classes differ in {len(hard)} re-run view(s), first slot "
                                f"{base + p_idx[j]} view {v_idx[j]}: cache {c[j].tolist()}, teacher "
                                f"{idx[j].tolist()}")
    bad = torch.nonzero((diff > tol).any(1) | (lse_diff > ctx.atol + ctx.rtol * lse.abs())).flatten().tolist()
    if bad:
        j = bad[0]
        rep.add("recompute", i, f"log-probabilities or lse differ beyond float16 rounding + atol {ctx.atol}, "
                                f"rtol {ctx.rtol} in "
                                f"{len(bad)} re-run view(s), first slot {base + p_idx[j]} view {v_idx[j]} "
                                f"(largest difference {float(diff[j].max()):.4g})")


@contextlib.contextmanager
def _split_independent_threads(device):
    """One thread for a teacher on the CPU, in every process: a float32 sum's last bits depend on
    the thread count, and the re-run's statistics must not depend on how many processes share
    the shards (--workers, torchrun). The parallelism comes from the processes."""
    import torch
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check_replay(rep: VerifyReport, group, attrs: dict, manifest: Manifest | None, layout) -> None:
    """This machine re-renders the cache's fingerprint views bit for bit (replay_check.py)."""
    recorded = attrs.get("replay")
    if not recorded or not recorded.get("sha256"):
        rep.replay = "no fingerprint recorded (a cache made before replay fingerprints)"
        return
    rep.replay = f"made with {replay_check.describe(recorded['env'])}"
    if manifest is None or rep.complete < layout.num_shards:
        rep.replay += "; not compared (shards or cache incomplete)"
        return
    try:
        why = replay_check.mismatch(group, attrs, manifest)
    except (ShardError, schema.CacheError, ValueError, IndexError) as e:
        why = f"cannot re-render the fingerprint views ({e})"
    if why:
        rep.add("replay", None, why)
    else:
        rep.replay += f"; {len(recorded['views'])} views re-rendered bit for bit here"


# ---------------------------------------------------------------------------------------------
# report


def format_report(rep: VerifyReport) -> str:
    lines = [f"verify {rep.cache} against {rep.shards_dir}"
             + (f" ({rep.shards} shards, {rep.samples} samples)" if rep.shards else "")]
    width = max(len(c) for c in CHECKS)
    for check in CHECKS:
        if check not in rep.ran:
            continue
        found = [p for p in rep.problems if p.check == check]
        note = ""
        if check == "complete":
            note = f"  ({rep.complete}/{rep.shards} shards committed)"
        elif check in ("labels", "boxes", "view params") and rep.compared < rep.valid:
            note = f"  (only {rep.compared} of {rep.valid} samples could be compared with the shards)"
        elif check == "replay" and rep.replay:
            note = f"  ({rep.replay})"
        elif check == "recompute" and rep.recompute:
            r = rep.recompute
            note = (f"  ({r['views']} views re-run on {r['device']}: largest log-probability "
                    f"difference {r['max_logit_diff']:.3g}, lse {r['max_lse_diff']:.3g}; {r['class_mismatches']} top-k "
                    f"order mismatch(es), {r['near_ties']} of them near-ties"
                    + (f"; {r['skipped']} skipped (damaged or unmatched)" if r["skipped"] else "") + ")")
        lines.append(f"  {check:<{width}}  {'FAIL' if found else 'ok'}{note}")
        for p in found[:SHOWN]:
            lines.append(f"      {'shard ' + str(p.shard) if p.shard is not None else 'cache'}: {p.message}")
        if len(found) > SHOWN:
            lines.append(f"      ... and {len(found) - SHOWN} more")
    skipped = [c for c in CHECKS[2:-1] if c not in rep.ran]
    if skipped and rep.problems:
        lines.append(f"  not run (the attributes cannot be trusted to read the arrays): {', '.join(skipped)}")
    if rep.ok:
        extra = f", teacher re-run on {rep.recompute['views']} views" if rep.recompute else ""
        lines.append(f"verdict: OK: the cache matches its shards ({rep.shards} shards, {rep.samples} samples, "
                     f"{rep.views} views; {len(rep.ran)} checks passed{extra})")
    else:
        where: dict[str, list] = {}
        for p in rep.problems:
            w = where.setdefault(p.check, [])
            if p.shard not in w:
                w.append(p.shard)
        parts = []
        for check in CHECKS:
            if check in where:
                shards = [s for s in where[check] if s is not None]
                at = (["cache"] if None in where[check] else []) + (
                    [f"shard{'s' if len(shards) > 1 else ''} {', '.join(map(str, shards[:6]))}"
                     f"{', ...' if len(shards) > 6 else ''}"] if shards else [])
                parts.append(f"{check} ({'; '.join(at)})")
        lines.append(f"verdict: FAILED: {len(rep.problems)} problem(s): {', '.join(parts)}")
    return "\n".join(lines)
