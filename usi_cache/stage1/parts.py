"""Stage 1 as independent jobs: `usi cache --part I/N` (a Slurm array task, a Kubernetes Indexed
Job pod, a preemptible machine) computes the shards of part I of N with no process group.

* Which shards: part I owns the WebDataset shards i with i mod N = I, a pure function of
  (I, N, shard count), so parts agree without talking; a part skips the ones already committed
  (a rerun resumes) and commits each shard with its marker as a torchrun rank does.
* The store: the first part creates it, the others join. Creation is claimed by an exclusive
  create of `OUT/parts/create` (O_EXCL on a local or NFS path, a conditional PUT with
  If-None-Match on S3); the claimant writes the attributes last (schema.create, clear=False), the
  others wait for them. Every part then checks the cache's attributes against its own settings
  as a resume does, and refuses on a difference before writing anything. A claim older than
  CLAIM_STALE_S whose cache is still unfinished was left by a killed part: the next part finishes
  the creation (it deletes nothing, so doing it twice is harmless). A grow (--add-views) starts
  the same way, claimed by `OUT/parts/grow-<block>-<N>`.
* Finishing: the part that finds every shard committed after committing its own finalises the
  cache (grow commit, invalid list, replay fingerprint, audit) exactly as a one-job run does. The
  last part to commit always sees every shard; two parts finishing together both finalise, which
  writes the same values twice.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from usi_cache import cache_format as schema, storage
from usi_cache.config.errors import ConfigError

log = logging.getLogger(__name__)
CLAIM_STALE_S = 120.0  # creating a cache or starting a grow takes seconds; a claim this old whose work is
# unfinished was left by a killed part
POLL_S = 0.5  # how often a waiting part looks again


@dataclass(frozen=True)
class Part:
    index: int  # I, 0 <= I < count
    count: int  # N

    def shards(self, num_shards: int) -> list[int]:
        """The WebDataset shards this part owns."""
        return list(range(self.index, num_shards, self.count))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def resolve_part(spec: str, env=os.environ) -> Part | None:
    """Part I/N from cache.part and, for auto, the job array's environment: Slurm's
    SLURM_ARRAY_TASK_ID minus SLURM_ARRAY_TASK_MIN (any first index) of SLURM_ARRAY_TASK_COUNT, or a
    Kubernetes Indexed Job's JOB_COMPLETION_INDEX (its count is not in the environment: auto/N)."""
    spec = spec.strip()
    if not spec:
        return None
    head, _, tail = spec.partition("/")
    if head != "auto":
        return Part(int(head), int(tail))
    count = int(tail) if tail else None
    if "SLURM_ARRAY_TASK_ID" in env:
        try:
            task, first = int(env["SLURM_ARRAY_TASK_ID"]), int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
            tasks = int(env["SLURM_ARRAY_TASK_COUNT"])
            last = int(env.get("SLURM_ARRAY_TASK_MAX", first + tasks - 1))
        except (KeyError, ValueError):
            raise ConfigError("cache.part: auto: SLURM_ARRAY_TASK_ID, _MIN and _COUNT must be integers") from None
        if last - first + 1 != tasks:
            raise ConfigError(f"cache.part: auto: the Slurm array {first}-{last} has {tasks} tasks, not one per "
                              f"index: submit it as --array={first}-{first + tasks - 1} (no step, no list)")
        if count is not None and count != tasks:
            raise ConfigError(f"cache.part: {spec}: the Slurm array has {tasks} tasks, not {count}")
        index, count = task - first, tasks
    elif "JOB_COMPLETION_INDEX" in env:
        if count is None:
            raise ConfigError("cache.part: auto: a Kubernetes job does not tell its completions: give auto/N "
                              "(N = the Job's completions)")
        index = int(env["JOB_COMPLETION_INDEX"]) if env["JOB_COMPLETION_INDEX"].isdigit() else -1
    else:
        raise ConfigError(f"cache.part: {spec}: neither SLURM_ARRAY_TASK_ID nor JOB_COMPLETION_INDEX is set "
                          f"(not a job array task): give I/N")
    if not 0 <= index < count:
        raise ConfigError(f"cache.part: {spec}: the job's index {index} is not a part of {count} (0 <= I < N)")
    return Part(index, count)


