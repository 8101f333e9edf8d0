"""How classes spread over shards, and how many distinct classes a stage-2 batch would hold.

Shards written class by class (what a simple script over an ImageFolder writes) give batches
of a handful of classes, which BatchNorm and SGD suffer from without a word. From the per-shard
class counts that `dataset.json` stores, `predict_distinct` predicts the distinct classes of a
local batch under stage 2's reading model, `random_distinct` what a random sampler gives, and
`check_spread` refuses class-concentrated shards with one line.

The model (docs/shards.md): a rank's DataLoader worker reads whole shards one after another in
a seeded random shard order, and draws its batch of B from a shuffle buffer of b samples
(`stage2/plan.py`'s `exact_shuffle`: each read adds one sample and then one of the b + 1 held leaves at
random, so a sample read k reads ago is still held with probability q^(k+1), q = b / (b + 1)).
At a read position t, shard s holds an expected buffer share w_s (the geometric weights of its
samples' ages), and each of its samples is in the buffer with probability b·w_s / n_s (within a
shard, classes are taken to be in random order). A batch takes each held sample with
probability B / b, so

    distinct(t) = sum_c 1 − prod_s (1 − B·w_s / n_s)^(n_sc)

which is sum_c 1 − (1 − p_c)^B with p the buffer's class mix, to first order in B / b, without
that formula's bias low on noisy per-shard counts (it treats a batch as drawn with replacement). The prediction is the mean over `windows` seeded read positions, each
after its own seeded shard order. Random sampling: sum_c 1 − (1 − g_c)^B, g the global class mix.
"""
from __future__ import annotations

import json
import logging
import shlex
from itertools import chain
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from usi_cache import storage
from usi_cache.shards.manifest import MANIFEST, ShardError

THRESHOLD = 0.5  # refuse when the predicted distinct classes per batch < THRESHOLD x random sampling
WINDOWS = 64  # seeded read positions the prediction averages over
CHUNK_CELLS = 1 << 22  # shards x classes held dense at once (32 MiB of float64)

log = logging.getLogger(__name__)

ClassCounts = Sequence[Mapping[int, int]]  # per shard: {class index: samples of it}


class ClassOrderError(ShardError):
    """Shards whose classes are too concentrated for stage 2's shuffle buffer."""


def decode_counts(flat, where: str) -> dict[int, int]:
    """One shard's class counts as `manifest.write_manifest` stores them ([class, count, class, count,
    ...], about 6 bytes per class present) as {class: count}, checked: `where` names the entry."""
    if not isinstance(flat, list) or len(flat) % 2 or not all(isinstance(x, int) and x >= 0 for x in flat):
        raise ShardError(f"{where}: expected a flat list [class, count, ...] of non-negative integers")
    return dict(zip(flat[::2], flat[1::2]))


def read_class_counts(root: str) -> list[dict[int, int]] | None:
    """The per-shard class counts of ROOT/dataset.json, in shard order; None for a manifest written
    before they were stored (or by hand without them). `load_manifest` has checked the rest."""
    path = storage.join(root, MANIFEST)
    shards = json.loads(storage.read_bytes(path))["shards"]
    if not all("class_counts" in s for s in shards):
        return None
    return [decode_counts(s["class_counts"], f"{path}: shards[{i}].class_counts") for i, s in enumerate(shards)]


