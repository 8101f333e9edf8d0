"""Portable replay: the cache records its decoders and a pixel fingerprint; readers re-render it."""
from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner

import helpers
from helpers import cache_args, make_shards, save_teacher
from usi_cache.checks import replay as replay_check
from usi_cache import cache_format as schema
from usi_cache.cli.main import main
from usi_cache.shards.manifest import load_manifest


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("replay")
    shards = make_shards(root / "train", n=26, per_shard=10, bad=(0, 1, 2))  # three samples never decode
    val = make_shards(root / "val", n=10, per_shard=10, seed=3)
    ckpt = save_teacher(root / "t.pth")
    cache = root / "c.zarr"
    r = CliRunner().invoke(main, ["cache", *cache_args(shards, ckpt, cache), "--views", "3"])
    assert r.exit_code == 0, r.output
    return {"root": root, "train": shards, "val": val, "ckpt": ckpt, "cache": cache}


def as_if_made_elsewhere(made, tmp_path):
    """A copy of the cache whose record says another Pillow rendered different pixels."""
    cache = tmp_path / "c.zarr"
    shutil.copytree(made["cache"], cache)
    group, attrs = schema.open_cache(cache, mode="r+")
    env = {**attrs["replay"]["env"], "pillow": "9.5.0.post1"}
    group.attrs[schema.ATTR] = {**attrs, "decoders": env, "replay": {**attrs["replay"], "env": env, "sha256": "0" * 64}}
    return cache


@pytest.mark.slow
def test_a_new_cache_records_decoders_and_a_fingerprint_that_reproduces(made):
    group, attrs = schema.open_cache(made["cache"])
    rec = attrs["replay"]
    assert rec["env"] == replay_check.decoder_env() == attrs["decoders"] and len(rec["sha256"]) == 64
    assert [v for _, v in rec["views"]] == [0, 2] * 4
    labels = group["labels"][:]
    assert all(labels[slot] >= 0 for slot, _ in rec["views"])  # never the undecodable sample
    assert replay_check.fingerprint(group, attrs, load_manifest(made["train"])) == rec
    assert replay_check.mismatch(group, attrs, load_manifest(made["train"])) is None
    r = CliRunner().invoke(main, ["verify", str(made["cache"]), "--shards", str(made["train"])])
    assert r.exit_code == 0 and "re-rendered bit for bit here" in r.output, r.output
    r = CliRunner().invoke(main, ["inspect", str(made["cache"]), "--no-stats"])
    assert r.exit_code == 0 and "8 fingerprint views re-rendered bit for bit" in r.output, r.output


@pytest.mark.slow
def test_training_refuses_mismatched_pixels_unless_allowed(made, tmp_path):
    cache = as_if_made_elsewhere(made, tmp_path)
    args = helpers.train_args(made, tmp_path / "run", "--cache", str(cache), "--epochs", "1", "--max-steps", "1",
                               batch_size=8, workers=0)
    r = CliRunner().invoke(main, ["train", *args])
    line = r.output.strip().splitlines()[-1]
    assert r.exit_code == 1 and line.startswith("Error: ") and "Pillow 9.5.0.post1" in line, r.output
    assert f"this machine has Pillow {replay_check.decoder_env()['pillow']}" in line
    assert "--allow-replay-mismatch" in line
    r = CliRunner().invoke(main, ["train", *args, "--allow-replay-mismatch"])
    assert r.exit_code == 0 and "training anyway" in r.output, r.output


def test_verify_and_inspect_name_the_mismatch(made, tmp_path):
    cache = as_if_made_elsewhere(made, tmp_path)
    r = CliRunner().invoke(main, ["verify", str(cache), "--shards", str(made["train"])])
    assert r.exit_code == 1 and "replay" in r.output.strip().splitlines()[-1], r.output
    assert "made with Pillow 9.5.0.post1" in r.output
    r = CliRunner().invoke(main, ["inspect", str(cache), "--no-stats"])
    assert r.exit_code == 0 and "replayed pixels differ" in r.output, r.output


def test_stage1_will_not_finish_a_cache_begun_with_other_decoders(made, tmp_path):
    cache = as_if_made_elsewhere(made, tmp_path)
    r = CliRunner().invoke(main, ["cache", *cache_args(made["train"], made["ckpt"], cache), "--views", "3"])
    assert r.exit_code == 1 and "made with Pillow 9.5.0.post1" in r.output, r.output


def test_a_machine_that_cannot_decode_the_fingerprint_views_is_told_so(made, monkeypatch):
    """A missing codec is the kind of difference the check exists for: one line, no traceback."""
    def refuse(data):
        raise ValueError("undecodable image (no codec)")
    monkeypatch.setattr("usi_cache.shards.images.decode_image", refuse)
    group, attrs = schema.open_cache(made["cache"])
    why = replay_check.mismatch(group, attrs, load_manifest(made["train"]))
    assert why.startswith("this machine cannot rebuild the fingerprint views (the image does not decode)"), why
    assert "although this machine reports the same decoders" in why
