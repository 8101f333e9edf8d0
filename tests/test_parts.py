"""Stage 1 as independent parts (`--part I/N`): real processes started at one instant, a part
killed with SIGKILL and rerun, the result compared array by array with a one-process cache."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from helpers import NUM_CLASSES, ROOT, TEACHER, cache_args, make_samples, make_shards, run_py, save_teacher
from test_object_storage import BUCKET, s3  # noqa: F401 (s3: the S3 server fixture, a test dependency)
from usi_cache import cache_format as schema, storage
from usi_cache.stage1 import parts
from usi_cache.cli.main import main
from usi_cache.config.errors import ConfigError



def env_of(extra=None) -> dict:
    """This process's environment (the S3 fixture's variables included) with run_py's thread
    count, so that a part's float32 teacher sums match the one-process reference bit for bit."""
    return {**os.environ, "OMP_NUM_THREADS": "1", **(extra or {})}


# A part started at a given instant: torch and timm are imported before it waits, so that parts
# started together reach the store together.
LAUNCH = ("import sys, time\n"
          "import usi_cache.stage1.run\n"
          "from usi_cache.cli.main import cache_command\n"
          "time.sleep(max(0.0, float(sys.argv[1]) - time.time()))\n"
          "cache_command(sys.argv[2:], prog_name='usi cache')\n")


def start(args: list[str], at: float, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", LAUNCH, str(at), *args], cwd=ROOT, env=env_of(env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    return out


def parts_together(args: list[str], n: int) -> list[dict]:
    """Parts 0..n-1 of one `usi cache` command started at one instant; each must succeed: their
    JSON summaries."""
    at = time.time() + 6
    procs = [start([*args, "--part", f"{i}/{n}", "--json"], at) for i in range(n)]
    outs = [finish(p) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    return [json.loads(o[o.index("{"):]) for o in outs]


def arrays(path) -> dict[str, np.ndarray]:
    """Every array of a cache over all its committed views."""
    group, attrs = schema.open_cache(path)
    layout = schema.Layout.from_attrs(attrs)
    return {name: np.asarray(schema.array(group, name, layout)[:]) for name in layout.arrays}


def assert_same_cache(a, b) -> None:
    xa, xb = arrays(a), arrays(b)
    assert xa.keys() == xb.keys()
    for name in xa:
        np.testing.assert_array_equal(xa[name], xb[name], err_msg=name)
    (_, aa), (_, ab) = schema.open_cache(a), schema.open_cache(b)
    assert schema.attrs_difference(aa, ab) is None
    assert aa["invalid"] == ab["invalid"] and aa["replay"] == ab["replay"]


def committed(out: str, shards: list[int]) -> int:
    """How many of `shards` have their marker (a chunk is moved into place whole)."""
    return sum(storage.is_file(storage.join(out, "labels", "c", str(s))) for s in shards)


# ------------------------------------------------------------------ which part, from where

def test_part_spec_and_job_array_environment():
    assert parts.resolve_part("1/3") == parts.Part(1, 3) and parts.Part(1, 3).shards(10) == [1, 4, 7]
    assert parts.resolve_part("") is None
    slurm = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_MAX": "6",
             "SLURM_ARRAY_TASK_COUNT": "3"}
    assert parts.resolve_part("auto", slurm) == parts.Part(1, 3)  # --array=4-6 counts from 4
    assert parts.resolve_part("auto/3", slurm) == parts.Part(1, 3)
    assert parts.resolve_part("auto/4", {"JOB_COMPLETION_INDEX": "3"}) == parts.Part(3, 4)
    for spec, env, match in [
        ("auto/4", slurm, "the Slurm array has 3 tasks, not 4"),
        ("auto", {**slurm, "SLURM_ARRAY_TASK_MAX": "8"}, "submit it as --array=4-6"),  # --array=4-8:2
        ("auto", {"JOB_COMPLETION_INDEX": "0"}, "give auto/N"),
        ("auto/2", {"JOB_COMPLETION_INDEX": "2"}, "index 2 is not a part of 2"),
        ("auto", {}, "neither SLURM_ARRAY_TASK_ID nor JOB_COMPLETION_INDEX"),
    ]:
        with pytest.raises(ConfigError, match=match):
            parts.resolve_part(spec, env)


@pytest.mark.parametrize("extra, message", [
    (["--part", "3/2"], "cache.part: '3/2': part 3 of 2 does not exist: expected I/N with 0 <= I < N"),
    (["--part", "0/0"], "cache.part: '0/0': N must be a positive integer"),
    (["--part", "first"], "cache.part: 'first': expected I/N (0 <= I < N), auto or auto/N"),
    (["--part", "0/2", "--overwrite"], "cache.part: a part joins the cache its siblings write; it cannot be "
                                       "combined with overwrite"),
])
def test_bad_part_is_one_line_and_writes_nothing(tmp_path, shards, teacher_ckpt, extra, message):
    out = tmp_path / "c.zarr"
    r = CliRunner().invoke(main, ["cache", *cache_args(shards, teacher_ckpt, out), *extra])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith(f"Error: {message}"), r.output
    assert not out.exists()


def test_part_with_other_settings_or_another_cache_is_refused(tmp_path, shards, teacher_ckpt):
    out = tmp_path / "c.zarr"
    r = CliRunner().invoke(main, ["cache", *cache_args(shards, teacher_ckpt, out, "--views", "2"), "--part", "0/2"])
    assert r.exit_code == 0, r.output
    before = storage.sizes(out)
    r = CliRunner().invoke(main, ["cache", *cache_args(shards, teacher_ckpt, out, "--views", "3"), "--part", "1/2"])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert r.output.strip() == (f"Error: {out}: existing cache differs in views (cache has 2, this run has 3); "
                                "every part runs with the cache's settings: give them, or another --out")
    other = make_shards(tmp_path / "other", n=12, per_shard=4, seed=3)
    r = CliRunner().invoke(main, ["cache", *cache_args(other, teacher_ckpt, out, "--views", "2"), "--part", "1/2"])
    assert r.exit_code == 1 and "existing cache differs in dataset" in r.output, r.output
    assert storage.sizes(out) == before  # nothing written
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "a.txt").write_text("mine")
    r = CliRunner().invoke(main, ["cache", *cache_args(shards, teacher_ckpt, folder), "--part", "0/2"])
    assert r.exit_code == 1 and "folder is not a cache (no zarr.json) and is not empty" in r.output, r.output
    assert sorted(p.name for p in folder.iterdir()) == ["a.txt"]


