"""`usi shards reshard`: class-ordered tars rewritten into shuffled shards (every key and byte
kept, independent of --workers, resumable after a SIGKILL), and stage 2 refusing class-ordered
train shards unless --allow-ordered."""
from __future__ import annotations

import collections
import hashlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from helpers import ROOT, error_line, make_samples, make_shards, run_py, train_args
from test_class_spread import class_ordered_tars
from usi_cache import storage
from usi_cache.shards.class_spread import check_training_shards, read_class_counts
from usi_cache.cli.main import main
from usi_cache.shards.reshard import STATE, reshard
from usi_cache.shards.manifest import MANIFEST, load_manifest
from usi_cache.shards.tars import Sample, read_shard, write_shards, write_tar


def ordered_source(folder: Path, classes: int = 20, per_class: int = 100, per_shard: int = 50) -> Path:
    """Class-ordered tars of tiny PNGs (8x8 noise, ~250 bytes): `classes` x `per_class` samples."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    samples = []
    for c in range(classes):
        for k in range(per_class):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
            samples.append(Sample(f"c{c:03d}_{k:05d}", "png", buf.getvalue(), c))
    for i in range(0, len(samples), per_shard):
        write_tar(str(folder / f"src-{i // per_shard:05d}.tar"), samples[i:i + per_shard])
    return folder


def every_sample(paths) -> collections.Counter:
    return collections.Counter((s.key, s.ext, hashlib.sha256(s.data).hexdigest(), s.cls)
                               for p in paths for s in read_shard(p))


def tar_bytes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return ordered_source(tmp_path_factory.mktemp("reshard") / "src")


def test_reshard_keeps_every_sample_and_ignores_the_worker_count(source, tmp_path):
    one = reshard(str(source), str(tmp_path / "one"), per_shard=64, seed=3, workers=1, progress=False,
                  batch=16, buffer=50)
    two = reshard(str(source), str(tmp_path / "two"), per_shard=64, seed=3, workers=2, progress=False,
                  batch=16, buffer=50)
    assert tar_bytes(tmp_path / "one") == tar_bytes(tmp_path / "two")
    assert (tmp_path / "one" / MANIFEST).read_bytes() == (tmp_path / "two" / MANIFEST).read_bytes()
    m = load_manifest(tmp_path / "one")
    assert [s.count for s in m.shards] == [64] * 31 + [16] and m.classes == tuple(str(c) for c in range(20))
    assert every_sample(m.path(i) for i in range(len(m.shards))) == every_sample(sorted(source.glob("*.tar")))
    assert not (tmp_path / "one" / STATE / "spill").exists()  # spills gone once the run is done
    # the source is refused by the check, the output is a random sampler's: ~3.7 -> ~11.1 of 20 classes
    assert not one.before.ok and one.after.ok
    assert one.before.predicted < 0.4 * one.before.random
    # Tolerance: for a random permutation the per-shard class counts are multinomial, and the model
    # reads that noise as real (a shard of 64 holds ~3.2 of each class, ±1.8): the prediction
    # sits ~1 % under random sampling at this size (0.03 % at ImageNet's 1,000 per shard).
    assert one.after.predicted == pytest.approx(one.after.random, rel=0.03)
    counts = read_class_counts(m.root)
    assert [sum(c.values()) for c in counts] == [s.count for s in m.shards]
    # another seed, another order
    other = reshard(str(source), str(tmp_path / "seed4"), per_shard=64, seed=4, workers=1, progress=False)
    assert tar_bytes(tmp_path / "seed4") != tar_bytes(tmp_path / "one")
    assert other.manifest.num_samples == m.num_samples


def test_reshard_cli_one_lines_and_refusals(source, tmp_path):
    out = tmp_path / "out"
    args = ["shards", "reshard", str(source), str(out), "--per-shard", "100", "--workers", "1", "--quiet",
            "--batch-size", "16", "--shuffle-buffer", "50"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert f"{out}: 2000 samples, 20 classes, 20 shards, fingerprint" in r.output
    assert "class spread: a batch of 16 would hold ~" in r.output and "(before: ~3.7)" in r.output
    manifest = (out / MANIFEST).read_bytes()
    r = CliRunner().invoke(main, args)  # the same command again: nothing to do, the same manifest
    assert r.exit_code == 0, r.output
    assert (out / MANIFEST).read_bytes() == manifest
    r = CliRunner().invoke(main, [*args, "--seed", "1"])
    assert r.exit_code == 1 and error_line(r.output) == (
        f"Error: {out}: holds a reshard of another source, seed or --per-shard ({out / STATE / 'run.json'}); "
        f"remove it or give another OUT")
    other = make_shards(tmp_path / "other")
    r = CliRunner().invoke(main, ["shards", "reshard", str(source), str(other), "--quiet"])
    assert r.exit_code == 1 and error_line(r.output) == (
        f"Error: {other}: already holds a dataset (dataset.json or .tar files); give a new folder")
    r = CliRunner().invoke(main, ["shards", "reshard", str(source), str(source), "--quiet"])
    assert r.exit_code == 1 and "OUT is the source folder" in error_line(r.output)


def test_a_key_met_twice_is_refused_by_name_before_it_reaches_a_tar(tmp_path):
    src = ordered_source(tmp_path / "src", classes=2, per_class=10, per_shard=10)
    (src / "copy-00000.tar").write_bytes((src / "src-00000.tar").read_bytes())  # the same keys again
    r = CliRunner().invoke(main, ["shards", "reshard", str(src), str(tmp_path / "out"), "--per-shard", "30",
                                  "--quiet"])
    assert r.exit_code == 1 and "occurs twice in the source shards" in error_line(r.output), r.output
    assert not (tmp_path / "out" / MANIFEST).exists() and not list((tmp_path / "out").glob("*.tar"))


def test_too_low_an_open_file_limit_is_one_line_before_pass_2(tmp_path):
    src = ordered_source(tmp_path / "src", classes=4, per_class=50, per_shard=2)  # 100 source shards
    script = ("import resource, sys\n"
              "resource.setrlimit(resource.RLIMIT_NOFILE, (60, 60))\n"
              "from usi_cache.cli.main import main\n"
              "main(sys.argv[1:])\n")
    r = subprocess.run([sys.executable, "-c", script, "shards", "reshard", str(src), str(tmp_path / "out"),
                        "--per-shard", "200", "--workers", "1", "--quiet"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1 and "ulimit -n 164" in error_line(r.stdout + r.stderr), r.stdout + r.stderr


def test_bad_source_tar_is_one_line_and_writes_no_manifest(tmp_path):
    src = class_ordered_tars(tmp_path / "src")
    bad = src / "part-0002.tar"
    bad.write_bytes(bad.read_bytes()[:1500])  # cut inside a member
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["shards", "reshard", str(src), str(out), "--workers", "1", "--quiet"])
    assert r.exit_code == 1
    assert error_line(r.output).startswith(f"Error: {bad}: damaged tar (")
    assert not (out / MANIFEST).exists()


def test_source_with_a_manifest_uses_its_counts_and_class_names(tmp_path):
    src = tmp_path / "src"
    write_shards(sorted(make_samples(40), key=lambda s: s.cls), [f"n{c}" for c in range(5)], src, per_shard=8,
                 seed=None, progress=False)
    r = reshard(str(src), str(tmp_path / "out"), per_shard=6, workers=1, progress=False)
    assert r.manifest.classes == tuple(f"n{c}" for c in range(5))
    assert every_sample(r.manifest.path(i) for i in range(7)) == every_sample(sorted(src.glob("*.tar")))
    # a source tar that no longer holds what its dataset.json says is named
    write_tar(str(src / "shard-000001.tar"), make_samples(3))
    r = CliRunner().invoke(main, ["shards", "reshard", str(src), str(tmp_path / "out2"), "--workers", "1",
                                  "--quiet"])
    assert r.exit_code == 1
    assert error_line(r.output).startswith(f"Error: {src / 'shard-000001.tar'}: holds 3 samples, expected 8")


def test_a_manifest_folder_is_the_dataset_it_lists(tmp_path):
    """`index --out DIR` lists tars that lie elsewhere: `reshard DIR` reshards those tars."""
    src = class_ordered_tars(tmp_path / "tars")
    listing = tmp_path / "listing"
    r = CliRunner().invoke(main, ["shards", "index", str(src), "--out", str(listing), "--allow-ordered",
                                  "--workers", "1", "--quiet"])
    assert r.exit_code == 0, r.output
    r = reshard(str(listing), str(tmp_path / "out"), per_shard=40, workers=1, progress=False)
    assert [s.count for s in r.manifest.shards] == [40] * 3 + [30]
    assert every_sample(r.manifest.path(i) for i in range(4)) == every_sample(sorted(src.glob("*.tar")))


def test_reshard_from_an_fsspec_url(source, tmp_path):
    """Source tars behind a URL (fsspec's memory:// filesystem: one process, hence one worker)."""
    for p in sorted(source.glob("*.tar"))[:8]:
        storage.write_bytes(f"memory://reshard-src/{p.name}", p.read_bytes())
    r = reshard("memory://reshard-src/src-*.tar", str(tmp_path / "out"), per_shard=50, workers=1, progress=False)
    assert r.manifest.num_samples == 400
    assert every_sample(r.manifest.path(i) for i in range(8)) == every_sample(sorted(source.glob("*.tar"))[:8])


def _run(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "usi_cache.cli", "shards", "reshard", *args], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"finished before the kill: {proc.communicate()}"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_sigkill_then_rerun_gives_the_same_bytes(source, tmp_path):
    """A real SIGKILL in pass 1, then another in pass 2; each rerun resumes (finished output shards
    are not rewritten) and the result is byte-identical to an uninterrupted run."""
    ref = tmp_path / "ref"
    args = ["--per-shard", "20", "--workers", "1", "--quiet", "--seed", "5"]
    assert _run([str(source), str(ref), *args]).wait() == 0
    out = tmp_path / "out"
    spill = out / STATE / "spill"
    proc = _run([str(source), str(out), *args])
    _kill_when(proc, lambda: len(list((spill / "pass1").glob("*.json"))) >= 5)
    assert not (out / MANIFEST).exists() and proc.returncode == -signal.SIGKILL
    proc = _run([str(source), str(out), *args])
    _kill_when(proc, lambda: len(list((out / STATE / "shards").glob("*.json"))) >= 10)
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.tar")
            if (out / STATE / "shards" / f"{p.name}.json").exists()}
    assert len(kept) >= 10 and not (out / MANIFEST).exists()
    done = _run([str(source), str(out), *args])
    assert done.wait() == 0, done.communicate()
    assert tar_bytes(out) == tar_bytes(ref) and (out / MANIFEST).read_bytes() == (ref / MANIFEST).read_bytes()
    assert all((out / n).stat().st_ino == ino and (out / n).stat().st_mtime_ns == t for n, (ino, t) in kept.items())
    assert not spill.exists() and not list(out.glob("*.tmp-*"))


