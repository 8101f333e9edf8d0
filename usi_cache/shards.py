"""Writing and reading WebDataset shards, and the dataset manifest (`dataset.json`).

Shards are plain tar files in the WebDataset layout: each sample is `KEY.<ext>` (the original
encoded image bytes) plus `KEY.cls` (the class index as ASCII). Writing is deterministic —
sorted input, a seeded shuffle across shards, fixed tar headers (mtime 0, uid 0) — so the
same input gives byte-identical tars and the same fingerprint.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from . import storage

MANIFEST = "dataset.json"
MANIFEST_FORMAT = "usi-cache-shards/1"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


class ShardError(ValueError):
    """Bad shard input: an empty source, a missing manifest, a damaged tar."""


@dataclass(frozen=True)
class Sample:
    key: str  # unique, no dots (WebDataset splits the extension at the first dot)
    ext: str  # image extension inside the tar, e.g. "png"
    data: bytes  # encoded image bytes, as found in the source
    cls: int  # class index into the manifest's class names


@dataclass(frozen=True)
class ShardInfo:
    name: str  # tar file name, relative to the shard folder
    count: int  # samples in this shard
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """What `dataset.json` says about a folder of shards."""

    root: str  # the folder (or URL prefix) holding dataset.json
    classes: tuple[str, ...]
    per_shard: int  # samples per shard (the last may be short); also the cache's slots per shard
    shards: tuple[ShardInfo, ...]
    fingerprint: str  # sha256 over classes, per_shard and every shard's name, count and sha256

    @property
    def num_samples(self) -> int:
        return sum(s.count for s in self.shards)

    def path(self, index: int) -> str:
        """Shard `index`'s tar: a local path or a URL, like the root."""
        return storage.join(self.root, self.shards[index].name)

    def check_count(self, index: int, count: int) -> None:
        """A shard read to its end must hold what dataset.json says (a tar cut between members
        reads without error)."""
        expected = self.shards[index].count
        if count != expected:
            raise ShardError(f"{self.path(index)}: holds {count} samples, "
                             f"{storage.join(self.root, MANIFEST)} says {expected}")

    def to_dict(self) -> dict:
        return {
            "format": MANIFEST_FORMAT,
            "classes": list(self.classes),
            "per_shard": self.per_shard,
            "num_samples": self.num_samples,
            "shards": [{"name": s.name, "count": s.count, "sha256": s.sha256} for s in self.shards],
            "fingerprint": self.fingerprint,
        }


