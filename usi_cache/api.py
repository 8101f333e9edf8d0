"""A read-only Python entry point for notebooks: a cache's predictions without knowing Zarr.

    import usi_cache
    cache = usi_cache.open_cache("runs/demo/cache.zarr")          # a folder or an s3:// URL
    cache.topk("fmnist_train_00000")                               # per view: classes, names, probs
    cache.view_image("fmnist_train_00000", view=3)                 # PIL image, as the teacher saw it
    table = cache.samples(shards=range(2))                         # one row per sample (pandas)

A sample is named by its key (str) or its slot (int). Everything is read through the cache
format package (`usi_cache.cache_format`, the only code that names its arrays) and rendered by
the one renderer (`views/render.py`). Nothing is written. `samples` and `label_issues` stream shard by shard; the
table that `samples` returns holds one row per sample it covers: pass `shards` on a large
cache.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from usi_cache import cache_format as schema
from usi_cache.checks.inspect.stats import bucket_probs


class Cache:
    """An open cache (read-only). `shards`: the shard folder for images (default: where the
    cache recorded them)."""

    def __init__(self, path: str | Path, shards: str | Path | None = None):
        self.path = str(path)
        self.shards_dir = None if shards is None else str(shards)
        self._group, self.attrs = schema.open_cache(self.path)
        self.layout = schema.Layout.from_attrs(self.attrs)
        self.classes: list[str] = list(self.attrs["dataset"]["classes"])
        self._arrays = schema.open_arrays(self._group, self.layout)

    def __repr__(self) -> str:
        L = self.layout
        return (f"Cache({self.path!r}: {self.attrs['dataset']['num_samples']} samples in {L.num_shards} shards, "
                f"C = {L.num_classes}, V = {L.views}, k = {L.topk}, teacher {' + '.join(m['name'] for m in schema.teacher_members(self.attrs))})")

    def summary(self) -> dict:
        """The summary of `usi inspect` (attributes, completeness, size on disk, replay check)."""
        from usi_cache.checks.inspect.run import summarize
        return summarize(self.path, self.shards_dir)

    def slot(self, sample: str | int) -> int:
        """The slot of a sample given by key (searched shard by shard) or slot (range-checked)."""
        from usi_cache.checks.inspect.run import find_slot
        if isinstance(sample, (int, np.integer)):
            return find_slot(self.path, slot=int(sample))
        return find_slot(self.path, key=str(sample))

    def topk(self, sample: str | int) -> list[dict]:
        """Per view: {"view", "classes" [k], "names" [k], "probs" [k], "tail_mass"}, the teacher's
        top-k probabilities p_i = exp(log p_i) in descending order. An empty or undecodable slot
        (label -1) or an uncommitted one is a CacheError."""
        slot = self.slot(sample)
        rows = slice(slot, slot + 1)
        label = int(schema.read_array(self._arrays, "labels", rows)[0])
        if label < 0:
            why = "its shard is not committed yet" if label == schema.NOT_WRITTEN else "empty or undecodable"
            raise schema.CacheError(f"slot {slot}: {why} (label {label}): no predictions")
        classes = schema.read_array(self._arrays, "classes", rows)[0]
        log_p = schema.log_probs(schema.read_array(self._arrays, "logits", rows)[0],
                                 schema.read_array(self._arrays, "lse", rows)[0], self.layout)
        p, rest = bucket_probs(log_p)
        return [{"view": v, "classes": classes[v].astype(int).tolist(),
                 "names": [self.classes[int(c)] for c in classes[v]], "probs": p[v].tolist(),
                 "tail_mass": float(rest[v])} for v in range(self.layout.views)]

    def view_image(self, sample: str | int, view: int = 0):
        """The stored view `view` of a sample rendered as the teacher saw it (PIL RGB image at
        the teacher's input size; a paired cache's view is the mixed image). Needs the shards."""
        from PIL import Image

        from usi_cache.views.render import render_stored, shard_images, stored_view
        from usi_cache.checks.common import shards_for
        if not 0 <= view < self.layout.views:
            raise schema.CacheError(f"view {view}: the cache has views 0..{self.layout.views - 1}")
        slot = self.slot(sample)
        S = self.layout.slots_per_shard
        shard, pos = divmod(slot, S)
        manifest = shards_for(self.attrs, self.shards_dir)
        block = schema.read_block(self._arrays, self.layout, shard)
        if block.labels[pos] < 0:
            raise schema.CacheError(f"slot {slot}: no valid sample (label {int(block.labels[pos])})")
        images = shard_images(manifest.path(shard), {pos}, self.layout.paired, block.keys)
        try:
            pixels = render_stored(stored_view(block, pos, view, shard * S, S), images.get(pos), images.get,
                                   schema.view_size(self.attrs), schema.view_spec(self.attrs))
        except ValueError as e:
            raise schema.CacheError(f"slot {slot} view {view}: {e}") from None
        return Image.fromarray(pixels)

    def samples(self, shards=None):
        """One row per valid sample of the committed shards in `shards` (indices; default all):
        slot, key, shard, position, label, label_name, teacher (the top class of the
        view-averaged probabilities), teacher_name, p_label, p_teacher (view-averaged),
        views_top1_label (fraction of views whose top-1 is the label), tail_mass (mean). A
        pandas DataFrame when pandas is installed, else a list of dicts."""
        from usi_cache.checks.inspect.label_issues import shard_rows
        from usi_cache.checks.common import valid_positions
        picked = range(self.layout.num_shards) if shards is None else list(shards)
        out = []
        for i in picked:
            if not 0 <= i < self.layout.num_shards:
                raise schema.CacheError(f"shard {i}: the cache has shards 0..{self.layout.num_shards - 1}")
            positions = valid_positions(self._arrays, self.layout, i)
            if positions is None or not len(positions):
                continue
            s = shard_rows(self._arrays, self.layout, i, positions)
            best = s.rows.argmax(1)
            at = np.arange(len(best))
            out += [{"slot": int(s.slots[j]), "key": s.keys[j], "shard": i, "position": int(s.positions[j]),
                     "label": int(s.labels[j]), "label_name": self.classes[s.labels[j]], "teacher": int(best[j]),
                     "teacher_name": self.classes[best[j]], "p_label": float(s.rows[j, s.labels[j]]),
                     "p_teacher": float(s.rows[j, best[j]]),
                     "views_top1_label": float((s.top1[j] == s.labels[j]).mean()), "tail_mass": float(s.tail[j])}
                    for j in at]
        return _table(out)

    def label_issues(self, top: int = 100, workers: int = 1):
        """The `top` label issues by confident learning (label_issues.find_label_issues), ranked,
        as a table (pandas when installed, else a list of dicts)."""
        from usi_cache.checks.inspect.label_issues import find_label_issues
        r = find_label_issues(self.path, top=top, least_confident=0, progress=False, workers=workers)
        return _table(r["issues"])


def _table(rows: list[dict]):
    try:
        import pandas as pd
    except ImportError:
        return rows
    return pd.DataFrame(rows)


def open_cache(path: str | Path, shards: str | Path | None = None) -> Cache:
    """Open a cache read-only (a folder or an fsspec URL such as s3://bucket/cache.zarr);
    `shards`: its shard folder for images (default: where the cache recorded them)."""
    return Cache(path, shards)