def _csr(class_counts: ClassCounts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row of each entry, class, count) of the per-shard counts, as int64 arrays."""
    rows = np.repeat(np.arange(len(class_counts)), [len(c) for c in class_counts])
    cls = np.fromiter(chain.from_iterable(class_counts), np.int64, len(rows))  # keys, at C speed
    cnt = np.fromiter(chain.from_iterable(c.values() for c in class_counts), np.int64, len(rows))
    return rows, cls, cnt


def random_distinct(class_counts: ClassCounts, num_classes: int, batch: int) -> float:
    """Expected distinct classes in a batch of `batch` samples drawn at random from the dataset."""
    _, cls, cnt = _csr(class_counts)
    g = np.bincount(cls, weights=cnt, minlength=num_classes) / max(cnt.sum(), 1)
    return float((1 - (1 - g) ** batch).sum())


def predict_distinct(class_counts: ClassCounts, num_classes: int, batch: int, buffer: int, *,
                     windows: int = WINDOWS, seed: int = 0) -> float:
    """Expected distinct classes in a local batch of `batch` drawn through a shuffle buffer of
    `buffer` samples, from shards read whole in a random order (the module's model). Pure: the
    result depends on the arguments only. O(windows x shards x classes) arithmetic, in chunks."""
    rows, cls, cnt = _csr(class_counts)
    n = np.bincount(rows, weights=cnt, minlength=len(class_counts))  # samples per shard
    keep = np.flatnonzero(n > 0)  # an empty shard adds nothing to the buffer
    n = n[keep]
    remap = np.full(len(class_counts), -1)
    remap[keep] = np.arange(len(keep))
    rows = remap[rows]
    S, N = len(n), float(n.sum())
    if S == 0:
        return 0.0
    rng = np.random.default_rng(seed)
    order = np.argsort(rng.random((windows, S)), axis=1)  # each window's shard reading order
    ns = n[order]
    ends = np.cumsum(ns, axis=1)
    starts = ends - ns
    t = np.floor(rng.random((windows, 1)) * N)  # samples read before the window's batch
    lq = -np.log1p(1.0 / buffer)  # log q
    norm = -np.expm1(N * lq)  # 1 − q^N: the read sequence is cyclic (epoch after epoch)

    def qpow(k):  # q^k for ages k >= 0
        return np.exp(np.maximum(k, 0) * lq)

    # a shard read before t: ages t − end .. t − start − 1 (mod N); the shard holding t: its part
    # before t has ages 0 .. t − start − 1, its part from t on was read a cycle ago
    before = np.mod(t - ends, N)
    w = qpow(before) - qpow(before + ns)
    inside = (starts <= t) & (t < ends)
    w_in = (1 - qpow(t - starts)) + (qpow(N - ends + t) - qpow(N))
    w = np.where(inside, w_in, w) / norm  # each window's weights sum to 1
    share = np.zeros((windows, S))
    np.put_along_axis(share, order, w, axis=1)
    # per sample of shard s: P(in the batch) = P(held) · B / b = b·w_s / n_s · B / b
    take = np.minimum(share * batch / n, 1 - 1e-12)
    log_miss = np.log1p(-take)  # (windows, S)
    total = np.zeros((windows, num_classes))
    step = max(1, CHUNK_CELLS // max(num_classes, 1))
    for lo in range(0, S, step):  # total = log_miss @ counts (dense by chunks of shards)
        sel = (rows >= lo) & (rows < lo + step)
        m = min(step, S - lo)
        dense = np.bincount((rows[sel] - lo) * num_classes + cls[sel], weights=cnt[sel],
                            minlength=m * num_classes).reshape(m, num_classes)
        total += log_miss[:, lo:lo + step] @ dense
    return float((1 - np.exp(total)).sum(axis=1).mean())


@dataclass(frozen=True)
class Spread:
    """The class-order check's numbers for one dataset and batch set-up."""

    predicted: float  # distinct classes per local batch, stage 2's reading model
    random: float  # the same for a random sampler
    classes: int  # C
    batch: int
    buffer: int

    @property
    def ok(self) -> bool:
        return self.predicted >= THRESHOLD * self.random

    def describe(self) -> str:
        return (f"a batch of {self.batch} would hold ~{self.predicted:.1f} of {self.classes} classes where "
                f"random sampling gives ~{self.random:.1f} (shuffle buffer {self.buffer})")


def measure(class_counts: ClassCounts, num_classes: int, batch: int, buffer: int) -> Spread:
    return Spread(predict_distinct(class_counts, num_classes, batch, buffer),
                  random_distinct(class_counts, num_classes, batch), num_classes, batch, buffer)


def check_spread(where: str, class_counts: ClassCounts, num_classes: int, batch: int, buffer: int, *,
                 allow_ordered: bool, how_to_allow: str = "--allow-ordered") -> Spread:
    """The numbers; raise ClassOrderError (one line naming `where`, both numbers and the fix) when the
    classes are concentrated and `allow_ordered` is false."""
    spread = measure(class_counts, num_classes, batch, buffer)
    if not spread.ok and not allow_ordered:
        raise ClassOrderError(f"{where}: class-ordered shards: {spread.describe()}: run `usi shards reshard "
                              f"{shlex.quote(str(where))} OUT` to shuffle them into new shards, or pass {how_to_allow} to keep them")
    return spread


def check_training_shards(root: str, num_classes: int, batch: int, buffer: int, *, allow_ordered: bool) -> None:
    """Stage 2 at start (rank 0): refuse class-ordered train shards (ClassOrderError) unless
    `allow_ordered`, then say a warning line; a manifest without class counts skips the check."""
    counts = read_class_counts(root)
    if counts is None:
        log.info(f"{root}: dataset.json has no per-shard class counts (made before they were stored): "
                 f"class-order check skipped (`usi shards index` adds them)")
        return
    spread = check_spread(root, counts, num_classes, batch, buffer, allow_ordered=allow_ordered,
                          how_to_allow="--allow-ordered (train.allow_ordered)")
    if not spread.ok:
        log.warning(f"warning: {root}: class-ordered shards kept (allow_ordered): {spread.describe()}")
