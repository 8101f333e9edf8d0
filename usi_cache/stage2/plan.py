"""Which rank, worker and step sees which (sample, view): a pure function, enumerable without images.

Inputs: the valid samples per shard (in cache mode, slots whose label is not −1), the seed, the
epoch, the world size W, the DataLoader workers per rank K, the batch per rank B and the repeats R.

* **Steps.** Every rank runs `steps = floor(N / (W · B))` batches per epoch (N = valid samples),
  the number of steps of R = 1 whatever R is (timm's `RepeatAugSampler` keeps it too).
* **Groups.** A global step has U = W · B units, numbered u = j · W + i for position j of rank i's
  local batch (timm's round-robin deal of repeat-interleaved indices). Consecutive units form the
  step's G = ceil(U / R) copy groups: group g holds copy r of one sample at unit g · R + r. So the R
  copies of a sample are trained in the same global step, on R consecutive ranks (mod W): distinct
  ranks when W ≥ R, sharing a local batch only where W < R forces it. When R does not divide U the
  step's last group is trimmed to U mod R copies.
* **Lanes.** Group g belongs to lane g mod L, L = W / gcd(W, R); the copies of every group of a lane
  land on the same ranks (the lane's ranks). A lane's samples are read, in the same order, by each
  of its ranks, so the ranks that share a copy group read the same shard pieces (shard bytes per
  rank stay those of R = 1: a rank is in R / gcd(W, R) lanes, each 1/L of the selection).
* **Selection.** The run lays the shards out once in a seeded order; their valid samples form a
  cyclic sequence of N positions. Epoch e selects the window of D = steps · G positions that starts
  where epoch e − 1's ended, so over a run every sample is selected equally often (±1), and no
  sample twice within an epoch (D ≤ N). With R = 1 the window leaves out only N − D < W · B samples,
  a different remainder each epoch.
* **Streams.** The selected samples, as pieces of shards in a seeded per-epoch order, are cut into
  one stream per (lane, worker), laid end to end in that order: worker k of a rank builds the
  batches of steps ≡ k (mod K), so stream (l, k) holds lane l's groups of those steps. Each stream
  is shuffled through a bounded buffer seeded by (seed, epoch, lane, worker) — never by rank — so
  every rank of the lane sees the same order. With R = 1 lanes are ranks and this is the plain
  rank / worker split.
* **Views.** With R = 1 epoch e uses view e mod V. With R > 1 a sample selected for the s-th time
  (s counted over the run) uses views s·R + r (mod V), r < R: every view is used before any repeats.

`assemble` turns a worker's lane streams into its batches; the data path (`data.py`) and the
enumeration (`enumerate_plan`) both call it, so what is enumerated is what is trained.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator
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
class Pull:
    """One copy group of a step as one rank sees it: which lane it comes from and where its copies
    go in the rank's local batch (none for a trimmed group whose copies all land elsewhere)."""

    group: int
    lane: int
    places: tuple[tuple[int, int], ...]  # (position in the local batch, copy r)