# ---------------------------------------------------------------- stage 2
def ordered_train_data(root: Path) -> dict:
    """Train shards of one class each (60 samples, 5 classes), shuffled val shards."""
    train = root / "train"
    write_shards(sorted(make_samples(60), key=lambda s: (s.cls, s.key)), [f"class{c}" for c in range(5)], train,
                 per_shard=12, seed=None, progress=False)
    return {"train": train, "val": make_shards(root / "val", n=10, per_shard=5, seed=7)}


def test_stage2_refuses_class_ordered_train_shards_before_training(tmp_path):
    data = ordered_train_data(tmp_path)
    run = tmp_path / "run"
    t0 = time.perf_counter()
    r = CliRunner().invoke(main, ["train", *train_args(data, run, "--shuffle-buffer", "4", batch_size=8,
                                                        workers=0)])
    assert r.exit_code == 1, r.output
    line = error_line(r.output)
    assert line.startswith(f"Error: {data['train']}: class-ordered shards: a batch of 8 would hold ~")
    assert "of 5 classes where random sampling gives ~" in line
    assert line.endswith("or pass --allow-ordered (train.allow_ordered) to keep them")
    assert not (run / "config.json").exists() and time.perf_counter() - t0 < 30


@pytest.mark.slow
def test_stage2_refusal_reaches_every_rank_under_torchrun(tmp_path):
    """Two torchrun ranks: rank 0 checks, both stop with the line (no rank waits for the other)."""
    data = ordered_train_data(tmp_path)
    r = run_py(["train_student.py", *train_args(data, tmp_path / "run", "--shuffle-buffer", "4", batch_size=8,
                                                workers=0)], torchrun=2, timeout=120)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 2 and all("class-ordered shards: a batch of 8 would hold ~" in ln for ln in lines), \
        r.stderr[-3000:]


