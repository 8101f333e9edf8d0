"""A Hugging Face dataset split into shards, through the same streaming writer as a folder.

`shards_from_hf` opens one split (a `save_to_disk` folder, parquet files, or a hub name found
in the local cache; nothing is downloaded), reads its label column only, and plans the shards
as `writer.plan_shards` does for files: one Entry `(key, row index, class)` per row, keys
`<split>_<row:08d>` (unique and stable for a given dataset), sorted, shuffled with the seed.
`writer.write_planned` then has worker processes build whole tars: each worker memory-maps
the split's Arrow files itself (`HFSource`) and reads its rows one at a time by index, so the
parent never holds an image and a worker holds one.

Images keep their encoded bytes: an `Image` feature is read with `decode=False` (its
{"bytes", "path"} record), a binary column as it is; only a split of pixel arrays is encoded,
as PNG (Pillow's defaults: deterministic).
"""
from __future__ import annotations

import functools
import glob
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from usi_cache.shards.writer import Entry, plan_shards, read_class_names, write_planned
from usi_cache.shards.images import IMAGE_EXTS, Rejected, check_image
from usi_cache.shards.manifest import Manifest, ShardError
from usi_cache.shards.tars import Sample, sanitize_key

IMAGE_COLUMNS = ("image", "img")  # looked for in this order when --image-column is not given
LABEL_COLUMNS = ("label", "labels", "cls")


