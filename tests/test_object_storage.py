"""Shards, cache and teacher checkpoint on S3, against a real S3 server started here.

The server is moto's server mode: a separate process speaking the S3 HTTP API on 127.0.0.1.
The project talks to it through s3fs exactly as it would to AWS (only the endpoint differs,
given by fsspec's FSSPEC_S3_ENDPOINT_URL variable); nothing in the client is mocked.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from helpers import TEACHER, make_samples, run_py, save_teacher
from usi_cache import cache_format as schema
from usi_cache.cli.main import main

pytest.importorskip("s3fs")
pytest.importorskip("moto")

BUCKET = "usi-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """An S3 endpoint on 127.0.0.1 with an empty bucket; env set for this process and children."""
    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "FSSPEC_S3_ENDPOINT_URL": endpoint,
           "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
           "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import fsspec.config
    import s3fs
    conf_before = dict(fsspec.config.conf)
    fsspec.config.conf["s3"] = {"endpoint_url": endpoint}  # fsspec read the variables at import
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"moto server did not start on {endpoint}")
                time.sleep(0.2)
        fs = s3fs.S3FileSystem()
        fs.mkdir(BUCKET)
        yield fs
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        fsspec.config.conf.clear()
        fsspec.config.conf.update(conf_before)
        s3fs.S3FileSystem.clear_instance_cache()


def _image_folder(root: Path, n: int, seed: int) -> Path:
    """SRC/<class>/<image> from the tests' tiny images."""
    for s in make_samples(n, seed):
        d = root / f"class{s.cls}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{s.key}.{s.ext}").write_bytes(s.data)
    return root


def invoke(*args: str, code: int = 0):
    r = CliRunner().invoke(main, list(args))
    assert r.exit_code == code, r.output
    return r.output


CACHE_ARGS = ("--teacher", TEACHER, "--views", "3", "--topk", "3", "--input-size", "32",
              "--batch-size", "16", "--workers", "1")


def _arrays(cache: str) -> dict[str, np.ndarray]:
    group, attrs = schema.open_cache(cache)
    return {name: group[name][:] for name in schema.ARRAYS}


