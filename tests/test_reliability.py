"""Faults, really done: NaN losses, kills (during saves, of one DDP/torchrun rank), a full disk,
damaged shards and images, code-running pickles, unsafe YAML. Each test causes the fault for real
(SIGKILL, a 100 kB tmpfs, a cut tar) and checks what the user sees and what is left on disk.
"""
from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import helpers
import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from helpers import (
    NUM_CLASSES,
    ROOT,
    TEACHER,
    cache_args,
    error_line,
    make_samples,
    make_shards,
    make_train_data,
    run_py,
)
from PIL import Image

from usi_cache import cache_format as schema
from usi_cache.cli.main import main
from usi_cache.shards.tars import Sample, write_shards

ENV = {"USI_DIST_TIMEOUT": "30"}  # a lost rank fails the survivors' collectives within 30 s


# ----------------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """4 train shards (10 each), 2 val shards, a teacher and its V = 3 cache."""
    return make_train_data(tmp_path_factory.mktemp("rel"), n=40, per_shard=10, n_val=10, val_per_shard=5)


def train_args(data, out, *extra) -> list[str]:
    return helpers.train_args(data, out, *extra, batch_size=4, workers=0)


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def all_finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def children(pid: int) -> list[int]:
    """Direct child processes of `pid` (from /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def rank_pid(torchrun_pid: int, rank: int) -> int | None:
    """PID of the torchrun worker with RANK=rank (a child of the agent; its DataLoader workers are
    grandchildren, so they are not confused with it)."""
    for pid in children(torchrun_pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    return None


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(cond, timeout: float, what: str, proc: subprocess.Popen | None = None, poll: float = 0.02):
    deadline = time.time() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"process ended (rc {proc.returncode}) before {what}:\n{out}")
        if time.time() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)


def popen(args: list[str], torchrun: int = 0, extra_torchrun: tuple = ()) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **ENV}
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
            *extra_torchrun, *args] if torchrun else [sys.executable, *args])
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"process did not end within {timeout} s:\n{out}")
    return out


def assert_same_cache(a: Path, b: Path) -> None:
    ga, aa = schema.open_cache(a)
    gb, ab = schema.open_cache(b)
    for name in schema.ARRAYS:
        np.testing.assert_array_equal(ga[name][:], gb[name][:], err_msg=name)
    assert schema.attrs_difference(aa, ab) is None


def committed(path: Path) -> np.ndarray:
    group, attrs = schema.open_cache(path)
    return schema.completed_shards(group, schema.Layout.from_attrs(attrs))


def block_files(cache: Path, shards) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every chunk file of the given shards: a rewrite changes them."""
    _, attrs = schema.open_cache(cache)
    layout = schema.Layout.from_attrs(attrs)
    out = {}
    for shard in shards:
        for name in schema.ARRAYS:
            for f in map(Path, schema.chunk_files(cache, name, int(shard), layout)):
                st = f.stat()
                out[str(f)] = (st.st_ino, st.st_mtime_ns)
    return out


# ----------------------------------------------------------------------- 1. non-finite loss

@pytest.mark.slow
def test_diverging_run_stops_naming_epoch_step_keys_and_keeps_last_good_checkpoint(data, tmp_path):
    """Epoch 0 warms up at lr 1e-4 and is saved; epoch 1 runs at lr 5e29 and diverges for real."""
    run = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", *train_args(data, run, "--max-steps", "3", "--lr", "1e30")])
    assert r.exit_code == 1
    line = error_line(r.output)
    assert line.startswith("Error: non-finite loss at epoch 1 step "), line
    assert "batch keys img" in line, line
    assert [e["epoch"] for e in read_log(run)] == [0]
    last = torch.load(run / "last.pth", weights_only=True)  # epoch 0's checkpoint, untouched
    assert last["epoch"] == 0 and all_finite(last["state_dict"]) and all_finite(last["state_dict_ema"])
    assert all_finite(torch.load(run / "best.pth", weights_only=True)["state_dict"])
    assert not (run / "last.pth.tmp").exists()


