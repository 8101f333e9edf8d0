"""Growing a cache by N views (`usi cache --add-views N`) on real shards, a real teacher and real Zarr."""
from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from helpers import ROOT, TEACHER, cache_args, make_shards, run_py, save_teacher
from usi_cache import cache_format as schema
from usi_cache.cli.main import main

FP16_REL = 2.0 ** -10  # float16 spacing relative to the value: the rounding of a cached log-probability


def cache(shards, ckpt, out, *extra, ok=True):
    r = CliRunner().invoke(main, ["cache", *cache_args(shards, ckpt, out, *extra)])
    if ok:
        assert r.exit_code == 0, r.output
    return r


def files(path: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of a cache: its bytes and mtime (ns)."""
    return {str(f.relative_to(path)): (f.read_bytes(), f.stat().st_mtime_ns) for f in path.rglob("*") if f.is_file()}


def read_all(path) -> tuple[dict[str, np.ndarray], dict]:
    """Every array of a cache over all its views (through the schema), and its attributes."""
    group, attrs = schema.open_cache(path)
    layout = schema.Layout.from_attrs(attrs)
    return {n: schema.read_array(group, n, slice(0, layout.slots)) for n in layout.arrays}, attrs


def assert_equivalent(grown, fresh):
    """A grown cache holds what one made with all its views from the start holds: the same view
    parameters, pairings, classes, keys and labels; log-probabilities and lse within fp16 rounding."""
    (x, a), (y, b) = read_all(grown), read_all(fresh)
    assert set(x) == set(y)
    for name in x:
        if name in ("logits", "lse"):
            continue
        np.testing.assert_array_equal(x[name], y[name], err_msg=name)
    np.testing.assert_allclose(x["logits"].astype(np.float64), y["logits"].astype(np.float64),
                               rtol=2 * FP16_REL, atol=1e-6)
    np.testing.assert_allclose(x["lse"], y["lse"], rtol=1e-5, atol=1e-5)
    assert schema.attrs_difference(a, b) is None
    assert a["views"] == b["views"] and a["replay"]["views"] == b["replay"]["views"]
    assert a["replay"]["sha256"] == b["replay"]["sha256"]  # the fingerprint covers a grown view


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """A V = 2 cache grown by 3, the files it had before, and a V = 5 cache made from scratch."""
    root = tmp_path_factory.mktemp("grow")
    shards = make_shards(root / "shards", n=26, per_shard=10)
    ckpt = save_teacher(root / "teacher.pth")
    out, fresh = root / "grown.zarr", root / "fresh.zarr"
    cache(shards, ckpt, out, "--views", "2")
    before = files(out)
    shutil.copytree(out, root / "base.zarr")  # V = 2, for the tests that grow it otherwise
    r = cache(shards, ckpt, out, "--views", "2", "--add-views", "3")
    cache(shards, ckpt, fresh, "--views", "5")
    return {"root": root, "shards": shards, "ckpt": ckpt, "out": out, "fresh": fresh, "before": before,
            "base": root / "base.zarr", "output": r.output}


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.slow
def test_grown_cache_equals_one_made_with_all_views(grown):
    assert "3/3 complete (3 computed now, 0 reused)" in grown["output"]
    assert "130 (78 computed now; grown from V = 2 to 5)" in grown["output"]
    assert_equivalent(grown["out"], grown["fresh"])
    _, attrs = schema.open_cache(grown["out"])
    assert attrs["view_blocks"] == [2, 3] and attrs["schema_version"] == 4 and "growing" not in attrs


@pytest.mark.slow
def test_existing_files_are_not_rewritten(grown):
    after = files(grown["out"])
    changed = [rel for rel, (data, mtime) in grown["before"].items() if after[rel] != (data, mtime)]
    assert changed == ["zarr.json"]  # only the root attributes (V, view_blocks, replay) were rewritten
    new = sorted(set(after) - set(grown["before"]))
    assert new and all(rel == "blocks/zarr.json" or rel.startswith("blocks/1/") for rel in new)
    assert any(rel.startswith("blocks/1/logits/c/") for rel in new)


@pytest.mark.slow
def test_rerunning_a_finished_grow_does_nothing(grown, tmp_path):
    out = copy(grown["out"], tmp_path / "c.zarr")
    before = files(out)
    r = cache(grown["shards"], grown["ckpt"], out, "--views", "2", "--add-views", "3")
    assert "(0 computed now, 3 reused)" in r.output and "grown from V = 2 to 5" in r.output
    after = files(out)
    assert {k: v for k, v in after.items() if k != "zarr.json"} == {k: v for k, v in before.items() if k != "zarr.json"}
    # and it grows again from its new V
    r = cache(grown["shards"], grown["ckpt"], out, "--views", "5", "--add-views", "1")
    assert "grown from V = 5 to 6" in r.output
    _, attrs = schema.open_cache(out)
    assert attrs["views"] == 6 and attrs["view_blocks"] == [2, 3, 1]


@pytest.mark.slow
def test_verify_and_inspect_read_a_grown_cache(grown):
    r = CliRunner().invoke(main, ["verify", str(grown["out"]), "--shards", str(grown["shards"]), "--recompute", "30",
                                  "--teacher-checkpoint", str(grown["ckpt"])])
    assert r.exit_code == 0, r.output
    assert "130 views" in r.output and "teacher re-run on 30 views" in r.output
    r = CliRunner().invoke(main, ["inspect", str(grown["out"]), "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert s["summary"]["views"] == 5 and s["stats"]["views"] == 130
    assert [v["view"] for v in s["stats"]["per_view"]] == [0, 1, 2, 3, 4]
    x, _ = read_all(grown["out"])
    r = CliRunner().invoke(main, ["inspect", str(grown["out"]), "--slot", "11", "--json"])
    assert r.exit_code == 0, r.output
    views = json.loads(r.output)["sample"]["views"]
    assert len(views) == 5
    assert [t["class"] for t in views[4]["topk"]] == x["classes"][11, 4].tolist()  # a grown view


@pytest.mark.slow
def test_verify_finds_a_damaged_grown_chunk(grown, tmp_path):
    out = copy(grown["out"], tmp_path / "c.zarr")
    chunk = out / "blocks" / "1" / "logits" / "c" / "1" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 3] ^= 0xFF
    chunk.write_bytes(bytes(data))
    r = CliRunner().invoke(main, ["verify", str(out), "--shards", str(grown["shards"])])
    assert r.exit_code == 1 and "checksums" in r.output and "logits" in r.output, r.output


@pytest.mark.slow
def test_verify_finds_a_grown_block_of_the_wrong_shape(grown, tmp_path):
    import zarr
    out = copy(grown["out"], tmp_path / "c.zarr")
    logits = zarr.open_group(str(out), mode="r+")["blocks/1/logits"]  # block 1 holds views 2..4
    logits.resize((logits.shape[0], 2, logits.shape[2]))
    r = CliRunner().invoke(main, ["verify", str(out), "--shards", str(grown["shards"])])
    assert r.exit_code == 1, r.output
    assert "'logits': view block 2..4 is stored with shape (30, 2, 3), expected (30, 3, 3)" in r.output


def _gets(path: Path, read) -> dict[str, int]:
    """Store reads (key -> count) made by read(group) on the cache opened through zarr's LoggingStore."""
    seen: list[str] = []

    class Keys(logging.Handler):
        def emit(self, record):
            msg = record.getMessage()
            if "Calling LocalStore.get(" in msg:
                seen.append(msg.split("get(", 1)[1].rstrip(")"))

    store = zarr.storage.LoggingStore(zarr.storage.LocalStore(str(path), read_only=True), log_level="INFO")
    handler = Keys()
    store.logger.addHandler(handler)  # (LoggingStore adds its own only when no logger above has one)
    try:
        group = zarr.open_group(store, mode="r", zarr_format=3)
        layout = schema.Layout.from_attrs(dict(group.attrs[schema.ATTR]))
        arrays = schema.open_arrays(group, layout)  # metadata, once (not counted)
        seen.clear()
        read(arrays, layout)
    finally:
        store.logger.removeHandler(handler)
    out: dict[str, int] = {}
    for key in seen:
        out[key] = out.get(key, 0) + 1
    return out


@pytest.mark.slow
def test_stage2_reads_one_inner_chunk_per_array_and_view(grown):
    """Stage 2's read of one view of a shard touches only the view block holding it, and reads it
    exactly as from a cache made with all views at once (the same requests per array)."""
    for view in (1, 3):
        got = _gets(grown["out"], lambda a, layout: schema.read_block(a, layout, 2, view))
        fresh = _gets(grown["fresh"], lambda a, layout: schema.read_block(a, layout, 2, view))
        prefix = "blocks/1/" if view >= 2 else ""
        per_view = [k for k in got if k.split("/c/")[0] not in schema.PER_SLOT]
        assert len(per_view) == len(schema.PER_VIEW) and all(k.startswith(prefix) for k in per_view)
        assert all("/c/2/" in k for k in per_view)  # the shard's own Zarr shard
        assert all(got[k] == 2 for k in per_view)  # its index, then the one inner chunk of the view
        assert sorted(got.values()) == sorted(fresh.values())
        assert {k.removeprefix("blocks/1/"): n for k, n in got.items()} == fresh


@pytest.mark.slow
def test_stage2_trains_on_grown_views(grown, tmp_path):
    from usi_cache.stage2.plan import PlanSpec
    from usi_cache.shards.manifest import load_manifest
    from usi_cache.stage2.data import TrainStream, TrainStreamSpec, valid_counts
    group, attrs = schema.open_cache(grown["out"])
    layout = schema.Layout.from_attrs(attrs)
    m = load_manifest(grown["shards"])
    plan = PlanSpec(counts=valid_counts(m, group, layout), seed=42, world=1, workers=0, batch=4, repeats=1)
    stream = TrainStream(TrainStreamSpec(manifest=m, cache=str(grown["out"]), layout=layout,
                                         spec=schema.view_spec(attrs), size=32, plan=plan, rank=0, shuffle_buffer=8))
    stream.set_epoch(3)  # view 3: in the grown block
    x, _ = read_all(grown["out"])
    slots = {str(k): i for i, k in enumerate(x["keys"]) if k}
    samples = list(stream)
    assert len(samples) == 24 and {s["view"] for s in samples} == {3}
    for s in samples:
        np.testing.assert_array_equal(s["t_log_probs"].numpy(), x["logits"][slots[s["key"]], 3].astype(np.float32))
        assert s["t_classes"].tolist() == x["classes"][slots[s["key"]], 3].tolist()
    # the real stage 2: three one-step epochs read views 0, 1 and 2 (the last one grown)
    val = make_shards(tmp_path / "val", n=10, per_shard=5, seed=7)
    run = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", "--model", TEACHER, "--train-shards", str(grown["shards"]),
                                  "--val-shards", str(val), "--cache", str(grown["out"]), "--out", str(run),
                                  "--epochs", "3", "--cooldown-epochs", "0", "--warmup-epochs", "1",
                                  "--batch-size", "4", "--input-size", "32", "--workers", "0", "--max-steps", "1",
                                  "--quiet"])
    assert r.exit_code == 0, r.output
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [row["view"] for row in log] == [0, 1, 2]
    assert all(np.isfinite(row["train_kd"]) and row["train_kd"] > 0 for row in log)


