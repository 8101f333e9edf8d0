"""Label issues by confident learning over a cache: which given labels the teacher rejects.

Confident learning (Northcutt, Jiang and Chuang, "Confident learning: estimating uncertainty in
dataset labels", JAIR 2021; the method of cleanlab) from the cache alone, streamed one
WebDataset shard's block at a time:

* **The teacher's row of a sample** is its class probabilities averaged over the sample's V
  views. Each view holds its top-k probabilities p_i = exp(log p_i) and the tail mass
  r = 1 - sum_i p_i; a class outside a view's top-k gets the uniform share r / (C - k) of that
  view's tail (0 when k = C), the stand-in for the dense row that the cache does not keep:
  ``row_j = mean_v (p_vj if j in top-k_v else r_v / (C - k))``. `shard_rows` builds these rows
  for one shard (S x C floats: one shard, never the dataset).
* **Pass 1: thresholds.** t_j = the mean self-confidence of class j, the mean of row_j over
  the samples whose given label is j. Per-class sums travel; the per-class table of the HTML
  report and the least confident samples come from the same pass.
* **Pass 2: the confident joint.** A sample is *confidently* of class j when row_j >= t_j; of
  several such classes the one with the largest row_j (cleanlab's rule). C[given, j] counts
  these; a sample whose confident class is not its given label is a **label issue** (the
  off-diagonal of the confident joint: cleanlab's ``filter_by="confident_learning"``).
  A sample that no class claims (every row_j < t_j) is left out of the joint by cleanlab,
  which misses flipped labels whose true class has a high threshold (an easy class at 0.85
  when its mean is 0.9); here such a sample is an issue too when its top class is not its
  label (`unclaimed=True`, the default; `unclaimed=False` is cleanlab's rule exactly).
* **Score.** Issues are ranked by the self-confidence row_given, lowest first (cleanlab's
  default ``rank_by="self_confidence"``), ties by slot. The normalised margin
  row_given - max_{j != given} row_j is reported beside it.

Memory is flat in the dataset size: per-class sums (O(C)), the sparse off-diagonal of the
confident joint, and bounded lists of candidates (the `top` lowest scores of each shard,
merged into the `top` lowest overall). The shards are spread over `--workers` processes and
torchrun ranks by `dist.map_shards`; per-shard results are merged in shard order, so the
output does not depend on the split. Slots with label -1 (empty or undecodable) and
uncommitted shards are left out.
"""
from __future__ import annotations

import csv
import functools
import heapq
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from usi_cache import cache_format as schema, storage
from usi_cache.dist import World, broadcast_object, init_world, map_shards, on_main
from usi_cache.checks.inspect.stats import bucket_probs, parse_shard_range
from usi_cache.checks.common import PROGRESS_MIN_SHARDS, valid_positions

TOP = 100  # label issues kept (lowest self-confidence first)
LEAST_CONFIDENT = 24  # least confident samples kept for the report's gallery
SCORE = ("self_confidence", "the mean probability the teacher gives the sample's label over its views, "
                            "lowest first")
CSV_FIELDS = ("rank", "slot", "key", "shard", "position", "given", "given_name", "teacher", "teacher_name",
              "p_given", "p_teacher", "margin", "views_agreeing_teacher", "views_agreeing_given", "claimed")


@dataclass
class ShardRows:
    """The valid samples of one shard, with their view-averaged probability rows."""

    shard: int
    positions: np.ndarray  # (n,) position in the shard
    slots: np.ndarray  # (n,) slot
    keys: np.ndarray  # (n,) str
    labels: np.ndarray  # (n,) int64 given labels
    rows: np.ndarray  # (n, C) float64: mean over views of p (top-k) or the uniform tail share
    top1: np.ndarray  # (n, V) int64: each view's top-1 class
    view_top1_prob: np.ndarray  # (n, V) float64
    tail: np.ndarray  # (n,) float64: mean tail mass over the views