@pytest.mark.slow
def test_nan_weights_stop_at_the_first_step_with_nothing_saved(data, tmp_path):
    torch.manual_seed(0)
    state = timm.create_model(TEACHER, num_classes=NUM_CLASSES).state_dict()
    state["fc.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    run = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", *train_args(data, run, "--pretrained-checkpoint",
                                                       str(tmp_path / "nan.pth"))])
    assert r.exit_code == 1
    assert error_line(r.output).startswith("Error: non-finite loss at epoch 0 step 0 (batch keys img")
    assert not (run / "last.pth").exists() and not (run / "best.pth").exists()


# ------------------------------------------------------------------- 2. atomic checkpoints

@pytest.mark.slow
def test_sigkill_during_checkpoint_saves_never_leaves_a_corrupt_last_pth(data, tmp_path):
    """Kill -9 the trainer the moment it starts writing last.pth (twice), and once at a random
    moment; last.pth must always load, and --resume must then finish the run."""
    run, tmp = tmp_path / "run", tmp_path / "run" / "last.pth.tmp"
    args = ["train_student.py", *train_args(data, run, "--epochs", "12", "--max-steps", "1"), "--resume"]
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    landed, partial = 0, 0
    for attempt in ("save", "save", "random"):
        proc = popen(args)
        try:
            if attempt == "save":  # the n-th time the temp file appears, kill at once
                n, seen, present = rng.randint(1, 2), 0, False
                deadline = time.time() + 120
                while seen < n and proc.poll() is None and time.time() < deadline:
                    now = tmp.exists()
                    seen += now and not present
                    present = now
                    if seen < n:
                        time.sleep(0.0005)
            else:  # somewhere in the next epoch or so: training, evaluating or saving
                lines = len(read_log(run)) if (run / "log.jsonl").is_file() else 0
                wait_for(lambda: (run / "log.jsonl").is_file() and len(read_log(run)) > lines, 120,
                         "an epoch to finish", proc)
                # within about the next two epochs (an epoch of one step can take 0.1 s: a longer
                # wait would let the run finish before the kill)
                epoch_s = [e["time_s"] for e in read_log(run) if "time_s" in e][-1]
                time.sleep(rng.uniform(0, min(1.5, 2 * epoch_s)))
            assert proc.poll() is None, f"run ended before the kill (seed {seed}):\n{proc.stdout.read()}"
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.communicate()
        if attempt == "save" and tmp.exists():
            landed += 1
            try:
                torch.load(tmp, weights_only=True)
            except Exception:
                partial += 1  # a half-written file: what last.pth would be without the rename
        if (run / "last.pth").exists():
            state = torch.load(run / "last.pth", weights_only=True)
            assert {"state_dict", "state_dict_ema", "optimizer", "scheduler", "epoch", "best"} <= set(state)
            done = [e["epoch"] for e in read_log(run)]
            # log.jsonl is appended before last.pth is renamed into place: at most one line ahead
            # (a resume trims it back to the checkpoint's epoch)
            assert done[-1:] in ([state["epoch"]], [state["epoch"] + 1]), (done, state["epoch"])
        if (run / "best.pth").exists():
            torch.load(run / "best.pth", weights_only=True)
    assert landed >= 1 and partial >= 1, f"no kill landed mid-save (landed {landed}, partial {partial}, seed {seed})"
    r = run_py(args, env=ENV)
    assert r.returncode == 0, r.stdout + r.stderr
    epochs = [e["epoch"] for e in read_log(run)]
    assert epochs == sorted(set(epochs)) and epochs[-1] == 11, epochs
    assert torch.load(run / "last.pth", weights_only=True)["epoch"] == 11
    assert not tmp.exists()


# ------------------------------------------------------- 3. a killed rank in 2-rank training