def test_stage2_skips_the_check_for_a_manifest_without_class_counts(tmp_path, caplog):
    data = ordered_train_data(tmp_path)
    path = data["train"] / MANIFEST
    d = json.loads(path.read_text())
    assert [s.pop("class_counts") for s in d["shards"]] == [[c, 12] for c in range(5)]
    path.write_text(json.dumps(d))
    with caplog.at_level(logging.INFO, logger="usi_cache"):
        check_training_shards(str(data["train"]), 5, 8, 4, allow_ordered=False)
    assert [r.getMessage() for r in caplog.records] == [
        f"{data['train']}: dataset.json has no per-shard class counts (made before they were stored): "
        f"class-order check skipped (`usi shards index` adds them)"]


@pytest.mark.slow
def test_stage2_trains_class_ordered_shards_with_allow_ordered(tmp_path):
    data = ordered_train_data(tmp_path)
    run = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", *train_args(data, run, "--shuffle-buffer", "4", "--allow-ordered",
                                                        batch_size=8, workers=0)])
    assert r.exit_code == 0, r.output
    assert "class-ordered shards kept (allow_ordered)" in r.output
    assert (run / "last.pth").exists()
    assert json.loads((run / "config.json").read_text())["allow_ordered"] is True


@pytest.mark.slow
def test_reshard_memory_benchmark_runs_small(tmp_path):
    r = subprocess.run([sys.executable, "benchmarks/reshard_memory.py", "--sizes", "60,120", "--classes", "3",
                        "--per-shard", "20", "--workers", "2", "--work", str(tmp_path / "work")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "USI_BENCH_RESULTS": str(tmp_path / "results")})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    result = json.loads((tmp_path / "results/reshard_memory.json").read_text())
    assert [run["images"] for run in result["runs"]] == [60, 120] and result["peak_ratio"] > 0
    assert all(run["processes"] >= 3 and run["peak_mib"] > 10 for run in result["runs"])  # workers counted
    assert all(run["after"] == pytest.approx(run["random"], rel=0.05) for run in result["runs"])
    assert "peak RSS ratio 120 / 60 images" in (tmp_path / "results/reshard_memory.txt").read_text()
