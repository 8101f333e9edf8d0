"""Stage 2 data path: stream WebDataset shards, join each sample to its cache row, replay the view.

What each rank and DataLoader worker reads is `plan.py`'s pure function of (seed, epoch,
world, workers, valid samples per shard): a worker reads the shard pieces of each of its lane
streams in order, joins every tar sample to its cache row by position (one read per array per
shard piece and view), checks the key, replays the stored views of the copies this rank trains
at the student's input size, shuffles each stream through a bounded buffer seeded alike on every
rank of the lane, and `plan.assemble` deals the copies into batches (the R copies of a sample
in one global step). Every rank runs the same number of batches.
"""
from __future__ import annotations

import multiprocessing
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from usi_cache import cache_format as schema
from usi_cache.config.stages import ViewSpec
from usi_cache.stage2.plan import Piece, PlanSpec, assemble, exact_shuffle, stream_rng, view_index, worker_streams
from usi_cache.views.mixing import PartnerImages
from usi_cache.views.render import render, render_stored, stored_view
from usi_cache.shards.manifest import Manifest, ShardError
from usi_cache.shards.images import decode_image
from usi_cache.shards.tars import read_shard
from usi_cache.views.sampling import sample_view, view_rng

__all__ = ["valid_counts", "TrainStreamSpec", "TrainStream"]


def valid_counts(manifest: Manifest, group=None, layout: schema.Layout | None = None) -> tuple[int, ...]:
    """Samples per shard that can be trained on: the cache's labelled slots (an undecodable
    image has label −1 there), or every sample of the manifest without a cache."""
    if group is None:
        return tuple(s.count for s in manifest.shards)
    labels = schema.read_array(group, "labels", slice(0, layout.slots))
    return tuple(int(n) for n in (labels.reshape(layout.num_shards, layout.slots_per_shard) >= 0).sum(axis=1))


@dataclass(frozen=True)
class TrainStreamSpec:
    manifest: Manifest
    cache: str | None  # None: label-only / online-teacher mode (views drawn afresh)
    layout: schema.Layout | None
    spec: ViewSpec
    size: int  # student input size
    plan: PlanSpec  # who reads what (seed, world, workers, batch, repeats, valid counts)
    rank: int
    shuffle_buffer: int  # samples held for shuffling, per worker