@pytest.mark.slow
def test_two_ranks_grow_like_one(grown, tmp_path):
    out = copy(grown["base"], tmp_path / "c.zarr")
    r = run_py(["cache_teacher.py", *cache_args(grown["shards"], grown["ckpt"], out, "--views", "2",
                                                "--add-views", "3")], torchrun=2)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "grown from V = 2 to 5" in r.stdout
    assert_equivalent(out, grown["out"])


@pytest.mark.slow
def test_a_paired_cache_grows(tmp_path):
    shards = make_shards(tmp_path / "shards", n=16, per_shard=8)
    ckpt = save_teacher(tmp_path / "teacher.pth")
    grown, fresh = tmp_path / "grown.zarr", tmp_path / "fresh.zarr"
    cache(shards, ckpt, grown, "--views", "1", "--mix", "paired")
    cache(shards, ckpt, grown, "--views", "1", "--add-views", "2", "--mix", "paired")
    cache(shards, ckpt, fresh, "--views", "3", "--mix", "paired")
    x, _ = read_all(grown)
    assert (x["mix_kind"][:, 1:] > 0).any()  # grown views are mixed, and their pairings equal the fresh ones'
    assert_equivalent(grown, fresh)
    r = CliRunner().invoke(main, ["verify", str(grown), "--shards", str(shards), "--recompute", "12",
                                  "--teacher-checkpoint", str(ckpt)])
    assert r.exit_code == 0, r.output


