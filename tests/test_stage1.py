"""Stage 1 end to end: a real cache from real shards and a real timm teacher."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from helpers import NUM_CLASSES, ROOT, TEACHER, cache_args, make_shards, run_py, save_teacher
from usi_cache import cache_format as schema
from usi_cache.cli.main import main
from usi_cache.config.stages import ViewSpec
from usi_cache.shards.images import decode_image
from usi_cache.shards.manifest import load_manifest
from usi_cache.shards.tars import read_shard
from usi_cache.models.teacher import load_teacher
from usi_cache.views.sampling import decode_view, replay_array, sample_view, view_rng


def make_cache(shards, ckpt, out, *extra):
    r = CliRunner().invoke(main, ["cache", *cache_args(shards, ckpt, out, *extra)])
    assert r.exit_code == 0, r.output
    return r


def arrays(path) -> dict[str, np.ndarray]:
    group, _ = schema.open_cache(path)
    return {n: group[n][:] for n in schema.ARRAYS}


def assert_same_cache(a, b, close: tuple[str, ...] = ()):
    """Every array equal (those in `close` to a relative 1e-6), and the same attributes."""
    xa, xb = arrays(a), arrays(b)
    for name in schema.ARRAYS:
        if name in close:
            np.testing.assert_allclose(xa[name], xb[name], rtol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(xa[name], xb[name], err_msg=name)
    _, aa = schema.open_cache(a)
    _, ab = schema.open_cache(b)
    assert schema.attrs_difference(aa, ab) is None
    assert aa["invalid"] == ab["invalid"]


@pytest.mark.slow
def test_cache_contents_and_replay_invariant(tmp_path, shards, teacher_ckpt):
    out = tmp_path / "c.zarr"
    r = make_cache(shards, teacher_ckpt, out)
    assert "bytes per view" in r.output and "3/3 complete" in r.output
    group, attrs = schema.open_cache(out)
    m = load_manifest(shards)
    layout = schema.Layout.from_attrs(attrs)
    assert (layout.num_shards, layout.slots_per_shard, layout.views, layout.topk) == (3, 10, 8, 3)
    assert attrs["dataset"]["fingerprint"] == m.fingerprint
    assert attrs["teacher"]["name"] == TEACHER and attrs["teacher"]["input_size"] == 32
    assert len(attrs["teacher"]["checkpoint_sha256"]) == 64
    assert group["logits"].dtype == np.float16 and group["classes"].dtype == np.uint16
    assert schema.completed_shards(group, layout).all()
    # per-view arrays: one Zarr shard per WebDataset shard, inner chunks of one view
    assert group["logits"].shards == (10, 8, 3) and group["logits"].chunks == (10, 1, 3)
    x = arrays(out)
    # the short last shard: slots past its end are empty
    assert list(x["labels"][26:]) == [-1] * 4 and list(x["keys"][26:]) == [""] * 4
    assert (np.diff(x["logits"][:26].astype(np.float32), axis=2) <= 0).all()  # descending

    spec = ViewSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in attrs["view_spec"].items()})
    teacher, _ = load_teacher(TEACHER, str(teacher_ckpt), num_classes=NUM_CLASSES, input_size=32)
    images, rows = [], []
    for shard in range(3):
        for pos, sample in enumerate(read_shard(m.path(shard))):
            slot = shard * 10 + pos
            assert x["keys"][slot] == sample.key and x["labels"][slot] == sample.cls
            image = decode_image(sample.data)
            for v in range(8):
                stored = decode_view(tuple(x["boxes"][slot, v]), bool(x["flips"][slot, v]), x["aug_ops"][slot, v],
                                     x["aug_levels"][slot, v], x["aug_resample"][slot, v])
                # the stored view is exactly the one the seeded sampler draws
                assert stored == sample_view(view_rng(42, sample.key, v), image.height, image.width, spec)
                images.append(replay_array(image, stored, 32, spec))
                rows.append((slot, v))
    assert len(rows) >= 200
    assert (x["aug_ops"][:26] >= 0).any(), "RandAugment must be on in this test"
    # re-run the teacher on the replayed pixels, in a different batching than stage 1
    logits = torch.cat([teacher(torch.from_numpy(np.stack(images[i:i + 37]))) for i in range(0, len(images), 37)])
    top, cls = torch.topk(logits, 3, dim=1)
    slots, views = np.array(rows).T
    np.testing.assert_array_equal(cls.numpy(), x["classes"][slots, views])
    assert attrs["schema_version"] == 4 and attrs["teacher"]["precision"] == "fp32"  # CPU: 'auto' is fp32
    # schema 3 stores log-probabilities z - lse, rounded once to float16
    lse = torch.logsumexp(logits.double(), 1)
    cached = x["logits"][slots, views]
    exact = (top.double() - lse[:, None]).numpy()
    np.testing.assert_allclose(exact, cached.astype(np.float64), rtol=2.0 ** -10, atol=1e-6)  # fp16 rounding (down)
    np.testing.assert_allclose(lse.numpy(), x["lse"][slots, views], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_two_ranks_equal_one_rank(tmp_path, shards, teacher_ckpt):
    one, two = tmp_path / "one.zarr", tmp_path / "two.zarr"
    make_cache(shards, teacher_ckpt, one)
    r = run_py(["cache_teacher.py", *cache_args(shards, teacher_ckpt, two)], torchrun=2)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3/3 complete" in r.stdout
    assert_same_cache(one, two)


@pytest.mark.slow
def test_worker_processes_give_the_same_cache(tmp_path, shards, teacher_ckpt):
    """Worker processes and another batch size: the same views, classes and labels; the float32
    lse may differ in its last bit (the teacher's CPU kernels may sum in another order for another
    batch size: 12 of 240 values differed by 1e-7 in one run on a loaded machine), so it is
    compared to a relative 1e-6."""
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    make_cache(shards, teacher_ckpt, a)
    make_cache(shards, teacher_ckpt, b, "--workers", "2", "--batch-size", "5")
    assert_same_cache(a, b, close=("lse",))


def _committed(cache, chunks) -> bool:
    """True once a shard's commit marker is readable (its chunk file can exist before it is whole)."""
    if not (chunks.is_dir() and any(chunks.iterdir())):
        return False
    try:
        group, attrs = schema.open_cache(cache)
        return bool(schema.completed_shards(group, schema.Layout.from_attrs(attrs)).any())
    except Exception:  # a chunk being written: not committed yet
        return False


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_cache(tmp_path, teacher_ckpt):
    shards = make_shards(tmp_path / "shards", n=60, per_shard=6)
    full, killed = tmp_path / "full.zarr", tmp_path / "killed.zarr"
    make_cache(shards, teacher_ckpt, full)
    args = [sys.executable, "cache_teacher.py", *cache_args(shards, teacher_ckpt, killed)]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    chunks = killed / "labels" / "c"
    deadline = time.time() + 120
    while time.time() < deadline and not _committed(killed, chunks):
        time.sleep(0.01)  # kill right after the first shard is committed
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    group, attrs = schema.open_cache(killed)
    done = schema.completed_shards(group, schema.Layout.from_attrs(attrs))
    assert 0 < done.sum() < len(done), f"kill landed at {done.sum()}/{len(done)} shards"
    r = make_cache(shards, teacher_ckpt, killed)
    assert f"{int(done.sum())} reused" in r.output
    assert_same_cache(full, killed)