def test_random_teacher_must_be_asked_for(tmp_path, shards, teacher_ckpt):
    out = tmp_path / "c.zarr"
    base = ["cache", "--shards", str(shards), "--teacher", TEACHER, "--views", "1", "--topk", "3",
            "--input-size", "32", "--workers", "0", "--out", str(out)]
    r = CliRunner().invoke(main, base)
    assert r.exit_code == 1 and r.output.strip() == (
        "Error: cache.teacher_checkpoint: not given, and not pretrained: the cache would hold a random teacher; "
        "give --teacher-checkpoint or --pretrained (or --random-teacher if meant)"), r.output
    assert not out.exists()
    r = CliRunner().invoke(main, [*base, "--random-teacher", "--teacher-checkpoint", str(teacher_ckpt)])
    assert r.exit_code == 1 and "cache.random_teacher: excludes cache.teacher_checkpoint" in r.output, r.output
    r = CliRunner().invoke(main, [*base, "--random-teacher"])
    assert r.exit_code == 0, r.output
    assert schema.open_cache(out)[1]["teacher"]["checkpoint_sha256"] is None


# ------------------------------------------------------------------ creating the store at once

RACE = """
import json, os, sys, time
from usi_cache import cache_format as schema
from usi_cache.checks import replay as replay_check
from usi_cache.config.stages import CacheConfig
from usi_cache.stage1 import parts, run as cache
out, views, at = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
cfg = CacheConfig(shards="s", out=out, teacher="t", views=views, part="0/4", random_teacher=True)
layout = schema.Layout(num_shards=4, slots_per_shard=3, views=views, topk=2, num_classes=5, op_slots=1)
attrs = schema.make_attrs(teacher={"name": "t"}, num_classes=5, topk=2, views=views, view_spec={}, op_names=[],
                          op_slots=1, seed=0, manifest={"shards": [{"name": "a"}] * 4, "per_shard": 3,
                          "fingerprint": "f"}, tool_version="x")
attrs["decoders"] = replay_check.decoder_env()
time.sleep(max(0.0, at - time.time()))
error = parts.prepare_store(cfg, attrs, layout, lambda: cache._prepare_store(cfg, attrs, layout))
print(json.dumps({"pid": os.getpid(), "error": error}))
"""


