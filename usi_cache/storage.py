"""Local paths and fsspec URLs behind one small API.

Shards, caches and teacher checkpoints may live on object storage: any fsspec URL
(`s3://bucket/prefix`, `gs://...`, `memory://...`). Local paths keep using the OS directly
(fsync, atomic renames); URLs go through fsspec, which needs the protocol's package (`s3fs`
for S3: `pip install 'usi-cache[s3]'`). Credentials and endpoints come from the usual places
(AWS_* variables, ~/.aws/) and from fsspec's `FSSPEC_<PROTOCOL>_<OPTION>` variables, e.g.
`FSSPEC_S3_ENDPOINT_URL=http://127.0.0.1:9000` for an S3-compatible server.

On object storage a single object write is atomic (readers see the old object or the whole
new one), which is all the cache's commit protocol needs: each WebDataset shard is one Zarr
shard object per array, and `labels` is written last.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import IO, Iterator

EXTRAS = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}


class _ForkedSessionFilter(logging.Filter):
    """Drop aiohttp's "Unclosed client session/connector" in forked DataLoader workers.

    fsspec discards the parent's cached filesystems in a forked child; their aiohttp sessions
    belong to the parent's event loop and cannot be closed there, so garbage collection reports
    them. They were never used in the child, and the parent still owns and closes them.
    """

    def __init__(self):
        super().__init__()
        self.pid = os.getpid()  # the process that imported this module: its messages pass

    def filter(self, record: logging.LogRecord) -> bool:
        return os.getpid() == self.pid or not str(record.msg).startswith(
            ("Unclosed client session", "Unclosed connector"))


logging.getLogger("asyncio").addFilter(_ForkedSessionFilter())


class StorageError(OSError):
    """A URL that cannot be reached, read or written; the message names the URL."""


def is_url(path: str | os.PathLike) -> bool:
    """True for `proto://...` (other than file://), which goes through fsspec."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def _local(path: str | os.PathLike) -> Path:
    text = str(path)
    return Path(text[len("file://"):] if text.startswith("file://") else text)


def join(root: str | os.PathLike, *names: str) -> str:
    """`root/name/...` for a folder path or a URL prefix."""
    if is_url(root):
        return "/".join([str(root).rstrip("/"), *names])
    return str(_local(root).joinpath(*names))


def basename(path: str | os.PathLike) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def resolve(path: str | os.PathLike) -> str:
    """An absolute local path, or the URL unchanged (what a cache records as the shards' root)."""
    return str(path).rstrip("/") if is_url(path) else str(_local(path).resolve())


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for a URL, with a one-line error when it can't.

    The filesystem's listing cache is dropped for the path: other processes (ranks, the Zarr
    store's own client) write to the same bucket, and a stale listing would hide their objects.
    """
    import fsspec
    protocol = str(url).split("://", 1)[0]
    try:
        fs, path = fsspec.core.url_to_fs(str(url))
        fs.invalidate_cache(path)
        return fs, path
    except ImportError:
        pkg = EXTRAS.get(protocol)
        hint = f"pip install {pkg}" + (" (or 'usi-cache[s3]')" if protocol == "s3" else "") if pkg else \
            "install the fsspec implementation for it"
        raise StorageError(f"{url}: {protocol}:// URLs need an extra package: {hint}") from None
    except ValueError as e:  # fsspec: "Protocol not known"
        raise StorageError(f"{url}: {e}") from None


@contextlib.contextmanager
def errors(url: str, what: str, hint: str = "") -> Iterator[None]:
    """Turn a storage client's exception (botocore, aiohttp, ...) into a StorageError naming `url`.
    A no-op for local paths: their OSErrors (a full disk, ...) pass through unchanged."""
    if not is_url(url):
        yield
        return
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError:
        raise StorageError(f"{url}: not found") from None
    except PermissionError as e:
        raise StorageError(f"{url}: permission denied ({_first_line(e)})") from None
    except Exception as e:
        if not is_client_error(e):
            raise  # a bug, not the storage: keep its traceback
        raise StorageError(f"{url}: {what} failed ({type(e).__name__}: {_first_line(e)})"
                           + (f"; {hint}" if hint else "")) from None


# Clients raise their own types for network and credential failures (botocore's
# EndpointConnectionError and NoCredentialsError are not OSErrors).
_CLIENT_MODULES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec", "gcsfs", "google", "adlfs", "azure")


def is_client_error(e: BaseException) -> bool:
    """An exception of the storage (OS or a storage client), not of the program."""
    return isinstance(e, (OSError, TimeoutError)) or type(e).__module__.split(".")[0] in _CLIENT_MODULES


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def is_file(path: str | os.PathLike) -> bool:
    if not is_url(path):
        return _local(path).is_file()
    fs, p = filesystem(path)
    with errors(str(path), "checking"):
        try:  # not fs.isfile(): that answers False for an unreachable server too
            return fs.info(p)["type"] == "file"
        except FileNotFoundError:
            return False


def is_dir(path: str | os.PathLike) -> bool:
    """A local folder; for a URL, a prefix that holds at least one object (or a bucket)."""
    if not is_url(path):
        return _local(path).is_dir()
    fs, p = filesystem(path)
    with errors(str(path), "checking"):
        try:
            return fs.info(p)["type"] == "directory"
        except FileNotFoundError:
            return False


def listdir(path: str | os.PathLike) -> list[str]:
    """Names directly under a folder or prefix; [] when it does not exist."""
    if not is_url(path):
        p = _local(path)
        return sorted(x.name for x in p.iterdir()) if p.is_dir() else []
    fs, p = filesystem(path)
    with errors(str(path), "listing"):
        try:
            return sorted(basename(x) for x in fs.ls(p, detail=False))
        except FileNotFoundError:
            return []


def read_bytes(path: str | os.PathLike) -> bytes:
    if not is_url(path):
        return _local(path).read_bytes()
    fs, p = filesystem(path)
    with errors(str(path), "reading"):
        return fs.cat_file(p)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a whole file or object (one PUT on object storage: atomic for readers)."""
    if not is_url(path):
        p = _local(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        return
    fs, p = filesystem(path)
    with errors(str(path), "writing"):
        fs.pipe_file(p, data)


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append to a small text file (a run log). Object storage has no append: the object is
    read and written back whole, which is fine for a log of one line per epoch."""
    if not is_url(path):
        with open(_local(path), "a") as f:
            f.write(text)
        return
    old = read_bytes(path) if is_file(path) else b""
    write_bytes(path, old + text.encode())


def open_read(path: str | os.PathLike) -> IO[bytes]:
    """A seekable binary file object; read-ahead buffered for URLs."""
    if not is_url(path):
        return open(_local(path), "rb")
    fs, p = filesystem(path)
    with errors(str(path), "opening"):
        # large blocks: shards are read front to back, one request per 16 MiB
        return fs.open(p, "rb", block_size=16 << 20, cache_type="readahead")


def remove_tree(path: str | os.PathLike) -> None:
    """Delete a folder or every object under a prefix (nothing when absent)."""
    if not is_url(path):
        if _local(path).is_dir():
            shutil.rmtree(_local(path))
        return
    fs, p = filesystem(path)
    with errors(str(path), "deleting"):
        if fs.exists(p):
            fs.rm(p, recursive=True)


def sizes(path: str | os.PathLike) -> dict[str, int]:
    """Bytes of every file under a folder or prefix, keyed by its path relative to it."""
    if not is_url(path):
        root = _local(path)
        return {str(f.relative_to(root)): f.stat().st_size for f in root.rglob("*") if f.is_file()}
    fs, p = filesystem(path)
    with errors(str(path), "listing"):
        found = fs.find(p.rstrip("/") + "/", detail=True)
    prefix = p.rstrip("/") + "/"
    return {k[len(prefix):] if k.startswith(prefix) else k: int(v.get("size") or 0) for k, v in found.items()}


def zarr_store(path: str | os.PathLike, *, read_only: bool):
    """What zarr.open_group takes: the local path, or an fsspec store for a URL."""
    if not is_url(path):
        return str(_local(path))
    from zarr.storage import FsspecStore
    filesystem(path)  # the one-line error when the protocol's package is missing
    with errors(str(path), "opening"):
        return FsspecStore.from_url(str(path), read_only=read_only)
