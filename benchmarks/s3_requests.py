"""S3 requests: the requests of one stage-2 epoch, counted at a real S3 server.

Starts moto's S3 server on 127.0.0.1 (its access log lists every request), writes synthetic
shards and a stage-1 cache to s3://, then runs one epoch of `usi train` (one process, one data
worker) reading shards and cache from s3:// and counts the requests that epoch made, by kind.

Interpretation:
A stage-2 epoch reads each selected piece of a train shard's tar once (a HEAD and a ranged GET;
shards are streamed in large read-ahead blocks) and its cache block once (the cache-chunk
requests per train shard above, for all its arrays). A shard cut between two workers is read by
both, and with repeated augmentation R each selected piece is read by R workers. The metadata
requests read the cache's `zarr.json` files.
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench_common import NOT_RECORDED, publish, synthetic_shards, table

ROOT = Path(__file__).resolve().parent.parent
N_TRAIN, N_VAL, PER_SHARD = 40, 16, 8
VIEWS, TOPK = 3, 3  # of the cache
REQUEST = re.compile(r'"(GET|HEAD|PUT|POST|DELETE) (\S+) HTTP')
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # the server colours some status lines


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _usi(*args: str, env: dict) -> None:
    r = subprocess.run([str(ROOT / ".venv" / "bin" / "usi"), *args], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"usi {args[0]} failed:\n{r.stderr[-2000:]}")


def _kind(method: str, path: str) -> str:
    if "/train/" in path and path.endswith(".tar"):
        return "train shard (tar)"
    if "/val/" in path and path.endswith(".tar"):
        return "val shard (tar)"
    if "/cache.zarr/" in path and "/c/" in path:
        return "cache chunk"
    if path.endswith("zarr.json"):
        return "cache metadata (zarr.json)"
    return "other (manifests, listings)"


def report(r: dict) -> str:
    """The table and findings of an s3_requests results file."""
    counts, per = r["counts"], r["per_train_shard"]
    rows = [[k, v, f"{per[k]:.1f}" if k in per else "-"] for k, v in sorted(counts.items())]
    rows.append(["total", sum(counts.values()), "-"])
    cache = f"cache V = {r['cache_views']}, k = {r['cache_topk']}" if "cache_views" in r else f"cache: {NOT_RECORDED}"
    val = f"{r['val_shards']} val shards" if "val_shards" in r else f"val shards: {NOT_RECORDED}"
    return "\n".join([
        f"one stage-2 epoch, 1 process, 1 worker, {r['train_shards']} train shards of {r['per_shard']} ({cache}), "
        f"{val}:", "", table(["requests", "count", "per train shard"], rows), "",
        f"* per train shard: {per['train shard (tar)']:.1f} requests for its tar, {per['cache chunk']:.1f} for its "
        "cache block"])


def parser() -> argparse.ArgumentParser:
    """No options: the sizes are fixed so that the request counts compare across runs."""
    return argparse.ArgumentParser(description=__doc__.splitlines()[0])


def main(argv: list[str] | None = None) -> None:
    parser().parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="usi-s3-"))
    port = _free_port()
    log_path = tmp / "moto.log"
    log = open(log_path, "w")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1", "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
           "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "OMP_NUM_THREADS": "1"}
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        os.environ.update(env)
        import s3fs
        fs = s3fs.S3FileSystem(endpoint_url=env["FSSPEC_S3_ENDPOINT_URL"])
        fs.mkdir("bench")
        for split, n, seed in (("train", N_TRAIN, 0), ("val", N_VAL, 1)):
            local = synthetic_shards(tmp / split, n, classes=5, size=40, per_shard=PER_SHARD, seed=seed)
            fs.put(str(local), f"bench/{split}", recursive=True)
        url = "s3://bench"
        _usi("cache", "--shards", f"{url}/train", "--teacher", "test_resnet", "--views", str(VIEWS),
             "--topk", str(TOPK), "--input-size", "32", "--batch-size", "16", "--workers", "1",
             "--random-teacher", "--out", f"{url}/cache.zarr", env=env)
        log.flush()
        start = len(log_path.read_text().splitlines())
        _usi("train", "--model", "test_resnet", "--train-shards", f"{url}/train", "--val-shards", f"{url}/val",
             "--cache", f"{url}/cache.zarr", "--out", str(tmp / "run"), "--epochs", "1", "--cooldown-epochs", "0",
             "--warmup-epochs", "1", "--batch-size", "4", "--input-size", "32", "--workers", "1", "--quiet", env=env)
        time.sleep(0.5)  # let the server flush its last log lines
        lines = log_path.read_text().splitlines()[start:]
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    counts = Counter(_kind(*m.groups()) for ln in lines if (m := REQUEST.search(ANSI.sub("", ln))))
    n_train_shards = -(-N_TRAIN // PER_SHARD)
    per_shard = {k: counts[k] / n_train_shards for k in ("train shard (tar)", "cache chunk")}
    publish("s3_requests", {"train_shards": n_train_shards, "per_shard": PER_SHARD,
                            "val_shards": -(-N_VAL // PER_SHARD), "cache_views": VIEWS, "cache_topk": TOPK,
                            "counts": dict(counts), "per_train_shard": per_shard}, report)


if __name__ == "__main__":
    main()
