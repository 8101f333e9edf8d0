"""Stage 2 data path: stream WebDataset shards, join each sample to its cache row, replay the view.

Per epoch, the shard order is a seeded permutation; rank r takes every world-th shard of it
and DataLoader worker w every W-th shard of the rank's list. For each shard, a worker reads
the cache ONCE per array (that shard's rows, the epoch's view), joins every tar sample to its
row by position, checks the key and replays the stored view at the student's input size.

Every rank runs exactly `steps` batches per epoch: a worker that exhausts its shards starts
over on them (a wrap-around, like WebDataset's `with_epoch`), so uneven shards never make one
rank stop early and hang DDP.
"""
from __future__ import annotations

import hashlib
import tarfile
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from . import schema, storage
from .config import ViewSpec
from .shards import IMAGE_EXTS, Manifest, ShardError, decode_image
from .mixing import NO_MIX, PairParams, PartnerImages, mix_pixels
from .views import decode_view, pil_filter, replay_array, sample_view, view_rng

def stable_seed(*parts) -> int:
    """A 64-bit seed from a stable hash of `parts` (never Python's hash())."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little")


def iter_tar(path: str) -> Iterator[tuple[str, bytes, int]]:
    """(key, encoded image, class) of each sample of one shard (a path or URL), streamed.

    The file is opened here (fsspec for URLs); WebDataset's tar iterator and key grouping do
    the rest, exactly as `wds.WebDataset` would for a local file.
    """
    try:
        with storage.errors(path, "reading"), storage.open_read(path) as stream:
            files = wds.tariterators.tar_file_expander([{"url": path, "stream": stream}])
            for s in wds.tariterators.group_by_keys(files):
                img = next((s[e] for e in IMAGE_EXTS if e in s), None)
                if img is None or "cls" not in s:
                    raise ShardError(f"{path}: sample {s['__key__']!r} lacks an image or a cls entry")
                yield s["__key__"], img, int(s["cls"])
    except (OSError, ValueError, tarfile.TarError) as e:
        if isinstance(e, (ShardError, storage.StorageError)):
            raise
        # webdataset re-raises with (message, stream, url) as the arguments
        reason = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
        raise ShardError(f"{path}: damaged tar ({reason})") from None


@dataclass(frozen=True)
class TrainStreamSpec:
    manifest: Manifest
    cache: str | None  # None: label-only / online-teacher mode (views drawn afresh)
    layout: schema.Layout | None
    spec: ViewSpec
    size: int  # student input size
    seed: int
    batch_size: int  # per rank
    steps: int  # batches per rank per epoch
    shuffle_buffer: int
    rank: int
    world: int
    repeats: int = 1  # repeated augmentation: views of each sample per epoch


class TrainStream(IterableDataset):
    """Yields dicts: image uint8 (3, H, W), label, key, and in cache mode the teacher's
    top-k logits (k,) float32, classes (k,) int64 and lse (float)."""

    def __init__(self, s: TrainStreamSpec):
        self.s = s
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def view_indices(self, epoch: int) -> list[int]:
        """The views of epoch e: e mod V in cache mode (a fresh view every epoch otherwise).

        With repeated augmentation R > 1, the R distinct views (e·R + r) mod V, r < R.
        """
        R = self.s.repeats
        first = [epoch * R + r for r in range(R)]
        return [v % self.s.layout.views for v in first] if self.s.cache else first

    def worker_plan(self, worker: int, workers: int) -> tuple[list[int], int]:
        """This worker's shard list and its number of batches."""
        s = self.s
        order = np.random.default_rng(stable_seed("shard-order", s.seed, self.epoch)).permutation(
            len(s.manifest.shards))
        rank_shards = [int(i) for i in order[s.rank::s.world]]
        shards = rank_shards[worker::workers]
        batches = s.steps // workers + (1 if worker < s.steps % workers else 0)
        return shards, batches

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        shards, batches = self.worker_plan(worker, workers)
        quota = batches * self.s.batch_size
        if quota == 0:
            return
        if not shards:
            raise ShardError(f"rank {self.s.rank} worker {worker} has no train shard "
                             f"(use fewer workers or ranks than shards)")
        rng = np.random.default_rng(stable_seed("shuffle", self.s.seed, self.epoch, self.s.rank, worker))
        group = schema.open_arrays(schema.open_cache(self.s.cache)[0], self.s.layout) if self.s.cache else None
        if quota + self.s.manifest.per_shard * self.s.repeats <= self.s.shuffle_buffer:
            # The worker's whole epoch fits in the buffer: read whole shards until there are
            # `quota` samples and shuffle those, instead of wrapping around the shards again just
            # to fill the buffer (costly when each shard read is a request to object storage).
            # Whole shards: each one read is read to its end, so its sample count is checked;
            # at most quota - 1 + one shard's samples are held, within the buffer's bound.
            epoch: list[dict] = []
            while len(epoch) < quota:
                before = len(epoch)
                for shard in shards:
                    epoch += self.shard_samples(shard, group)
                    if len(epoch) >= quota:
                        break
                if len(epoch) == before:
                    raise ShardError(f"shards {shards} hold no valid sample")
            for j in rng.permutation(len(epoch))[:quota]:
                yield epoch[j]
            return
        buffer: list[dict] = []
        produced = 0
        for sample in self._cycle(shards, group):
            if len(buffer) < self.s.shuffle_buffer:
                buffer.append(sample)
                continue
            j = int(rng.integers(len(buffer)))
            buffer[j], sample = sample, buffer[j]
            yield sample
            produced += 1
            if produced == quota:
                return
        while buffer and produced < quota:  # only reached if the stream ran dry
            yield buffer.pop(int(rng.integers(len(buffer))))
            produced += 1

    def _cycle(self, shards: list[int], group) -> Iterator[dict]:
        """The worker's shards over and over (the wrap-around that equalises ranks)."""
        any_valid = False
        while True:
            for shard in shards:
                for sample in self.shard_samples(shard, group):
                    any_valid = True
                    yield sample
            if not any_valid:
                raise ShardError(f"shards {shards} hold no valid sample")

    def shard_samples(self, shard: int, group) -> Iterator[dict]:
        """The replayed samples of one shard for this epoch (label -1 slots skipped).

        With repeated augmentation (R > 1) each sample is yielded R times, once per view of
        `view_indices(epoch)`; the image is decoded once for all of them.
        """
        s, m = self.s, self.s.manifest
        path = m.path(shard)
        views = self.view_indices(self.epoch)
        blocks = []
        if group is not None:  # one read per array per view of the epoch
            blocks = [schema.read_block(group, s.layout, shard, v) for v in views]
        samples = iter_tar(path)
        partners = None
        if blocks and s.layout.paired:  # partners may come later in the tar: hold its encoded bytes
            samples = list(samples)
            partners = PartnerImages([data for _, data, _ in samples])
        count = 0
        for pos, (key, data, cls) in enumerate(samples):
            count += 1
            if pos >= m.per_shard:
                raise ShardError(f"{path}: more samples than the manifest's {m.per_shard} per shard")
            if blocks:
                cached_key = str(blocks[0].keys[pos])
                if cached_key != key:
                    raise schema.CacheError(f"{path} position {pos}: shard has key {key!r}, "
                                            f"cache has key {cached_key!r}")
                if blocks[0].labels[pos] < 0:
                    continue  # undecodable at caching time: no target
            try:
                image = decode_image(data)
            except ValueError as e:
                if blocks:
                    raise ShardError(f"{path}: sample {key!r} no longer decodes ({e}) "
                                     f"but the cache holds a target for it") from None
                continue
            for r, view in enumerate(views):
                if blocks:
                    b = blocks[r]
                    params = decode_view(tuple(b.boxes[pos]), bool(b.flips[pos]), b.aug_ops[pos],
                                         b.aug_levels[pos], b.aug_resample[pos])
                else:
                    params = sample_view(view_rng(s.seed, key, view), image.height, image.width, s.spec)
                pixels = replay_array(image, params, s.size, s.spec)
                out = {"label": cls, "key": key}
                if partners is not None:
                    pixels = self._paired(b, shard, pos, pixels, partners, out)
                out["image"] = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
                if blocks:
                    out["t_logits"] = torch.from_numpy(b.logits[pos].astype(np.float32))
                    out["t_classes"] = torch.from_numpy(b.classes[pos].astype(np.int64))
                    out["t_lse"] = float(b.lse[pos])
                yield out
        m.check_count(shard, count)


    def _paired(self, b: schema.ShardBlock, shard: int, pos: int, pixels: np.ndarray,
                partners: PartnerImages, out: dict) -> np.ndarray:
        """Rebuild the mixed view the teacher saw; adds the partner's label and lambda to `out`."""
        s = self.s
        out["label_b"], out["lam"] = out["label"], 1.0
        kind = int(b.mix_kind[pos])
        if kind == NO_MIX:
            return pixels
        q = int(b.mix_partner[pos]) - shard * s.layout.slots_per_shard
        image = partners.get(q)
        if image is None:
            raise ShardError(f"{s.manifest.path(shard)}: partner position {q} of {out['key']!r} does not decode")
        q_params = decode_view(tuple(b.boxes[q]), bool(b.flips[q]), b.aug_ops[q], b.aug_levels[q],
                               b.aug_resample[q])
        pair = PairParams(q, kind, float(b.mix_lam[pos]), tuple(float(x) for x in b.mix_box[pos]))
        out["label_b"], out["lam"] = int(b.labels[q]), pair.lam
        return mix_pixels(pixels, replay_array(image, q_params, s.size, s.spec), pair)


