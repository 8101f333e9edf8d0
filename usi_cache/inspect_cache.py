"""`usi inspect`: what a cache holds, how good its teacher is, and what one sample's views were.

Everything is computed into plain dicts first (`summarize`, `teacher_stats`, `sample_info`);
the text report (`format_*`), the `--json` output and the plots (`plots.py`) are all rendered
from those dicts, so the three always show the same numbers.

Statistics are streamed one WebDataset shard's block at a time (bounded memory whatever the
cache size) and only over committed shards. Slots with label -1 (empty or undecodable) are
left out. Probabilities come from the cached top-k log-probabilities (`schema.log_probs`, which
also reads the raw logits of schema 1-2 caches): p_i = exp(log p_i), the *tail* (rest) mass is
r = 1 - sum_i p_i, and the entropy is taken
over the k + 1 buckets (the k classes plus the rest bucket), which is a lower bound of the
teacher's full C-class entropy (equal when k = C).
"""
from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path

import numpy as np

from . import replay_check, schema, storage
from .dist import World, init_world, map_shards, on_main
from .mixing import CUTMIX, MIXUP, NO_MIX
from .randaugment import GEOMETRIC_OPS
from .shards import Manifest, ShardError, load_manifest
from .render import render, render_stored, shard_images, stored_view
from .views import decode_view

TOP5 = 5  # "top-5" agreement; top-min(5, k) when the cache keeps fewer than 5 classes
WORST = 10  # classes listed as the teacher's worst
CONFUSIONS = 10  # most frequent (ground truth -> top-1) confusions listed
HIST_BINS = 50  # histogram bins of top-1 probability and of tail mass, over [0, 1]
RELIABILITY_BINS = 15  # confidence bins of the reliability diagram, over [0, 1]
ENTROPY_NOTE = "entropy over the k+1 buckets (top-k classes + rest mass), in nats"
BIG = 8  # show a progress bar when reading at least this many shards


# ---------------------------------------------------------------------------------------------
# small helpers shared with verify.py