def _datasets():
    """The `datasets` package, offline: a hub name is read from the local cache, never downloaded."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # read when huggingface_hub is first imported ...
    try:
        import datasets
    except ImportError:
        raise ShardError("usi shards from-hf needs Hugging Face datasets: pip install 'usi-cache[hf]'") from None
    import huggingface_hub.constants
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True  # ... or was imported before
    return datasets


def _not_found(spec: str) -> ShardError:
    return ShardError(f"{spec}: neither a dataset saved with save_to_disk, parquet files, nor a dataset in the "
                      f"local Hugging Face cache (loaded offline: nothing is downloaded)")


def _unknown_split(spec: str, split: str, splits) -> ShardError:
    return ShardError(f"{spec}: no split {split!r} (splits: {', '.join(map(str, splits)) or 'none'})")


def open_split(spec: str, split: str, cache_dir: str | None = None):
    """The `datasets.Dataset` of `split` in `spec`, memory-mapped from Arrow files.

    Parquet files (and a hub dataset cached as parquet) are converted once to Arrow in
    `cache_dir` (default: the datasets cache), as `datasets.load_dataset` does; a later run
    finds the conversion there.
    """
    ds = _datasets()
    path = Path(spec)
    if path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json")):
        try:
            d = ds.load_from_disk(str(path))
        except (OSError, ValueError, KeyError) as e:
            raise ShardError(f"{spec}: damaged saved dataset ({type(e).__name__}: {e})") from None
        if isinstance(d, ds.DatasetDict):
            if split not in d:
                raise _unknown_split(spec, split, d)
            return d[split]
        if d.split is not None and str(d.split) != split:
            raise _unknown_split(spec, split, [d.split])
        return d
    if any(c in spec for c in "*?["):
        files = sorted(glob.glob(spec))
        if not files:
            raise ShardError(f"{spec}: matches no files")
        data_files = {split: files}
    elif path.is_dir():
        if not any(path.rglob("*.parquet")):
            raise _not_found(spec)
        data_files = None
    elif path.exists() or path.suffix == ".parquet":
        if path.suffix != ".parquet":
            raise _not_found(spec)
        data_files = {split: [str(path)]}
    else:  # a hub name
        data_files = None
    local = data_files is not None or path.is_dir()
    try:
        if local:
            builder = ds.load_dataset_builder("parquet", data_files=data_files,
                                              data_dir=None if data_files else str(path), cache_dir=cache_dir)
        else:
            builder = ds.load_dataset_builder(spec, cache_dir=cache_dir)
    except (OSError, ValueError) as e:  # ConnectionError (offline), DatasetNotFoundError, ...
        raise _not_found(spec) from e
    splits = list(builder.config.data_files or builder.info.splits or [])
    if split not in splits:
        raise _unknown_split(spec, split, splits)
    if local:  # prepare the asked split only, not every split
        builder = ds.load_dataset_builder("parquet", cache_dir=cache_dir,
                                          data_files={split: builder.config.data_files[split]})
    try:
        builder.download_and_prepare()
        return builder.as_dataset(split=split)
    except (OSError, ValueError) as e:
        raise ShardError(f"{spec}: cannot read split {split!r} ({type(e).__name__}: {e})") from None


def _column(d, spec: str, split: str, given: str | None, defaults: tuple[str, ...], what: str) -> str:
    names = d.column_names
    if given is not None:
        if given not in names:
            raise ShardError(f"{spec}: split {split!r} has no column {given!r} (columns: {', '.join(names)})")
        return given
    found = next((c for c in defaults if c in names), None)
    if found is None:
        raise ShardError(f"{spec}: split {split!r} has no {what} column (looked for {', '.join(defaults)}; "
                         f"columns: {', '.join(names)}; name it with --{what}-column)")
    return found


def _image_kind(feature, ds) -> str | None:
    """How the image column stores images: encoded (Image feature), bytes (binary) or array (pixels)."""
    if isinstance(feature, ds.Image):
        return "encoded"
    if isinstance(feature, ds.Value) and feature.dtype in ("binary", "large_binary"):
        return "bytes"
    inner = feature
    while isinstance(inner, (ds.Sequence, ds.LargeList, getattr(ds, "List", ()))):
        inner = inner.feature
    if isinstance(feature, (ds.Array2D, ds.Array3D)):
        inner = ds.Value(feature.dtype)
    if inner is not feature and isinstance(inner, ds.Value) and inner.dtype == "uint8":
        return "array"
    return None


def _labels(d, column: str) -> np.ndarray:
    """The label column, read in batches (the image column is not touched)."""
    col = d.select_columns([column]).with_format("numpy")
    parts = [np.asarray(b[column]) for b in col.iter(batch_size=1 << 16)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def shards_from_hf(spec: str, out: str | Path, *, split: str = "train", image_column: str | None = None,
                   label_column: str | None = None, classes_file: str | None = None,
                   cache_dir: str | None = None, per_shard: int = 1000, seed: int = 0,
                   workers: int | None = None, prefix: str = "shard",
                   progress: bool = True) -> tuple[Manifest, list[Rejected]]:
    """Shard `split` of a Hugging Face dataset into `out` (a folder or URL); returns the manifest
    and every row left out (no label, or an image that does not decode).

    Class names come from the label column's ClassLabel feature, else `classes_file`, else
    0..max(label). The tars depend only on the split's rows, `per_shard` and `seed`.
    """
    if per_shard < 1:
        raise ShardError(f"per_shard: expected a positive integer, got {per_shard}")
    ds = _datasets()
    if not progress:
        ds.disable_progress_bars()
    spec = str(spec)
    d = open_split(spec, split, cache_dir)
    image = _column(d, spec, split, image_column, IMAGE_COLUMNS, "image")
    label = _column(d, spec, split, label_column, LABEL_COLUMNS, "label")
    kind = _image_kind(d.features[image], ds)
    if kind is None:
        raise ShardError(f"{spec}: image column {image!r} holds {d.features[image]}, expected images "
                         f"(an Image feature, encoded bytes or uint8 pixel arrays)")
    feature = d.features[label]
    if not (isinstance(feature, ds.ClassLabel) or (isinstance(feature, ds.Value) and "int" in feature.dtype)):
        raise ShardError(f"{spec}: label column {label!r} holds {feature}, expected integer class indices "
                         f"(ClassLabel or int); name another with --label-column")
    files = tuple(f["filename"] for f in d.cache_files)
    if not files or d._indices is not None:
        raise ShardError(f"{spec}: split {split!r} is not stored in Arrow files alone (save it with save_to_disk)")
    labels = _labels(d, label)
    top = int(labels.max()) if len(labels) else -1
    if isinstance(feature, ds.ClassLabel):
        classes = list(feature.names)
        if classes_file:
            raise ShardError(f"--classes: {spec} names its classes itself (ClassLabel of {label!r})")
    elif classes_file:
        classes = read_class_names(classes_file)
    else:
        classes = [str(c) for c in range(top + 1)]
    if top >= len(classes):
        row = int(np.argmax(labels))
        raise ShardError(f"{spec}: split {split!r} row {row} has label {top}, but there are {len(classes)} classes")
    width = max(8, len(str(len(labels) - 1)))
    stem = sanitize_key(split)
    entries: list[Entry] = []
    rejected = []
    for row, cls in enumerate(labels.tolist()):
        key = f"{stem}_{row:0{width}d}"
        if cls < 0:  # ClassLabel's -1: no label (e.g. a test split)
            rejected.append(Rejected(f"{spec} {key}", f"no label ({cls})"))
        else:
            entries.append((key, row, cls))
    del labels
    plan = plan_shards(entries, per_shard, seed) if entries else []
    del entries
    source = HFSource(spec, files, image, kind)
    return write_planned(source, plan, classes, out, per_shard=per_shard, workers=workers, prefix=prefix,
                         progress=progress, rejected=rejected, what=f"{spec} (split {split!r})")


@dataclass(frozen=True)
class HFSource:
    """One split's rows by index, for `writer.write_planned`'s workers."""

    name: str  # DATASET_OR_PATH, to name rows left out
    files: tuple[str, ...]  # the split's Arrow files, in order; memory-mapped by each worker
    column: str  # the image column
    kind: str  # "encoded", "bytes" or "array" (see _image_kind)

    def samples(self, shard: list[Entry], rejected: list) -> Iterator[Sample]:
        d = _open_rows(self.files, self.column, self.kind)
        for key, row, cls in shard:
            try:
                data = _image_bytes(d[row][self.column], self.kind)
                ext = check_image(data)
                if ext is None:
                    raise ValueError(f"image format not one of {', '.join(IMAGE_EXTS)}")
            except ValueError as e:
                rejected.append([f"{self.name} {key}", str(e)])
                continue
            yield Sample(key, ext, data, cls)


@functools.lru_cache(maxsize=1)
def _open_rows(files: tuple[str, ...], column: str, kind: str):
    """The image column of the split, memory-mapped (opened once per worker process)."""
    ds = _datasets()
    parts = [ds.Dataset.from_file(f) for f in files]
    d = (parts[0] if len(parts) == 1 else ds.concatenate_datasets(parts)).select_columns([column])
    if kind == "encoded":  # the stored {"bytes", "path"}, not a decoded PIL image
        d = d.cast_column(column, ds.Image(decode=False))
    elif kind == "array":
        d = d.with_format("numpy")
    return d


def _image_bytes(value, kind: str) -> bytes:
    """A row's encoded image; ValueError (the row is left out) when there is none."""
    if kind == "bytes":
        if value is None:
            raise ValueError("no image (null)")
        return bytes(value)
    if kind == "encoded":
        if value is None or (value.get("bytes") is None and not value.get("path")):
            raise ValueError("no image (null)")
        if value.get("bytes") is not None:
            return value["bytes"]
        try:  # an Image feature that stores a path only: the file it names
            with open(value["path"], "rb") as f:
                return f.read()
        except OSError as e:
            raise ValueError(f"image file {value['path']} not readable ({e.strerror})") from None
    # the feature is uint8 (see _image_kind), but the numpy format may hand it over widened
    arr = np.asarray(value).astype(np.uint8)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
        raise ValueError(f"pixel array of shape {arr.shape}, expected HxW or HxWx1/3/4")
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(arr[:, :, 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr).save(buf, format="PNG")
    return buf.getvalue()