class TrainStream(IterableDataset):
    """Yields dicts: image uint8 (3, H, W), label, key, sid (the sample's slot), view, and in
    cache mode the teacher's top-k log-probabilities (k,) float32 and classes (k,) int64.

    The epoch lives in shared memory: DataLoader workers that persist between epochs keep their
    own copy of the dataset, and read `set_epoch`'s value when the next epoch's iteration starts."""

    def __init__(self, s: TrainStreamSpec):
        self.s = s
        self._epoch = multiprocessing.Value("q", 0, lock=False)

    @property
    def epoch(self) -> int:
        return self._epoch.value

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = epoch

    def __iter__(self):
        s = self.s
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        if workers != max(s.plan.workers, 1):
            raise RuntimeError(f"the plan has {s.plan.workers} workers per rank, the DataLoader {workers}")
        epoch = self.epoch  # read once: the whole iteration is this epoch's
        if s.plan.worker_batches(worker) == 0:
            return
        group = schema.open_arrays(schema.open_cache(s.cache)[0], s.layout) if s.cache else None
        buffer = s.plan.lane_buffer(s.shuffle_buffer)
        streams = {}
        for lane, pieces in worker_streams(s.plan, epoch, s.rank, worker).items():
            samples = self.stream_samples(pieces, group, epoch, s.plan.lane_copies(lane, s.rank))
            streams[lane] = exact_shuffle(samples, buffer, stream_rng(s.plan, epoch, lane, worker))
        for copies, copy in assemble(s.plan, s.rank, worker, streams):
            yield copies[copy]

    def stream_samples(self, pieces: list[Piece], group, epoch: int, copies: tuple[int, ...]) -> Iterator[dict]:
        for piece in pieces:
            yield from self.piece_samples(piece, group, epoch, copies)

    def piece_samples(self, piece: Piece, group, epoch: int, copies: tuple[int, ...]) -> Iterator[dict]:
        """The samples of one shard piece (valid samples lo..hi−1), each as {copy r: the replayed
        view of copy r} for the copies this rank trains."""
        s, m = self.s, self.s.manifest
        path = m.path(piece.shard)
        V = s.layout.views if s.cache else None
        slots = s.layout.slots_per_shard if s.cache else m.per_shard
        positions = piece.position + np.arange(piece.lo, piece.hi)
        views = {r: view_index(positions, r, epoch, s.plan, V) for r in copies}
        blocks = {}
        if group is not None:  # one read per array per view this piece uses (one, or two at a boundary, per copy)
            needed = np.unique(np.concatenate(list(views.values())))
            blocks = {int(v): schema.read_block(group, s.layout, piece.shard, int(v)) for v in needed}
        total = s.plan.counts[piece.shard]
        first = next(iter(blocks.values()), None)  # keys and labels: the same in every view's block
        paired = bool(blocks) and s.layout.paired
        # a piece that starts mid-shard passes over the samples before it by their tar headers only
        # (not in a paired cache: partners may lie anywhere in the tar)
        skip = 0 if paired or piece.lo == 0 else (
            piece.lo if first is None else int(np.flatnonzero(first.labels[:slots] >= 0)[piece.lo - 1]) + 1)
        samples = read_shard(path, skip)
        partners = None
        if paired:  # partners may come later in the tar: hold its encoded bytes
            samples = list(samples)
            partners = PartnerImages([x.data for x in samples])
        j = piece.lo if skip else 0  # valid index
        count = skip  # samples read or passed over
        for pos, sample in enumerate(samples, start=skip):
            count += 1
            if pos >= slots:
                raise ShardError(f"{path}: more samples than the manifest's {slots} per shard")
            if first is not None:
                cached_key = str(first.keys[pos])
                if cached_key != sample.key:
                    raise schema.CacheError(f"{path} position {pos}: shard has key {sample.key!r}, "
                                            f"cache has key {cached_key!r}")
                if first.labels[pos] < 0:
                    continue  # undecodable at caching time: no target, not in the plan
            j += 1
            if j <= piece.lo:
                continue
            if j > piece.hi:
                if piece.hi < total:
                    return  # the rest of the shard belongs to other pieces
                continue
            image = self.decode(sample, piece.shard, blocks)  # once, whatever the copies
            yield {r: self.replay(sample, image, pos, int(v[j - 1 - piece.lo]), piece.shard, slots, blocks, partners)
                   for r, v in views.items()}
        if j != total:
            raise ShardError(f"{path}: {j} valid samples, the epoch plan expected {total}")
        m.check_count(piece.shard, count)

    def decode(self, sample, shard: int, blocks: dict) -> Image.Image:
        try:
            return decode_image(sample.data)
        except ValueError as e:
            why = ("the cache holds a target for it" if blocks else
                   "training without a cache needs every sample to decode (shards made by `usi shards` "
                   "leave such files out; a cache marks them)")
            raise ShardError(f"{self.s.manifest.path(shard)}: sample {sample.key!r} does not decode ({e}); {why}") from None

    def replay(self, sample, image: Image.Image, pos: int, view: int, shard: int, slots: int, blocks: dict,
               partners: PartnerImages | None) -> dict:
        """One training sample: the stored (or, without a cache, freshly drawn) view replayed."""
        s = self.s
        out = {"label": sample.cls, "key": sample.key, "sid": shard * slots + pos, "view": view}
        if not blocks:  # label-only / online: a fresh view
            params = sample_view(view_rng(s.plan.seed, sample.key, view), image.height, image.width, s.spec)
            pixels = render(image, params, s.size, s.spec)
        else:  # the stored view, mixed with its partner as the teacher saw it in a paired cache
            b = blocks[view]
            try:
                stored = stored_view(b, pos, None, shard * slots, slots)
                pixels = render_stored(stored, image, partners.get if partners else None, s.size, s.spec)
            except ValueError as e:
                raise ShardError(f"{s.manifest.path(shard)}: {sample.key!r}: {e}") from None
            if s.layout.paired:  # the mixed ground truth: the partner's label and lambda
                q = stored.partner_position
                out["label_b"] = out["label"] if q is None else int(b.labels[q])
                out["lam"] = 1.0 if q is None else stored.pair.lam
        out["image"] = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
        if blocks:
            # top-k log-probabilities whatever the schema version, float32 into the loss
            out["t_log_probs"] = torch.from_numpy(b.log_probs[pos].astype(np.float32))
            out["t_classes"] = torch.from_numpy(b.classes[pos].astype(np.int64))
        return out