# ---------------------------------------------------------------- claims
def claim(url: str) -> bool:
    """Create the small file or object `url` only if it does not exist; True when this process
    created it. Exclusive on local paths and NFS (O_EXCL) and on S3 (If-None-Match); other fsspec
    filesystems check, then write (not atomic)."""
    text = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()})
    if not storage.is_url(url):
        path = Path(url.removeprefix("file://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True
    fs, path = storage.filesystem(url)
    with storage.errors(url, "claiming"):
        try:
            fs.pipe_file(path, text.encode(), mode="create")
        except FileExistsError:
            return False
        except TypeError:  # a filesystem whose pipe_file has no mode: check, then write
            if fs.exists(path):
                return False
            fs.pipe_file(path, text.encode())
    return True


def _claim_age(url: str) -> float:
    """Seconds since the claim at `url` was made (0 when it cannot be read yet)."""
    try:
        return time.time() - float(json.loads(storage.read_bytes(url))["time"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0


def _unclaim(url: str) -> None:
    """Give a claim up (its work failed before it was done), so that another part takes it."""
    if not storage.is_url(url):
        Path(url.removeprefix("file://")).unlink(missing_ok=True)
        return
    fs, path = storage.filesystem(url)
    with storage.errors(url, "deleting"):
        fs.rm_file(path)


def _claim_or_wait(url: str, ready: Callable[[], bool], what: str) -> bool:
    """True when this part is to do the claimed work: it made the claim, or the claim went stale
    with the work unfinished; False once another part has done it."""
    while not ready():
        if claim(url):
            return True
        age = _claim_age(url)
        if age > CLAIM_STALE_S:
            log.warning(f"warning: {url}: {what} was claimed {age:.0f} s ago and is unfinished (its part was "
                        f"killed?): finishing it here")
            return True
        time.sleep(POLL_S)
    return False


# ---------------------------------------------------------------- the store
def _created(out: str) -> bool:
    """A cache with its attributes is at `out` (written last by a part that creates it)."""
    try:
        schema.open_cache(out)
        return True
    except schema.CacheError:
        return False


def prepare_store(cfg, attrs: dict, layout: schema.Layout, join: Callable[[], str | None]) -> str | None:
    """Create the cache at cfg.out or wait for the part that does, then `join()`: the checks of a
    resume (settings, dataset, decoders). Returns an error; nothing is written before it."""
    out = cfg.out
    if storage.is_file(out) or (not storage.is_url(out) and Path(out).is_symlink()):
        return f"{out}: is a file, not a cache"
    marker = storage.join(out, schema.PARTS_DIR, "create")
    if not _created(out):
        if schema.exists(out) and not storage.is_file(marker):
            return join()  # a cache, damaged or foreign: the resume's one-line error
        others = [n for n in storage.listdir(out) if n != schema.PARTS_DIR]
        if others and not storage.is_file(marker):
            return f"{out}: folder is not a cache (no zarr.json) and is not empty: choose another --out"
        if _claim_or_wait(marker, lambda: _created(out), "creating the cache"):
            try:
                schema.create(out, attrs, layout, clear=False)
            except BaseException:
                _unclaim(marker)
                raise
    return join()


def prepare_grow(cfg, grow: Callable[[], str | None]) -> str | None:
    """--add-views with parts: the first part starts the grow (`grow()`: its checks, then
    schema.begin_grow), the others wait until it is recorded, then run the same checks (which
    write nothing once the grow is recorded). Returns an error."""
    out, n = cfg.out, cfg.add_views
    if not _created(out) or _grow_started(out, cfg.views, n):
        return grow()  # its one-line error, or the checks of a grow that runs (or ran)
    block = len(schema.Layout.from_attrs(schema.open_cache(out)[1]).blocks)
    marker = storage.join(out, schema.PARTS_DIR, f"grow-{block}-{n}")
    if not _claim_or_wait(marker, lambda: _grow_started(out, cfg.views, n), "starting the grow"):
        return grow()
    error = grow()
    if error and not _grow_started(out, cfg.views, n):
        _unclaim(marker)  # the next part finds the same error without waiting for this claim
    return error


def _grow_started(out: str, views: int, n: int) -> bool:
    """A grow by n views of a cache of `views` is recorded with all its arrays, or committed; also
    True when the cache is in a state the grow's own checks refuse (another grow runs, other V)."""
    group, found = schema.open_cache(out)
    growing, blocks = found.get("growing"), found.get("view_blocks") or [found["views"]]
    if growing is None:
        return found["views"] != views  # grown already, or a V that grow() names as the error
    if growing != n:
        return True
    return f"{schema.BLOCKS_GROUP}/{len(blocks)}/{schema.BLOCK_MARKER}" in group


# ---------------------------------------------------------------- finishing
def unfinished(group, layout: schema.Layout, block: schema.ViewBlock) -> int:
    """Shards of view block `block` not committed yet (by any part)."""
    return int((~schema.completed_shards(group, layout, block)).sum())


def waiting_summary(cfg, part: Part, layout: schema.Layout, block: schema.ViewBlock, times: list, left: int,
                    wall: float) -> dict:
    """What a part that leaves the finishing to another part reports."""
    computed = sum(t.views for t in times)
    return {"cache": str(cfg.out), "part": str(part), "finalised": False, "shards": layout.num_shards,
            "shards_left": left, "shards_computed": sum(t.shards for t in times), "views_computed": computed,
            "views": block.count, "wall_s": wall, "views_per_s": computed / wall if wall > 0 else 0.0}


def format_waiting(s: dict) -> str:
    return (f"part {s['part']} of {s['cache']}: {s['shards_computed']} shard(s) computed now "
            f"({s['views_computed']} views, {s['wall_s']:.1f} s, {s['views_per_s']:.0f} views/s); "
            f"{s['shards_left']} of {s['shards']} shards are another part's and not committed yet: the part "
            f"that commits the last one finalises the cache (`usi cache status {s['cache']}` shows which)")


def commit_record(part: Part | None) -> tuple[float, int, int]:
    """What a shard's commit records (schema.COMMITS): now, and the part that computed it."""
    return (time.time(), part.index, part.count) if part else (time.time(), -1, 0)


def part_of(records: np.ndarray | None) -> int | None:
    """N of the parts that committed these shards most recently (None: no part run recorded)."""
    if records is None:
        return None
    ran = records[(records[:, 0] > 0) & (records[:, 2] > 0)]
    return int(ran[np.argmax(ran[:, 0]), 2]) if len(ran) else None
