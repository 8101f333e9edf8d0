"""`usi inspect`: what a cache holds, how good its teacher is, and what one sample's views were.

Everything is computed into plain dicts first: the summary (`summarize`), the teacher
statistics (`stats.teacher_stats`) and one sample (`sample_info`), gathered by
`inspect_report`; the text (`text.py`), the `--json` output and the plots (`figures.py`)
are all rendered from that dict, so the three always show the same numbers. Bad requests and
damaged caches raise the project's errors (ConfigError, CacheError, ShardError); the command
line turns them into one-line messages.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from usi_cache.checks import replay as replay_check
from usi_cache import cache_format as schema, storage
from usi_cache.config.errors import ConfigError
from usi_cache.dist import World, init_world, on_main
from usi_cache.checks.inspect.text import format_report
from usi_cache.checks.inspect.stats import bucket_entropy, bucket_probs, teacher_stats
from usi_cache.views.mixing import CUTMIX, MIXUP, NO_MIX
from usi_cache.views.randaugment import GEOMETRIC_OPS
from usi_cache.views.render import render, render_stored, shard_images, stored_view
from usi_cache.checks.common import shards_for
from usi_cache.shards.manifest import ShardError
from usi_cache.views.sampling import decode_view

__all__ = [
    "summarize", "replay_status", "find_slot", "sample_info", "replay_sample", "validate_request", "inspect_report",
    "run_inspect",
]


# ---------------------------------------------------------------------------------------------
# summary


def summarize(path: str | Path, shards_dir: str | Path | None = None) -> dict:
    """Attributes, completeness per shard, invalid samples and size on disk of a cache."""
    group, attrs = schema.open_cache(path)
    layout = schema.Layout.from_attrs(attrs)
    ds = attrs["dataset"]
    labels = schema.read_array(group, schema.COMMIT_ARRAY, slice(0, layout.slots))
    labels = labels.reshape(layout.num_shards, layout.slots_per_shard)
    shards = []
    for i, info in enumerate(ds["shards"]):
        complete = bool((labels[i] != schema.NOT_WRITTEN).all())
        valid = int((labels[i] >= 0).sum())
        shards.append({"index": i, "name": info["name"], "samples": int(info["count"]), "complete": complete,
                       # slots past the shard's end are -1 too; only real samples count as invalid
                       "invalid": int(info["count"]) - valid if complete else None})
    samples = int(ds["num_samples"])
    views = samples * layout.views
    usage = schema.disk_usage(path)
    team = schema.teacher_members(attrs)
    t = team[0]
    if len(team) > 1:  # an ensemble: named by its members, views shown at the largest size
        t = {**t, "name": " + ".join(m["name"] for m in team), "input_size": schema.view_size(attrs),
             "checkpoint": None, "checkpoint_sha256": None,
             "precision": ",".join(dict.fromkeys(str(m.get("precision")) for m in team))}
    return {
        "cache": str(path),
        "schema_version": attrs["schema_version"],
        "tool_version": attrs["tool_version"],
        "created": attrs["created"],
        "teacher": {"name": t["name"], "checkpoint": t.get("checkpoint"),
                    "checkpoint_sha256": t.get("checkpoint_sha256"), "input_size": t["input_size"],
                    "mean": t["mean"], "std": t["std"], "interpolation": t.get("interpolation"),
                    "precision": t.get("precision"),  # None: not recorded (schema < 3)
                    "members": team if len(team) > 1 else None},  # an ensemble: every teacher, with its weight
        "dataset": {"shards": layout.num_shards, "per_shard": layout.slots_per_shard, "samples": samples,
                    "num_classes": layout.num_classes, "classes": list(ds["classes"]),
                    "fingerprint": ds["fingerprint"]},
        "views": layout.views,
        "topk": layout.topk,
        "seed": attrs["seed"],
        "view_spec": attrs["view_spec"],
        "completeness": {"complete": sum(s["complete"] for s in shards), "total": layout.num_shards,
                         "missing": [s["index"] for s in shards if not s["complete"]], "shards": shards},
        "invalid": {"count": sum(s["invalid"] or 0 for s in shards), "keys": list(attrs.get("invalid", []))},
        "disk": {"bytes": {n: usage[n] for n in schema.ARRAYS}, "total": usage["total"],
                 "cached_views": views,
                 "bytes_per_view": usage["total"] / views if views else None,
                 "bytes_per_view_by_array": {n: usage[n] / views if views else None for n in schema.ARRAYS}},
        "audit": attrs.get("audit"),  # the top-k fidelity table (checks/audit.py), when one was run
        "replay": replay_status(group, attrs, shards_dir),
    }


def replay_status(group, attrs: dict, shards_dir=None) -> dict:
    """The decoders the cache was made with and whether this machine re-renders its fingerprint
    views bit for bit (from `shards_dir` or the recorded root; not checked when they are gone)."""
    recorded = attrs.get("replay")
    out = {"recorded": replay_check.describe(recorded["env"]) if recorded else None,
           "here": replay_check.describe(replay_check.decoder_env()), "pixels": "not recorded"}
    if recorded and recorded.get("sha256"):
        try:
            why = replay_check.mismatch(group, attrs, shards_for(attrs, shards_dir))
            out["pixels"] = why or f"{len(recorded['views'])} fingerprint views re-rendered bit for bit"
        except (schema.CacheError, ShardError, storage.StorageError) as e:
            out["pixels"] = f"not checked ({e})"
    return out


# ---------------------------------------------------------------------------------------------
# one sample


def find_slot(path: str | Path, *, key: str | None = None, slot: int | None = None) -> int:
    """The slot of sample `key` (searched shard by shard), or `slot` after a range check."""
    group, attrs = schema.open_cache(path)
    layout = schema.Layout.from_attrs(attrs)
    if slot is not None:
        if not 0 <= slot < layout.slots:
            raise schema.CacheError(f"--slot {slot}: the cache has slots 0..{layout.slots - 1}")
        return slot
    for i in range(layout.num_shards):
        keys = schema.read_array(group, "keys", layout.rows(i))
        hit = np.flatnonzero(keys == key)
        if len(hit):
            return i * layout.slots_per_shard + int(hit[0])
    raise schema.CacheError(f"key {key!r} is not in the cache (not written yet, or another dataset)")


def sample_info(path: str | Path, slot: int) -> dict:
    """Everything the cache holds about one slot: per view the crop, flip, ops and top-k."""
    group, attrs = schema.open_cache(path)
    layout = schema.Layout.from_attrs(attrs)
    rows = slice(slot, slot + 1)
    x = {n: schema.read_array(group, n, rows)[0] for n in layout.arrays}
    names = list(attrs["dataset"]["classes"])
    op_names = list(attrs["op_names"])
    label = int(x["labels"])
    shard, pos = divmod(slot, layout.slots_per_shard)
    out = {"slot": slot, "shard": shard, "position": pos, "key": str(x["keys"]), "label": label,
           "label_name": names[label] if label >= 0 else None,
           "status": ("ok" if label >= 0 else "not written" if label == schema.NOT_WRITTEN
                      else "empty slot" if not x["keys"] else "undecodable image"),
           "paired": layout.paired, "views": []}
    if label < 0:
        return out
    log_p = schema.log_probs(x["logits"], x["lse"], layout)
    p, rest = bucket_probs(log_p)
    h = bucket_entropy(p, rest)
    zs = log_p.astype(np.float64) + x["lse"].astype(np.float64)[:, None]  # the teacher's logits
    for v in range(layout.views):
        params = decode_view(x["boxes"][v], x["flips"][v], x["aug_ops"][v], x["aug_levels"][v],
                             x["aug_resample"][v])
        out["views"].append({
            "view": v, "box": dict(zip(("top", "left", "height", "width"), params.box)), "flip": params.flip,
            "ops": [{"op": op_names[o.op], "level": o.level,
                     "resample": _filter_name(o.resample) if o.op in GEOMETRIC_OPS else None}
                    for o in params.ops],
            "topk": [{"class": int(c), "name": names[int(c)], "logit": float(z), "prob": float(pi)}
                     for c, z, pi in zip(x["classes"][v], zs[v], p[v])],
            "tail_mass": float(rest[v]), "entropy_nats": float(h[v]),
            "top1_correct": bool(int(x["classes"][v][0]) == label),
        })
        if layout.paired:
            out["views"][-1]["mix"] = _mix_info(group, x, v, names)
    return out


def _mix_info(group, x: dict, v: int, names: list[str]) -> dict:
    """The pairing of view v of a paired cache: partner, kind, lambda, box."""
    kind = int(x["mix_kind"][v])
    if kind == NO_MIX:
        return {"kind": "none"}
    partner = int(x["mix_partner"][v])
    rows = slice(partner, partner + 1)
    plabel = int(schema.read_array(group, "labels", rows)[0])
    return {"kind": "mixup" if kind == MIXUP else "cutmix", "partner_slot": partner,
            "partner_key": str(schema.read_array(group, "keys", rows)[0]), "partner_label": plabel,
            "partner_label_name": names[plabel] if plabel >= 0 else None, "lam": float(x["mix_lam"][v]),
            "box": [float(b) for b in x["mix_box"][v]] if kind == CUTMIX else None}


def _filter_name(resample: int) -> str:
    from PIL import Image
    try:
        return Image.Resampling(resample).name.lower()
    except ValueError:
        return str(resample)


def replay_sample(path: str | Path, info: dict, shards_dir: str | Path | None):
    """(original RGB image, [replayed view images at the teacher's input size]) of a sample.

    Each view is rebuilt from the stored arrays by the one `render` of every stage; a mixed
    view of a paired cache is shown as own view | partner's view | the mixed image it saw."""
    from PIL import Image
    group, attrs = schema.open_cache(path)
    layout = schema.Layout.from_attrs(attrs)
    manifest = shards_for(attrs, shards_dir)
    shard, pos = info["shard"], info["position"]
    block = schema.read_block(group, layout, shard)
    images = shard_images(manifest.path(shard), {pos}, layout.paired, block.keys)
    if pos >= len(images.encoded):
        raise ShardError(f"{manifest.path(shard)}: has no sample at position {pos}")
    image = images.get(pos)
    spec, size = schema.view_spec(attrs), schema.view_size(attrs)
    views = []
    for v in range(layout.views):
        try:
            stored = stored_view(block, pos, v, shard * layout.slots_per_shard, layout.slots_per_shard)
        except ValueError as e:
            raise schema.CacheError(f"slot {shard * layout.slots_per_shard + pos} view {v}: {e}") from None
        own = Image.fromarray(render(image, stored.params, size, spec))
        if stored.pair is None:
            views.append(own)
            continue
        partner = images.get(stored.pair.partner)
        if partner is None:
            raise ShardError(f"{manifest.path(shard)}: partner position {stored.pair.partner} does not decode")
        panels = (own, Image.fromarray(render(partner, stored.partner_params, size, spec)),
                  Image.fromarray(render_stored(stored, image, images.get, size, spec)))
        gap = max(1, size // 16)
        panel = Image.new("RGB", (3 * size + 2 * gap, size), (255, 255, 255))
        for k, im in enumerate(panels):
            panel.paste(im, (k * (size + gap), 0))
        views.append(panel)
    return image, views


# ---------------------------------------------------------------------------------------------
# the command


def validate_request(*, key: str | None = None, slot: int | None = None, shard_range: str | None = None,
                     sample_views: int | None = None, stats: bool = True, plot: str | None = None,
                     label_issues: bool = False, html: str | None = None, issues_csv: str | None = None) -> None:
    """Refuse (ConfigError) a combination of options that does not make one report."""
    one = key is not None or slot is not None
    if one and (label_issues or html):
        raise ConfigError("--label-issues and --html report on the whole cache, not one sample (--key/--slot)")
    if html and not stats:
        raise ConfigError("--html shows the statistics: drop --no-stats")
    if issues_csv and not label_issues:
        raise ConfigError("--issues-csv writes the label issues: add --label-issues")
    if key is not None and slot is not None:
        raise ConfigError("give --key or --slot, not both")
    if one and (shard_range is not None or sample_views is not None):
        raise ConfigError("--shard-range and --sample-views restrict the statistics; "
                          "they do not apply to one sample (--key/--slot)")
    if plot and not one and not stats:
        raise ConfigError("--plot draws the statistics or one sample: drop --no-stats or give --key/--slot")


def inspect_report(path: str | Path, *, key: str | None = None, slot: int | None = None,
                   shards_dir: str | None = None, shard_range: str | None = None,
                   sample_views: int | None = None, seed: int = 0, stats: bool = True, plot: str | None = None,
                   label_issues: bool = False, top: int = 100, issues_csv: str | None = None,
                   html: str | None = None, progress: bool = True, workers: int = 1,
                   members: int = 0, teacher_checkpoint: str | None = None,
                   world: World | None = None) -> dict | None:
    """The report as data: {"summary", "stats" (None with stats=False or one sample), "sample"
    (one sample, by key or slot), "plot" (the figure written, when `plot` is given), "members"
    (with `members` N: the teachers re-run on N replayed views, checks/members.py),
    "label_issues" (label_issues.find_label_issues, with `label_issues` or `html`), "html" (the
    page written to the folder `html`)}. Under torchrun the ranks share the shards; rank 0
    returns the report, the others None."""
    validate_request(key=key, slot=slot, shard_range=shard_range, sample_views=sample_views, stats=stats,
                     plot=plot, label_issues=label_issues, html=html, issues_csv=issues_csv)
    one = key is not None or slot is not None
    world = world or init_world()
    if html:  # the galleries need the shards: refuse before the long passes
        on_main(world, lambda: shards_for(schema.open_cache(path)[1], shards_dir) and None)
    st = issues = None
    if stats and not one:  # every rank takes part
        st = teacher_stats(path, shard_range=shard_range, sample_views=sample_views, seed=seed,
                           progress=progress, workers=workers, world=world)
    if label_issues or html:
        from usi_cache.checks.inspect.label_issues import find_label_issues
        issues = find_label_issues(path, top=top, shard_range=shard_range, progress=progress, workers=workers,
                                   world=world)
    if not world.is_main:
        return None
    report = {"summary": summarize(path, shards_dir), "stats": st, "sample": None, "plot": None,
              "label_issues": issues, "html": None}
    if members:
        report["members"] = _members(path, shards_dir, members, teacher_checkpoint, seed)
    if issues_csv:
        from usi_cache.checks.inspect.label_issues import write_csv
        issues["csv"] = write_csv(issues["issues"], issues_csv)
    if html:
        from usi_cache.checks.inspect.html import write_html
        report["html"] = write_html(report, path, html, shards_dir)
    if one:
        report["sample"] = sample_info(path, find_slot(path, key=key, slot=slot))
    if plot:
        report["plot"] = _plot(report, path, shards_dir, plot)
    return report


def _plot(report: dict, path, shards_dir, plot: str) -> str:
    """Draw the report's sample (its views replayed) or its statistics to `plot`."""
    if report["sample"] is None:
        from usi_cache.checks.inspect.figures import plot_stats
        return str(plot_stats(report["stats"], report["summary"], plot))
    sample = report["sample"]
    if not sample["views"]:
        raise schema.CacheError(f"slot {sample['slot']}: {sample['status']}, nothing to plot")
    from usi_cache.checks.inspect.figures import plot_sample
    image, views = replay_sample(path, sample, shards_dir)
    t = report["summary"]["teacher"]
    return str(plot_sample(sample, image, views, plot, title=f"{storage.basename(path)}: teacher {t['name']}, "
                                                             f"views replayed at {t['input_size']} px"))


def _members(path, shards_dir, n: int, checkpoint, seed: int) -> dict:
    """Re-run the cache's teachers (each member of an ensemble) on n replayed views: agreement."""
    from usi_cache.checks.common import shards_for
    from usi_cache.checks.members import member_agreement
    from usi_cache.models.ensemble import load_cache_ensemble
    group, attrs = schema.open_cache(path)
    ensemble, mismatch = load_cache_ensemble(attrs, checkpoint)
    if mismatch:
        raise schema.CacheError(mismatch)
    return member_agreement(group, attrs, shards_for(attrs, shards_dir), ensemble, n, seed)


def run_inspect(path: str | Path, *, as_json: bool = False, world: World | None = None, **options) -> str:
    """`usi inspect`: the report as text (or JSON), writing the figure to `plot` when given;
    `options` are those of `inspect_report`. Rank 0 alone reports ("" elsewhere)."""
    report = inspect_report(path, world=world, **options)
    return "" if report is None else format_report(report, as_json)