@pytest.mark.slow
def test_undecodable_image_gets_label_minus_one(tmp_path, teacher_ckpt):
    shards = make_shards(tmp_path / "shards", n=12, per_shard=5, bad=(4,))
    out = tmp_path / "c.zarr"
    r = make_cache(shards, teacher_ckpt, out)
    assert "1 undecodable sample(s)" in r.output and "img0004" in r.output
    assert "invalid samples  1" in r.output
    _, attrs = schema.open_cache(out)
    assert attrs["invalid"] == ["img0004"]
    x = arrays(out)
    slot = list(x["keys"]).index("img0004")
    assert x["labels"][slot] == -1 and (x["logits"][slot] == 0).all()
    assert (x["labels"][x["keys"] != ""] >= 0).sum() == 11


@pytest.mark.parametrize("extra, match", [
    (["--topk", "9"], "k = 9 exceeds the dataset's 5 classes"),
    (["--views", "0"], "cache.views: expected a positive integer"),
    (["--teacher", "resnett50"], "resnet"),
])
def test_bad_arguments(tmp_path, shards, teacher_ckpt, extra, match):
    r = CliRunner().invoke(main, ["cache", *cache_args(shards, teacher_ckpt, tmp_path / "c.zarr"), *extra])
    assert r.exit_code != 0 and match in r.output, r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "c.zarr").exists()


def test_teacher_class_count_mismatch(tmp_path, shards):
    ckpt = save_teacher(tmp_path / "t7.pth", num_classes=7)
    r = CliRunner().invoke(main, ["cache", *cache_args(shards, ckpt, tmp_path / "c.zarr")])
    assert r.exit_code == 1 and "7" in r.output and "5" in r.output, r.output
    assert not (tmp_path / "c.zarr").exists()


