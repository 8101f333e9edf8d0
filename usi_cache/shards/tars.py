"""Writing and reading WebDataset shards (their manifest `dataset.json` is manifest.py).

Shards are plain tar files in the WebDataset layout: each sample is `KEY.<ext>` (the original
encoded image bytes) plus `KEY.cls` (the class index as ASCII). Writing is deterministic —
sorted input, a seeded shuffle across shards, fixed tar headers (mtime 0, uid 0) — so the
same input gives byte-identical tars and the same fingerprint.

`read_shard` is the one tar reader of the project (stage 1, verify, inspect, `usi shards
index`); `write_tar` the one tar writer (in-memory sources here, folders in `folder.py`).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import tarfile
from collections import Counter
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import IO, Iterable, Iterator

import numpy as np

from usi_cache import storage
from usi_cache.progress import progress_bar
from usi_cache.shards.images import IMAGE_EXTS
from usi_cache.shards.manifest import Manifest, ShardError, ShardInfo, output_folder, write_manifest


@dataclass(frozen=True)
class Sample:
    key: str  # unique, no dots (WebDataset splits the extension at the first dot)
    ext: str  # image extension inside the tar, e.g. "png"
    data: bytes  # encoded image bytes, as found in the source
    cls: int  # class index into the manifest's class names


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


def write_shards(samples: Iterable[Sample], classes: Iterable[str], out: str | Path, *,
                 per_shard: int = 1000, seed: int | None = 0, prefix: str = "shard",
                 progress: bool = True) -> Manifest:
    """Write `samples` as deterministic tar shards plus `dataset.json` into `out` (a folder or URL).

    With a `seed`, samples are sorted by key, then shuffled with the seed, so that shards mix
    classes and the result depends only on the input; this holds every sample in memory (fine
    for Fashion-MNIST and test data; folders go through `folder.shards_from_folder`, which
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


def sanitize_key(text: str) -> str:
    """A WebDataset-safe key: no dots, no path separators."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


# WebDataset's split of a member name (webdataset.tariterators.base_plus_ext): the key is the
# name up to the first dot of its last path component, the extension the rest.
_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def read_shard(path: str | Path, skip: int = 0) -> Iterator[Sample]:
    """Yield the samples of one shard (a path or URL) in tar order, streamed; with `skip` > 0, from
    its sample `skip` on, passing over the first `skip` samples by their tar headers only (the file
    is read seekable, as local files and fsspec URLs are: a reader that starts mid-shard does not
    read the bytes before its start; those samples are not checked).

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
        yield from _tar_samples(f, path, skip)


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


def _tar_samples(f: IO[bytes], path: str, skip: int = 0) -> Iterator[Sample]:
    """read_shard's rule over an open file, read strictly front to back (tar stream mode); with
    `skip`, the first `skip` samples' members are passed over by seeking (their data is not read)."""
    key, entries = None, {}
    skipped = 0  # samples passed over so far

    def sample() -> Sample:
        ext = next((e for e in IMAGE_EXTS if e in entries), None)
        if ext is None or "cls" not in entries:
            what = "an image (" + ", ".join(IMAGE_EXTS) + ")" if ext is None else "a cls entry"
            raise ShardError(f"{path}: sample {key!r} lacks {what}; it has {sorted(entries) or 'nothing'}")
        text = entries["cls"].decode(errors="replace").strip()
        if not re.fullmatch(r"[0-9]+", text):
            raise ShardError(f"{path}: sample {key!r} has cls {text[:40]!r}, expected a non-negative integer")
        return Sample(key, ext, entries[ext], int(text))

    with tarfile.open(fileobj=f, mode="r:" if skip else "r|") as tar:
        for member in tar:
            m = _MEMBER.match(member.name) if member.isfile() else None
            if m is None:
                continue
            k, ext = m.group(1), m.group(2).lower()
            if skipped < skip:  # still passing over: count keys, read nothing
                if k != key:
                    skipped += key is not None
                    key = k
                if skipped < skip:
                    continue
                key = None  # the first member of sample `skip`: read it as the start of a sample
            if k != key:
                if key is not None:
                    done, entries = sample(), {}  # a suspended reader holds no yielded sample's bytes
                    yield done
                key, entries = k, {}
            if ext in entries:
                raise ShardError(f"{path}: sample {key!r} has two {ext!r} entries")
            entries[ext] = tar.extractfile(member).read()
        if key is not None and skipped >= skip:  # (a shard shorter than `skip` yields nothing)
            yield sample()
