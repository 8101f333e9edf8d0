"""Writing and reading WebDataset shards, and the dataset manifest (`dataset.json`).

Shards are plain tar files in the WebDataset layout: each sample is `KEY.<ext>` (the original
encoded image bytes) plus `KEY.cls` (the class index as ASCII). Writing is deterministic —
sorted input, a seeded shuffle across shards, fixed tar headers (mtime 0, uid 0) — so the
same input gives byte-identical tars and the same fingerprint.

`read_shard` is the one tar reader of the project (stage 1, verify, inspect, `usi shards
index`); `write_tar` the one tar writer (in-memory sources here, folders in `ingest.py`).
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from itertools import islice
from typing import IO, Iterable, Iterator

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
    name: str  # tar file name relative to the shard folder, or a full path / URL (indexed shards elsewhere)
    count: int  # samples in this shard
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """What `dataset.json` says about a folder of shards."""

    root: str  # the folder (or URL prefix) holding dataset.json
    classes: tuple[str, ...]
    per_shard: int  # the largest shard's count (or more); also the cache's slots per shard
    shards: tuple[ShardInfo, ...]
    fingerprint: str  # sha256 over classes, per_shard and every shard's name, count and sha256

    @property
    def num_samples(self) -> int:
        return sum(s.count for s in self.shards)

    def path(self, index: int) -> str:
        """Shard `index`'s tar: a local path or a URL (see `shard_path`)."""
        return shard_path(self.root, self.shards[index].name)

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


def shard_path(root: str, name: str) -> str:
    """Where a manifest's shard `name` points: a URL or an absolute path as it is, anything else
    (`shard-000000.tar`, `sub/x.tar`) relative to the folder or prefix `root` holding dataset.json."""
    if storage.is_url(name) or os.path.isabs(name):
        return name
    return storage.join(root, name)