def test_empty_shard_folder(tmp_path, teacher_ckpt):
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(main, ["cache", *cache_args(tmp_path / "empty", teacher_ckpt, tmp_path / "c.zarr")])
    assert r.exit_code == 1 and "no dataset manifest" in r.output


@pytest.mark.slow
def test_existing_cache_with_other_config_is_refused(tmp_path, shards, teacher_ckpt):
    out = tmp_path / "c.zarr"
    make_cache(shards, teacher_ckpt, out)
    before = arrays(out)["logits"].copy()
    r = CliRunner().invoke(main, ["cache", *cache_args(shards, teacher_ckpt, out), "--views", "4"])
    assert r.exit_code == 1 and "differs in views (cache has 8, this run has 4)" in r.output, r.output
    other = save_teacher(tmp_path / "t2.pth", seed=1)
    r = CliRunner().invoke(main, ["cache", *cache_args(shards, other, out)])
    assert r.exit_code == 1 and "teacher.checkpoint_sha256" in r.output, r.output
    other_shards = make_shards(tmp_path / "other", n=26, seed=3)
    r = CliRunner().invoke(main, ["cache", *cache_args(other_shards, teacher_ckpt, out)])
    assert r.exit_code == 1 and "dataset." in r.output, r.output
    np.testing.assert_array_equal(arrays(out)["logits"], before)
    r = CliRunner().invoke(main, ["cache", *cache_args(shards, teacher_ckpt, out), "--views", "4", "--overwrite"])
    assert r.exit_code == 0, r.output
    assert schema.open_cache(out)[1]["views"] == 4


@pytest.mark.slow
def test_json_summary(tmp_path, shards, teacher_ckpt):
    r = make_cache(shards, teacher_ckpt, tmp_path / "c.zarr", "--json")
    s = json.loads(r.output[r.output.index("{"):])
    assert s["samples"] == 26 and s["views"] == 26 * 8 and s["views_computed"] == 208
    assert s["bytes_per_view"] == s["bytes_on_disk"] / 208


def test_cache_without_randaugment(tmp_path, shards, teacher_ckpt):
    from usi_cache.stage1.run import run_cache
    from usi_cache.config.stages import CacheConfig
    cfg = CacheConfig(shards=str(shards), out=str(tmp_path / "c.zarr"), teacher=TEACHER,
                      teacher_checkpoint=str(teacher_ckpt), views=2, topk=3, input_size=32, workers=0,
                      view=ViewSpec(randaugment=""))
    s = run_cache(cfg, progress=False)
    assert s["shards_complete"] == 3
    group, attrs = schema.open_cache(cfg.out)
    assert attrs["op_slots"] == 1 and (group["aug_ops"][:] == -1).all()
    assert attrs["dataset"]["root"] == str(shards.resolve())


def as_schema2(path) -> np.ndarray:
    """Turn a schema-3 cache into what the schema-2 writer stored (raw float16 logits z, version
    2, no recorded precision); returns the log-probabilities it held."""
    group, attrs = schema.open_cache(path, mode="r+")
    log_p, lse = group["logits"][:], group["lse"][:]
    group["logits"][:] = (log_p.astype(np.float64) + lse.astype(np.float64)[..., None]).astype(np.float16)
    attrs["schema_version"] = 2
    del attrs["teacher"]["precision"]
    group.attrs[schema.ATTR] = attrs
    return log_p


@pytest.mark.slow
def test_schema2_cache_still_reads_and_verifies(tmp_path, shards, teacher_ckpt):
    out = tmp_path / "c.zarr"
    make_cache(shards, teacher_ckpt, out)
    log_p = as_schema2(out)
    group, attrs = schema.open_cache(out)
    layout = schema.Layout.from_attrs(attrs)
    assert not layout.stores_log_probs
    block = schema.read_block(group, layout, 1)
    assert block.logits.dtype == np.float16 and block.log_probs.dtype == np.float32
    # converted in one place: z - lse, within the float16 rounding of z
    tol = np.spacing(np.abs(block.logits)).astype(np.float64) / 2 + 1e-6
    assert (np.abs(block.log_probs - log_p[layout.rows(1)]) <= tol + np.spacing(np.abs(log_p[layout.rows(1)]))).all()
    r = CliRunner().invoke(main, ["verify", str(out), "--shards", str(shards), "--recompute", "10",
                                  "--teacher-checkpoint", str(teacher_ckpt)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["inspect", str(out), "--slot", "3", "--json"])
    assert r.exit_code == 0, r.output
    view = json.loads(r.output)["sample"]["views"][0]
    np.testing.assert_allclose([t["prob"] for t in view["topk"]], np.exp(log_p[3, 0].astype(np.float64)),
                               rtol=2e-2)