@pytest.mark.slow
def test_torchrun_training_with_a_killed_rank_fails_fast_and_resumes(data, tmp_path):
    run = tmp_path / "run"
    args = ["train_student.py", *train_args(data, run, "--cache", str(data["cache"]), "--epochs", "3",
                                             "--workers", "1")]
    proc = popen(args, torchrun=2)
    try:
        wait_for(lambda: (run / "last.pth").is_file(), 180, "epoch 0's checkpoint", proc)
        victim, survivor = rank_pid(proc.pid, 1), rank_pid(proc.pid, 0)
        assert victim and survivor, children(proc.pid)
        os.kill(victim, signal.SIGKILL)
        t_kill = time.time()
        out = finish(proc, timeout=90)
    finally:
        proc.kill()
    assert proc.returncode != 0, out
    assert time.time() - t_kill < 90
    assert not alive(survivor), "rank 0 outlived the run"
    done = [e["epoch"] for e in read_log(run)]
    saved = torch.load(run / "last.pth", weights_only=True)["epoch"]
    assert saved < 2, f"the kill should land before the last epoch: {done}"
    # the log line is written before last.pth: torchrun may stop rank 0 between the two
    assert saved in (done[-1], done[-1] - 1), (saved, done)

    r = run_py([*args, "--resume"], torchrun=2, env=ENV, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"resuming from {run / 'last.pth'} at epoch {saved + 1}" in r.stdout
    log = read_log(run)
    assert [e["epoch"] for e in log] == [0, 1, 2]
    assert all(e["rank_weights_equal"] and e["ranks"] == 2 and e["val_count"] == 10 for e in log)


@pytest.mark.slow
def test_torchrun_max_restarts_resumes_after_a_killed_rank(data, tmp_path):
    """With --max-restarts and --resume on the command line, torchrun heals the run by itself."""
    run = tmp_path / "run"
    args = ["train_student.py", *train_args(data, run, "--cache", str(data["cache"]), "--epochs", "3"), "--resume"]
    proc = popen(args, torchrun=2, extra_torchrun=("--max-restarts=1",))
    try:
        wait_for(lambda: (run / "last.pth").is_file(), 180, "epoch 0's checkpoint", proc)
        victim = rank_pid(proc.pid, 1)
        assert victim, children(proc.pid)
        os.kill(victim, signal.SIGKILL)
        out = finish(proc, timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert "resuming from" in out
    log = read_log(run)
    assert [e["epoch"] for e in log] == [0, 1, 2] and all(e["rank_weights_equal"] for e in log)


# ------------------------------------------------------------ 4. stage 1: kill and full disk

@pytest.mark.slow
def test_stage1_torchrun_rank_killed_mid_shard_resumes_only_unfinished_shards(data, tmp_path):
    shards = make_shards(tmp_path / "shards", n=60, per_shard=6)
    full, killed = tmp_path / "full.zarr", tmp_path / "killed.zarr"
    # the reference runs with the same intra-op threads as the ranks (OMP_NUM_THREADS=1): on the
    # CPU, torch.logsumexp's rounding of a shard's short last batch depends on the thread count
    r = run_py(["cache_teacher.py", *cache_args(shards, data["ckpt"], full, "--views", "4")])
    assert r.returncode == 0, r.stdout + r.stderr
    proc = popen(["cache_teacher.py", *cache_args(shards, data["ckpt"], killed, "--views", "4")], torchrun=2)
    labels = killed / "labels" / "c"
    try:
        wait_for(lambda: labels.is_dir() and any(labels.iterdir()), 180, "the first committed shard", proc,
                 poll=0.005)
        victim = rank_pid(proc.pid, 1)
        assert victim, children(proc.pid)
        os.kill(victim, signal.SIGKILL)  # rank 1 is mid-shard: it commits one shard at a time
        out = finish(proc, timeout=90)
    finally:
        proc.kill()
    assert proc.returncode != 0, out
    done = committed(killed)
    assert 0 < done.sum() < len(done), f"kill landed at {done.sum()}/{len(done)} shards"
    kept = block_files(killed, np.flatnonzero(done))
    r = run_py(["cache_teacher.py", *cache_args(shards, data["ckpt"], killed, "--views", "4"), "--json"],
               torchrun=2, env=ENV)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    assert summary["shards_reused"] == done.sum()
    assert summary["shards_computed"] == len(done) - done.sum()
    assert block_files(killed, np.flatnonzero(done)) == kept  # committed shards were not rewritten
    assert_same_cache(full, killed)


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill up (needs root/CAP_SYS_ADMIN): {r.stderr.strip()}")


def _umount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)  # a leaked handle: detach


@pytest.mark.slow
def test_stage1_disk_full_is_a_clear_error_and_the_next_run_resumes(data, tmp_path):
    shards = make_shards(tmp_path / "shards", n=30, per_shard=10)
    ref = tmp_path / "ref.zarr"
    args = lambda out: ["cache", *cache_args(shards, data["ckpt"], out), "--views", "2"]  # noqa: E731
    assert CliRunner().invoke(main, args(ref)).exit_code == 0
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "100k")  # room for the metadata and one shard's chunk files (4 kB pages)
    try:
        out = disk / "c.zarr"
        r = CliRunner().invoke(main, args(out))
        assert r.exit_code == 1
        assert error_line(r.output) == (f"Error: {out}: No space left on device while writing the cache; "
                                        f"committed shards are kept: free space and run the same command "
                                        f"again to resume")
        done = committed(out)
        assert 0 < done.sum() < len(done), done
        subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)  # space freed
        r = CliRunner().invoke(main, args(out))
        assert r.exit_code == 0, r.output
        assert f"({len(done) - done.sum()} computed now, {done.sum()} reused)" in r.output
        assert_same_cache(ref, out)
    finally:
        _umount(disk)


