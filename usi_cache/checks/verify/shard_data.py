"""One shard as `usi verify`'s per-shard checks see it: read once, judged by every check.

`load_shard` does all the reading (the cache's block, the shard's tar) and derives what several
checks compare against (which slots hold the tar's sample, the image sizes, the views the seeded
sampler draws, which arrays' values are lost). It records what it could not read instead of
raising, so every check still runs on what is there; the checks themselves (shard_checks.py)
only judge.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image

from usi_cache import cache_format as schema
from usi_cache.views.mixing import NO_MIX, pair_rng, sample_pair
from usi_cache.shards.manifest import Manifest, ShardError
from usi_cache.shards.tars import read_shard
from usi_cache.views.sampling import encode_ops, sample_view, view_rng


@dataclass
class VerifyContext:
    """What checking a shard needs. Built on rank 0 and sent to every process without `group`
    and `teacher`, which each process opens for itself (`open_context`)."""
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


def open_context(ctx: VerifyContext) -> VerifyContext:
    """The context of one process: its own handle on the cache (and its own teacher, loaded when
    its first shard with views to re-run comes)."""
    return replace(ctx, group=schema.open_cache(ctx.path)[0])


@dataclass
class TarContents:
    """The shard's samples by position, as the tar holds them."""
    keys: list[str]
    classes: list[int]
    sizes: list  # (height, width) from the image header, or None when it is not an image
    data: list[bytes]  # the encoded images


@dataclass
class ShardData:
    """Shard `shard` read for the checks. An array that could not be read, or whose chunk file is
    missing, is None in `arrays` (its problem is in `unreadable` or `lost`)."""
    ctx: VerifyContext
    shard: int
    arrays: dict  # name -> the shard's block, or None
    unreadable: list[str] = field(default_factory=list)  # "name: where unreadable (why)"
    committed: bool = False
    count: int = 0  # samples in the shard, as the cache's dataset says
    valid: np.ndarray | None = None  # (S,) label >= 0 (none before the commit)
    tar: TarContents | None = None
    tar_problem: str | None = None  # why the tar could not be read
    in_place: np.ndarray | None = None  # (S,) the cache's key is the tar's key at that position
    sizes: list = field(default_factory=list)  # (S,) image (height, width) where in place, else None
    known: np.ndarray | None = None  # (S,) valid, in place and the image header read
    expected: dict = field(default_factory=dict)  # view-parameter arrays the seeded sampler draws
    lost: list[str] = field(default_factory=list)  # "name: chunk file ... is missing (...)"
    undecodable: set = field(default_factory=set)  # keys stored with label -1, in place
    rerun: dict | None = None  # --recompute: this shard's re-run statistics (filled by its check)

    @property
    def layout(self) -> schema.Layout:
        return self.ctx.layout

    @property
    def base(self) -> int:
        """The shard's first slot."""
        return self.shard * self.ctx.layout.slots_per_shard

    @property
    def labels(self) -> np.ndarray | None:
        return self.arrays.get(schema.COMMIT_ARRAY)


def load_shard(ctx: VerifyContext, i: int) -> ShardData:
    """Read shard i: only its commit marker when it is not committed (or unreadable), and then
    no slot is valid, so the value checks find nothing to judge."""
    S = ctx.layout.slots_per_shard
    d = ShardData(ctx, i, {}, valid=np.zeros(S, bool), in_place=np.zeros(S, bool), sizes=[None] * S,
                  known=np.zeros(S, bool))
    d.arrays[schema.COMMIT_ARRAY] = labels = _read(d, schema.COMMIT_ARRAY)
    if labels is None or (labels == schema.NOT_WRITTEN).any():
        return d
    d.committed = True
    for name in ctx.layout.arrays:  # with the pairing arrays of a paired cache
        if name != schema.COMMIT_ARRAY:
            d.arrays[name] = _read(d, name)
    d.count = int(ctx.attrs["dataset"]["shards"][i]["count"])
    d.valid = labels >= 0
    d.tar = _read_tar(d)
    keys = d.arrays["keys"]
    if d.tar is not None and keys is not None:
        n = min(len(d.tar.keys), S)
        d.in_place[:n] = [str(keys[p]) == d.tar.keys[p] for p in range(n)]
        for p in np.flatnonzero(d.in_place):
            d.sizes[p] = d.tar.sizes[p]
            if labels[p] == schema.INVALID:
                d.undecodable.add(d.tar.keys[p])
    d.known = d.valid & d.in_place & np.array([s is not None for s in d.sizes])
    d.expected = _expected_views(d)
    d.lost = _lost_chunks(d)
    return d