def fingerprint(classes: Iterable[str], per_shard: int, shards: Iterable[ShardInfo]) -> str:
    payload = json.dumps({"classes": list(classes), "per_shard": per_shard,
                          "shards": [[s.name, s.count, s.sha256] for s in shards]},
                         sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def load_manifest(root: str | Path) -> Manifest:
    """Read and check `ROOT/dataset.json` (ROOT a folder or a URL); every listed shard must exist."""
    root = str(root).rstrip("/") if storage.is_url(root) else str(root)
    path = storage.join(root, MANIFEST)
    if not storage.is_dir(root):
        raise ShardError(f"{root}: shard folder not found")
    if not storage.is_file(path):
        raise ShardError(f"{path}: no dataset manifest (make shards with `usi shards ...`)")
    try:
        d = json.loads(storage.read_bytes(path))
        shards = tuple(ShardInfo(s["name"], int(s["count"]), s["sha256"]) for s in d["shards"])
        m = Manifest(root, tuple(d["classes"]), int(d["per_shard"]), shards, d["fingerprint"])
    except (ValueError, KeyError, TypeError) as e:
        raise ShardError(f"{path}: not a valid dataset manifest ({type(e).__name__}: {e})") from None
    if not m.shards:
        raise ShardError(f"{path}: lists no shards")
    present = set(storage.listdir(root))  # one listing, not a request per shard
    for i, s in enumerate(m.shards):
        if s.name not in present and ("/" not in s.name or not storage.is_file(m.path(i))):
            raise ShardError(f"{m.path(i)}: shard listed in {MANIFEST} is missing")
    if fingerprint(m.classes, m.per_shard, m.shards) != m.fingerprint:
        raise ShardError(f"{path}: fingerprint does not match its own contents (edited by hand?)")
    return m


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shards(samples: list[Sample], classes: Iterable[str], out: str | Path, *,
                 per_shard: int = 1000, seed: int = 0, prefix: str = "shard",
                 progress: bool = True) -> Manifest:
    """Write `samples` as deterministic tar shards plus `dataset.json` into `out` (a folder or URL).

    Samples are sorted by key, then shuffled with `seed`, so that shards mix classes and the
    result depends only on the input.
    """
    out = str(out).rstrip("/") if storage.is_url(out) else str(out)
    classes = tuple(classes)
    if per_shard < 1:
        raise ShardError(f"per_shard: expected a positive integer, got {per_shard}")
    if not samples:
        raise ShardError(f"{out}: no samples to write")
    samples = sorted(samples, key=lambda s: s.key)
    keys = [s.key for s in samples]
    if len(set(keys)) != len(keys):
        raise ShardError("duplicate sample keys in the input")
    order = np.random.default_rng(seed).permutation(len(samples))
    if not storage.is_url(out):
        Path(out).mkdir(parents=True, exist_ok=True)
    infos = []
    n_shards = (len(samples) + per_shard - 1) // per_shard
    for i in _progress(range(n_shards), progress, f"writing {n_shards} shards to {out}"):
        name = f"{prefix}-{i:06d}.tar"
        buf = io.BytesIO()
        idx = order[i * per_shard:(i + 1) * per_shard]
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for j in idx:
                s = samples[j]
                _tar_member(tar, f"{s.key}.{s.ext}", s.data)
                _tar_member(tar, f"{s.key}.cls", str(s.cls).encode())
        data = buf.getvalue()
        storage.write_bytes(storage.join(out, name), data)
        infos.append(ShardInfo(name, len(idx), hashlib.sha256(data).hexdigest()))
    m = Manifest(out, classes, per_shard, tuple(infos), fingerprint(classes, per_shard, infos))
    # the manifest last: a folder without one is not taken for a complete set of shards
    storage.write_bytes(storage.join(out, MANIFEST), (json.dumps(m.to_dict(), indent=1) + "\n").encode())
    return m


def _progress(it, enabled: bool, desc: str):
    if not enabled:
        return it
    from tqdm import tqdm
    return tqdm(it, desc=desc, unit="shard", leave=False)


def sanitize_key(text: str) -> str:
    """A WebDataset-safe key: no dots, no path separators."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


@dataclass(frozen=True)
class Rejected:
    path: str
    reason: str


def samples_from_folder(src: str | Path) -> tuple[list[Sample], tuple[str, ...], list[Rejected]]:
    """Collect `SRC/<class>/<image>` files, keeping their encoded bytes.

    Returns the samples, the class names (sorted folder names) and the files left out
    (not an image, or not decodable) with the reason.
    """
    src = Path(src)
    if not src.is_dir():
        raise ShardError(f"{src}: source folder not found")
    class_dirs = sorted(p for p in src.iterdir() if p.is_dir())
    if not class_dirs:
        raise ShardError(f"{src}: no class folders (expected SRC/<class>/<image>)")
    classes = tuple(p.name for p in class_dirs)
    samples, rejected, used = [], [], set()
    for cls, cdir in enumerate(class_dirs):
        for f in sorted(p for p in cdir.rglob("*") if p.is_file()):
            ext = f.suffix.lower().lstrip(".")
            if ext not in IMAGE_EXTS:
                rejected.append(Rejected(str(f), "not an image file"))
                continue
            data = f.read_bytes()
            try:
                with Image.open(io.BytesIO(data)) as im:
                    im.load()
            except (UnidentifiedImageError, OSError, ValueError) as e:
                rejected.append(Rejected(str(f), f"unreadable image ({e})"))
                continue
            key = sanitize_key(f"{cdir.name}_{f.relative_to(cdir).with_suffix('')}")
            base, n = key, 1
            while key in used:
                n += 1
                key = f"{base}_{n}"
            used.add(key)
            samples.append(Sample(key, "jpg" if ext == "jpeg" else ext, data, cls))
    if not samples:
        raise ShardError(f"{src}: no readable images found ({len(rejected)} files left out)")
    return samples, classes, rejected


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


def decode_image(data: bytes) -> Image.Image:
    """Decode encoded image bytes to an RGB PIL image (raises ValueError when undecodable)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"undecodable image ({e})") from None


def read_shard(path: str | Path) -> Iterator[Sample]:
    """Yield the samples of one shard (a path or URL) in tar order (a damaged tar raises ShardError)."""
    path = str(path)
    current: dict = {}
    key = None

    def flush():
        if key is None:
            return None
        img = [(e, d) for e, d in current.items() if e in IMAGE_EXTS]
        if not img or "cls" not in current:
            raise ShardError(f"{path}: sample {key!r} lacks an image or a cls entry")
        try:
            cls = int(current["cls"].decode().strip())
        except ValueError:
            raise ShardError(f"{path}: sample {key!r} has a non-integer cls") from None
        return Sample(key, img[0][0], img[0][1], cls)

    try:
        # for a URL, a network failure mid-read is a StorageError, not a "damaged tar"
        with storage.errors(path, "reading"), storage.open_read(path) as f, \
                tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                k, _, ext = member.name.partition(".")
                if k != key:
                    s = flush()
                    if s is not None:
                        yield s
                    key, current = k, {}
                current[ext.lower()] = tar.extractfile(member).read()
            s = flush()
            if s is not None:
                yield s
    except storage.StorageError:
        raise  # unreachable storage is not a damaged tar
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ShardError(f"{path}: damaged tar ({e})") from None