def bucket_probs(log_p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-k probabilities p (..., k) and rest mass r (...), float64, from log p (..., k).
    r = -expm1(log sum p): no cancellation when the tail is small; clamped at 0."""
    log_p = log_p.astype(np.float64)
    rest = -np.expm1(np.logaddexp.reduce(log_p, axis=-1))
    return np.exp(log_p), np.clip(rest, 0.0, None)


def bucket_entropy(p: np.ndarray, rest: np.ndarray) -> np.ndarray:
    """Entropy (nats) over the k+1 buckets: -sum p log p - r log r, with 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(-1)
        h -= np.where(rest > 0, rest * np.log(rest), 0.0)
    return h


def parse_shard_range(text: str | None, num_shards: int) -> range:
    """'A:B' (B exclusive), 'A:', ':B' or 'A' -> a range of shard indices inside the cache."""
    if text is None:
        return range(num_shards)
    try:
        if ":" in text:
            a, b = text.split(":", 1)
            start = int(a) if a.strip() else 0
            stop = int(b) if b.strip() else num_shards
        else:
            start = int(text)
            stop = start + 1
    except ValueError:
        raise schema.CacheError(f"--shard-range: expected A:B (shard indices), got {text!r}") from None
    if not 0 <= start < stop <= num_shards:
        raise schema.CacheError(f"--shard-range {text}: the cache has shards 0..{num_shards - 1} "
                                f"(A:B selects shards A..B-1)")
    return range(start, stop)


def shards_for(attrs: dict, shards_dir: str | Path | None) -> Manifest:
    """The shard folder's manifest, refused (naming the field) unless it is the cache's dataset."""
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


def _ranges(indices) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    out, run = [], []
    for i in indices:
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else f"{run[0]}")
        run = [i]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else f"{run[0]}")
    return ", ".join(out)


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
    t = attrs["teacher"]
    return {
        "cache": str(path),
        "schema_version": attrs["schema_version"],
        "tool_version": attrs["tool_version"],
        "created": attrs["created"],
        "teacher": {"name": t["name"], "checkpoint": t.get("checkpoint"),
                    "checkpoint_sha256": t.get("checkpoint_sha256"), "input_size": t["input_size"],
                    "mean": t["mean"], "std": t["std"], "interpolation": t.get("interpolation"),
                    "precision": t.get("precision")},  # None: not recorded (schema < 3)
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
        "audit": attrs.get("audit"),  # the top-k fidelity table (audit.py), when one was run
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


def format_summary(s: dict) -> str:
    t, d, c = s["teacher"], s["dataset"], s["completeness"]
    missing = f"; missing: shard {_ranges(c['missing'])}" if c["missing"] else ""
    inv = s["invalid"]
    shown = ", ".join(inv["keys"][:5]) + (" ..." if len(inv["keys"]) > 5 else "")
    spec = s["view_spec"]
    rows = [
        ("cache", s["cache"]),
        ("schema", f"version {s['schema_version']}, written by usi-cache {s['tool_version']} on {s['created']}"),
        ("teacher", f"{t['name']}, checkpoint sha256 {t['checkpoint_sha256'] or 'none (random or pretrained weights)'}"),
        ("teacher input", f"{t['input_size']} px, mean {_triple(t['mean'])}, std {_triple(t['std'])}, "
                          f"forward in {t['precision'] or 'unrecorded precision'}"),
        ("dataset", f"{d['samples']} samples in {d['shards']} shards of {d['per_shard']}, {d['num_classes']} classes, "
                    f"fingerprint {d['fingerprint'][:12]}"),
        ("views", f"V = {s['views']} per sample, top k = {s['topk']} logits per view, seed {s['seed']}"),
        ("view spec", f"scale {spec['scale']}, ratio [{spec['ratio'][0]:.3g}, {spec['ratio'][1]:.3g}], "
                      f"hflip {spec['hflip']}, {spec['randaugment'] or 'no RandAugment'}, {spec['interpolation']}"),
        ("shards", f"{c['complete']}/{c['total']} complete{missing}"),
        ("invalid samples", f"{inv['count']}" + (f" ({shown})" if inv["keys"] else "")),
        ("size on disk", f"{s['disk']['total'] / 1e6:.3f} MB, {_num(s['disk']['bytes_per_view'], 1)} bytes per view "
                         f"({s['disk']['cached_views']} views)"),
        ("replay", f"made with {s['replay']['recorded'] or 'unrecorded decoders'}; here {s['replay']['here']}: "
                   f"{s['replay']['pixels']}"),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    per = [f"{n} {s['disk']['bytes'][n] / 1e3:.1f} kB = {_num(s['disk']['bytes_per_view_by_array'][n], 1)} B/view"
           for n in schema.ARRAYS]
    for i in range(0, len(per), 4):
        lines.append(f"{'per array' if i == 0 else '':<{width}}  " + ", ".join(per[i:i + 4]))
    if s.get("audit"):
        from .audit import format_audit
        lines.append(format_audit(s["audit"]))
    return "\n".join(lines)


def _triple(v) -> str:
    return "(" + ", ".join(f"{x:.4g}" for x in v) + ")"


def _num(x, digits: int) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


# ---------------------------------------------------------------------------------------------
# teacher statistics


class StatsAccumulator:
    """Running sums for the teacher statistics; `add` takes one batch of views, memory is O(C + bins)."""

    def __init__(self, num_classes: int, views: int, topk: int):
        self.C, self.V, self.k = num_classes, views, topk
        self.m = min(TOP5, topk)
        self.n_view = np.zeros(views, np.int64)
        self.top1_view = np.zeros(views, np.int64)
        self.topm_view = np.zeros(views, np.int64)
        self.conf_view = np.zeros(views, np.float64)
        self.mass = self.tail = self.entropy = 0.0
        self.class_n = np.zeros(num_classes, np.int64)
        self.class_top1 = np.zeros(num_classes, np.int64)
        self.confusions: Counter = Counter()
        self.edges = np.linspace(0.0, 1.0, HIST_BINS + 1)
        self.hist_top1 = np.zeros(HIST_BINS, np.int64)
        self.hist_tail = np.zeros(HIST_BINS, np.int64)
        self.rel_n = np.zeros(RELIABILITY_BINS, np.int64)
        self.rel_conf = np.zeros(RELIABILITY_BINS, np.float64)
        self.rel_acc = np.zeros(RELIABILITY_BINS, np.int64)
        self.samples = 0

    def add(self, labels: np.ndarray, view: np.ndarray, classes: np.ndarray, log_p: np.ndarray) -> None:
        """labels, view: (n,) ground truth (>= 0) and view index; classes, log_p: (n, k)."""
        if len(labels) == 0:
            return
        labels = labels.astype(np.int64)
        classes = classes.astype(np.int64)
        p, rest = bucket_probs(log_p)
        top1 = classes[:, 0] == labels
        topm = (classes[:, :self.m] == labels[:, None]).any(1)
        conf = p[:, 0]
        np.add.at(self.n_view, view, 1)
        np.add.at(self.top1_view, view, top1)
        np.add.at(self.topm_view, view, topm)
        np.add.at(self.conf_view, view, conf)
        self.mass += float(np.minimum(p.sum(1), 1.0).sum())  # rounding can push the sum a hair above 1
        self.tail += float(rest.sum())
        self.entropy += float(bucket_entropy(p, rest).sum())
        self.class_n += np.bincount(labels, minlength=self.C)
        self.class_top1 += np.bincount(labels[top1], minlength=self.C)
        wrong = ~top1
        pairs, counts = np.unique(labels[wrong] * self.C + classes[wrong, 0], return_counts=True)
        self.confusions.update(dict(zip(pairs.tolist(), counts.tolist())))
        self.hist_top1 += np.histogram(np.clip(conf, 0, 1), self.edges)[0]
        self.hist_tail += np.histogram(np.clip(rest, 0, 1), self.edges)[0]
        b = np.clip((conf * RELIABILITY_BINS).astype(np.int64), 0, RELIABILITY_BINS - 1)
        self.rel_n += np.bincount(b, minlength=RELIABILITY_BINS)
        self.rel_conf += np.bincount(b, weights=conf, minlength=RELIABILITY_BINS)
        self.rel_acc += np.bincount(b, weights=top1, minlength=RELIABILITY_BINS).astype(np.int64)

    def merge(self, other: StatsAccumulator) -> None:
        """Add another accumulator's counts and sums (merge in a fixed order for fixed float sums)."""
        for name in ("n_view", "top1_view", "topm_view", "conf_view", "class_n", "class_top1", "hist_top1",
                     "hist_tail", "rel_n", "rel_conf", "rel_acc"):
            getattr(self, name).__iadd__(getattr(other, name))
        self.mass += other.mass
        self.tail += other.tail
        self.entropy += other.entropy
        self.confusions.update(other.confusions)
        self.samples += other.samples

    def result(self, class_names: list[str]) -> dict:
        n = int(self.n_view.sum())
        div = max(n, 1)
        label = f"top-{TOP5}" if self.m == TOP5 else f"top-{self.m} (k = {self.k} < {TOP5}: this is top-k)"
        per_class = [(c, int(self.class_n[c]), int(self.class_top1[c])) for c in range(self.C) if self.class_n[c]]
        per_class.sort(key=lambda x: (x[2] / x[1], -x[1], x[0]))
        ranked = sorted(self.confusions.items(), key=lambda kv: (-kv[1], kv[0]))
        most_predicted: dict[int, tuple[int, int]] = {}  # true class -> (most frequent wrong top-1, views)
        for pair, count in ranked:
            most_predicted.setdefault(pair // self.C, (pair % self.C, count))
        worst = []
        for c, cn, c1 in per_class[:WORST]:
            pred = most_predicted.get(c)
            worst.append({"class": c, "name": class_names[c], "views": cn, "top1_agreement": c1 / cn,
                          "most_confused_with": None if pred is None else class_names[pred[0]],
                          "most_confused_views": 0 if pred is None else pred[1]})
        confusions = []
        for pair, count in ranked[:CONFUSIONS]:
            t, pred = divmod(pair, self.C)
            confusions.append({"true": t, "true_name": class_names[t], "predicted": pred,
                               "predicted_name": class_names[pred], "views": count,
                               "share_of_true_class": count / int(self.class_n[t])})
        rel_bins = []
        ece = 0.0
        for b in range(RELIABILITY_BINS):
            nb = int(self.rel_n[b])
            cb = self.rel_conf[b] / nb if nb else None
            ab = self.rel_acc[b] / nb if nb else None
            if nb:
                ece += nb / div * abs(ab - cb)
            rel_bins.append({"lo": b / RELIABILITY_BINS, "hi": (b + 1) / RELIABILITY_BINS, "views": nb,
                             "confidence": cb, "accuracy": ab})
        return {
            "views": n,
            "samples": self.samples,
            "top1_agreement": int(self.top1_view.sum()) / div if n else None,
            "top5_agreement": int(self.topm_view.sum()) / div if n else None,
            "top5_k_used": self.m,
            "top5_label": label,
            "per_view": [{"view": v, "views": int(self.n_view[v]),
                          "top1_agreement": self.top1_view[v] / self.n_view[v] if self.n_view[v] else None,
                          "top5_agreement": self.topm_view[v] / self.n_view[v] if self.n_view[v] else None,
                          "mean_top1_prob": self.conf_view[v] / self.n_view[v] if self.n_view[v] else None}
                         for v in range(self.V)],
            "mean_top1_prob": float(self.conf_view.sum()) / div if n else None,
            "mean_topk_mass": self.mass / div if n else None,
            "mean_tail_mass": self.tail / div if n else None,
            "mean_entropy_nats": self.entropy / div if n else None,
            "max_entropy_nats": float(np.log(self.k + 1)),
            "entropy_note": ENTROPY_NOTE,
            "worst_classes": worst,
            "confusions": confusions,
            "histograms": {"edges": self.edges.tolist(), "top1_prob": self.hist_top1.tolist(),
                           "tail_mass": self.hist_tail.tolist()},
            "reliability": {"bins": rel_bins, "ece": ece if n else None},
        }


def teacher_stats(path: str | Path, *, shard_range: str | None = None, sample_views: int | None = None,
                  seed: int = 0, progress: bool = True, workers: int = 1, world: World | None = None) -> dict | None:
    """Teacher statistics over the committed shards in `shard_range` (all views, or a seeded
    uniform sample of `sample_views` (slot, view) pairs). Reads one shard's block at a time, in
    `workers` processes on each torchrun rank; returns the statistics on rank 0 (None on the
    others). Each shard is counted into its own accumulator and rank 0 adds them up in shard
    order, so the floating-point sums do not depend on the worker count or world size."""
    world = world or init_world()
    path = str(path)
    scope = on_main(world, functools.partial(_stats_scope, path, shard_range, sample_views, seed))
    parts = map_shards(_shard_stats, list(scope["picks"]), functools.partial(_open_stats, path, scope["picks"]),
                       world=world, workers=workers, progress=progress and len(scope["picks"]) >= BIG,
                       desc="teacher statistics")
    if not world.is_main:
        return None
    layout = scope["layout"]
    acc = StatsAccumulator(layout.num_classes, layout.views, layout.topk)
    excluded = 0
    for part, invalid in parts:  # in shard order
        acc.merge(part)
        excluded += invalid
    out = acc.result(scope["classes"])
    out["scope"] = {"shards": scope["shards"], "shards_read": len(parts),
                    "incomplete_skipped": scope["incomplete"], "sample_views": sample_views,
                    "seed": seed if sample_views is not None else None,
                    "invalid_excluded": excluded}
    return out


def _stats_scope(path: str, shard_range: str | None, sample_views: int | None, seed: int) -> dict:
    """Rank 0: the committed shards to read and, per shard, the (slot, view) pairs to count
    (None: every view of every valid slot; else indices into its valid slots x views)."""
    group, attrs = schema.open_cache(path)
    layout = schema.Layout.from_attrs(attrs)
    selected = parse_shard_range(shard_range, layout.num_shards)
    if sample_views is not None and sample_views < 1:
        raise schema.CacheError(f"--sample-views: expected a positive number, got {sample_views}")
    valid = {}
    incomplete = []
    for i in selected:
        lab = schema.read_array(group, schema.COMMIT_ARRAY, layout.rows(i))
        if (lab == schema.NOT_WRITTEN).any():
            incomplete.append(i)
        else:
            valid[i] = int((lab >= 0).sum())
    picks: dict[int, np.ndarray | None] = {i: None for i in valid}
    total = sum(valid.values()) * layout.views
    if sample_views is not None and sample_views < total:
        chosen = np.sort(np.random.default_rng(seed).choice(total, sample_views, replace=False))
        picks, start = {}, 0
        for i, n in valid.items():
            n *= layout.views
            mine = chosen[(chosen >= start) & (chosen < start + n)] - start
            if len(mine):
                picks[i] = mine
            start += n
    return {"picks": picks, "incomplete": incomplete, "shards": [selected.start, selected.stop],
            "layout": layout, "classes": list(attrs["dataset"]["classes"])}


def _open_stats(path: str, picks: dict) -> tuple:
    group, attrs = schema.open_cache(path)
    return group, attrs, schema.Layout.from_attrs(attrs), picks


def _shard_stats(state: tuple, i: int) -> tuple[StatsAccumulator, int]:
    """Shard i's statistics and its number of invalid samples (label -1)."""
    group, attrs, layout, picks = state
    rows = layout.rows(i)
    lab = schema.read_array(group, schema.COMMIT_ARRAY, rows)
    valid = np.flatnonzero(lab >= 0)
    excluded = int(attrs["dataset"]["shards"][i]["count"]) - len(valid)
    if picks[i] is None:
        slot_idx = np.repeat(valid, layout.views)
        view_idx = np.tile(np.arange(layout.views), len(valid))
    else:
        slot_idx, view_idx = valid[picks[i] // layout.views], picks[i] % layout.views
    acc = StatsAccumulator(layout.num_classes, layout.views, layout.topk)
    acc.samples += len(np.unique(slot_idx))
    if len(slot_idx):
        classes = schema.read_array(group, "classes", rows)
        log_p = schema.log_probs(schema.read_array(group, "logits", rows),
                                 schema.read_array(group, "lse", rows), layout)
        acc.add(lab[slot_idx], view_idx, classes[slot_idx, view_idx], log_p[slot_idx, view_idx])
    return acc, excluded


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f} %"


def format_stats(st: dict, k: int) -> str:
    sc = st["scope"]
    where = f"shards {sc['shards'][0]}..{sc['shards'][1] - 1}"
    if sc["sample_views"] is not None:
        where += f", a random sample of {sc['sample_views']} views (seed {sc['seed']})"
    lines = [f"teacher statistics ({where}): {st['views']} views of {st['samples']} samples; "
             f"{sc['invalid_excluded']} invalid sample(s) (label -1) excluded"]
    if sc["incomplete_skipped"]:
        lines.append(f"  incomplete shards skipped: {_ranges(sc['incomplete_skipped'])}")
    if not st["views"]:
        lines.append("  no committed views to measure")
        return "\n".join(lines)
    rows = [
        ("top-1 agreement with ground truth", _pct(st["top1_agreement"])),
        (st["top5_label"] + " agreement", _pct(st["top5_agreement"])),
        ("mean top-1 probability", f"{st['mean_top1_prob']:.4f}"),
        ("mean top-k probability mass", f"{st['mean_topk_mass']:.4f} (k = {k}; the tail holds "
                                        f"{st['mean_tail_mass']:.4f})"),
        ("mean entropy", f"{st['mean_entropy_nats']:.4f} nats (max log(k+1) = {st['max_entropy_nats']:.3f}; "
                         f"{ENTROPY_NOTE.split(', in nats')[0]})"),
        ("expected calibration error", f"{st['reliability']['ece']:.4f} ({RELIABILITY_BINS} bins)"),
    ]
    width = max(len(r[0]) for r in rows)
    lines += [f"  {name:<{width}}  {value}" for name, value in rows]
    lines.append("  per view index:  view   views   top-1    " + st["top5_label"].split(" ")[0] + "    mean top-1 prob")
    for pv in st["per_view"]:
        lines.append(f"                   {pv['view']:>4}  {pv['views']:>6}  {_pct(pv['top1_agreement']):>8}  "
                     f"{_pct(pv['top5_agreement']):>8}  {_num(pv['mean_top1_prob'], 4):>8}")
    lines.append(f"  the {len(st['worst_classes'])} classes the teacher is worst at (top-1 agreement, views, "
                 f"most often mistaken for):")
    for w in st["worst_classes"]:
        other = f"{w['most_confused_with']} ({w['most_confused_views']})" if w["most_confused_with"] else "-"
        lines.append(f"    {w['class']:>5}  {w['name']:<24} {_pct(w['top1_agreement']):>8}  {w['views']:>7}  {other}")
    lines.append("  most frequent confusions (ground truth -> teacher's top-1, views, share of that class):")
    for c in st["confusions"]:
        lines.append(f"    {c['true_name']} -> {c['predicted_name']}: {c['views']} "
                     f"({100 * c['share_of_true_class']:.1f} %)")
    return "\n".join(lines)


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


def format_sample(s: dict) -> str:
    head = (f"sample {s['key'] or '(empty)'}: slot {s['slot']} (shard {s['shard']}, position {s['position']}), "
            f"ground truth {s['label']}" + (f" {s['label_name']}" if s["label_name"] else f" ({s['status']})"))
    lines = [head]
    if not s["views"]:
        lines.append("  no views: " + {"not written": "this shard has not been committed yet",
                                       "empty slot": "no sample at this position (past the shard's end)",
                                       "undecodable image": "the image did not decode in stage 1"}[s["status"]])
        return "\n".join(lines)
    for v in s["views"]:
        b = v["box"]
        ops = ", ".join(f"{o['op']} {o['level']:+.2f}" + (f" ({o['resample']})" if o["resample"] else "")
                        for o in v["ops"]) or "none"
        lines.append(f"  view {v['view']}: crop top {b['top']} left {b['left']} height {b['height']} width "
                     f"{b['width']}, flip {'yes' if v['flip'] else 'no'}, RandAugment: {ops}")
        mix = v.get("mix")
        if mix and mix["kind"] != "none":
            box = (f", box (top, left, bottom, right) {tuple(round(f, 3) for f in mix['box'])} of the side"
                   if mix["box"] else "")
            lines.append(f"    mixed ({mix['kind']}, lambda {mix['lam']:.3f}{box}) with view {v['view']} of "
                         f"{mix['partner_key']} (slot {mix['partner_slot']}, ground truth "
                         f"{mix['partner_label_name']}); the top-k below is the teacher's on the mixed image")
        elif mix:
            lines.append("    not mixed (paired cache: this view was drawn without a partner)")
        for r, t in enumerate(v["topk"], 1):
            mark = "  <- ground truth" if t["class"] == s["label"] else ""
            lines.append(f"    {r:>3}. {t['name']:<24} p = {t['prob']:.4f}  (logit {t['logit']:+.3f}){mark}")
        lines.append(f"         rest (outside the top {len(v['topk'])}) = {v['tail_mass']:.4f}; entropy "
                     f"{v['entropy_nats']:.3f} nats over the k+1 buckets")
    return "\n".join(lines)


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
    spec, size = schema.view_spec(attrs), int(attrs["teacher"]["input_size"])
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


def run_inspect(path: str | Path, *, key: str | None = None, slot: int | None = None,
                shards_dir: str | None = None, shard_range: str | None = None, sample_views: int | None = None,
                seed: int = 0, stats: bool = True, plot: str | None = None, as_json: bool = False,
                progress: bool = True, workers: int = 1, world: World | None = None) -> str:
    """`usi inspect`: the report as text (or JSON), writing the figure to `plot` when given.
    Under torchrun the ranks share the statistics' shards and rank 0 alone reports ("" elsewhere)."""
    import json

    import click
    one = key is not None or slot is not None
    if key is not None and slot is not None:
        raise click.UsageError("give --key or --slot, not both")
    if one and (shard_range is not None or sample_views is not None):
        raise click.UsageError("--shard-range and --sample-views restrict the statistics; "
                               "they do not apply to one sample (--key/--slot)")
    world = world or init_world()
    st = None
    if stats and not one:  # every rank takes part
        st = teacher_stats(path, shard_range=shard_range, sample_views=sample_views, seed=seed,
                           progress=progress, workers=workers, world=world)
    if not world.is_main:
        return ""
    report = {"summary": summarize(path, shards_dir), "stats": None, "sample": None, "plot": None}
    if one:
        report["sample"] = sample_info(path, find_slot(path, key=key, slot=slot))
        if plot:
            if not report["sample"]["views"]:
                raise schema.CacheError(f"slot {report['sample']['slot']}: {report['sample']['status']}, "
                                        "nothing to plot")
            from .plots import plot_sample
            image, views = replay_sample(path, report["sample"], shards_dir)
            t = report["summary"]["teacher"]
            report["plot"] = str(plot_sample(report["sample"], image, views, plot,
                                             title=f"{storage.basename(path)}: teacher {t['name']}, "
                                                   f"views replayed at {t['input_size']} px"))
    elif stats:
        report["stats"] = st
        if plot:
            from .plots import plot_stats
            report["plot"] = str(plot_stats(report["stats"], report["summary"], plot))
    elif plot:
        raise click.UsageError("--plot draws the statistics or one sample: drop --no-stats or give --key/--slot")
    if as_json:
        return json.dumps(report, indent=1)
    parts = [format_summary(report["summary"])]
    if report["stats"] is not None:
        parts.append(format_stats(report["stats"], report["summary"]["topk"]))
    if report["sample"] is not None:
        parts.append(format_sample(report["sample"]))
    if report["plot"]:
        parts.append(f"plot written to {report['plot']}")
    return "\n\n".join(parts)
