"""Ingest at scale: a folder streamed into shards (parallel, resumable), existing tars indexed,
and the one shard reader's rule."""
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
import zarr
from click.testing import CliRunner
from helpers import NUM_CLASSES, cache_args, error_line, make_folder, stats, tar_hashes, train_args
from PIL import Image

from usi_cache.cli.main import main
from usi_cache.shards.folder import shards_from_folder
from usi_cache.shards.manifest import ShardError, load_manifest
from usi_cache.shards.tars import read_shard
from usi_cache.shards.writer import SIDECARS


# ---------------------------------------------------------------- usi shards from-folder
def test_worker_count_does_not_change_the_tars(tmp_path):
    src = make_folder(tmp_path / "src", per_class=6)
    one, _ = shards_from_folder(src, tmp_path / "one", per_shard=4, workers=1, progress=False)
    two, _ = shards_from_folder(src, tmp_path / "two", per_shard=4, workers=2, progress=False)
    assert tar_hashes(tmp_path / "one") == tar_hashes(tmp_path / "two")
    assert one.fingerprint == two.fingerprint and [s.count for s in one.shards] == [4, 4, 4, 4, 2]


def test_rerun_keeps_finished_shards_and_rebuilds_the_rest(tmp_path):
    src = make_folder(tmp_path / "src", per_class=6)
    out = tmp_path / "out"
    args = ["shards", "from-folder", str(src), str(out), "--per-shard", "4", "--workers", "1", "--quiet"]
    assert CliRunner().invoke(main, args).exit_code == 0
    reference, before = tar_hashes(out), stats(out)
    manifest = (out / "dataset.json").read_bytes()
    # what a kill leaves behind: no manifest, a tar being written under its temporary name, a
    # finished tar whose sidecar was not written yet, a sidecar cut short, a missing tar
    (out / "dataset.json").unlink()
    (out / "shard-000001.tar").rename(out / "shard-000001.tar.tmp-12345")
    (out / SIDECARS / "shard-000002.tar.json").unlink()
    (out / SIDECARS / "shard-000003.tar.json").write_text('{"name": "shard-0')
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    after = stats(out)
    assert tar_hashes(out) == reference and (out / "dataset.json").read_bytes() == manifest
    assert not list(out.glob("*.tmp-*"))
    assert after["shard-000000.tar"] == before["shard-000000.tar"]  # kept, not re-read
    assert after["shard-000004.tar"] == before["shard-000004.tar"]
    for rebuilt in ("shard-000001.tar", "shard-000002.tar", "shard-000003.tar"):
        assert after[rebuilt] != before[rebuilt]
    # another seed is another plan: every shard is built again
    r = CliRunner().invoke(main, [*args, "--seed", "1"])
    assert r.exit_code == 0, r.output
    assert all(stats(out)[n] != after[n] for n in after)