def _read(d: ShardData, name: str) -> np.ndarray | None:
    """One shard's block of one array, or None (after naming the damaged views) when unreadable."""
    ctx = d.ctx
    rows = ctx.layout.rows(d.shard)
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
        d.unreadable.append(f"{name}: {where} unreadable {detail}")
        return None


def _read_tar(d: ShardData) -> TarContents | None:
    """The shard's tar, or None (the reason in `tar_problem`; no manifest is the fingerprint
    check's problem)."""
    m = d.ctx.manifest
    if m is None:
        return None
    if d.shard >= len(m.shards):
        d.tar_problem = f"{m.root} has no shard {d.shard} (it has {len(m.shards)})"
        return None
    tar = TarContents([], [], [], [])
    try:
        for sample in read_shard(m.path(d.shard)):
            tar.keys.append(sample.key)
            tar.classes.append(sample.cls)
            tar.data.append(sample.data)
            try:  # the header is enough for the size: no full decode of every image
                with Image.open(io.BytesIO(sample.data)) as im:
                    tar.sizes.append((im.height, im.width))
            except Exception:  # PIL raises many types for bytes that are not an image
                tar.sizes.append(None)
    except ShardError as e:
        d.tar_problem = str(e)
        return None
    return tar


def _expected_views(d: ShardData) -> dict:
    """The view-parameter arrays (and pairing arrays of a paired cache) as the seeded sampler
    draws them for the known slots; fill values elsewhere."""
    ctx, layout = d.ctx, d.layout
    empty = schema.ShardBlock.empty(layout)  # fill values where no view is expected
    expected = {name: getattr(empty, name) for name in schema.VIEW_PARAMS}
    S, V = layout.slots_per_shard, layout.views
    keys = d.arrays["keys"] if d.arrays["keys"] is not None else [""] * S
    for p in np.flatnonzero(d.known):
        h, w = d.sizes[p]
        for v in range(V):
            params = sample_view(view_rng(ctx.attrs["seed"], str(keys[p]), v), h, w, ctx.spec)
            expected["boxes"][p, v] = params.box
            expected["flips"][p, v] = params.flip
            (expected["aug_ops"][p, v], expected["aug_levels"][p, v],
             expected["aug_resample"][p, v]) = encode_ops(params, layout.op_slots)
    if layout.paired:  # pairings are drawn from the seed too: a partner that decodes, or no mixing
        expected.update({name: getattr(empty, name) for name in schema.MIX_ARRAYS})
        size, mix = schema.view_size(ctx.attrs), ctx.attrs["mix_spec"]
        labels = d.labels
        for p in np.flatnonzero(d.known):
            for v in range(V):
                pair = sample_pair(pair_rng(ctx.attrs["seed"], str(keys[p]), v), int(p), d.count, size, **mix)
                if pair.kind != NO_MIX and labels[pair.partner] >= 0:
                    expected["mix_partner"][p, v] = d.base + pair.partner
                    expected["mix_kind"][p, v], expected["mix_lam"][p, v] = pair.kind, pair.lam
                    expected["mix_box"][p, v] = pair.box
    return expected


def _lost_chunks(d: ShardData) -> list[str]:
    """Arrays whose chunk file is missing although their content cannot be all fill values (a
    missing file reads as fill values: Zarr does not write a chunk of fill values only). Their
    values are lost: they become None in `arrays`, so no value check judges fill values."""
    ctx, layout, x, valid, known = d.ctx, d.layout, d.arrays, d.valid, d.known
    lost = []
    for name in schema.ARRAYS:
        if x.get(name) is None or x[name].size == 0:
            continue
        keys = schema.chunk_keys(name, d.shard, layout)
        if all(k in ctx.stored for k in keys):
            continue
        if name in schema.VIEW_PARAMS:
            fine = known.sum() == valid.sum() and np.array_equal(x[name][valid], d.expected[name][valid])
        elif name == "classes":
            fine = layout.topk == 1 or not valid.any()  # k >= 2 distinct classes cannot all be 0
        elif name == "keys":
            fine = d.count == 0
        else:
            fine = not valid.any()
        if not fine:
            rel = ", ".join(k for k in keys if k not in ctx.stored)
            fill = np.asarray(schema.array(ctx.group, name, layout).fill_value).item()
            lost.append(f"{name}: chunk file {rel} is missing (reads as fill value {fill!r}: the values are lost)")
            x[name] = None
    return lost
