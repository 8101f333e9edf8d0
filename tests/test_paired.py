"""Paired (mix-consistent) caches: the teacher saw the mixed image; stage 2 rebuilds it exactly."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from helpers import NUM_CLASSES, TEACHER, cache_args, make_shards, save_teacher
from usi_cache import cache_format as schema
from usi_cache.cli.main import main
from usi_cache.views.mixing import CUTMIX, MIXUP, NO_MIX, PairParams, mix_pixels, pair_rng, sample_pair
from usi_cache.shards.images import decode_image
from usi_cache.shards.manifest import load_manifest
from usi_cache.shards.tars import read_shard
from usi_cache.models.teacher import load_teacher
from usi_cache.stage2.plan import PlanSpec
from usi_cache.stage2.data import TrainStream, TrainStreamSpec, valid_counts
from usi_cache.views.sampling import decode_view, replay_array


@pytest.fixture(scope="module")
def paired(tmp_path_factory):
    root = tmp_path_factory.mktemp("paired")
    shards = make_shards(root / "shards", n=26, per_shard=10, bad=(7,))
    ckpt = save_teacher(root / "t.pth")
    cache = root / "paired.zarr"
    r = CliRunner().invoke(main, ["cache", *cache_args(shards, ckpt, cache), "--views", "4", "--mix", "paired"])
    assert r.exit_code == 0, r.output
    group, attrs = schema.open_cache(cache)
    x = {n: group[n][:] for n in schema.ARRAYS + schema.MIX_ARRAYS}
    m = load_manifest(shards)
    images = {}
    for shard in range(len(m.shards)):
        for pos, s in enumerate(read_shard(m.path(shard))):
            try:
                images[shard * m.per_shard + pos] = decode_image(s.data)
            except ValueError:
                images[shard * m.per_shard + pos] = None
    return {"root": root, "shards": shards, "ckpt": ckpt, "cache": cache, "attrs": attrs, "x": x, "m": m,
            "images": images}


def rebuild(d, slot: int, v: int, size: int) -> np.ndarray:
    """The mixed view of (slot, v), rebuilt from the arrays alone."""
    x, spec = d["x"], schema.view_spec(d["attrs"])

    def view(s):
        p = decode_view(tuple(x["boxes"][s, v]), bool(x["flips"][s, v]), x["aug_ops"][s, v], x["aug_levels"][s, v],
                        x["aug_resample"][s, v])
        return replay_array(d["images"][s], p, size, spec)

    kind = int(x["mix_kind"][slot, v])
    if kind == NO_MIX:
        return view(slot)
    pair = PairParams(int(x["mix_partner"][slot, v]), kind, float(x["mix_lam"][slot, v]),
                      tuple(float(b) for b in x["mix_box"][slot, v]))
    return mix_pixels(view(slot), view(pair.partner), pair)


@pytest.mark.slow
def test_pairs_are_drawn_from_the_seed_within_the_shard(paired):
    x, attrs, m = paired["x"], paired["attrs"], paired["m"]
    assert attrs["mix"] == "paired" and attrs["schema_version"] == schema.SCHEMA_VERSION
    spec = attrs["mix_spec"]
    kinds = []
    for slot, key in enumerate(x["keys"]):
        if not key or x["labels"][slot] < 0:
            continue
        shard, pos = divmod(slot, m.per_shard)
        for v in range(attrs["views"]):
            pair = sample_pair(pair_rng(attrs["seed"], str(key), v), pos, m.shards[shard].count, 32,
                               mixup=spec["mixup"], cutmix=spec["cutmix"], prob=spec["prob"], switch=spec["switch"])
            partner = int(x["mix_partner"][slot, v])
            kind = int(x["mix_kind"][slot, v])
            kinds.append(kind)
            if kind == NO_MIX:  # the drawn partner is the undecodable sample
                assert x["labels"][shard * m.per_shard + pair.partner] == -1
                continue
            assert partner == shard * m.per_shard + pair.partner and partner // m.per_shard == shard
            assert partner != slot and x["labels"][partner] >= 0
            assert (kind, np.float32(x["mix_lam"][slot, v])) == (pair.kind, np.float32(pair.lam))
            assert tuple(np.float32(x["mix_box"][slot, v])) == tuple(np.float32(pair.box))
            assert 0 <= pair.lam <= 1
    assert MIXUP in kinds and CUTMIX in kinds


@pytest.mark.slow
def test_replay_invariant_for_paired_views(paired):
    x = paired["x"]
    teacher, _ = load_teacher(TEACHER, str(paired["ckpt"]), num_classes=NUM_CLASSES, input_size=32)
    rows = [(s, v) for s in range(len(x["keys"])) if x["labels"][s] >= 0 for v in range(4)]
    pixels = np.stack([rebuild(paired, s, v, 32) for s, v in rows])
    logits = teacher(torch.from_numpy(pixels))
    top, cls = torch.topk(logits, 3, dim=1)
    slots, views = np.array(rows).T
    np.testing.assert_array_equal(cls.numpy(), x["classes"][slots, views])
    log_p = top.double() - torch.logsumexp(logits.double(), 1, keepdim=True)  # schema 3 stores log p
    np.testing.assert_allclose(log_p.numpy(), x["logits"][slots, views].astype(np.float64), rtol=2.0 ** -10, atol=1e-6)


def test_stage2_rebuilds_the_mixed_pixels_bit_identically(paired):
    d, x, m = paired, paired["x"], paired["m"]
    layout = schema.Layout.from_attrs(d["attrs"])
    group = schema.open_cache(d["cache"])[0]
    plan = PlanSpec(counts=valid_counts(m, group, layout), seed=42, world=1, workers=0, batch=5, max_steps=5)
    stream = TrainStream(TrainStreamSpec(manifest=m, cache=str(d["cache"]), layout=layout,
                                         spec=schema.view_spec(d["attrs"]), size=32, plan=plan, rank=0,
                                         shuffle_buffer=3))
    stream.set_epoch(2)
    slot_of = {str(k): i for i, k in enumerate(x["keys"]) if k}
    n = 0
    for s in stream:
        slot = slot_of[s["key"]]
        np.testing.assert_array_equal(s["image"].permute(1, 2, 0).numpy(), rebuild(d, slot, 2, 32))
        partner = int(x["mix_partner"][slot, 2])
        if x["mix_kind"][slot, 2] != NO_MIX:
            assert s["label_b"] == x["labels"][partner] and s["lam"] == pytest.approx(float(x["mix_lam"][slot, 2]))
        else:
            assert s["lam"] == 1.0
        np.testing.assert_array_equal(s["t_log_probs"].numpy(), x["logits"][slot, 2].astype(np.float32))
        n += 1
    assert n == 25


@pytest.mark.slow
def test_training_on_a_paired_cache(paired, tmp_path):
    val = make_shards(tmp_path / "val", n=12, per_shard=6, seed=9)
    r = CliRunner().invoke(main, ["train", "--model", TEACHER, "--train-shards", str(paired["shards"]),
                                  "--val-shards", str(val), "--cache", str(paired["cache"]), "--out",
                                  str(tmp_path / "run"), "--epochs", "1", "--cooldown-epochs", "0",
                                  "--warmup-epochs", "0", "--batch-size", "5", "--input-size", "32", "--workers",
                                  "1", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "paired cache" in r.output and "batch mixing (train.mix) is not used" in r.output
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[0]["train_kd"] > 0 and log[0]["val_count"] == 12


def test_version_1_plain_caches_still_read(tmp_path, shards, teacher_ckpt):
    out = tmp_path / "v1.zarr"
    r = CliRunner().invoke(main, ["cache", *cache_args(shards, teacher_ckpt, out), "--views", "2"])
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "zarr.json").read_text())
    attrs = meta["attributes"]["usi_cache"]
    attrs["schema_version"] = 1
    del attrs["mix"], attrs["mix_spec"]
    (out / "zarr.json").write_text(json.dumps(meta))
    group, found = schema.open_cache(out)
    layout = schema.Layout.from_attrs(found)
    assert not layout.paired and schema.completed_shards(group, layout).all()
    assert schema.read_block(group, layout, 0, 1).mix_kind is None


def test_inspect_shows_both_images_of_a_paired_view(paired, tmp_path):
    x = paired["x"]
    slot = next(s for s in range(len(x["keys"])) if x["labels"][s] >= 0 and (x["mix_kind"][s] != NO_MIX).all())
    png = tmp_path / "pair.png"
    r = CliRunner().invoke(main, ["inspect", str(paired["cache"]), "--slot", str(slot), "--shards",
                                  str(paired["shards"]), "--plot", str(png)])
    assert r.exit_code == 0, r.output
    partner = str(x["keys"][int(x["mix_partner"][slot, 0])])
    assert f"with view 0 of {partner}" in r.output and "lambda" in r.output
    from PIL import Image
    with Image.open(png) as im:
        assert im.width > 1000 and im.height > 300
    r = CliRunner().invoke(main, ["inspect", str(paired["cache"]), "--slot", str(slot), "--json"])
    info = json.loads(r.output)["sample"]
    assert info["paired"] and info["views"][0]["mix"]["partner_slot"] == int(x["mix_partner"][slot, 0])


def _verify_recompute(d, cache) -> tuple[str, str]:
    r = CliRunner().invoke(main, ["verify", str(cache), "--shards", str(d["shards"]), "--recompute", "24",
                                  "--teacher-checkpoint", str(d["ckpt"])])
    assert "Traceback" not in r.output
    return r.output, r.output.strip().splitlines()[-1]


def test_verify_recompute_rebuilds_paired_views_with_their_partner(paired):
    """Varied non-square PNG/JPEG images: every re-run mixed view reproduces the cache."""
    output, verdict = _verify_recompute(paired, paired["cache"])
    assert "recompute    ok" in output and not verdict.startswith("verdict: FAILED"), output


def test_verify_recompute_fails_a_corrupted_pairing(paired, tmp_path):
    import shutil

    import zarr
    cache = tmp_path / "c.zarr"
    shutil.copytree(paired["cache"], cache)
    group = zarr.open_group(str(cache), mode="r+")
    kind, partner = group["mix_kind"][:], group["mix_partner"][:]
    own = np.broadcast_to(np.arange(len(partner))[:, None], partner.shape)
    group["mix_partner"][:] = np.where(kind != NO_MIX, own, partner)  # each mixed with itself
    output, verdict = _verify_recompute(paired, cache)
    assert verdict.startswith("verdict: FAILED") and "recompute" in verdict, output
    # without a teacher too: pairings are drawn from the seed, like the view parameters
    r = CliRunner().invoke(main, ["verify", str(cache), "--shards", str(paired["shards"])])
    assert r.exit_code == 1 and "view params" in r.output.strip().splitlines()[-1], r.output
    assert "mix_partner in" in r.output