@pytest.mark.slow
def test_stage1_disk_full_before_the_cache_exists_says_to_overwrite(data, tmp_path):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "12k")  # not even room for the arrays' metadata
    try:
        out = disk / "c.zarr"
        args = ["cache", *cache_args(data["train"], data["ckpt"], out), "--views", "1"]
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 1
        assert error_line(r.output) == (f"Error: {out}: No space left on device while writing the cache; the "
                                        f"cache was not created: free space and run the same command with "
                                        f"--overwrite")
        subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)
        r = CliRunner().invoke(main, [*args, "--overwrite"])
        assert r.exit_code == 0, r.output
    finally:
        _umount(disk)


@pytest.mark.slow
def test_stage2_disk_full_is_a_clear_error(data, tmp_path):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "3m")  # best.pth (1.5 MB) fits, last.pth (6 MB) does not
    try:
        r = CliRunner().invoke(main, ["train", *train_args(data, disk / "run", "--epochs", "1", "--max-steps", "1")])
        assert r.exit_code == 1
        line = error_line(r.output)
        assert "last.pth" in line and "No space left on device" in line, line
    finally:
        _umount(disk)


# ------------------------------------------------------------------------ 5. damaged input

def _truncate(path: Path, at: int | None = None) -> bytes:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2 + 100 if at is None else at])
    return data


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["0", "1"])
def test_stage1_truncated_tar_names_the_shard_and_resumes_once_repaired(data, tmp_path, workers):
    shards = make_shards(tmp_path / "shards", n=30, per_shard=10)
    bad = shards / "shard-000001.tar"
    original = _truncate(bad)
    out = tmp_path / "c.zarr"
    args = ["cache", *cache_args(shards, data["ckpt"], out), "--views", "2", "--workers", workers]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1
    assert error_line(r.output) == f"Error: {bad}: damaged tar (unexpected end of data)"
    done = committed(out)
    assert not done.all() and not done[1]
    bad.write_bytes(original)  # repaired (e.g. copied again)
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert f"{int(done.sum())} reused" in r.output and "3/3 complete" in r.output


@pytest.mark.slow
def test_stage1_tar_cut_between_members_names_the_shard(data, tmp_path):
    shards = make_shards(tmp_path / "shards", n=30, per_shard=10)
    bad = shards / "shard-000001.tar"
    with tarfile.open(bad) as t:
        cut = t.getmembers()[10].offset  # a clean cut after 5 whole samples: tarfile sees no error
    _truncate(bad, cut)
    r = CliRunner().invoke(main, ["cache", *cache_args(shards, data["ckpt"], tmp_path / "c.zarr"), "--views", "1"])
    assert r.exit_code == 1
    assert error_line(r.output) == f"Error: {bad}: holds 5 samples, {shards / 'dataset.json'} says 10"


