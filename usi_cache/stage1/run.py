"""Stage 1 driver: run the teacher over V views of every sample and fill the Zarr cache.

Ranks take disjoint WebDataset shards and each writes whole Zarr shards, so no locks are
needed. Within a rank, DataLoader workers each own whole shards: a worker decodes every image
once, samples and replays its V views, and emits teacher batches made only of that shard's
views, in tar order. Batch composition therefore depends on the shard alone, which keeps the
cache bit-identical across world sizes, worker counts and resumes.

With `add_views` N the run grows an existing cache instead: the same checks as a resume, then
views V .. V+N-1 are written as a new view block (cache_format/spec.py) by the ranks exactly like the
first V, each shard's block committed by its own marker, and the cache shows V+N views once
every shard has them. Existing chunk files are never written again.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from usi_cache import __version__, cache_format as schema, storage
from usi_cache.stage1 import parts
from usi_cache.checks import replay as replay_check
from usi_cache.config.stages import CacheConfig, ViewSpec
from usi_cache.config.errors import ConfigError
from usi_cache.config.parser import to_dict
from usi_cache.dist import World, all_gather_objects, barrier, broadcast_object, close_world, init_world, on_main
from usi_cache.views.randaugment import OP_NAMES
from usi_cache.shards.manifest import Manifest, ShardError, load_manifest, shard_path
from usi_cache.shards.images import decode_image
from usi_cache.shards.tars import read_shard
from usi_cache.models.ensemble import Ensemble, load_ensemble
from usi_cache.messages import messages
from usi_cache.views.mixing import NO_MIX, PartnerImages, pair_rng, sample_pair
from usi_cache.views.render import Partner, render
from usi_cache.views.sampling import encode_ops, op_slots, sample_view, view_rng

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ViewJob:
    """What a worker needs to turn one shard into teacher batches."""

    root: str
    shard_names: tuple[str, ...]
    layout: schema.Layout  # of the view block being written (V = its views)
    spec: ViewSpec
    sizes: tuple[int, ...]  # the teachers' distinct input sizes (square): each view is rendered at each
    seed: int
    batch_size: int
    mix: dict | None = None  # paired caches: mixup, cutmix, prob, switch (sample_pair's keywords)
    first_view: int = 0  # the block's first view index: views are drawn by their index in the cache


def shard_batches(job: ViewJob, shard: int) -> Iterator[dict]:
    """Yield teacher batches of one shard, then one `meta` record with its per-slot values."""
    layout = job.layout
    S, V, n = layout.slots_per_shard, layout.views, layout.op_slots
    meta = schema.ShardBlock.empty(layout)
    images, pos, views = [], [], []
    path = shard_path(job.root, job.shard_names[shard])

    def batch():
        out = {"kind": "batch", "shard": shard, "images": [np.stack(x) for x in zip(*images)],  # one per size
               "pos": np.asarray(pos, np.int64), "view": np.asarray(views, np.int64)}
        images.clear(), pos.clear(), views.clear()
        return out

    samples = read_shard(path)
    partners = None
    if layout.paired:  # a partner may come later in the tar: hold the shard's encoded bytes
        samples = list(samples)
        partners = PartnerImages([s.data for s in samples])
    count = 0
    for p, sample in enumerate(samples):
        if p >= S:
            raise ShardError(f"{path}: holds more than the {S} samples per shard its manifest allows")
        count += 1
        meta.keys[p] = sample.key
        try:
            image = decode_image(sample.data)  # decoded once for all V views
        except ValueError:
            continue  # label stays -1 (INVALID); reported when the run completes
        meta.labels[p] = sample.cls
        for j in range(V):  # j: the view's place in the block; v: its index in the cache
            v = job.first_view + j
            params = sample_view(view_rng(job.seed, sample.key, v), image.height, image.width, job.spec)
            meta.boxes[p, j] = params.box
            meta.flips[p, j] = params.flip
            meta.aug_ops[p, j], meta.aug_levels[p, j], meta.aug_resample[p, j] = encode_ops(params, n)
            partner = _draw_partner(job, samples, partners, meta, shard, p, v, j) if partners else None
            images.append(tuple(render(image, params, size, job.spec, partner) for size in job.sizes))
            pos.append(p), views.append(j)
            if len(images) == job.batch_size:
                yield batch()
    if images:
        yield batch()
    yield {"kind": "meta", "shard": shard, "count": count, "block": meta}


def _draw_partner(job: ViewJob, samples, partners: PartnerImages, meta: schema.ShardBlock, shard: int,
                  p: int, v: int, j: int) -> Partner | None:
    """Draw the partner of view v of sample p (its view v) and record the pairing in `meta` at
    the block's place j; None when the view is not mixed or the partner does not decode."""
    key = samples[p].key
    # the pairing is drawn at the largest size (a lone teacher's size): the cutmix box is stored as
    # fractions of the side, and every size renders the same pairing
    pair = sample_pair(pair_rng(job.seed, key, v), p, len(samples), max(job.sizes), **job.mix)
    partner_image = partners.get(pair.partner) if pair.kind != NO_MIX else None
    if partner_image is None:
        return None
    q = pair.partner
    q_params = sample_view(view_rng(job.seed, samples[q].key, v), partner_image.height, partner_image.width,
                           job.spec)
    meta.mix_partner[p, j] = shard * job.layout.slots_per_shard + q
    meta.mix_kind[p, j], meta.mix_lam[p, j], meta.mix_box[p, j] = pair.kind, pair.lam, pair.box
    return Partner(partner_image, q_params, pair)