def eval_array(image: Image.Image, size: int, crop_pct: float, interpolation: str) -> np.ndarray:
    """Validation transform: resize the short side to size / crop_pct, centre-crop size×size."""
    scale = int(size / crop_pct)
    w, h = image.size
    if w <= h:
        nw, nh = scale, max(1, round(h * scale / w))
    else:
        nw, nh = max(1, round(w * scale / h)), scale
    image = image.resize((nw, nh), pil_filter(interpolation))
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.array(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


class EvalStream(IterableDataset):
    """Every validation image exactly once across ranks and workers (shards are split)."""

    def __init__(self, manifest: Manifest, size: int, crop_pct: float, interpolation: str,
                 rank: int, world: int):
        self.m, self.size, self.crop_pct, self.interp = manifest, size, crop_pct, interpolation
        self.rank, self.world = rank, world

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        shards = list(range(len(self.m.shards)))[self.rank::self.world][worker::workers]
        for shard in shards:
            count = 0
            for key, data, cls in iter_tar(self.m.path(shard)):
                count += 1
                try:
                    image = decode_image(data)
                except ValueError:
                    continue
                pixels = eval_array(image, self.size, self.crop_pct, self.interp)
                yield {"image": torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), "label": cls}
            self.m.check_count(shard, count)