def race(out: str, views: list[int], env=None) -> tuple[list[dict], dict]:
    """Processes that prepare the store at `out` at the same instant, one per entry of `views`."""
    at = time.time() + 8  # every process has imported torch by then
    procs = [subprocess.Popen([sys.executable, "-c", RACE, out, str(v), str(at)], cwd=ROOT, text=True,
                              env=env_of(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for v in views]
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr[-3000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    claim = json.loads(storage.read_bytes(storage.join(out, schema.PARTS_DIR, "create")))
    return results, claim


def check_race(out: str, results: list[dict], claim: dict, views: list[int]) -> None:
    winner = [i for i, r in enumerate(results) if r["pid"] == claim["pid"]]
    assert len(winner) == 1, (results, claim)  # one process created the store
    won = views[winner[0]]
    for v, r in zip(views, results):  # every other process joined it, or refused other settings
        if v == won:
            assert r["error"] is None, r
        else:
            assert f"existing cache differs in views (cache has {won}, this run has {v})" in r["error"], r
    group, attrs = schema.open_cache(out)
    assert attrs["views"] == won and group["logits"].shape[1] == won


def test_parts_creating_the_store_at_once_do_not_clash(tmp_path):
    """Four processes reach an empty OUT at the same instant (one with other settings): exactly
    one creates the cache, the others join it or refuse, none deletes or overwrites it."""
    views = [2, 2, 2, 3]
    out = str(tmp_path / "c.zarr")
    check_race(out, *race(out, views), views)


def test_a_stale_creation_claim_is_finished_by_the_next_part(tmp_path, shards, teacher_ckpt):
    """A part killed while creating the store left its claim and a group without attributes: a
    part started later finishes the creation and computes its shards."""
    out = tmp_path / "c.zarr"
    import zarr
    zarr.open_group(str(out), mode="w", zarr_format=3)
    (out / schema.PARTS_DIR).mkdir()
    (out / schema.PARTS_DIR / "create").write_text(json.dumps({"host": "h", "pid": 1, "time": 0.0}))
    r = CliRunner().invoke(main, ["cache", *cache_args(shards, teacher_ckpt, out, "--views", "2"), "--part", "0/1"])
    assert r.exit_code == 0, r.output
    assert "was claimed" in r.output and "3/3 complete" in r.output, r.output


# ------------------------------------------------------------------ end to end

def run_parts(shards: str, ckpt: str, out: str, n: int, victim: int, views: int = 4, env=None, extra=()) -> dict:
    """N parts started at one instant; part `victim` is killed (SIGKILL) after committing one of
    its shards; the others finish; `usi cache status` is read; the victim reruns."""
    args = lambda i: [*cache_args(shards, ckpt, out, "--views", str(views), *extra), "--part", f"{i}/{n}",  # noqa: E731
                      "--json"]
    at = time.time() + 6
    procs = [start(args(i), at, env) for i in range(n)]
    mine = parts.Part(victim, n).shards(len(json.loads(storage.read_bytes(storage.join(shards, "dataset.json")))
                                                       ["shards"]))
    deadline = time.time() + 240
    while time.time() < deadline and procs[victim].poll() is None:
        try:
            if committed(out, mine):
                break
        except OSError:
            pass
        time.sleep(0.005)
    procs[victim].send_signal(signal.SIGKILL)
    outputs = [finish(p) for p in procs]
    assert procs[victim].returncode == -signal.SIGKILL, outputs[victim][-3000:]
    for i, (p, o) in enumerate(zip(procs, outputs)):
        if i != victim:
            assert p.returncode == 0, o[-3000:]
            s = json.loads(o[o.index("{"):])
            assert s["finalised"] is False and s["shards_left"] >= 1, s  # the victim's shards were left
    done = committed(out, mine)
    assert 0 < done < len(mine), f"kill landed at {done}/{len(mine)} of part {victim}'s shards"
    r = CliRunner().invoke(main, ["cache", "status", out, "--json"], env=env)
    assert r.exit_code == 0, r.output
    status = json.loads(r.output)
    assert status["parts"]["parts"] == n and status["parts"]["from"] == "the commit records"
    assert status["parts"]["with_work"] == [{"part": victim, "shards_left": len(mine) - done}]
    assert status["state"] == "in progress" and status["blocks"][0]["views_per_s"] > 0
    text = CliRunner().invoke(main, ["cache", "status", out], env=env).output
    assert f"resubmit parts {victim} (--part I/{n}" in text, text
    rerun = run_py(["-c", LAUNCH, "0", *args(victim)], env=env)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout[rerun.stdout.index("{"):])
    assert summary["shards_complete"] == summary["shards"] and summary["shards_computed"] == len(mine) - done
    return summary


@pytest.mark.slow
def test_three_parts_at_once_one_killed_equal_one_process(tmp_path):
    """Item 3 of the issue, locally: 3 parts as 3 processes started together on an empty OUT,
    part 1 killed mid-way and rerun, give the one-process cache array by array; running a
    finished part again (finalising twice) changes nothing."""
    shards = make_shards(tmp_path / "shards", n=120, per_shard=10)
    ckpt = save_teacher(tmp_path / "teacher.pth")
    one, split = tmp_path / "one.zarr", tmp_path / "parts.zarr"
    r = run_py(["cache_teacher.py", *cache_args(shards, ckpt, one, "--views", "4")])
    assert r.returncode == 0, r.stdout + r.stderr
    run_parts(str(shards), str(ckpt), str(split), 3, victim=1)
    assert_same_cache(one, split)
    status = json.loads(CliRunner().invoke(main, ["cache", "status", str(split), "--json"]).output)
    assert status["state"] == "complete" and status["parts"]["with_work"] == []
    r = run_py(["cache_teacher.py", *cache_args(shards, ckpt, split, "--views", "4"), "--part", "0/3", "--json"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout[r.stdout.index("{"):])["shards_computed"] == 0
    assert_same_cache(one, split)


@pytest.mark.slow
def test_parts_grow_a_cache_like_one_process(tmp_path):
    """--add-views with 2 parts started together equals a one-process grow."""
    shards = make_shards(tmp_path / "shards", n=40, per_shard=5)
    ckpt = save_teacher(tmp_path / "teacher.pth")
    one, split = tmp_path / "one.zarr", tmp_path / "parts.zarr"
    for out in (one, split):
        r = run_py(["cache_teacher.py", *cache_args(shards, ckpt, out, "--views", "2")])
        assert r.returncode == 0, r.stdout + r.stderr
    grow = lambda out: [*cache_args(shards, ckpt, out, "--views", "2"), "--add-views", "2"]  # noqa: E731
    r = run_py(["cache_teacher.py", *grow(one)])
    assert r.returncode == 0, r.stdout + r.stderr
    summaries = parts_together(grow(split), 2)
    assert sum(s["shards_computed"] for s in summaries) == 8
    assert any(s.get("grown") == {"from": 2, "to": 4} for s in summaries), summaries  # the last one finalised
    assert schema.open_cache(split)[1]["view_blocks"] == [2, 2]
    assert_same_cache(one, split)


# ------------------------------------------------------------------ object storage

@pytest.mark.slow
def test_parts_creating_the_store_on_s3_at_once_do_not_clash(s3):
    """The same race on S3: the claim is a conditional PUT (If-None-Match), which the server refuses
    to every process but one."""
    views = [2, 2, 2, 3]
    out = f"s3://{BUCKET}/race/c.zarr"
    check_race(out, *race(out, views), views)


@pytest.mark.slow
def test_three_parts_on_s3_one_killed_equal_one_local_process(s3, tmp_path):
    """Item 3 of the issue on object storage: shards and cache on the S3 server, 3 parts started
    together, one killed and rerun: the cache equals a one-process cache written to a folder."""
    from usi_cache.shards.tars import write_shards
    url = f"s3://{BUCKET}/parts"
    classes = [f"class{c}" for c in range(NUM_CLASSES)]
    write_shards(make_samples(90), classes, f"{url}/shards", per_shard=10, seed=0, progress=False)
    shards = make_shards(tmp_path / "shards", n=90, per_shard=10)
    ckpt = save_teacher(tmp_path / "teacher.pth")
    local = tmp_path / "one.zarr"
    r = run_py(["cache_teacher.py", *cache_args(shards, ckpt, local, "--views", "2")])
    assert r.returncode == 0, r.stdout + r.stderr
    run_parts(f"{url}/shards", str(ckpt), f"{url}/c.zarr", 3, victim=2, views=2)
    assert_same_cache(local, f"{url}/c.zarr")


@pytest.mark.slow
def test_a_part_can_be_a_torchrun_job(tmp_path):
    """Part 0 of 2 as a 2-rank torchrun job (its ranks share the part's shards), part 1 as one
    process: the cache equals a one-process run."""
    shards = make_shards(tmp_path / "shards", n=40, per_shard=5)
    ckpt = save_teacher(tmp_path / "teacher.pth")
    one, split = tmp_path / "one.zarr", tmp_path / "parts.zarr"
    r = run_py(["cache_teacher.py", *cache_args(shards, ckpt, one, "--views", "2")])
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_py(["cache_teacher.py", *cache_args(shards, ckpt, split, "--views", "2"), "--part", "0/2", "--json"],
               torchrun=2)
    assert r.returncode == 0, r.stdout + r.stderr
    s = json.loads(r.stdout[r.stdout.index("{"):])
    assert (s["finalised"], s["shards_computed"], s["shards_left"]) == (False, 4, 4), s
    r = run_py(["cache_teacher.py", *cache_args(shards, ckpt, split, "--views", "2"), "--part", "1/2"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "8/8 complete (4 computed now, 4 reused)" in r.stdout, r.stdout
    assert_same_cache(one, split)


def test_status_with_given_parts_and_on_a_cache_without_commit_times(tmp_path, shards, teacher_ckpt):
    """`--parts N` names the parts with work on any cache (here one made by one process); a cache
    made before commit times were recorded (no `commits` array) still reads, resumes and shows
    its counts, with views/s unknown."""
    out = tmp_path / "c.zarr"
    r = CliRunner().invoke(main, ["cache", *cache_args(shards, teacher_ckpt, out)])
    assert r.exit_code == 0, r.output
    for f in schema.chunk_files(out, schema.COMMIT_ARRAY, 1, schema.Layout.from_attrs(schema.open_cache(out)[1])):
        Path(f).unlink()  # shard 1 uncommitted, as if its job died
    st = json.loads(CliRunner().invoke(main, ["cache", "status", str(out), "--parts", "2", "--json"]).output)
    assert st["parts"] == {"parts": 2, "from": "--parts", "with_work": [{"part": 1, "shards_left": 1}]}
    b = st["blocks"][0]
    assert (b["shards_committed"], b["shards"], b["views_left"]) == (2, 3, 10 * 8) and st["state"] == "in progress"
    assert b["views_per_s"] > 0 and b["eta_s"] > 0  # from the two commits left
    assert json.loads(CliRunner().invoke(main, ["cache", "status", str(out), "--json"]).output)["parts"] is None
    import shutil
    shutil.rmtree(out / schema.COMMITS)  # an older cache
    text = CliRunner().invoke(main, ["cache", "status", str(out)]).output
    assert "2/3 shards committed, 80 views left; views/s unknown" in text, text
    r = CliRunner().invoke(main, ["cache", *cache_args(shards, teacher_ckpt, out)])
    assert r.exit_code == 0 and "3/3 complete (1 computed now, 2 reused)" in r.output, r.output
    st = json.loads(CliRunner().invoke(main, ["cache", "status", str(out), "--json"]).output)
    assert st["state"] == "complete" and st["blocks"][0]["views_per_s"] is None


@pytest.mark.slow
def test_an_ensemble_paired_cache_in_two_parts_equals_one_process(tmp_path):
    """Parts and ensembles together: two parts started at one instant build a paired cache of a
    weighted 2-teacher ensemble identical, array by array, to one process's."""
    shards = make_shards(tmp_path / "shards", n=40, per_shard=10)
    a, b = save_teacher(tmp_path / "a.pth", seed=0), save_teacher(tmp_path / "b.pth", seed=1)

    def args(out):
        x = cache_args(shards, a, out, "--views", "2", "--mix", "paired", "--teacher-weights", "2,1")
        x[x.index("--teacher") + 1], x[x.index("--teacher-checkpoint") + 1] = f"{TEACHER},{TEACHER}", f"{a},{b}"
        return x

    one, split = tmp_path / "one.zarr", tmp_path / "parts.zarr"
    r = run_py(["cache_teacher.py", *args(one)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert sum(s["shards_computed"] for s in parts_together(args(split), 2)) == 4
    assert_same_cache(one, split)
    _, attrs = schema.open_cache(split)
    assert [t["weight"] for t in attrs["teachers"]] == pytest.approx([2 / 3, 1 / 3])
    assert schema.Layout.from_attrs(attrs).paired