def _block_committed(out: Path) -> bool:
    """True once a shard of the grown block is committed (its marker readable)."""
    marker = out / "blocks" / "1" / schema.BLOCK_MARKER / "c"
    if not (marker.is_dir() and any(marker.iterdir())):
        return False
    try:
        group, attrs = schema.open_cache(out)
        block = schema.ViewBlock(1, attrs["views"], attrs["growing"])
        return bool(schema.completed_shards(group, schema.Layout.from_attrs(attrs), block).any())
    except Exception:  # a marker being written: not committed yet
        return False


@pytest.mark.slow
def test_killed_grow_resumes_to_the_same_cache(tmp_path):
    shards = make_shards(tmp_path / "shards", n=60, per_shard=6)
    ckpt = save_teacher(tmp_path / "teacher.pth")
    base, full, killed = tmp_path / "base.zarr", tmp_path / "full.zarr", tmp_path / "killed.zarr"
    cache(shards, ckpt, base, "--views", "1")
    copy(base, full), copy(base, killed)
    cache(shards, ckpt, full, "--views", "1", "--add-views", "3")
    args = [sys.executable, "cache_teacher.py", *cache_args(shards, ckpt, killed, "--views", "1", "--add-views", "3")]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline and not _block_committed(killed):
        time.sleep(0.01)  # kill right after the first shard of the new views is committed
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    group, attrs = schema.open_cache(killed)
    layout = schema.Layout.from_attrs(attrs)
    done = schema.completed_shards(group, layout, schema.ViewBlock(1, 1, 3))
    assert 0 < done.sum() < len(done), f"kill landed at {done.sum()}/{len(done)} shards"
    # meanwhile readers see the committed views only
    assert attrs["views"] == 1 and attrs["growing"] == 3 and layout.blocks == (schema.ViewBlock(0, 0, 1),)
    assert schema.read_block(group, layout, 0).logits.shape[1] == 1
    # another N is refused while this grow is unfinished; a plain resume says it is there
    r = cache(shards, ckpt, killed, "--views", "1", "--add-views", "2", ok=False)
    assert r.exit_code == 1 and "a grow by 3 views is unfinished" in r.output, r.output
    r = cache(shards, ckpt, killed, "--views", "1")
    assert "unfinished grow by 3 views" in r.output
    r = cache(shards, ckpt, killed, "--views", "1", "--add-views", "3")
    assert f"{int(done.sum())} reused" in r.output and "grown from V = 1 to 4" in r.output
    x, a = read_all(killed)
    y, b = read_all(full)
    for name in x:
        np.testing.assert_array_equal(x[name], y[name], err_msg=name)
    assert a["view_blocks"] == b["view_blocks"] == [1, 3] and schema.attrs_difference(a, b) is None