def test_undecodable_files_make_shorter_shards(tmp_path):
    src = make_folder(tmp_path / "src", per_class=4)
    for i in range(3):
        (src / "dog" / f"broken{i}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    r = CliRunner().invoke(main, ["shards", "from-folder", str(src), str(tmp_path / "out"), "--per-shard", "5",
                                  "--workers", "2", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "left out 3 file(s)" in r.output and "broken0.jpg: unreadable image" in r.output
    m = load_manifest(tmp_path / "out")
    assert m.num_samples == 12 and m.per_shard == 5 and sum(s.count < 5 for s in m.shards) >= 2
    for i in range(len(m.shards)):
        m.check_count(i, len(list(read_shard(m.path(i)))))


def test_empty_class_folder_is_an_error_unless_allowed(tmp_path):
    src = make_folder(tmp_path / "src", per_class=2)
    (src / "fox").mkdir()
    (src / "fox" / "readme.txt").write_text("no images here")
    r = CliRunner().invoke(main, ["shards", "from-folder", str(src), str(tmp_path / "a"), "--quiet"])
    assert r.exit_code == 1
    assert error_line(r.output).startswith(f"Error: {src / 'fox'}: class folder without image files")
    assert not (tmp_path / "a" / "dataset.json").exists()
    r = CliRunner().invoke(main, ["shards", "from-folder", str(src), str(tmp_path / "b"), "--quiet",
                                  "--allow-empty-classes"])
    assert r.exit_code == 0, r.output
    m = load_manifest(tmp_path / "b")
    assert m.classes == ("cat", "dog", "eel", "fox") and m.num_samples == 6


def test_from_folder_to_a_url(tmp_path):
    src = make_folder(tmp_path / "src", per_class=3)
    local, _ = shards_from_folder(src, tmp_path / "local", per_shard=4, workers=1, progress=False)
    # memory:// lives in this process only, hence one worker; real object stores take any number
    m, _ = shards_from_folder(src, "memory://ingest/train/", per_shard=4, workers=1, progress=False)
    assert m.fingerprint == local.fingerprint
    again = load_manifest("memory://ingest/train")
    assert [s.key for s in read_shard(again.path(0))] == [s.key for s in read_shard(local.path(0))]


# ---------------------------------------------------------------- read_shard's rule
def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_image_is_picked_by_extension_priority_not_member_order(tmp_path):
    path = tmp_path / "two-images.tar"
    with tarfile.open(path, "w") as tar:
        for key, order in (("a", ("png", "jpg")), ("b", ("jpg", "png"))):
            for ext in order:
                add(tar, f"{key}.{ext}", f"{key} {ext} bytes".encode())
            add(tar, f"{key}.cls", b"1")
        add(tar, "dir.v2/c.x.PNG", b"c png bytes")  # WebDataset's key: up to the last component's first dot
        add(tar, "dir.v2/c.x.json", b"{}")
        add(tar, "dir.v2/c.cls", b"3\n")  # another key ("dir.v2/c"): a sample without an image
    samples = read_shard(path)
    assert [(s.key, s.ext, s.data) for s in (next(samples), next(samples))] == [
        ("a", "jpg", b"a jpg bytes"), ("b", "jpg", b"b jpg bytes")]
    with pytest.raises(ShardError, match=r"two-images.tar: sample 'dir.v2/c' lacks an image"):
        next(samples)


@pytest.mark.parametrize("members, expected", [
    ({"k.jpg": b"x"}, "sample 'k' lacks a cls entry"),
    ({"k.json": b"{}", "k.cls": b"1"}, "sample 'k' lacks an image"),
    ({"k.jpg": b"x", "k.cls": b"cat"}, "sample 'k' has cls 'cat', expected a non-negative integer"),
    ({"k.jpg": b"x", "k.cls": b"-1"}, "sample 'k' has cls '-1', expected a non-negative integer"),
])
def test_bad_samples_are_named(tmp_path, members, expected):
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            add(tar, name, data)
    with pytest.raises(ShardError) as e:
        list(read_shard(path))
    assert str(e.value).startswith(f"{path}: {expected}") and "\n" not in str(e.value)


# ---------------------------------------------------------------- usi shards index
def jpeg(seed: int, cls: int) -> bytes:
    rng = np.random.default_rng(seed)
    base = np.array([cls * 50, 255 - cls * 40, 90])
    arr = np.clip(base + rng.normal(0, 30, (int(rng.integers(24, 40)), 32, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def webdataset_shards(folder: Path) -> Path:
    """Tars as webdataset.ShardWriter makes them: jpg/cls/json, 10 + 10 + 3 and 7 samples."""
    folder.mkdir()
    for pattern, first, n in (("train-%06d.tar", 0, 23), ("extra-%06d.tar", 100, 7)):
        with wds.ShardWriter(str(folder / pattern), maxcount=10, verbose=0) as sink:
            for i in range(first, first + n):
                cls = i % NUM_CLASSES
                sink.write({"__key__": f"s{i:04d}", "jpg": jpeg(i, cls), "cls": cls, "json": {"i": i}})
    return folder


@pytest.mark.slow
def test_index_unequal_webdataset_shards_and_cache_them(tmp_path, teacher_ckpt):
    shards = webdataset_shards(tmp_path / "wds")
    r = CliRunner().invoke(main, ["shards", "index", str(shards), "--workers", "2", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "30 samples, 5 classes, 4 shards of 3..10 samples (per_shard 10)" in r.output
    m = load_manifest(shards)
    assert [(s.name, s.count) for s in m.shards] == [
        ("extra-000000.tar", 7), ("train-000000.tar", 10), ("train-000001.tar", 10), ("train-000002.tar", 3)]
    assert m.classes == ("0", "1", "2", "3", "4") and m.per_shard == 10
    for i, s in enumerate(m.shards):
        assert hashlib.sha256(Path(m.path(i)).read_bytes()).hexdigest() == s.sha256
    # stage 1 over the unequal shards: every sample cached, the short shards' spare slots -1
    out = tmp_path / "cache.zarr"
    r = CliRunner().invoke(main, ["cache", *cache_args(shards, teacher_ckpt, out), "--views", "2"])
    assert r.exit_code == 0, r.output
    group = zarr.open_group(str(out), mode="r")
    labels = np.asarray(group["labels"][:]).reshape(4, 10)
    assert ((labels >= 0).sum(axis=1) == [7, 10, 10, 3]).all()
    keys = np.asarray(group["keys"][:]).reshape(4, 10)
    for i in range(4):
        got = [(s.key, s.cls) for s in read_shard(m.path(i))]
        assert [(str(k), int(c)) for k, c in zip(keys[i][:len(got)], labels[i][:len(got)])] == got
    r = CliRunner().invoke(main, ["verify", str(out), "--shards", str(shards)])
    assert r.exit_code == 0, r.output
    # stage 2 over the same unequal shards, from the cache and from labels: 30 samples, batch 4
    # -> 7 steps, 28 distinct samples used once, in both modes
    for mode, extra in (("cache", ["--cache", str(out)]), ("labels", [])):
        run = tmp_path / mode
        args = train_args({"train": shards, "val": shards}, run, *extra, "--epochs", "1", batch_size=4, workers=2)
        r = CliRunner().invoke(main, ["train", *args])
        assert r.exit_code == 0, r.output
        (log,) = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        assert (log["samples_used"], log["sample_uses"], log["val_count"]) == (28, 28, 30), (mode, log)


def test_index_a_brace_pattern_into_another_folder(tmp_path):
    shards = webdataset_shards(tmp_path / "wds")
    os.chmod(shards, 0o555)  # read-only: dataset.json goes elsewhere
    try:
        names = tmp_path / "names.txt"
        names.write_text("\n".join(f"class {c}" for c in range(NUM_CLASSES)) + "\n\n")
        pattern = str(shards / "train-{000000..000002}.tar")
        r = CliRunner().invoke(main, ["shards", "index", pattern, "--out", str(tmp_path / "meta"),
                                      "--classes", str(names), "--workers", "1", "--quiet"])
        assert r.exit_code == 0, r.output
        m = load_manifest(tmp_path / "meta")
        assert m.classes[4] == "class 4" and [s.count for s in m.shards] == [10, 10, 3]
        assert [s.name for s in m.shards] == [str(shards / f"train-{i:06d}.tar") for i in range(3)]
        assert [s.key for s in read_shard(m.path(2))] == ["s0020", "s0021", "s0022"]
        # a glob, dataset.json beside the shards it names (inside a sub-folder: relative names)
        os.chmod(shards, 0o755)
        r = CliRunner().invoke(main, ["shards", "index", str(tmp_path / "wds" / "extra-*.tar"), "--out",
                                      str(tmp_path), "--quiet", "--workers", "1"])
        assert r.exit_code == 0, r.output
        assert [s.name for s in load_manifest(tmp_path).shards] == ["wds/extra-000000.tar"]
    finally:
        os.chmod(shards, 0o755)


def test_index_errors_are_one_line(tmp_path):
    shards = webdataset_shards(tmp_path / "wds")
    names = tmp_path / "names.txt"
    names.write_text("a\nb\n")
    r = CliRunner().invoke(main, ["shards", "index", str(shards), "--classes", str(names), "--quiet"])
    assert r.exit_code == 1 and "names 2 classes" in error_line(r.output)
    r = CliRunner().invoke(main, ["shards", "index", str(tmp_path / "none-*.tar"), "--quiet"])
    assert error_line(r.output) == f"Error: {tmp_path / 'none-*.tar'}: matches no files"
    bad = shards / "train-000001.tar"
    with tarfile.open(bad, "w") as tar:
        add(tar, "s0500.jpg", jpeg(0, 0))
        add(tar, "s0500.json", b"{}")
    r = CliRunner().invoke(main, ["shards", "index", str(shards), "--quiet", "--workers", "1"])
    assert error_line(r.output) == f"Error: {bad}: sample 's0500' lacks a cls entry; it has ['jpg', 'json']"
    assert not (shards / "dataset.json").exists()


@pytest.mark.slow
def test_ingest_memory_benchmark_runs_small(tmp_path):
    import subprocess
    import sys

    from helpers import ROOT
    r = subprocess.run([sys.executable, "benchmarks/ingest_memory.py", "--sizes", "30,60", "--classes", "3",
                        "--per-shard", "20", "--workers", "2", "--work", str(tmp_path / "work")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "USI_BENCH_RESULTS": str(tmp_path / "results")})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    result = json.loads((tmp_path / "results/ingest_memory.json").read_text())
    assert [run["images"] for run in result["runs"]] == [30, 60] and result["peak_ratio"] > 0
    assert all(run["processes"] >= 3 and run["peak_mib"] > 10 for run in result["runs"])  # workers counted
    assert "peak RSS ratio 60 / 30 images" in (tmp_path / "results/ingest_memory.txt").read_text()


def test_index_shards_at_a_url(tmp_path):
    from usi_cache import storage
    shards = webdataset_shards(tmp_path / "wds")
    for p in sorted(shards.glob("*.tar")):
        storage.write_bytes(f"memory://byo/{p.name}", p.read_bytes())
    local = load_manifest_of(shards)
    # memory:// lives in this process only, hence one worker
    for spec in ("memory://byo/", "memory://byo/train-*.tar", "memory://byo/train-{000000..000002}.tar"):
        r = CliRunner().invoke(main, ["shards", "index", spec, "--workers", "1", "--quiet"])
        assert r.exit_code == 0, r.output
        m = load_manifest("memory://byo")
        assert [s.sha256 for s in m.shards] == [s.sha256 for s in local.shards if s.name in
                                                {x.name for x in m.shards}]
        assert [s.key for s in read_shard(m.path(len(m.shards) - 1))] == ["s0020", "s0021", "s0022"]


def load_manifest_of(shards: Path):
    r = CliRunner().invoke(main, ["shards", "index", str(shards), "--workers", "1", "--quiet"])
    assert r.exit_code == 0, r.output
    return load_manifest(shards)