def mean_rows(classes: np.ndarray, log_p: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows (n, C) float64: the class probabilities averaged over the views, from the top-k
    `classes` and log-probabilities `log_p` (n, V, k); outside a view's top-k a class gets the
    uniform share r_v / (C - k) of that view's tail mass r_v."""
    n, V, k = classes.shape
    p, rest = bucket_probs(log_p)  # (n, V, k), (n, V)
    share = rest / (num_classes - k) if num_classes > k else np.zeros_like(rest)
    rows = np.repeat(share.mean(1)[:, None], num_classes, 1)
    idx = np.repeat(np.arange(n), V * k)
    np.add.at(rows, (idx, classes.astype(np.int64).reshape(-1)), ((p - share[..., None]) / V).reshape(-1))
    return rows


def shard_rows(arrays, layout: schema.Layout, shard: int, positions: np.ndarray) -> ShardRows:
    """The rows of shard `shard`'s samples at `positions` (its valid ones). `arrays`: the
    cache's group or its `schema.open_arrays`."""
    rows = layout.rows(shard)
    classes = schema.read_array(arrays, "classes", rows)[positions]
    log_p = schema.log_probs(schema.read_array(arrays, "logits", rows),
                             schema.read_array(arrays, "lse", rows), layout)[positions]
    labels = schema.read_array(arrays, "labels", rows)[positions].astype(np.int64)
    keys = schema.read_array(arrays, "keys", rows)[positions]
    p, rest = bucket_probs(log_p)
    return ShardRows(shard=shard, positions=positions, slots=rows.start + positions,
                     keys=np.array([str(k) for k in keys], dtype=object), labels=labels,
                     rows=mean_rows(classes, log_p, layout.num_classes),
                     top1=classes[..., 0].astype(np.int64), view_top1_prob=p[..., 0], tail=rest.mean(1))


# ---------------------------------------------------------------------------------------------
# pass 1: per-class totals (thresholds, the per-class table) and the least confident samples


@dataclass
class ClassTotals:
    samples: np.ndarray  # (C,) samples with that given label
    self_conf: np.ndarray  # (C,) sum of row_given
    top1_prob: np.ndarray  # (C,) sum of the view-averaged top-1 probability
    correct: np.ndarray  # (C,) samples whose argmax row is the given label
    view_correct: np.ndarray  # (C,) views whose top-1 is the given label
    confusions: Counter  # (given * C + argmax) -> samples, argmax != given
    least: list  # [(confidence, slot, record)] the lowest, sorted

    @classmethod
    def empty(cls, C: int) -> "ClassTotals":
        z = functools.partial(np.zeros, C)
        return cls(z(np.int64), z(np.float64), z(np.float64), z(np.int64), z(np.int64), Counter(), [])

    def merge(self, other: "ClassTotals", keep: int) -> None:
        for name in ("samples", "self_conf", "top1_prob", "correct", "view_correct"):
            getattr(self, name).__iadd__(getattr(other, name))
        self.confusions.update(other.confusions)
        self.least = heapq.nsmallest(keep, self.least + other.least, key=lambda x: x[:2])


def _class_totals(state: tuple, shard: int) -> ClassTotals:
    arrays, layout, names, keep = state
    positions = valid_positions(arrays, layout, shard)
    out = ClassTotals.empty(layout.num_classes)
    if positions is None or not len(positions):
        return out
    s = shard_rows(arrays, layout, shard, positions)
    C = layout.num_classes
    given = s.labels
    best = s.rows.argmax(1)
    conf = s.rows.max(1)
    out.samples += np.bincount(given, minlength=C)
    out.self_conf += np.bincount(given, weights=s.rows[np.arange(len(given)), given], minlength=C)
    out.top1_prob += np.bincount(given, weights=s.view_top1_prob.mean(1), minlength=C)
    out.correct += np.bincount(given[best == given], minlength=C)
    out.view_correct += np.bincount(given, weights=(s.top1 == given[:, None]).sum(1), minlength=C).astype(np.int64)
    wrong = best != given
    out.confusions.update(Counter((given[wrong] * C + best[wrong]).tolist()))
    if keep:
        order = np.lexsort((s.slots, conf))[:keep]
        out.least = [(float(conf[i]), int(s.slots[i]), _record(s, i, int(best[i]), names)) for i in order]
    return out


def _record(s: ShardRows, i: int, teacher: int, names: list[str]) -> dict:
    """One sample as the report lists it."""
    row, given = s.rows[i], int(s.labels[i])
    others = np.delete(row, given)
    return {"slot": int(s.slots[i]), "key": s.keys[i], "shard": s.shard, "position": int(s.positions[i]),
            "given": given, "given_name": names[given], "teacher": teacher, "teacher_name": names[teacher],
            "p_given": float(row[given]), "p_teacher": float(row[teacher]),
            "margin": float(row[given] - (others.max() if len(others) else 0.0)),
            "views_agreeing_teacher": float((s.top1[i] == teacher).mean()),
            "views_agreeing_given": float((s.top1[i] == given).mean()),
            "tail_mass": float(s.tail[i])}


# ---------------------------------------------------------------------------------------------
# pass 2: the confident joint and the ranked issues


def confident_classes(rows: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Per row the confident class: argmax of row_j over the classes with row_j >= t_j, or -1
    when there is none (a class without samples has no threshold: t = inf)."""
    above = rows >= thresholds[None, :]
    masked = np.where(above, rows, -np.inf)
    out = masked.argmax(1)
    out[~above.any(1)] = -1
    return out


def _issues(state: tuple, shard: int) -> tuple[Counter, int, int, list]:
    """Shard's off-diagonal confident joint, its count of confidently counted samples, its
    count of unclaimed issues, and its `top` issues with the lowest scores."""
    arrays, layout, names, thresholds, top, unclaimed = state
    positions = valid_positions(arrays, layout, shard)
    if positions is None or not len(positions):
        return Counter(), 0, 0, []
    s = shard_rows(arrays, layout, shard, positions)
    conf = confident_classes(s.rows, thresholds)
    counted = conf >= 0
    joint_issue = counted & (conf != s.labels)
    C = layout.num_classes
    joint = Counter((s.labels[joint_issue] * C + conf[joint_issue]).tolist())
    teacher = np.where(counted, conf, s.rows.argmax(1))  # unclaimed: the top class
    loose = ~counted & (teacher != s.labels) if unclaimed else np.zeros_like(counted)
    idx = np.flatnonzero(joint_issue | loose)
    score = s.rows[idx, s.labels[idx]]
    order = idx[np.lexsort((s.slots[idx], score))][:top]
    found = [(float(s.rows[i, s.labels[i]]), int(s.slots[i]),
              {**_record(s, i, int(teacher[i]), names), "claimed": bool(counted[i])}) for i in order]
    return joint, int(counted.sum()), int(loose.sum()), found


# ---------------------------------------------------------------------------------------------
# the whole computation


def find_label_issues(path: str | Path, *, top: int = TOP, least_confident: int = LEAST_CONFIDENT,
                      shard_range: str | None = None, unclaimed: bool = True, progress: bool = True,
                      workers: int = 1, world: World | None = None) -> dict | None:
    """Confident learning over the committed shards in `shard_range` (two streamed passes).
    Returns on rank 0 (None on the others): {"method", "score", "samples", "issues_found",
    "issues" (the `top` lowest scores, ranked), "noise_pairs" (off-diagonal confident joint,
    largest first), "thresholds", "per_class", "least_confident", "scope"}."""
    world = world or init_world()
    path = str(path)
    if top < 0 or least_confident < 0:
        raise schema.CacheError(f"--top: expected a count >= 0, got {min(top, least_confident)}")
    scope = on_main(world, functools.partial(_scope, path, shard_range))
    shards = scope["shards"]
    show = progress and len(shards) >= PROGRESS_MIN_SHARDS
    names = scope["classes"]
    C = len(names)
    parts = map_shards(_class_totals, shards, functools.partial(_open, path, names, least_confident), world=world,
                       workers=workers, progress=show, desc="label issues: thresholds")
    totals = None
    thresholds = None
    if world.is_main:
        totals = ClassTotals.empty(C)
        for part in parts:  # in shard order: the same sums for any split
            totals.merge(part, least_confident)
        with np.errstate(invalid="ignore", divide="ignore"):
            thresholds = np.where(totals.samples > 0, totals.self_conf / np.maximum(totals.samples, 1), np.inf)
    thresholds = broadcast_object(world, thresholds)
    found = map_shards(_issues, shards, functools.partial(_open, path, names, thresholds, top, unclaimed), world=world,
                       workers=workers, progress=show, desc="label issues: confident joint")
    if not world.is_main:
        return None
    joint, counted, loose, ranked = Counter(), 0, 0, []
    for j, n, u, f in found:
        joint.update(j)
        counted += n
        loose += u
        ranked = heapq.nsmallest(top, ranked + f, key=lambda x: x[:2])
    issues = [{"rank": r, **rec} for r, (_, _, rec) in enumerate(ranked, 1)]
    pairs = sorted(joint.items(), key=lambda kv: (-kv[1], kv[0]))
    return {
        "method": "confident learning (per-class thresholds = mean self-confidence; issues = off-diagonal of "
                  "the confident joint" + (", and unclaimed samples whose top class is not their label)"
                                           if unclaimed else ")"),
        "score": {"name": SCORE[0], "meaning": SCORE[1]},
        "row": "class probabilities averaged over the V views; outside a view's top-k, the uniform share of its "
               "tail mass",
        "samples": int(totals.samples.sum()),
        "confidently_counted": counted,
        "issues_found": int(sum(joint.values())) + loose,
        "issues_unclaimed": loose,
        "issues": issues,
        "noise_pairs": [{"given": p // C, "given_name": names[p // C], "teacher": p % C,
                         "teacher_name": names[p % C], "samples": n} for p, n in pairs[:20]],
        "thresholds": [None if not np.isfinite(t) else float(t) for t in thresholds],
        "per_class": _per_class(totals, names, scope["views"]),
        "least_confident": [rec for _, _, rec in totals.least],
        "scope": {"shards": scope["range"], "shards_read": len(shards), "incomplete_skipped": scope["incomplete"],
                  "top": top},
    }


def _per_class(t: ClassTotals, names: list[str], views: int) -> list[dict]:
    C = len(names)
    most: dict[int, tuple[int, int]] = {}
    for pair, n in sorted(t.confusions.items(), key=lambda kv: (-kv[1], kv[0])):
        most.setdefault(pair // C, (pair % C, n))
    out = []
    for c in range(C):
        n = int(t.samples[c])
        other = most.get(c)
        out.append({"class": c, "name": names[c], "samples": n,
                    "accuracy": int(t.correct[c]) / n if n else None,
                    "view_top1_agreement": None if not n else int(t.view_correct[c]) / (n * views),
                    "mean_p_given": float(t.self_conf[c]) / n if n else None,
                    "mean_top1_prob": float(t.top1_prob[c]) / n if n else None,
                    "most_confused_with": None if other is None else other[0],
                    "most_confused_name": None if other is None else names[other[0]],
                    "most_confused_samples": 0 if other is None else other[1]})
    return out


def _scope(path: str, shard_range: str | None) -> dict:
    group, attrs = schema.open_cache(path)
    layout = schema.Layout.from_attrs(attrs)
    selected = parse_shard_range(shard_range, layout.num_shards)
    shards, incomplete = [], []
    for i in selected:
        (incomplete if valid_positions(group, layout, i) is None else shards).append(i)
    return {"shards": shards, "incomplete": incomplete, "range": [selected.start, selected.stop],
            "classes": list(attrs["dataset"]["classes"]), "views": layout.views}


def _open(path: str, names: list[str], *extra) -> tuple:
    group, attrs = schema.open_cache(path)
    layout = schema.Layout.from_attrs(attrs)
    return (schema.open_arrays(group, layout), layout, names, *extra)


# ---------------------------------------------------------------------------------------------
# output and the reference


def format_issues(r: dict, shown: int = 20) -> str:
    """The text of `usi inspect --label-issues`: counts, the noisiest class pairs, the first issues."""
    sc = r["scope"]
    lines = [f"label issues (shards {sc['shards'][0]}..{sc['shards'][1] - 1}, {r['method']}): {r['issues_found']} of "
             f"{r['samples']} samples; ranked by {r['score']['name']} ({r['score']['meaning']})"]
    if sc["incomplete_skipped"]:
        lines.append(f"  incomplete shards skipped: {len(sc['incomplete_skipped'])}")
    if r["noise_pairs"]:
        lines.append("  confident joint, given label -> teacher's class (samples): " + ", ".join(
            f"{p['given_name']} -> {p['teacher_name']} ({p['samples']})" for p in r["noise_pairs"][:5]))
    if r["issues"]:
        lines.append("  rank  key                       slot  given -> teacher (mean p given / teacher, views agreeing "
                     "with the teacher)")
    for x in r["issues"][:shown]:
        lines.append(f"  {x['rank']:>4}  {x['key']:<24} {x['slot']:>5}  {x['given_name']} -> {x['teacher_name']} "
                     f"({x['p_given']:.3f} / {x['p_teacher']:.3f}, {100 * x['views_agreeing_teacher']:.0f} %)")
    if len(r["issues"]) > shown:
        lines.append(f"  ... {len(r['issues']) - shown} more of the {len(r['issues'])} listed (--json, --issues-csv)")
    if r.get("csv"):
        lines.append(f"  CSV written to {r['csv']}")
    return "\n".join(lines)


def write_csv(issues: list[dict], path: str | Path) -> str:
    """The ranked issues as CSV (columns CSV_FIELDS), to a local path or URL."""
    import io
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for rec in issues:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in rec.items()})
    storage.write_bytes(path, buf.getvalue().encode())
    return str(path)


def dense_probs(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(slots, labels, rows (N, C)) of every valid sample of the committed shards: the rows
    `find_label_issues` ranks, densified. **Holds N x C floats**: for tests and the comparison
    with cleanlab at demo size only, never on the main path."""
    group, attrs = schema.open_cache(path)
    layout = schema.Layout.from_attrs(attrs)
    parts = []
    for i in range(layout.num_shards):
        positions = valid_positions(group, layout, i)
        if positions is not None and len(positions):
            parts.append(shard_rows(group, layout, i, positions))
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, layout.num_classes))
    return (np.concatenate([p.slots for p in parts]), np.concatenate([p.labels for p in parts]),
            np.concatenate([p.rows for p in parts]))