def as_schema(path: Path, version: int) -> None:
    """Turn a fresh (one-block) cache into what an older writer stored: the same arrays, the
    attributes of `version` (no view_blocks; version 2 also without recorded precision)."""
    group, attrs = schema.open_cache(path, mode="r+")
    attrs["schema_version"] = version
    del attrs["view_blocks"]
    if version < 3:
        del attrs["teacher"]["precision"]
    group.attrs[schema.ATTR] = attrs


@pytest.mark.slow
def test_a_schema3_cache_grows_and_a_schema2_cache_is_refused(grown, tmp_path):
    v3 = copy(grown["base"], tmp_path / "v3.zarr")
    as_schema(v3, 3)
    r = cache(grown["shards"], grown["ckpt"], v3, "--views", "2")  # resumes (nothing left to do) as version 3
    assert "(0 computed now, 3 reused)" in r.output and schema.open_cache(v3)[1]["schema_version"] == 3
    cache(grown["shards"], grown["ckpt"], v3, "--views", "2", "--add-views", "3")
    assert_equivalent(v3, grown["fresh"])
    assert schema.open_cache(v3)[1]["schema_version"] == 4
    v2 = copy(grown["base"], tmp_path / "v2.zarr")
    as_schema(v2, 2)
    r = cache(grown["shards"], grown["ckpt"], v2, "--views", "2", "--add-views", "3", ok=False)
    assert r.exit_code == 1 and "schema-2 cache stores raw logits and cannot grow" in r.output, r.output
    assert "--overwrite, --views 5" in r.output and len(r.output.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_grow_with_another_teacher_or_view_count_is_refused(grown, tmp_path):
    out = copy(grown["base"], tmp_path / "c.zarr")
    before = files(out)
    other = save_teacher(tmp_path / "other.pth", seed=1)
    for ckpt, extra, match in (
        (other, ("--views", "2"), "differs in teacher.checkpoint_sha256"),
        (grown["ckpt"], ("--views", "2", "--topk", "2"), "differs in topk"),
        (grown["ckpt"], ("--views", "4"), "the cache has V = 2 views, this run says views = 4; give --views 2"),
    ):
        r = cache(grown["shards"], ckpt, out, *extra, "--add-views", "3", ok=False)
        assert r.exit_code == 1 and match in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert files(out) == before  # nothing written


@pytest.mark.parametrize("extra, match", [
    (("--add-views", "-2"), "cache.add_views: expected >= 0 views to add, got -2"),
    (("--add-views", "2", "--overwrite"), "cache.add_views: grows the existing cache; it cannot be combined"),
    (("--add-views", "2"), "no cache to grow here; make it first (without --add-views)"),
])
def test_bad_grow_arguments(tmp_path, teacher_ckpt, extra, match):
    shards = make_shards(tmp_path / "shards", n=4, per_shard=4)
    r = cache(shards, teacher_ckpt, tmp_path / "c.zarr", *extra, ok=False)
    assert r.exit_code != 0 and match in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert not (tmp_path / "c.zarr").exists()


def test_layout_reads_view_blocks_from_the_attributes():
    a = {"dataset": {"shards": [{}] * 3, "per_shard": 4}, "views": 5, "view_blocks": [2, 3], "topk": 2,
         "num_classes": 5, "op_slots": 2, "schema_version": 4}
    layout = schema.Layout.from_attrs(a)
    assert layout.blocks == (schema.ViewBlock(0, 0, 2), schema.ViewBlock(1, 2, 3))
    assert layout.blocks[1].path("logits") == "blocks/1/logits" and layout.blocks[0].path("logits") == "logits"
    assert schema.chunk_keys("lse", 1, layout) == ["lse/c/1/0", "blocks/1/lse/c/1/0"]
    assert schema.chunk_keys("labels", 1, layout) == ["labels/c/1"]
    with pytest.raises(schema.CacheError, match=r"view_blocks \[2, 2\] does not add up to views = 5"):
        schema.Layout.from_attrs({**a, "view_blocks": [2, 2]})
    assert schema.Layout.from_attrs({k: v for k, v in a.items() if k != "view_blocks"}).blocks == (
        schema.ViewBlock(0, 0, 5),)


@pytest.mark.slow
def test_resuming_a_run_on_a_cache_grown_since_is_refused(grown, tmp_path):
    """Epoch e uses view e mod V: a run begun on V = 2 may not resume on the grown V = 3."""
    base = copy(grown["base"], tmp_path / "base.zarr")
    val = make_shards(tmp_path / "val", n=10, per_shard=5, seed=7)
    args = ["train", "--model", TEACHER, "--train-shards", str(grown["shards"]), "--val-shards", str(val),
            "--cache", str(base), "--out", str(tmp_path / "run"), "--epochs", "2", "--cooldown-epochs", "0",
            "--warmup-epochs", "1", "--batch-size", "4", "--input-size", "32", "--workers", "0",
            "--max-steps", "1", "--quiet"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    cache(grown["shards"], grown["ckpt"], base, "--views", "2", "--add-views", "1")
    r = CliRunner().invoke(main, [*args, "--resume"])
    assert r.exit_code == 1
    assert "began on V = 2 views, the cache now has V = 3" in r.output and "Traceback" not in r.output