class ShardViews(IterableDataset):
    """The batches of a list of shards; each DataLoader worker takes whole shards."""

    def __init__(self, job: ViewJob, shards: list[int]):
        self.job, self.shards = job, shards

    def __iter__(self):
        info = get_worker_info()
        mine = self.shards if info is None else self.shards[info.id::info.num_workers]
        for shard in mine:
            yield from shard_batches(self.job, shard)


def topk_targets(logits: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k log-probabilities as the cache stores them (float16, descending), their classes
    and the float32 log-sum-exp.

    logits: (N, C), any float dtype (a half-precision teacher's output is widened first).
    log p_i = z_i - lse is taken in float64 before the one rounding to float16.
    """
    if logits.dtype != torch.float64:  # an ensemble's mixture logits stay float64
        logits = logits.float()
    values, classes = torch.topk(logits, k, dim=1, largest=True, sorted=True)
    # float64: a float32 reduction's last bit depends on the CPU thread count and batch shape.
    # log p_i = (z_i - m) - log1p(s), m the max logit and s the sum of exp(z_j - m) over the
    # other classes: log p of the top class is then exact even when s is below float64's
    # epsilon (z_1 - logsumexp(z) would round it to 0 and the top-k to a mass above 1).
    shifted = logits.double() - values[:, :1].double()
    others = shifted.exp().scatter(1, classes[:, :1], 0.0).sum(1)
    log_norm = torch.log1p(others)
    log_p = schema.encode_log_probs((values.double() - values[:, :1].double() - log_norm[:, None]).numpy())
    lse = values[:, 0].double() + log_norm
    return log_p, classes.numpy(), lse.float().numpy()


@dataclass
class StageTimes:
    """Where the time of a rank went (seconds)."""

    data_wait: float = 0.0  # waiting for decoded, augmented batches
    teacher: float = 0.0
    write: float = 0.0
    views: int = 0
    shards: int = 0
    extra: dict = field(default_factory=dict)


def _mix_spec(cfg: CacheConfig) -> dict | None:
    """sample_pair's keywords for a paired cache (None for a plain one)."""
    return cfg.mix.sample_kwargs() if cfg.mix.mode == "paired" else None


def _prepare(cfg: CacheConfig, attrs: dict, layout: schema.Layout, part) -> str | None:
    """Rank 0: create, resume or grow the store; independent parts coordinate through parts.py."""
    if cfg.add_views:
        grow = lambda: _prepare_grow(cfg, attrs)  # noqa: E731
        return parts.prepare_grow(cfg, grow) if part else grow()
    if part:
        hint = "every part runs with the cache's settings: give them, or another --out"
        return parts.prepare_store(cfg, attrs, layout, lambda: _prepare_store(cfg, attrs, layout, hint))
    return _prepare_store(cfg, attrs, layout)


def _prepare_store(cfg: CacheConfig, attrs: dict, layout: schema.Layout,
                   hint: str = "use --overwrite to replace it") -> str | None:
    """Rank 0: create the cache, or check that the existing one matches. Returns an error."""
    out = cfg.out
    if storage.is_file(out) or (not storage.is_url(out) and Path(out).is_symlink()):
        return f"{out}: is a file, not a cache" + ("; --overwrite only replaces a cache" if cfg.overwrite else "")
    empty = not storage.listdir(out)
    if cfg.overwrite and not empty and not schema.exists(out):
        # --overwrite deletes what is at OUT: only ever a Zarr store, never e.g. a mistyped folder
        return (f"{out}: folder is not a cache (no zarr.json) and is not empty; "
                f"--overwrite only replaces a cache: choose another --out")
    if cfg.overwrite or empty:
        schema.create(out, attrs, layout)
        return None
    try:
        _, found = schema.open_cache(out)
    except schema.CacheError as e:
        return f"{e} ({hint})"
    if found.get("schema_version") in schema.GROWABLE_VERSIONS:  # block 0 is written alike: a version-3 cache resumes
        attrs = {**attrs, "schema_version": found["schema_version"]}
    return _mismatch(out, found, attrs, hint)


def _mismatch(out: str, found: dict, attrs: dict, hint: str) -> str | None:
    """Why this run may not add to the cache with attributes `found` (None when it may)."""
    diff = schema.attrs_difference(found, attrs)
    if diff:
        return f"{out}: existing cache differs in {diff}; {hint}"
    made = found.get("decoders") or (found.get("replay") or {}).get("env")
    if made and made != attrs["decoders"]:  # its pixels would not match the ones already cached
        return (f"{out}: made with {replay_check.describe(made)}, this machine has "
                f"{replay_check.describe(attrs['decoders'])}; finish it where it was made, or --overwrite")
    return None


def _prepare_grow(cfg: CacheConfig, attrs: dict) -> str | None:
    """Rank 0, --add-views N: check the cache as a resume does, then start (or resume) the grow
    from V = cfg.views to V+N. Rerunning the same command after a kill resumes it, after success
    it does nothing. Returns an error."""
    out, n = cfg.out, cfg.add_views
    if not schema.exists(out):
        return f"{out}: no cache to grow here; make it first (without --add-views)"
    try:
        group, found = schema.open_cache(out, mode="r+")
    except schema.CacheError as e:
        return str(e)
    version = found.get("schema_version")
    if version not in schema.GROWABLE_VERSIONS:
        return (f"{out}: a schema-{version} cache stores raw logits and cannot grow; rebuild it with this "
                f"version (--overwrite, --views {found['views'] + n})")
    layout = schema.Layout.from_attrs(found)
    V, growing = layout.views, found.get("growing")
    grown = growing is None and len(layout.blocks) > 1 and layout.blocks[-1].count == n and V == cfg.views + n
    if V != cfg.views and not grown:
        return (f"{out}: the cache has V = {V} views, this run says views = {cfg.views}; give --views {V} "
                f"(the cache's V now) with --add-views")
    if growing is not None and growing != n:
        return f"{out}: a grow by {growing} views is unfinished; finish it first with --add-views {growing}"
    error = _mismatch(out, found, {**attrs, "views": V, "schema_version": version},
                      "new views must come from the cache's own teacher, settings and dataset")
    if error:
        return error
    undone = int((~schema.completed_shards(group, layout)).sum())
    if undone:
        return (f"{out}: {undone} of {layout.num_shards} shards are not committed yet; finish the cache "
                f"(the same command without --add-views) before growing it")
    if not grown:
        schema.begin_grow(group, layout, n)
    return None


def _target(cfg: CacheConfig, found: dict) -> tuple[schema.Layout, schema.ViewBlock]:
    """The cache's committed layout and the view block this run writes: block 0 (create or
    resume), the grow recorded in `found`, or, for a grow already committed, its block (then
    every shard is done)."""
    layout = schema.Layout.from_attrs(found)
    if not cfg.add_views:
        return layout, layout.blocks[0]
    if found.get("growing"):
        return layout, schema.ViewBlock(len(layout.blocks), layout.views, found["growing"])
    return layout, layout.blocks[-1]


def run_cache(cfg: CacheConfig, *, progress: bool = True) -> dict:
    """Stage 1 end to end on this rank; returns the run summary (same on every rank)."""
    world = init_world()
    try:
        with messages(world.is_main):
            return _run(cfg, world, progress)
    finally:
        close_world(world)


def _run(cfg: CacheConfig, world: World, progress: bool) -> dict:
    t_start = time.perf_counter()
    if not (cfg.teacher_checkpoint or cfg.pretrained or cfg.random_teacher):
        raise ConfigError("cache.teacher_checkpoint: not given, and not pretrained: the cache would hold a random "
                          "teacher; give --teacher-checkpoint or --pretrained (or --random-teacher if meant)")
    part = parts.resolve_part(cfg.part)  # None: every shard (one job, or torchrun ranks)
    manifest = load_manifest(cfg.shards)
    C = len(manifest.classes)
    if cfg.topk > C:
        raise schema.CacheError(f"cache.topk: k = {cfg.topk} exceeds the dataset's {C} classes")
    teacher = load_ensemble(cfg.teacher, cfg.teacher_checkpoint, num_classes=C, weights=cfg.teacher_weights,
                            precisions=cfg.teacher_precision, pretrained=cfg.pretrained, input_size=cfg.input_size,
                            mean=cfg.mean, std=cfg.std, device=world.device, compile=cfg.compile)
    layout = schema.Layout(num_shards=len(manifest.shards), slots_per_shard=manifest.per_shard,
                           views=cfg.views, topk=cfg.topk, num_classes=C,
                           # at least one slot (then always -1) when RandAugment is off: Zarr
                           # cannot shard zero-size chunks
                           op_slots=max(1, op_slots(cfg.view)), paired=cfg.mix.mode == "paired")
    attrs = schema.make_attrs(teacher=teacher.attrs(), num_classes=C, topk=cfg.topk, views=cfg.views,
                              view_spec=to_dict(cfg.view), op_names=list(OP_NAMES),
                              op_slots=layout.op_slots, seed=cfg.seed,
                              manifest={**manifest.to_dict(), "root": storage.resolve(manifest.root)},
                              tool_version=__version__, mix=_mix_spec(cfg))
    try:  # every rank renders the views it caches: their decoders must agree
        replay_check.refuse_mixed(all_gather_objects(world, replay_check.decoder_env()), cfg.out)
    except ValueError as e:
        raise schema.CacheError(str(e)) from None
    attrs["decoders"] = replay_check.decoder_env()
    # rank 0 creates or checks the store; what it raises (a full disk, a refused URL) reaches
    # every rank, so none waits in a collective for it
    error = on_main(world, lambda: _prepare(cfg, attrs, layout, part))
    if error:
        raise schema.CacheError(error)
    group, found = schema.open_cache(cfg.out, mode="r+")
    layout, block = _target(cfg, found)
    done = schema.completed_shards(group, layout, block)
    pending = [i for i in (part.shards(layout.num_shards) if part else range(layout.num_shards)) if not done[i]]
    barrier(world)  # every rank has read the same completion state before anyone writes
    mine = pending[world.rank::world.size]
    times = _compute(cfg, world, manifest, layout, block, group, teacher, mine, progress, part)
    barrier(world)
    all_times = all_gather_objects(world, times)
    summary = None
    left = on_main(world, lambda: parts.unfinished(group, layout, block)) if part else 0
    if world.is_main and left:  # another part's shards are not committed yet: the last part finalises
        summary = parts.waiting_summary(cfg, part, layout, block, all_times, left, time.perf_counter() - t_start)
    elif world.is_main:
        if part:  # another part may have finalised a grow meanwhile
            _, found = schema.open_cache(cfg.out)
        if block.index and found.get("growing"):  # every rank has committed its shards of the block
            if not schema.completed_shards(group, layout, block).all():
                raise schema.CacheError(f"{cfg.out}: a shard of the new views is not committed; rerun to resume")
            with storage.errors(cfg.out, "writing the cache's attributes", "every shard is committed: rerun to finish"):
                found = schema.commit_grow(group)
        elif found.get("growing"):
            log.warning(f"warning: {cfg.out} has an unfinished grow by {found['growing']} views (not readable yet); "
                        f"finish it with --views {layout.views} --add-views {found['growing']}")
        summary = _finish(cfg, group, schema.Layout.from_attrs(found), block, manifest, all_times, len(pending),
                          time.perf_counter() - t_start)
        _, attrs = schema.open_cache(cfg.out)
        with storage.errors(cfg.out, "writing the cache's attributes", "every shard is committed: rerun to finish"):
            summary["replay_env"] = replay_check.record(group, attrs, manifest)["env"]
        if cfg.audit:
            from usi_cache.checks.audit import run_audit
            _, attrs = schema.open_cache(cfg.out)
            summary["audit"] = run_audit(group, attrs, manifest, teacher, cfg.audit, cfg.seed)
    return broadcast_object(world, summary)


def _compute(cfg, world, manifest: Manifest, layout, view_block: schema.ViewBlock, group, teacher: Ensemble, mine,
             progress, part: parts.Part | None = None) -> StageTimes:
    """Write view block `view_block` of this rank's shards `mine`, each committed on its own."""
    times = StageTimes()
    if not mine:
        return times
    layout = layout.block_layout(view_block)
    job = ViewJob(manifest.root, tuple(s.name for s in manifest.shards), layout, cfg.view,
                  teacher.sizes, cfg.seed, cfg.batch_size, _mix_spec(cfg), view_block.start)
    loader = DataLoader(ShardViews(job, mine), batch_size=None, num_workers=min(cfg.workers, len(mine)),
                        prefetch_factor=4 if cfg.workers else None,
                        persistent_workers=False)
    blocks: dict[int, schema.ShardBlock] = {}
    bar = None
    if progress and world.is_main:
        from tqdm import tqdm
        expected = sum(manifest.shards[i].count for i in mine) * layout.views
        what = f"views {view_block.views[0]}..{view_block.views[-1]}" if view_block.index else "views"
        bar = tqdm(total=expected, unit="view", desc=f"teacher {what} ({f'part {part}' if part else f'rank 0 of {world.size}'})",
                   dynamic_ncols=True)
    try:
        t = time.perf_counter()
        for msg in loader:
            times.data_wait += time.perf_counter() - t
            shard = msg["shard"]
            block = blocks.setdefault(shard, schema.ShardBlock.empty(layout))
            if msg["kind"] == "batch":
                t = time.perf_counter()
                images = [torch.as_tensor(x) for x in msg["images"]]
                # float32 logits (one teacher) or the float64 logits of the mixture (an ensemble,
                # models/ensemble.py), on the CPU: checking them costs no device sync
                logits = teacher(images)
                if not torch.isfinite(logits).all():
                    key = str(block.keys[int(msg["pos"][0])]) or f"position {int(msg['pos'][0])}"
                    raise schema.CacheError(
                        f"{manifest.path(shard)}: the teacher's output is not finite (near sample {key}) at "
                        f"precision {teacher.precision}; use --teacher-precision bf16 or fp32")
                values, classes, lse = topk_targets(logits, layout.topk)
                p, v = np.asarray(msg["pos"]), np.asarray(msg["view"])
                block.logits[p, v], block.classes[p, v], block.lse[p, v] = values, classes, lse
                times.teacher += time.perf_counter() - t
                times.views += len(p)
                if bar is not None:
                    bar.update(len(p))
            else:
                t = time.perf_counter()
                meta = msg["block"]
                manifest.check_count(shard, msg["count"])
                # what the worker drew (all but the teacher's outputs)
                for name in schema.VIEW_PARAMS + schema.PER_SLOT + (schema.MIX_ARRAYS if layout.paired else ()):
                    setattr(block, name, getattr(meta, name))
                with storage.errors(cfg.out, f"writing shard {shard}", "committed shards are kept: rerun to resume"):
                    schema.write_block(group, layout, shard, blocks.pop(shard), view_block, parts.commit_record(part))
                times.write += time.perf_counter() - t
                times.shards += 1
            t = time.perf_counter()
    finally:
        if bar is not None:
            bar.close()
    return times


def _finish(cfg, group, layout, block: schema.ViewBlock, manifest, all_times: list[StageTimes], pending: int,
            wall: float) -> dict:
    """Rank 0, after all ranks finished: record invalid samples and build the summary (`layout`:
    the cache as it is now; `block`: the view block this run wrote)."""
    n = layout.slots
    labels = schema.read_array(group, "labels", slice(0, n))
    keys = schema.read_array(group, "keys", slice(0, n))
    bad_slots = [i for i, (k, lab) in enumerate(zip(keys, labels)) if lab == schema.INVALID and k]
    invalid = sorted(str(keys[i]) for i in bad_slots)
    with storage.errors(cfg.out, "writing the cache's attributes", "every shard is committed: rerun to finish"):
        schema.set_invalid(group, invalid)
    if invalid:
        shown = ", ".join(f"{keys[i]} ({manifest.shards[i // layout.slots_per_shard].name})"
                          for i in bad_slots[:5]) + (" ..." if len(invalid) > 5 else "")
        log.warning(f"warning: {len(invalid)} undecodable sample(s) stored with label -1: {shown}")
    complete = int(schema.completed_shards(group, layout, block).sum())
    usage = schema.disk_usage(cfg.out)
    views_total = manifest.num_samples * layout.views
    computed = sum(t.views for t in all_times)
    return {
        "cache": str(cfg.out),
        "shards": layout.num_shards,
        "shards_complete": complete,
        "shards_computed": sum(t.shards for t in all_times),
        "shards_reused": layout.num_shards - pending,
        "samples": manifest.num_samples,
        "views": views_total,
        "views_computed": computed,
        "grown": {"from": block.start, "to": block.start + block.count} if block.index else None,
        "invalid_samples": len(invalid),
        "bytes_on_disk": usage["total"],
        "bytes_per_view": usage["total"] / max(views_total, 1),
        "wall_s": wall,
        "views_per_s": computed / wall if wall > 0 else 0.0,
        "time_teacher_s": sum(t.teacher for t in all_times),
        "time_data_wait_s": sum(t.data_wait for t in all_times),
        "time_write_s": sum(t.write for t in all_times),
    }


def format_summary(s: dict) -> str:
    if s.get("finalised") is False:  # a part that left the finishing to another
        return parts.format_waiting(s)
    rows = [
        ("cache", s["cache"]),
        ("shards", f"{s['shards_complete']}/{s['shards']} complete "
                   f"({s['shards_computed']} computed now, {s['shards_reused']} reused)"),
        ("samples", f"{s['samples']}"),
        ("views", f"{s['views']} ({s['views_computed']} computed now"
                  + (f"; grown from V = {s['grown']['from']} to {s['grown']['to']})" if s.get("grown") else ")")),
        ("invalid samples", f"{s['invalid_samples']}"),
        ("size on disk", f"{s['bytes_on_disk'] / 1e6:.2f} MB"),
        ("bytes per view", f"{s['bytes_per_view']:.1f}"),
        ("wall time", f"{s['wall_s']:.1f} s ({s['views_per_s']:.0f} views/s)"),
        ("time split", f"teacher {s['time_teacher_s']:.1f} s, waiting for data "
                       f"{s['time_data_wait_s']:.1f} s, writing {s['time_write_s']:.1f} s"),
    ]
    width = max(len(r[0]) for r in rows)
    text = "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
    if s.get("audit"):
        from usi_cache.checks.common import format_audit
        text += "\n" + format_audit(s["audit"])
    return text
