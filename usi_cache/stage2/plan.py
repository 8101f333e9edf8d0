"""Which rank, worker and step sees which (sample, view): a pure function, enumerable without images.

Inputs: the valid samples per shard (in cache mode, slots whose label is not −1), the seed, the
epoch, the world size, the DataLoader workers per rank, the batch per rank and the repeats R.

* **Steps.** Every rank runs `steps = floor(N / (world · batch))` batches per epoch (N = valid
  samples), the number of steps of R = 1 whatever R is (timm's `RepeatAugSampler` keeps it too).
* **Selection.** The run lays the shards out once in a seeded order; their valid samples form a
  cyclic sequence of N positions. Epoch e selects the window of D = ceil(steps · world · batch / R)
  positions that starts where epoch e − 1's ended, so over a run every sample is selected equally
  often (±1), and no sample twice within an epoch (D ≤ N). With R = 1 the window leaves out only
  N − D < world · batch samples, a different remainder each epoch.
* **Copies.** The selected samples, as pieces of shards in a seeded per-epoch order, form copy
  stream r for r < R (copy r uses the sample's r-th view of the epoch); the streams are laid end
  to end, and rank i takes the i-th run of `steps · batch` units, its workers consecutive runs
  of their batches. Copies of a sample lie D ≥ steps · batch units apart, so with world ≥ R they
  fall on different ranks. The last R·D − steps·world·batch < R units are dropped.
* **Views.** With R = 1 epoch e uses view e mod V. With R > 1 a sample selected for the s-th time
  (s counted over the run) uses views s·R + r (mod V), r < R: every view is used before any repeats.

A worker reads its pieces in order (a shard piece is a tar read up to its end) and shuffles them
through a bounded buffer that emits every unit exactly once (`exact_shuffle`).
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def stable_seed(*parts) -> int:
    """A 64-bit seed from a stable hash of `parts` (never Python's hash())."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little")


class PlanError(ValueError):
    """The data cannot fill one global batch."""


@dataclass(frozen=True)
class PlanSpec:
    counts: tuple[int, ...]  # valid samples of each shard, by shard index
    seed: int
    world: int  # ranks
    workers: int  # DataLoader workers per rank (0 counts as 1: the main process)
    batch: int  # per rank
    repeats: int = 1  # R: copies (distinct views) of each selected sample per epoch
    max_steps: int | None = None  # cap on steps per epoch

    def __post_init__(self):
        if not self.counts or min(self.counts) < 0:
            raise PlanError(f"valid samples per shard: expected counts >= 0 for at least one shard, "
                            f"got {self.counts[:8]}")

    @property
    def num_samples(self) -> int:
        return int(sum(self.counts))

    @property
    def steps(self) -> int:
        """Batches per rank per epoch (the same on every rank, so DDP never waits on a lost rank)."""
        steps = self.num_samples // (self.world * self.batch)
        if steps == 0:
            raise PlanError(f"{self.num_samples} valid samples cannot fill one global batch of "
                            f"{self.world} ranks x {self.batch}: lower the batch size")
        return min(steps, self.max_steps) if self.max_steps else steps

    @property
    def selected(self) -> int:
        """D: distinct samples selected per epoch."""
        return -(-self.steps * self.world * self.batch // self.repeats)

    def worker_batches(self, worker: int) -> int:
        """Batches of `worker`: the DataLoader takes batch b from worker b mod workers."""
        k = max(self.workers, 1)
        return self.steps // k + (1 if worker < self.steps % k else 0)


@dataclass(frozen=True)
class Piece:
    """Valid samples lo..hi−1 (counted among the shard's valid samples) of one shard, copy `copy`."""

    shard: int
    lo: int
    hi: int
    copy: int  # r < R
    position: int  # where the shard's first valid sample lies in the run's cyclic sequence

    def __len__(self) -> int:
        return self.hi - self.lo


def shard_layout(spec: PlanSpec) -> tuple[np.ndarray, np.ndarray]:
    """The run's shard order and each shard's starting position in the cyclic sequence."""
    order = np.random.default_rng(stable_seed("run-order", spec.seed)).permutation(len(spec.counts))
    starts = np.zeros(len(spec.counts), np.int64)
    starts[order] = np.concatenate([[0], np.cumsum(np.asarray(spec.counts, np.int64)[order])[:-1]])
    return order, starts


def selected_pieces(spec: PlanSpec, epoch: int) -> list[Piece]:
    """Epoch `epoch`'s window of D positions as shard pieces (copy 0), in sequence order."""
    order, starts = shard_layout(spec)
    N, D = spec.num_samples, spec.selected
    begin = (epoch * D) % N
    pieces: list[Piece] = []
    # walk the cycle twice at most: the window may wrap past the end
    for turn in (0, 1):
        for shard in order:
            count = spec.counts[shard]
            a, b = turn * N + starts[shard], turn * N + starts[shard] + count
            lo, hi = max(a, begin), min(b, begin + D)
            if lo < hi:
                pieces.append(Piece(int(shard), int(lo - a), int(hi - a), 0, int(starts[shard])))
    return pieces


def epoch_units(spec: PlanSpec, epoch: int) -> list[Piece]:
    """The epoch's copy streams end to end: the selected pieces in a seeded order, R times."""
    pieces = selected_pieces(spec, epoch)
    perm = np.random.default_rng(stable_seed("epoch-order", spec.seed, epoch)).permutation(len(pieces))
    ordered = [pieces[i] for i in perm]
    return [Piece(p.shard, p.lo, p.hi, r, p.position) for r in range(spec.repeats) for p in ordered]


def worker_pieces(spec: PlanSpec, epoch: int, rank: int, worker: int) -> list[Piece]:
    """What one worker of one rank reads this epoch, in order: exactly its batches × batch units."""
    k = max(spec.workers, 1)
    per_rank = spec.steps * spec.batch
    begin = rank * per_rank + sum(spec.worker_batches(w) for w in range(worker)) * spec.batch
    end = begin + spec.worker_batches(worker) * spec.batch
    assert worker < k
    out, at = [], 0
    for p in epoch_units(spec, epoch):
        lo, hi = max(begin, at), min(end, at + len(p))
        if lo < hi:
            out.append(Piece(p.shard, p.lo + lo - at, p.lo + hi - at, p.copy, p.position))
        at += len(p)
        if at >= end:
            break
    return out


def prior_selections(position: np.ndarray | int, epoch: int, spec: PlanSpec):
    """How often the sample at `position` of the cycle was selected in epochs before `epoch`."""
    reach = epoch * spec.selected  # positions covered by the earlier epochs' windows, unwrapped
    return np.maximum(0, (reach - np.asarray(position) + spec.num_samples - 1) // spec.num_samples)


def view_index(position, copy: int, epoch: int, spec: PlanSpec, views: int | None):
    """The view a unit replays: e mod V (R = 1), else s·R + r mod V; no modulus without a cache."""
    if spec.repeats == 1:
        u = np.full(np.shape(position), epoch, dtype=np.int64)
    else:
        u = prior_selections(position, epoch, spec) * spec.repeats + copy
    return u if views is None else u % views


def exact_shuffle(items: Iterable[T], buffer: int, rng: np.random.Generator, batch: int,
                  key: Callable[[T], object]) -> Iterator[T]:
    """Every item exactly once, in a shuffled order, holding at most `buffer` items.

    Items leave in groups of `batch` (the DataLoader's batches of this worker); an item whose
    `key` is already in the current group is passed over for another one from the buffer, so
    two copies of a sample share a batch only when the buffer holds nothing else.
    """
    held: list[T] = []
    in_batch: set = set()
    emitted = 0

    def pick() -> T:
        nonlocal emitted
        j = int(rng.integers(len(held)))
        if key(held[j]) in in_batch:
            others = [i for i in range(len(held)) if key(held[i]) not in in_batch]
            if others:
                j = others[int(rng.integers(len(others)))]
        held[j], held[-1] = held[-1], held[j]
        item = held.pop()
        emitted += 1
        if emitted % batch == 0:
            in_batch.clear()
        else:
            in_batch.add(key(item))
        return item

    for item in items:
        held.append(item)
        if len(held) > buffer:
            yield pick()
    while held:
        yield pick()


@dataclass(frozen=True)
class PlanSummary:
    """Counts of one epoch's plan, from pieces only (no images read)."""

    steps: int
    selected: int  # D distinct samples selected
    uses: int  # units trained on (steps · world · batch)
    dropped_uses: int  # units of the selection not trained on (< R)
    left_out: int  # valid samples not selected this epoch

    def describe(self, spec: PlanSpec) -> str:
        g = spec.world * spec.batch
        capped = spec.max_steps is not None and spec.max_steps < spec.num_samples // g
        why = f"max_steps = {spec.max_steps}" if capped else "< one global batch"
        if spec.repeats == 1:
            return (f"{self.uses} of {spec.num_samples} valid samples per epoch ({self.steps} steps x {g}); "
                    f"the {self.left_out} left out ({why}) change from epoch to epoch")
        return (f"{self.selected} distinct samples x {spec.repeats} views = {self.uses} uses per epoch "
                f"({self.steps} steps x {g}; {self.dropped_uses} copies dropped); each epoch selects a "
                f"different {self.selected / spec.num_samples:.0%} of the {spec.num_samples} valid samples")


def summarize(spec: PlanSpec) -> PlanSummary:
    uses = spec.steps * spec.world * spec.batch
    return PlanSummary(spec.steps, spec.selected, uses, spec.selected * spec.repeats - uses,
                       spec.num_samples - spec.selected)


def enumerate_plan(spec: PlanSpec, epoch: int) -> dict[str, np.ndarray]:
    """Every unit of the epoch as arrays (rank, worker, position in the cycle, copy, view without
    modulus), in each worker's reading order: the plan checked at any scale without an image."""
    cols: dict[str, list] = {"rank": [], "worker": [], "position": [], "copy": [], "view": []}
    for rank in range(spec.world):
        for worker in range(max(spec.workers, 1)):
            for p in worker_pieces(spec, epoch, rank, worker):
                pos = p.position + np.arange(p.lo, p.hi, dtype=np.int64)
                cols["rank"].append(np.full(len(p), rank, np.int32))
                cols["worker"].append(np.full(len(p), worker, np.int32))
                cols["position"].append(pos)
                cols["copy"].append(np.full(len(p), p.copy, np.int32))
                cols["view"].append(view_index(pos, p.copy, epoch, spec, None))
    return {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in cols.items()}