@pytest.fixture(scope="module")
def remote(s3, tmp_path_factory):
    """Shards made with `usi shards` straight to S3, the same shards locally, a teacher on S3,
    and a cache written to S3 by two torchrun processes."""
    tmp = tmp_path_factory.mktemp("remote")
    url = f"s3://{BUCKET}/run"
    src_train, src_val = _image_folder(tmp / "src-train", 40, 0), _image_folder(tmp / "src-val", 15, 7)
    for src, split in ((src_train, "train"), (src_val, "val")):
        invoke("shards", "from-folder", str(src), f"{url}/shards/{split}", "--per-shard", "8")
        invoke("shards", "from-folder", str(src), str(tmp / "shards" / split), "--per-shard", "8")
    ckpt = save_teacher(tmp / "teacher.pth")
    s3.put(str(ckpt), f"{BUCKET}/run/teacher.pth")
    r = run_py(["cache_teacher.py", "--shards", f"{url}/shards/train", "--teacher-checkpoint",
                f"{url}/teacher.pth", "--out", f"{url}/cache.zarr", *CACHE_ARGS, "--json"],
               torchrun=2, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    return {"url": url, "tmp": tmp, "ckpt": ckpt, "summary": summary, "fs": s3}


@pytest.mark.slow
def test_shards_on_s3_are_the_local_shards(remote):
    """`usi shards` to an s3:// URL writes the same bytes (same fingerprint) as to a folder."""
    fs, url, tmp = remote["fs"], remote["url"], remote["tmp"]
    for split in ("train", "val"):
        there = json.loads(fs.cat(f"{url}/shards/{split}/dataset.json"))
        here = json.loads((tmp / "shards" / split / "dataset.json").read_text())
        assert there["fingerprint"] == here["fingerprint"] and len(there["shards"]) >= 2
        for s in there["shards"]:
            assert fs.cat(f"{url}/shards/{split}/{s['name']}") == (tmp / "shards" / split / s["name"]).read_bytes()


@pytest.mark.slow
def test_two_process_cache_on_s3_equals_local_cache(remote):
    """A cache written to S3 by 2 ranks holds exactly what 1 process writes to a local folder,
    and records the s3:// shard root and the teacher checkpoint's URL."""
    s = remote["summary"]
    assert s["shards_complete"] == s["shards"] == 5 and s["views_computed"] == 40 * 3
    assert s["bytes_on_disk"] > 0
    local = remote["tmp"] / "cache.zarr"
    # a fresh process like the ranks (same thread count: the teacher's float32 sums match bit for bit)
    r = run_py(["cache_teacher.py", "--shards", str(remote["tmp"] / "shards" / "train"), "--teacher-checkpoint",
                str(remote["ckpt"]), "--out", str(local), *CACHE_ARGS], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    there, here = _arrays(f"{remote['url']}/cache.zarr"), _arrays(str(local))
    for name in schema.ARRAYS:
        np.testing.assert_array_equal(there[name], here[name], err_msg=name)
    _, attrs = schema.open_cache(f"{remote['url']}/cache.zarr")
    assert attrs["dataset"]["root"] == f"{remote['url']}/shards/train"
    assert attrs["teacher"]["checkpoint"] == f"{remote['url']}/teacher.pth"


@pytest.mark.slow
def test_resume_on_s3_recomputes_only_uncommitted_shards(remote):
    """Deleting one shard's commit marker object (a rank killed before committing it) makes
    the next run recompute that shard only; the result equals the first run."""
    fs, cache = remote["fs"], f"{remote['url']}/cache.zarr"
    before = _arrays(cache)
    layout = schema.Layout.from_attrs(schema.open_cache(cache)[1])
    for f in schema.chunk_files(cache, schema.COMMIT_ARRAY, 3, layout):
        fs.rm(f)
    out = invoke("cache", "--shards", f"{remote['url']}/shards/train", "--teacher-checkpoint",
                 f"{remote['url']}/teacher.pth", "--out", cache, *CACHE_ARGS, "--json")
    summary = json.loads(out[out.index("{"):])
    assert (summary["shards_computed"], summary["shards_reused"]) == (1, 4)
    after = _arrays(cache)
    for name in schema.ARRAYS:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


@pytest.mark.slow
def test_train_student_from_s3(remote):
    """2-rank DDP training reads train/val shards and the cache from S3 in DataLoader workers
    and writes its run (log, checkpoints) to S3; --resume reads last.pth back from there."""
    url, fs = remote["url"], remote["fs"]
    out = f"{url}/student"
    args = ["train_student.py", "--model", TEACHER, "--train-shards", f"{url}/shards/train",
            "--val-shards", f"{url}/shards/val", "--cache", f"{url}/cache.zarr", "--out", out,
            "--epochs", "2", "--cooldown-epochs", "0", "--warmup-epochs", "1", "--batch-size", "4",
            "--input-size", "32", "--workers", "1", "--quiet"]
    r = run_py(args, torchrun=2, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = [json.loads(ln) for ln in fs.cat(f"{out}/log.jsonl").decode().splitlines()]
    assert [e["epoch"] for e in log] == [0, 1]
    assert all(np.isfinite(e["train_loss"]) and e["rank_weights_equal"] for e in log)
    assert log[-1]["val_count"] == 15  # every val image counted once across the ranks
    assert {"last.pth", "best.pth", "config.json", "log.jsonl"} <= {p.rsplit("/", 1)[-1] for p in fs.ls(out)}
    # a line past the checkpoint (as if killed after logging epoch 2): --resume trims it
    fs.pipe(f"{out}/log.jsonl", fs.cat(f"{out}/log.jsonl") + json.dumps({**log[-1], "epoch": 2}).encode() + b"\n")
    r = run_py([*args, "--resume"], timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"resuming from {out}/last.pth at epoch 2" in r.stdout + r.stderr
    assert [json.loads(ln)["epoch"] for ln in fs.cat(f"{out}/log.jsonl").decode().splitlines()] == [0, 1]


@pytest.mark.slow
def test_verify_and_inspect_on_s3(remote):
    """`usi verify` re-runs the teacher (checkpoint on S3) on views re-drawn from S3 shards;
    `usi inspect` replays a sample from the shard root the cache recorded (an s3:// URL)."""
    url = remote["url"]
    out = invoke("verify", f"{url}/cache.zarr", "--shards", f"{url}/shards/train", "--recompute", "6",
                 "--teacher-checkpoint", f"{url}/teacher.pth")
    assert out.strip().splitlines()[-1].startswith("verdict: OK"), out
    d = json.loads(invoke("inspect", f"{url}/cache.zarr", "--json"))
    assert d["summary"]["completeness"]["missing"] == []
    assert d["summary"]["disk"]["total"] > 0 and d["summary"]["disk"]["bytes"]["logits"] > 0
    key = str(_arrays(f"{url}/cache.zarr")["keys"][9])
    sample = json.loads(invoke("inspect", f"{url}/cache.zarr", "--key", key, "--json"))
    assert sample["sample"]["key"] == key


def test_errors_on_s3_are_one_line(s3):
    """A missing bucket, a prefix without shards, and a cache URL that holds none."""
    out = invoke("cache", "--shards", "s3://no-such-bucket/shards", "--teacher", TEACHER, "--random-teacher",
                 "--out", f"s3://{BUCKET}/x.zarr", code=1)
    assert out.strip() == "Error: s3://no-such-bucket/shards: shard folder not found", out
    s3.pipe(f"{BUCKET}/empty/readme.txt", b"hi")
    out = invoke("cache", "--shards", f"s3://{BUCKET}/empty", "--teacher", TEACHER, "--random-teacher",
                 "--out", f"s3://{BUCKET}/x.zarr", code=1)
    assert out.strip() == f"Error: s3://{BUCKET}/empty/dataset.json: no dataset manifest (make shards with `usi shards ...`)"
    out = invoke("inspect", f"s3://{BUCKET}/empty", code=1)
    assert out.strip() == f"Error: s3://{BUCKET}/empty: no cache here (expected a Zarr group with zarr.json)"
    assert len(out.strip().splitlines()) == 1


@pytest.mark.slow
def test_unreachable_endpoint_is_one_line(tmp_path):
    """No server at the endpoint: a one-line error naming the URL, not a botocore traceback."""
    port = _free_port()
    r = run_py(["-m", "usi_cache.cli", "inspect", "s3://bucket/cache.zarr"], timeout=120,
               env={"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1",
                    "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_MAX_ATTEMPTS": "1",
                    "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull})
    assert r.returncode == 1, r.stdout + r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error: s3://bucket/cache.zarr"), r.stderr
    assert "EndpointConnectionError" in err[0], err[0]  # not "no cache here": the server was never asked


@pytest.mark.slow
def test_any_fsspec_filesystem_works(tmp_path):
    """Not only S3: shards, cache and verify through fsspec's in-memory filesystem."""
    from usi_cache.shards.tars import write_shards
    write_shards(make_samples(20), [f"class{c}" for c in range(5)], "memory://usi/train", per_shard=8,
                 progress=False)
    ckpt = save_teacher(tmp_path / "teacher.pth")
    invoke("cache", "--shards", "memory://usi/train", "--teacher", TEACHER, "--teacher-checkpoint", str(ckpt),
           "--views", "2", "--topk", "3", "--input-size", "32", "--workers", "0", "--out", "memory://usi/c.zarr")
    out = invoke("verify", "memory://usi/c.zarr", "--shards", "memory://usi/train")
    assert "verdict: OK: the cache matches its shards (3 shards, 20 samples, 40 views" in out, out


@pytest.mark.slow
def test_reshard_from_s3_to_a_folder(s3, tmp_path):
    """`usi shards reshard s3://.../*.tar DIR`: class-ordered tars on S3 into local shuffled shards,
    with two worker processes each reading S3; the same bytes as from the same tars on disk."""
    from test_class_spread import class_ordered_tars
    src = class_ordered_tars(tmp_path / "src")
    for p in sorted(src.glob("*.tar")):
        s3.put(str(p), f"{BUCKET}/ordered/{p.name}")
    invoke("shards", "reshard", f"s3://{BUCKET}/ordered/part-*.tar", str(tmp_path / "remote"), "--per-shard", "16",
           "--workers", "2", "--quiet")
    invoke("shards", "reshard", str(src), str(tmp_path / "local"), "--per-shard", "16", "--workers", "1", "--quiet")
    for name in sorted(p.name for p in (tmp_path / "local").glob("*.tar")):
        assert (tmp_path / "remote" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    assert json.loads((tmp_path / "remote" / "dataset.json").read_text())["fingerprint"] == \
        json.loads((tmp_path / "local" / "dataset.json").read_text())["fingerprint"]
    # and the reverse: a local source into shards on S3 (spills in a local temporary folder)
    invoke("shards", "reshard", str(src), f"s3://{BUCKET}/resharded", "--per-shard", "16", "--workers", "2",
           "--quiet")
    for name in sorted(p.name for p in (tmp_path / "local").glob("*.tar")):
        assert s3.cat(f"{BUCKET}/resharded/{name}") == (tmp_path / "local" / name).read_bytes()
    assert json.loads(s3.cat(f"{BUCKET}/resharded/dataset.json"))["fingerprint"] == \
        json.loads((tmp_path / "local" / "dataset.json").read_text())["fingerprint"]