@dataclass(frozen=True)
class PlanSpec:
    counts: tuple[int, ...]  # valid samples of each shard, by shard index
    seed: int
    world: int  # ranks
    workers: int  # DataLoader workers per rank (0 counts as 1: the main process)
    batch: int  # per rank
    repeats: int = 1  # R: copies (distinct views) of each selected sample per epoch, in one step
    max_steps: int | None = None  # cap on steps per epoch

    def __post_init__(self):
        if not self.counts or min(self.counts) < 0:
            raise PlanError(f"valid samples per shard: expected counts >= 0 for at least one shard, "
                            f"got {self.counts[:8]}")
        if self.repeats < 1:
            raise PlanError(f"repeated augmentation: expected R >= 1, got {self.repeats}")

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
    def units(self) -> int:
        """U: units (sample copies) per global step."""
        return self.world * self.batch

    @property
    def groups(self) -> int:
        """G: copy groups (distinct samples) per global step; the last is trimmed when R ∤ U."""
        return -(-self.units // self.repeats)

    @property
    def lanes(self) -> int:
        """L: lanes; the copies of lane l's groups always land on the same ranks."""
        return self.world // math.gcd(self.world, self.repeats)

    @property
    def selected(self) -> int:
        """D: distinct samples selected per epoch."""
        return self.steps * self.groups

    @property
    def trimmed(self) -> int:
        """Samples per epoch trained with fewer than R copies (the last group of each step when R ∤ U)."""
        return self.steps if self.units % self.repeats else 0

    def worker_batches(self, worker: int) -> int:
        """Batches of `worker`: the DataLoader takes batch b from worker b mod workers."""
        k = max(self.workers, 1)
        return self.steps // k + (1 if worker < self.steps % k else 0)

    def lane_groups(self, lane: int) -> int:
        """Groups of `lane` in one step."""
        return len(range(lane, self.groups, self.lanes))

    def rank_lanes(self, rank: int) -> tuple[int, ...]:
        """The lanes whose copies land on `rank` (the same number for every rank)."""
        return tuple(lane for lane in range(self.lanes) if self.lane_copies(lane, rank))

    def lane_copies(self, lane: int, rank: int) -> tuple[int, ...]:
        """The copies r of each of `lane`'s groups that land on `rank` (several only where W < R)."""
        return tuple(r for r in range(self.repeats) if (lane * self.repeats + r) % self.world == rank)

    def lane_buffer(self, buffer: int) -> int:
        """Each of a worker's lane streams shuffles through its share of the worker's buffer, so that
        the rendered copies held stay about `buffer` whatever W and R: a rank trains R / gcd(W, R)
        copies per cycle of its lanes (one per lane when W ≥ R; several per item where W < R)."""
        return -(-buffer // (self.repeats // math.gcd(self.world, self.repeats)))

    def pulls(self, rank: int) -> tuple[Pull, ...]:
        """One step of `rank`, group by group: every group of the rank's lanes, in group order (the
        order each rank of a lane takes the lane's samples), with where its copies go."""
        return _pulls(self, rank)


def _pulls(spec: PlanSpec, rank: int) -> tuple[Pull, ...]:
    R, W, U = spec.repeats, spec.world, spec.units
    mine = set(spec.rank_lanes(rank))
    out = []
    for g in range(spec.groups):
        lane = g % spec.lanes
        if lane in mine:
            out.append(Pull(g, lane, tuple((u // W, u - g * R) for u in range(g * R, min(g * R + R, U))
                                           if u % W == rank)))
    return tuple(out)


@dataclass(frozen=True)
class Piece:
    """Valid samples lo..hi−1 (counted among the shard's valid samples) of one shard."""

    shard: int
    lo: int
    hi: int
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
    """Epoch `epoch`'s window of D positions as shard pieces, in sequence order."""
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
                pieces.append(Piece(int(shard), int(lo - a), int(hi - a), int(starts[shard])))
    return pieces


def epoch_pieces(spec: PlanSpec, epoch: int) -> list[Piece]:
    """The selected pieces in the epoch's seeded order: the streams are consecutive runs of it."""
    pieces = selected_pieces(spec, epoch)
    perm = np.random.default_rng(stable_seed("epoch-order", spec.seed, epoch)).permutation(len(pieces))
    return [pieces[i] for i in perm]


def stream_lengths(spec: PlanSpec) -> list[tuple[int, int, int]]:
    """(lane, worker, samples) of every stream, in the order they are laid end to end."""
    k = max(spec.workers, 1)
    return [(lane, w, spec.worker_batches(w) * spec.lane_groups(lane)) for lane in range(spec.lanes) for w in range(k)]


def stream_pieces(spec: PlanSpec, epoch: int, lane: int, worker: int,
                  ordered: list[Piece] | None = None) -> list[Piece]:
    """What the stream of (`lane`, `worker`) reads this epoch, in order: one sample per group of the
    lane in that worker's steps. Every rank of the lane reads exactly these pieces."""
    begin = 0
    for l, w, n in stream_lengths(spec):
        if (l, w) == (lane, worker):
            break
        begin += n
    else:
        raise ValueError(f"no stream ({lane}, {worker}) in a plan of {spec.lanes} lanes x {spec.workers} workers")
    end = begin + n
    out, at = [], 0
    for p in ordered if ordered is not None else epoch_pieces(spec, epoch):
        lo, hi = max(begin, at), min(end, at + len(p))
        if lo < hi:
            out.append(Piece(p.shard, p.lo + lo - at, p.lo + hi - at, p.position))
        at += len(p)
        if at >= end:
            break
    return out


def worker_streams(spec: PlanSpec, epoch: int, rank: int, worker: int) -> dict[int, list[Piece]]:
    """The pieces of each lane stream one worker of one rank reads, by lane."""
    ordered = epoch_pieces(spec, epoch)
    return {lane: stream_pieces(spec, epoch, lane, worker, ordered) for lane in spec.rank_lanes(rank)}


def stream_rng(spec: PlanSpec, epoch: int, lane: int, worker: int) -> np.random.Generator:
    """The shuffle generator of one stream: the same on every rank of the lane (never the rank's)."""
    return np.random.default_rng(stable_seed("shuffle", spec.seed, epoch, lane, worker))


def assemble(spec: PlanSpec, rank: int, worker: int, streams: dict[int, Iterator[T]]) -> Iterator[tuple[T, int]]:
    """(item, copy r) in the order the worker's batches hold them: for each of its steps, one item
    from the lane stream of each group the rank takes part in, placed at its copies' positions. A
    group trimmed away from this rank still takes its item, so every rank of a lane stays in step."""
    pulls = spec.pulls(rank)
    for _ in range(spec.worker_batches(worker)):
        batch: list = [None] * spec.batch
        for pull in pulls:
            item = next(streams[pull.lane])
            for position, copy in pull.places:
                batch[position] = (item, copy)
        yield from batch


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


def exact_shuffle(items: Iterable[T], buffer: int, rng: np.random.Generator) -> Iterator[T]:
    """Every item exactly once, in a shuffled order, holding at most `buffer` items."""
    held: list[T] = []

    def pick() -> T:
        j = int(rng.integers(len(held)))
        held[j], held[-1] = held[-1], held[j]
        return held.pop()

    for item in items:
        held.append(item)
        if len(held) > buffer:
            yield pick()
    while held:
        yield pick()


@dataclass(frozen=True)
class PlanSummary:
    """Counts of one epoch's plan, from its shape only (no images read)."""

    steps: int
    selected: int  # D distinct samples selected
    uses: int  # units trained on (steps · world · batch)
    trimmed: int  # selected samples trained with fewer than R copies (R ∤ world · batch)
    left_out: int  # valid samples not selected this epoch

    def describe(self, spec: PlanSpec) -> str:
        g = spec.world * spec.batch
        capped = spec.max_steps is not None and spec.max_steps < spec.num_samples // g
        why = f"max_steps = {spec.max_steps}" if capped else "< one global batch"
        if spec.repeats == 1:
            return (f"{self.uses} of {spec.num_samples} valid samples per epoch ({self.steps} steps x {g}); "
                    f"the {self.left_out} left out ({why}) change from epoch to epoch")
        R, W = spec.repeats, spec.world
        where = (f"on {R} different ranks" if W >= R else f"over the {W} rank(s), sharing a local batch where "
                 f"{W} rank(s) < {R} copies force it")
        trim = f" ({self.trimmed} trimmed to {g % R} since {R} does not divide {g})" if self.trimmed else ""
        return (f"{self.selected} distinct samples x {R} views = {self.uses} uses per epoch ({self.steps} steps x "
                f"{g}{trim}); the {R} copies of a sample train in the same step, {where}; each epoch selects a "
                f"different {self.selected / spec.num_samples:.0%} of the {spec.num_samples} valid samples")


def summarize(spec: PlanSpec) -> PlanSummary:
    return PlanSummary(spec.steps, spec.selected, spec.steps * spec.units, spec.trimmed,
                       spec.num_samples - spec.selected)


def copy_stats(sample: np.ndarray, step: np.ndarray, rank: np.ndarray, repeats: int, world: int) -> dict:
    """Where an epoch's copies went, from one row per trained unit (sample id, global step, rank):
    distinct samples, uses, the most uses of one sample, copies sharing a local batch, and with
    R > 1 the fraction of repeated samples whose copies trained in one step (`repeat_same_step`)
    and, where world ≥ R, on as many ranks as copies (`repeat_distinct_ranks`). The training log
    and the enumeration both count with it."""
    order = np.lexsort((rank, step, sample))
    sid, st, rk = sample[order], step[order], rank[order]
    if len(sid) == 0:
        return {"samples_used": 0, "sample_uses": 0, "max_uses_per_sample": 0, "in_batch_duplicates": 0}
    first = np.flatnonzero(np.r_[True, sid[1:] != sid[:-1]])
    uses = np.diff(np.r_[first, len(sid)])
    out = {"samples_used": int(len(uses)), "sample_uses": int(len(sid)), "max_uses_per_sample": int(uses.max()),
           "in_batch_duplicates": int(((sid[1:] == sid[:-1]) & (st[1:] == st[:-1]) & (rk[1:] == rk[:-1])).sum())}
    if repeats > 1:
        repeated = uses > 1
        n = max(int(repeated.sum()), 1)
        one_step = np.minimum.reduceat(st, first) == np.maximum.reduceat(st, first)
        by_rank = np.lexsort((rk, sid))  # the same sample groups, each one's ranks adjacent
        r_sid, r_rk = sid[by_rank], rk[by_rank]
        ranks_used = np.add.reduceat(np.r_[1, ((r_sid[1:] != r_sid[:-1]) | (r_rk[1:] != r_rk[:-1]))], first)
        out["repeat_same_step"] = float((one_step & repeated).sum() / n)
        out["repeat_distinct_ranks"] = float(((ranks_used == uses) & repeated).sum() / n) if world >= repeats else None
    return out


def rank_reads(spec: PlanSpec, epoch: int, rank: int) -> tuple[int, int, int]:
    """What one rank's workers read from the tars this epoch: (tar opens, samples whose bytes are
    read, samples passed over). A piece lo..hi reads its hi − lo samples; one that starts mid-shard
    passes over the lo before it by their tar headers only (`read_shard(path, skip)` seeks), which
    costs a header per member, not the samples' bytes. (A paired cache reads whole shards: its
    partners may lie anywhere in the tar.)"""
    opens = read = passed = 0
    ordered = epoch_pieces(spec, epoch)
    for w in range(max(spec.workers, 1)):
        for lane in spec.rank_lanes(rank):
            for p in stream_pieces(spec, epoch, lane, w, ordered):
                opens += 1
                read += p.hi - p.lo
                passed += p.lo
    return opens, read, passed


def stream_order(spec: PlanSpec, epoch: int, lane: int, worker: int, buffer: int,
                 ordered: list[Piece] | None = None) -> np.ndarray:
    """The cycle positions of one stream in the order its shuffle emits them (the data path's order)."""
    pieces = stream_pieces(spec, epoch, lane, worker, ordered)
    positions = (q for p in pieces for q in range(p.position + p.lo, p.position + p.hi))
    return np.fromiter(exact_shuffle(positions, spec.lane_buffer(buffer), stream_rng(spec, epoch, lane, worker)),
                       np.int64)


def enumerate_plan(spec: PlanSpec, epoch: int, buffer: int = 1000) -> dict[str, np.ndarray]:
    """Every unit of the epoch as arrays — rank, worker, step, slot (position in the local batch),
    position (in the cycle), copy, view (without modulus) — in each rank's batch order, through the
    same `assemble` and shuffle as the data path: the plan checked at any scale without an image."""
    k = max(spec.workers, 1)
    ordered = epoch_pieces(spec, epoch)
    orders = {(lane, w): stream_order(spec, epoch, lane, w, buffer, ordered)
              for lane in range(spec.lanes) for w in range(k)}
    cols: dict[str, list] = {c: [] for c in ("rank", "worker", "step", "slot", "position", "copy")}
    for rank in range(spec.world):
        for w in range(k):
            nb = spec.worker_batches(w)
            if nb == 0:
                continue
            units = list(assemble(spec, rank, w, {lane: iter(orders[(lane, w)].tolist())
                                                  for lane in spec.rank_lanes(rank)}))
            pos, copy = np.array(units, np.int64).reshape(-1, 2).T
            cols["rank"].append(np.full(len(pos), rank, np.int32))
            cols["worker"].append(np.full(len(pos), w, np.int32))
            cols["step"].append(np.repeat(w + k * np.arange(nb, dtype=np.int64), spec.batch))
            cols["slot"].append(np.tile(np.arange(spec.batch, dtype=np.int32), nb))
            cols["position"].append(pos)
            cols["copy"].append(copy.astype(np.int32))
    out = {c: np.concatenate(v) if v else np.zeros(0, np.int64) for c, v in cols.items()}
    out["view"] = view_index(out["position"], out["copy"], epoch, spec, None)
    return out