@pytest.mark.slow
def test_corrupt_image_in_a_valid_tar_gets_label_minus_one_and_trains(data, tmp_path):
    samples = make_samples(20)
    png = next(i for i, s in enumerate(samples) if s.ext == "png")
    s = samples[png]
    samples[png] = Sample(s.key, s.ext, s.data[:len(s.data) // 2], s.cls)  # a real PNG, cut in half
    with pytest.raises(OSError):
        Image.open(io.BytesIO(samples[png].data)).convert("RGB")
    shards = tmp_path / "shards"
    write_shards(samples, [f"class{c}" for c in range(NUM_CLASSES)], shards, per_shard=10, progress=False)
    cache = tmp_path / "c.zarr"
    r = CliRunner().invoke(main, ["cache", *cache_args(shards, data["ckpt"], cache), "--views", "2"])
    assert r.exit_code == 0, r.output
    assert f"warning: 1 undecodable sample(s) stored with label -1: {s.key}" in r.output
    group, attrs = schema.open_cache(cache)
    assert attrs["invalid"] == [s.key]
    keys = list(group["keys"][:])
    assert group["labels"][keys.index(s.key)] == -1
    # stage 2 skips the slot (no target) and trains on the other 19 samples
    r = CliRunner().invoke(main, ["train", *train_args(data, tmp_path / "run", "--epochs", "1", "--cache",
                                                       str(cache)), "--train-shards", str(shards)])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("workers", ["0", "1"])
def test_stage2_truncated_train_shard_is_a_one_line_error_naming_it(data, tmp_path, workers):
    shards = tmp_path / "train"
    shutil.copytree(data["train"], shards)  # same fingerprint: the cache still matches
    bad = shards / "shard-000002.tar"
    _truncate(bad)
    r = CliRunner().invoke(main, ["train", *train_args(data, tmp_path / "run", "--cache", str(data["cache"]),
                                                       "--workers", workers), "--train-shards", str(shards)])
    assert r.exit_code == 1
    assert error_line(r.output) == f"Error: {bad}: damaged tar (unexpected end of data)"


@pytest.mark.slow
def test_stage2_tar_cut_between_members_is_an_error(data, tmp_path):
    shards = tmp_path / "train"
    shutil.copytree(data["train"], shards)
    bad = shards / "shard-000002.tar"
    with tarfile.open(bad) as t:
        cut = t.getmembers()[10].offset
    _truncate(bad, cut)
    # one whole epoch: every shard is read to its end, where the count is checked
    r = CliRunner().invoke(main, ["train", *train_args(data, tmp_path / "run", "--cache", str(data["cache"]),
                                                       "--epochs", "1"), "--train-shards", str(shards)])
    assert r.exit_code == 1 and str(bad) in error_line(r.output)


# ---------------------------------------------------------------- 6. bad input and security

class RunsCode:
    """Unpickling this calls os.system(...): code, refused by weights_only loading."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_as_pretrained_checkpoint_is_refused(data, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"fc.weight": torch.zeros(2), "x": RunsCode(marker)}, tmp_path / "evil.pth")
    r = CliRunner().invoke(main, ["train", *train_args(data, tmp_path / "run", "--pretrained-checkpoint",
                                                       str(tmp_path / "evil.pth"))])
    assert r.exit_code == 1
    line = error_line(r.output)
    assert line.startswith(f"Error: checkpoint {tmp_path / 'evil.pth'}: refused, loading it would run code ("), line
    assert "system" in line and not marker.exists()


@pytest.mark.slow
def test_tampered_last_pth_is_refused_on_resume(data, tmp_path):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    args = ["train", *train_args(data, run, "--epochs", "1", "--max-steps", "1")]
    assert CliRunner().invoke(main, args).exit_code == 0
    state = torch.load(run / "last.pth", weights_only=True)
    state["payload"] = RunsCode(marker)
    torch.save(state, run / "last.pth")
    r = CliRunner().invoke(main, [*args, "--resume"])
    assert r.exit_code == 1
    line = error_line(r.output)
    assert line.startswith(f"Error: {run / 'last.pth'}: checkpoint refused: loading it would run code ("), line
    assert "system" in line, line
    assert not marker.exists()


@pytest.mark.slow
def test_damaged_last_pth_on_resume_is_a_one_line_error(data, tmp_path):
    run = tmp_path / "run"
    args = ["train", *train_args(data, run, "--epochs", "1", "--max-steps", "1")]
    assert CliRunner().invoke(main, args).exit_code == 0
    _truncate(run / "last.pth")
    r = CliRunner().invoke(main, [*args, "--resume"])
    assert r.exit_code == 1 and "last.pth" in error_line(r.output)


@pytest.mark.parametrize("command", ["cache", "train"])
def test_yaml_python_tag_is_refused_without_running_it(data, tmp_path, command):
    marker = tmp_path / "pwned"
    config = tmp_path / "evil.yaml"
    config.write_text(f"{command}:\n  seed: !!python/object/apply:os.system ['touch {marker}']\n")
    args = (cache_args(data["train"], data["ckpt"], tmp_path / "c.zarr") if command == "cache"
            else train_args(data, tmp_path / "run"))
    r = CliRunner().invoke(main, [command, "--config", str(config), *args])
    assert r.exit_code == 1
    assert error_line(r.output) == (f"Error: {config}: not valid YAML (could not determine a constructor for "
                                    f"the tag 'tag:yaml.org,2002:python/object/apply:os.system')")
    assert not marker.exists()


@pytest.mark.parametrize("command, text, message", [
    ("cache", "cache:\n  viewz: 3\n", "cache.viewz: unknown key"),
    ("cache", "cache:\n  seed: three\n", "cache.seed: expected an integer, got 'three'"),
    ("cache", "view:\n  scale: [0.5, .nan]\n", "cache.view.scale[1]: expected a finite number, got nan"),
    ("cache", "cache: [1, 2]\n", "section 'cache': expected a mapping of keys, got [1, 2]"),
    ("cache", "cache:\n  1: 2\n  a: 3\n", "cache.1: unknown key"),
    ("train", "train:\n  lr: fast\n", "train.lr: expected a number, got 'fast'"),
    ("train", "train:\n  shuffle_buffer: 2.5\n", "train.shuffle_buffer: expected an integer, got 2.5"),
    ("train", "train:\n  kd_only: 1\n", "train.kd_only: expected true/false, got 1"),
    ("train", "train:\n  optimizer: sgd\n", "train.optimizer: unknown key"),
    ("train", "view: hflip\n", "section 'view': expected a mapping of keys, got 'hflip'"),
])
def test_bad_config_through_the_cli_names_the_key(data, tmp_path, command, text, message):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    args = (cache_args(data["train"], data["ckpt"], tmp_path / "c.zarr") if command == "cache"
            else train_args(data, tmp_path / "run"))
    r = CliRunner().invoke(main, [command, "--config", str(config), *args])
    assert r.exit_code == 1
    assert message in error_line(r.output)
    assert not (tmp_path / "c.zarr").exists() and not (tmp_path / "run").exists()


def test_overwrite_never_deletes_what_is_not_a_cache(data, tmp_path):
    """A mistyped --out with --overwrite must not wipe a folder or a file of something else."""
    folder, file = tmp_path / "thesis", tmp_path / "notes.txt"
    folder.mkdir()
    (folder / "chapter1.tex").write_text("years of work")
    file.write_text("more work")
    for out, message in ((folder, "folder is not a cache (no zarr.json) and is not empty"),
                         (file, "is a file, not a cache")):
        r = CliRunner().invoke(main, ["cache", *cache_args(data["train"], data["ckpt"], out), "--overwrite"])
        assert r.exit_code == 1
        assert error_line(r.output).startswith(f"Error: {out}: {message}")
    assert (folder / "chapter1.tex").read_text() == "years of work" and file.read_text() == "more work"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 folder anyway: nothing to test")
def test_unreadable_shard_folder_is_a_one_line_error(data, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(data["train"], shards)
    shards.chmod(0)
    try:
        r = CliRunner().invoke(main, ["cache", *cache_args(shards, data["ckpt"], tmp_path / "c.zarr")])
        assert r.exit_code == 1 and str(shards) in error_line(r.output)
    finally:
        shards.chmod(0o755)


@pytest.mark.slow
def test_resume_with_other_settings_is_refused(data, tmp_path):
    run = tmp_path / "run"
    args = ["train", *train_args(data, run, "--epochs", "1", "--max-steps", "1")]
    assert CliRunner().invoke(main, args).exit_code == 0
    r = CliRunner().invoke(main, [*args, "--lr", "0.5", "--resume"])
    assert r.exit_code == 1
    line = error_line(r.output)
    assert "last.pth: made with lr = 0.002, this run has 0.5" in line and "new --out" in line, line
