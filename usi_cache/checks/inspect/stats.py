"""The teacher statistics of `usi inspect`, as plain data: agreement with the ground truth,
confidence, tail mass, entropy, calibration, the worst classes and the confusions.

Statistics are streamed one WebDataset shard's block at a time (bounded memory whatever the
cache size) and only over committed shards. Slots with label -1 (empty or undecodable) are
left out. Probabilities come from the cached top-k log-probabilities (`schema.log_probs`, which
also reads the raw logits of schema 1-2 caches): p_i = exp(log p_i), the *tail* (rest) mass is
r = 1 - sum_i p_i, and the entropy is taken over the k + 1 buckets (the k classes plus the rest
bucket), which is a lower bound of the teacher's full C-class entropy (equal when k = C).
Nothing here formats: text.py and figures.py render the dict `teacher_stats` returns.
"""
from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path

import numpy as np

from usi_cache import cache_format as schema
from usi_cache.dist import World, init_world, map_shards, on_main
from usi_cache.checks.common import PROGRESS_MIN_SHARDS
from usi_cache.checks.common import sample_slot_views, valid_positions

TOP5 = 5  # "top-5" agreement; top-min(5, k) when the cache keeps fewer than 5 classes
WORST = 10  # classes listed as the teacher's worst
CONFUSIONS = 10  # most frequent (ground truth -> top-1) confusions listed
HIST_BINS = 50  # histogram bins of top-1 probability and of tail mass, over [0, 1]
RELIABILITY_BINS = 15  # confidence bins of the reliability diagram, over [0, 1]
ENTROPY_NOTE = "entropy over the k+1 buckets (top-k classes + rest mass), in nats"


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
    uniform sample of `sample_views` (slot, view) pairs, `common.sample_slot_views`). Reads
    one shard's block at a time, in `workers` processes on each torchrun rank; returns the
    statistics on rank 0 (None on the others). Each shard is counted into its own accumulator
    and rank 0 adds them up in shard order, so the floating-point sums do not depend on the
    worker count or world size."""
    world = world or init_world()
    path = str(path)
    scope = on_main(world, functools.partial(_stats_scope, path, shard_range, sample_views, seed))
    parts = map_shards(_shard_stats, list(scope["picks"]), functools.partial(_open_stats, path, scope["picks"]),
                       world=world, workers=workers, progress=progress and len(scope["picks"]) >= PROGRESS_MIN_SHARDS,
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
    (None: every view of every valid slot; else (positions, views))."""
    group, attrs = schema.open_cache(path)
    layout = schema.Layout.from_attrs(attrs)
    selected = parse_shard_range(shard_range, layout.num_shards)
    if sample_views is not None and sample_views < 1:
        raise schema.CacheError(f"--sample-views: expected a positive number, got {sample_views}")
    valid, incomplete = {}, []
    for i in selected:
        positions = valid_positions(group, layout, i)
        if positions is None:
            incomplete.append(i)
        else:
            valid[i] = positions
    picks: dict = {i: None for i in valid}
    if sample_views is not None and sample_views < sum(len(p) for p in valid.values()) * layout.views:
        picks = sample_slot_views(valid, layout.views, sample_views, seed)
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
        slot_idx, view_idx = picks[i]
    acc = StatsAccumulator(layout.num_classes, layout.views, layout.topk)
    acc.samples += len(np.unique(slot_idx))
    if len(slot_idx):
        classes = schema.read_array(group, "classes", rows)
        log_p = schema.log_probs(schema.read_array(group, "logits", rows),
                                 schema.read_array(group, "lse", rows), layout)
        acc.add(lab[slot_idx], view_idx, classes[slot_idx, view_idx], log_p[slot_idx, view_idx])
    return acc, excluded
