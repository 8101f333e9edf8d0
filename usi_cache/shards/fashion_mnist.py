"""The Fashion-MNIST source: samples from the Debian package's IDX files
(`apt-get install dataset-fashion-mnist`), for `usi shards fashion-mnist` and the demo.
"""
from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
from PIL import Image

from usi_cache.shards.manifest import ShardError
from usi_cache.shards.tars import Sample

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"


FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped), as used by (Fashion-)MNIST."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 8:
        raise ShardError(f"{path}: not an IDX uint8 file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ShardError(f"{path}: truncated IDX file (expected {dims})")
    return data.reshape(dims)


def samples_from_fashion_mnist(source: str | Path, split: str, limit: int | None = None) -> list[Sample]:
    """Fashion-MNIST `split` ('train' or 't10k'/'test') as PNG samples (28×28 grayscale)."""
    source = Path(source)
    stem = {"train": "train", "test": "t10k", "t10k": "t10k"}[split]
    files = {}
    for part in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        cands = [source / f"{stem}-{part}.gz", source / f"{stem}-{part}"]
        found = [c for c in cands if c.is_file()]
        if not found:
            raise ShardError(f"{cands[0]}: Fashion-MNIST file not found "
                             f"(apt-get install dataset-fashion-mnist, or pass --source DIR)")
        files[part] = found[0]
    images = _read_idx(files["images-idx3-ubyte"])
    labels = _read_idx(files["labels-idx1-ubyte"])
    if len(images) != len(labels):
        raise ShardError(f"{source}: {len(images)} images but {len(labels)} labels in split {split!r}")
    n = len(images) if limit is None else min(limit, len(images))
    name = "test" if stem == "t10k" else "train"
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(images[i], mode="L").save(buf, format="PNG")
        out.append(Sample(f"fmnist_{name}_{i:05d}", "png", buf.getvalue(), int(labels[i])))
    return out