def fingerprint(classes: Iterable[str], per_shard: int, shards: Iterable[ShardInfo]) -> str:
    payload = json.dumps({"classes": list(classes), "per_shard": per_shard,
                          "shards": [[s.name, s.count, s.sha256] for s in shards]},
                         sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def load_manifest(root: str | Path) -> Manifest:
    """Read and check `ROOT/dataset.json` (ROOT a folder or a URL); every listed shard must exist.
    Shard names are relative to ROOT, or full paths / URLs (`usi shards index --out`)."""
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


class _Hashed:
    """A file object that hashes what passes through it (tarfile writes and stream-reads)."""

    def __init__(self, f: IO[bytes]):
        self.f, self.sha256, self.pos = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.pos += len(data)
        return self.f.write(data)

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.sha256.update(data)
        self.pos += len(data)
        return data

    def tell(self) -> int:
        return self.pos


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_tar(path: str, samples: Iterable[Sample]) -> tuple[int, str]:
    """Write `samples` (in their order) as one deterministic tar; returns (count, sha256).

    Members are `KEY.<ext>` then `KEY.cls`, USTAR headers with mtime 0. A local tar is
    streamed to a temporary name and renamed when complete, so memory holds one sample and a
    killed run never leaves a partial tar under the final name; a URL is one whole-object
    write (atomic for readers), so it holds one shard.
    """
    count = 0

    def fill(f: IO[bytes]) -> str:
        nonlocal count
        out = _Hashed(f)
        with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for s in samples:
                _tar_member(tar, f"{s.key}.{s.ext}", s.data)
                _tar_member(tar, f"{s.key}.cls", str(s.cls).encode())
                count += 1
        return out.sha256.hexdigest()

    if storage.is_url(path):
        buf = io.BytesIO()
        digest = fill(buf)
        storage.write_bytes(path, buf.getvalue())
        return count, digest
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            digest = fill(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return count, digest


def write_manifest(out: str, classes: Iterable[str], per_shard: int, infos: Iterable[ShardInfo],
                   class_counts: Iterable[dict[int, int]] | None = None) -> Manifest:
    """Write `OUT/dataset.json` for shards already written; call it last, so that a folder
    without one is never taken for a complete set of shards. `class_counts` (per shard, {class:
    samples}) are stored for the class-order check (class_spread.py), one line per shard; they are
    not part of the fingerprint (they follow from the shards' bytes) nor of `Manifest`."""
    classes, infos = tuple(classes), tuple(infos)
    m = Manifest(out, classes, per_shard, infos, fingerprint(classes, per_shard, infos))
    d = m.to_dict()
    if class_counts is not None:  # [class, count, class, count, ...], classes ascending
        for s, c in zip(d["shards"], class_counts, strict=True):
            s["class_counts"] = [int(x) for k in sorted(c) for x in (k, c[k])]
    shards = ",\n".join("  " + json.dumps(s, separators=(",", ":")) for s in d.pop("shards"))
    text = json.dumps(d, indent=1)[:-2] + f',\n "shards": [\n{shards}\n ]\n}}\n'
    storage.write_bytes(storage.join(out, MANIFEST), text.encode())
    return m


def output_folder(out: str | Path) -> str:
    """`out` as the manifest's root (a URL without its trailing slash); a local folder is created."""
    if storage.is_url(out):
        return str(out).rstrip("/")
    Path(out).mkdir(parents=True, exist_ok=True)
    return str(out)


def write_shards(samples: Iterable[Sample], classes: Iterable[str], out: str | Path, *,
                 per_shard: int = 1000, seed: int | None = 0, prefix: str = "shard",
                 progress: bool = True) -> Manifest:
    """Write `samples` as deterministic tar shards plus `dataset.json` into `out` (a folder or URL).

    With a `seed`, samples are sorted by key, then shuffled with the seed, so that shards mix
    classes and the result depends only on the input; this holds every sample in memory (fine
    for Fashion-MNIST and test data; folders go through `ingest.shards_from_folder`, which
    holds paths only). With `seed=None` the stream is written in its own order, one shard in
    memory at a time.
    """
    classes = tuple(classes)
    if per_shard < 1:
        raise ShardError(f"per_shard: expected a positive integer, got {per_shard}")
    if seed is not None:
        samples = sorted(samples, key=lambda s: s.key)
        keys = {s.key for s in samples}
        if len(keys) != len(samples):
            raise ShardError("duplicate sample keys in the input")
        order = np.random.default_rng(seed).permutation(len(samples))
        samples = [samples[j] for j in order]
    out = output_folder(out)
    stream, infos, counts = iter(samples), [], []
    bar = progress_bar(progress, f"writing shards to {out}", "shard")
    while chunk := list(islice(stream, per_shard)):
        name = f"{prefix}-{len(infos):06d}.tar"
        count, digest = write_tar(storage.join(out, name), chunk)
        infos.append(ShardInfo(name, count, digest))
        counts.append(dict(Counter(s.cls for s in chunk)))
        bar.update(1)
    bar.close()
    if not infos:
        raise ShardError(f"{out}: no samples to write")
    return write_manifest(out, classes, per_shard, infos, counts)


def progress_bar(enabled: bool, desc: str, unit: str, total: int | None = None, initial: int = 0):
    """A tqdm bar (rate and ETA), or a silent stand-in with the same update/close."""
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False, disable=not enabled,
                smoothing=0.1)


def sanitize_key(text: str) -> str:
    """A WebDataset-safe key: no dots, no path separators."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


@dataclass(frozen=True)
class Rejected:
    path: str
    reason: str


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


_DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError)


# Pillow's format names -> the extension a shard stores the bytes under (MPO: a JPEG with extra frames)
_FORMAT_EXTS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif",
                "TIFF": "tif", "PPM": "ppm"}


def check_image(data: bytes) -> str | None:
    """Raise ValueError unless `data` decodes as an image (fully: a truncated file is caught);
    return the extension for its format (`jpg`, `png`, ...; None for one read_shard does not take)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return _FORMAT_EXTS.get(im.format)
    except _DECODE_ERRORS as e:
        raise ValueError(f"unreadable image ({e})") from None


def decode_image(data: bytes) -> Image.Image:
    """Decode encoded image bytes to an RGB PIL image (raises ValueError when undecodable)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except _DECODE_ERRORS as e:
        raise ValueError(f"undecodable image ({e})") from None


# WebDataset's split of a member name (webdataset.tariterators.base_plus_ext): the key is the
# name up to the first dot of its last path component, the extension the rest.
_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def read_shard(path: str | Path) -> Iterator[Sample]:
    """Yield the samples of one shard (a path or URL) in tar order, streamed.

    The rule, the same for every stage: a sample is the run of consecutive regular-file
    members sharing a key (WebDataset's grouping: the member name up to the first dot of its
    last path component; extensions compared lower-case; names without a dot are skipped).
    Its image is the entry whose extension comes first in IMAGE_EXTS (jpg, jpeg, png, webp,
    bmp, gif, tif, tiff, ppm), whatever the members' order in the tar; other entries (json,
    txt, a second image) are ignored. `cls` must be a non-negative integer.

    A damaged tar, a sample without an image or a cls, or a repeated entry raise a one-line
    ShardError naming the tar (and the sample); storage errors pass through as StorageError.
    Whether the shard holds as many samples as its manifest says is the caller's check
    (`Manifest.check_count`): a tar cut between members reads without error.
    """
    path = str(path)
    with _open_shard(path) as f:
        yield from _tar_samples(f, path)


def scan_shard(path: str) -> tuple[int, str, dict[int, int]]:
    """(samples, sha256 of the file, samples per cls) of one shard, read once front to back."""
    path = str(path)
    count, classes = 0, Counter()
    with _open_shard(path) as f:
        hashed = _Hashed(f)
        for s in _tar_samples(hashed, path):
            count += 1
            classes[s.cls] += 1
        while hashed.read(1 << 20):  # the end-of-archive padding counts in the sha256 too
            pass
    return count, hashed.sha256.hexdigest(), dict(classes)


@contextlib.contextmanager
def _open_shard(path: str) -> Iterator[IO[bytes]]:
    """A shard opened for reading; what goes wrong while it is read becomes one line naming it."""
    try:
        # for a URL, a network failure mid-read is a StorageError, not a "damaged tar"
        with storage.errors(path, "reading"), storage.open_read(path) as f:
            yield f
    except storage.StorageError:
        raise  # unreachable storage is not a damaged tar
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ShardError(f"{path}: damaged tar ({e})") from None


def _tar_samples(f: IO[bytes], path: str) -> Iterator[Sample]:
    """read_shard's rule over an open file, read strictly front to back (tar stream mode)."""
    key, entries = None, {}

    def sample() -> Sample:
        ext = next((e for e in IMAGE_EXTS if e in entries), None)
        if ext is None or "cls" not in entries:
            what = "an image (" + ", ".join(IMAGE_EXTS) + ")" if ext is None else "a cls entry"
            raise ShardError(f"{path}: sample {key!r} lacks {what}; it has {sorted(entries) or 'nothing'}")
        text = entries["cls"].decode(errors="replace").strip()
        if not re.fullmatch(r"[0-9]+", text):
            raise ShardError(f"{path}: sample {key!r} has cls {text[:40]!r}, expected a non-negative integer")
        return Sample(key, ext, entries[ext], int(text))

    with tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            m = _MEMBER.match(member.name) if member.isfile() else None
            if m is None:
                continue
            k, ext = m.group(1), m.group(2).lower()
            if k != key:
                if key is not None:
                    done, entries = sample(), {}  # a suspended reader holds no yielded sample's bytes
                    yield done
                key, entries = k, {}
            if ext in entries:
                raise ShardError(f"{path}: sample {key!r} has two {ext!r} entries")
            entries[ext] = tar.extractfile(member).read()
        if key is not None:
            yield sample()
