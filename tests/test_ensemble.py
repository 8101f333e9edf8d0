"""Ensemble teachers in one cache: the stored top-k is the mixture sum_m w_m softmax(z_m),
recomputed here by hand from each teacher's full logits on the replayed views; one teacher is
the cache it always was; bad ensembles are one line naming the teacher; verify, audit, inspect
and online KD run every member; a student trains on an ensemble cache under torchrun."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from helpers import NUM_CLASSES, TEACHER, error_line, make_shards, run_py, save_teacher, train_args
from usi_cache import cache_format as schema
from usi_cache.cli.main import main
from usi_cache.models.ensemble import load_ensemble, mixture_log_probs, mixture_logits, normalised_weights
from usi_cache.models.errors import TeacherError
from usi_cache.models.teacher import load_teacher
from usi_cache.shards.manifest import load_manifest
from usi_cache.shards.tars import read_shard
from usi_cache.views.mixing import PartnerImages
from usi_cache.views.render import render_stored, stored_view

OTHER = "test_efficientnet"  # another architecture, its own mean/std


def ensemble_args(shards, ckpts, out, *extra, sizes="32,40", weights="1,3"):
    return ["--shards", str(shards), "--teacher", f"{TEACHER},{OTHER}",
            "--teacher-checkpoint", ",".join(map(str, ckpts)), "--teacher-weights", weights,
            "--input-size", sizes, "--views", "3", "--topk", "3", "--batch-size", "16", "--workers", "0",
            "--out", str(out), *extra]


def save_other(path, num_classes=NUM_CLASSES, seed=1):
    import timm
    torch.manual_seed(seed)
    torch.save(timm.create_model(OTHER, num_classes=num_classes).state_dict(), path)
    return path


@pytest.fixture
def ckpts(tmp_path):
    return [save_teacher(tmp_path / "a.pth", seed=0), save_other(tmp_path / "b.pth")]


def make(args, **kw):
    r = CliRunner().invoke(main, ["cache", *args], **kw)
    assert r.exit_code == 0, r.output
    return r


def rebuild_all(cache, shards, sizes):
    """Every valid (slot, view) of the cache, re-rendered at each size from its stored parameters."""
    group, attrs = schema.open_cache(cache)
    layout, m = schema.Layout.from_attrs(attrs), load_manifest(shards)
    rows, pixels = [], []
    for shard in range(layout.num_shards):
        block = schema.read_block(group, layout, shard)
        at = PartnerImages([s.data for s in read_shard(m.path(shard))])
        for p in range(layout.slots_per_shard):
            if block.labels[p] < 0:
                continue
            for v in range(layout.views):
                view = stored_view(block, p, v, shard * layout.slots_per_shard, layout.slots_per_shard)
                pixels.append([render_stored(view, at.get(p), at.get, s, schema.view_spec(attrs)) for s in sizes])
                rows.append((shard * layout.slots_per_shard + p, v))
    return rows, pixels, group, attrs


@pytest.mark.parametrize("mix", ["none", "paired"])
def test_two_teacher_cache_is_the_mixture_recomputed_by_hand(tmp_path, shards, ckpts, mix):
    out = tmp_path / "e.zarr"
    make(ensemble_args(shards, ckpts, out, "--mix", mix, "--audit", "12"))
    rows, pixels, group, attrs = rebuild_all(out, shards, (32, 40))
    assert "teacher" not in attrs and [t["name"] for t in attrs["teachers"]] == [TEACHER, OTHER]
    assert attrs["schema_version"] == schema.ENSEMBLE_VERSION == 5  # a tool that knows only 4 refuses it
    assert [t["weight"] for t in attrs["teachers"]] == [0.25, 0.75]
    assert [t["input_size"] for t in attrs["teachers"]] == [32, 40]
    assert attrs["teachers"][1]["mean"] == pytest.approx([0.485, 0.456, 0.406])  # each member's own
    a, _ = load_teacher(TEACHER, str(ckpts[0]), num_classes=NUM_CLASSES, input_size=32)
    b, _ = load_teacher(OTHER, str(ckpts[1]), num_classes=NUM_CLASSES, input_size=40)
    za = a(torch.from_numpy(np.stack([p[0] for p in pixels]))).double()
    zb = b(torch.from_numpy(np.stack([p[1] for p in pixels]))).double()
    # by hand: p = 0.25 softmax(za) + 0.75 softmax(zb), in float64
    p = 0.25 * torch.softmax(za, 1) + 0.75 * torch.softmax(zb, 1)
    top, cls = torch.topk(p, 3, dim=1)
    slots, views = np.array(rows).T
    x = {n: schema.read_array(group, n, slice(None)) for n in ("logits", "classes", "lse")}
    np.testing.assert_array_equal(cls.numpy(), x["classes"][slots, views])
    stored = x["logits"][slots, views].astype(np.float64)
    exact = torch.log(top).numpy()
    # rounded down to float16: at most one spacing below the exact log-probability, never above
    assert (stored <= exact + 1e-12).all()
    assert (exact - stored <= np.spacing(np.abs(stored).astype(np.float16)).astype(np.float64) + 1e-9).all()
    assert (np.exp(stored).sum(1) <= 1.0).all()  # the tail mass stays >= 0
    # an ensemble's lse: the weighted mean of the members' log-sum-exps
    lse = 0.25 * torch.logsumexp(za, 1) + 0.75 * torch.logsumexp(zb, 1)
    np.testing.assert_allclose(x["lse"][slots, views], lse.numpy(), rtol=2 ** -23, atol=1e-6)
    if mix == "paired":
        assert attrs["mix"] == "paired" and (schema.read_array(group, "mix_kind", slice(None)) > 0).any()
    # stage 1's audit re-ran both members on 12 replayed (mixed) views: the mixture's top-1 is the cached one
    assert attrs["audit"]["views"] == 12 and all(r["top1_agreement"] == 1.0 for r in attrs["audit"]["rows"])


def test_an_ensemble_of_one_is_the_same_cache(tmp_path, shards, teacher_ckpt):
    base = ["--views", "2", "--topk", "3", "--input-size", "32", "--batch-size", "16", "--workers", "0",
            "--shards", str(shards), "--teacher-checkpoint", str(teacher_ckpt)]
    make([*base, "--teacher", TEACHER, "--out", str(tmp_path / "one.zarr")])
    make([*base, "--set", f"teacher=[{TEACHER}]", "--teacher-weights", "5", "--out", str(tmp_path / "list.zarr")])
    g1, a1 = schema.open_cache(tmp_path / "one.zarr")
    g2, a2 = schema.open_cache(tmp_path / "list.zarr")
    assert "teachers" not in a1 and "teachers" not in a2 and a1["teacher"] == a2["teacher"]
    assert a1["schema_version"] == a2["schema_version"] == 4
    assert "weight" not in a1["teacher"]
    for name in schema.ARRAYS:
        assert np.array_equal(schema.read_array(g1, name, slice(None)), schema.read_array(g2, name, slice(None))), name
    # and exactly the lone teacher's top-k (raw logits in, lse the real log-sum-exp)
    lse = schema.read_array(g1, "lse", slice(None))
    labels = schema.read_array(g1, "labels", slice(None))
    assert (np.abs(lse[labels >= 0]) > 0).all()


def test_mixture_and_weights():
    g = torch.Generator().manual_seed(0)
    z = [torch.randn(4, 7, generator=g) * 5, torch.randn(4, 7, generator=g) * 5, torch.randn(4, 7, generator=g)]
    w = normalised_weights([1, 2, 1], 3)
    assert w == (0.25, 0.5, 0.25)
    by_hand = sum(wi * torch.softmax(zi.double(), 1) for wi, zi in zip(w, z))
    torch.testing.assert_close(mixture_log_probs(z, w).exp(), by_hand, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(torch.logsumexp(mixture_log_probs(z, w), 1), torch.zeros(4, dtype=torch.float64))
    # the mixture's logits: softmax is the mixture, lse the weighted mean of the members' lse
    zm = mixture_logits(z, w)
    torch.testing.assert_close(torch.softmax(zm, 1), by_hand, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(torch.logsumexp(zm, 1), sum(wi * torch.logsumexp(zi.double(), 1) for wi, zi in zip(w, z)))
    same = mixture_logits([z[0], z[0]], (0.5, 0.5))  # members that agree: their own logits
    torch.testing.assert_close(same, z[0].double(), rtol=1e-12, atol=1e-12)
    # a member of weight 0 does not count
    torch.testing.assert_close(mixture_log_probs(z, (0.5, 0.5, 0.0)),
                               mixture_log_probs(z[:2], (0.5, 0.5)), rtol=1e-12, atol=1e-12)
    with pytest.raises(TeacherError, match="2 weight"):
        normalised_weights([1, 2], 3)


def test_online_distribution_is_the_same_mixture(tmp_path, ckpts):
    from usi_cache.stage2.targets import online_distribution
    e = load_ensemble([TEACHER, OTHER], [str(c) for c in ckpts], num_classes=NUM_CLASSES, weights=[1, 3])
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    P, rest = online_distribution(e, x, 1.0)
    a, b = (m.teacher for m in e.members)
    za = a.logits((x - a.mean) / a.std)
    zb = b.logits((x - b.mean) / b.std)
    torch.testing.assert_close(P, 0.25 * torch.softmax(za, 1) + 0.75 * torch.softmax(zb, 1))
    assert (rest == 0).all()
    one = load_ensemble([TEACHER], [str(ckpts[0])], num_classes=NUM_CLASSES)
    assert torch.equal(online_distribution(one, x, 2.0)[0], online_distribution(one.members[0].teacher, x, 2.0)[0])


@pytest.mark.parametrize("extra, match", [
    (["--teacher-weights", "1,2,3"], r"cache.teacher_weights: 3 value\(s\) for 2 teacher\(s\) \(test_resnet, "
                                     r"test_efficientnet\)"),
    (["--teacher-precision", "fp32,fp32,fp32"], r"cache.teacher_precision: 3 value\(s\) for 2 teacher\(s\)"),
    (["--teacher-checkpoint", "MISSING"], r"cache.teacher_checkpoint: 1 value\(s\) for 2 teacher\(s\)"),
])
def test_wrong_length_lists_are_one_line(tmp_path, shards, ckpts, extra, match):
    args = ensemble_args(shards, ckpts, tmp_path / "e.zarr")
    if extra[0] in args:
        args[args.index(extra[0]) + 1] = extra[1]
    else:
        args += extra
    r = CliRunner().invoke(main, ["cache", *args])
    assert r.exit_code != 0
    assert re.search(match, error_line(r.output)), r.output


def test_bad_member_is_one_line_naming_it(tmp_path, shards, ckpts):
    seven = save_other(tmp_path / "seven.pth", num_classes=7)
    r = CliRunner().invoke(main, ["cache", *ensemble_args(shards, [ckpts[0], seven], tmp_path / "e.zarr")])
    line = error_line(r.output)
    assert r.exit_code != 0 and line.startswith(f"Error: teacher 1 of 2 ({OTHER}): ") and "7" in line
    r = CliRunner().invoke(main, ["cache", *ensemble_args(shards, [ckpts[0], tmp_path / "nope.pth"],
                                                           tmp_path / "e.zarr")])
    line = error_line(r.output)
    assert line.startswith(f"Error: teacher 1 of 2 ({OTHER}): checkpoint ") and "nope.pth: no such file" in line


def test_resume_or_grow_with_another_ensemble_is_refused(tmp_path, shards, ckpts):
    out = tmp_path / "e.zarr"
    make(ensemble_args(shards, ckpts, out))
    r = CliRunner().invoke(main, ["cache", *ensemble_args(shards, ckpts, out, weights="1,1")])
    assert "teachers[0].weight (cache has 0.25, this run has 0.5)" in error_line(r.output)
    r = CliRunner().invoke(main, ["cache", *ensemble_args(shards, ckpts, out, "--add-views", "1", sizes="32,48")])
    assert "teachers[1].input_size (cache has 40, this run has 48)" in error_line(r.output)
    lone = ["--shards", str(shards), "--teacher", TEACHER, "--teacher-checkpoint", str(ckpts[0]), "--views", "3",
            "--topk", "3", "--input-size", "32", "--workers", "0", "--out", str(out)]
    r = CliRunner().invoke(main, ["cache", *lone])
    assert "teachers (the cache has 2 teacher(s), this run has 1)" in error_line(r.output)
    # the same ensemble, checkpoints moved: resumes (paths are not what identifies a teacher)
    moved = [tmp_path / "a2.pth", tmp_path / "b2.pth"]
    for src, dst in zip(ckpts, moved):
        dst.write_bytes(src.read_bytes())
    make(ensemble_args(shards, moved, out))


@pytest.mark.slow
def test_verify_audit_and_inspect_run_every_member(tmp_path, shards, ckpts):
    out = tmp_path / "e.zarr"
    make(ensemble_args(shards, ckpts, out))
    both = ",".join(map(str, ckpts))
    r = CliRunner().invoke(main, ["verify", str(out), "--shards", str(shards), "--recompute", "30",
                                  "--teacher-checkpoint", both, "--json"])
    assert r.exit_code == 0, r.output
    rc = json.loads(r.output)["recompute"]
    assert rc["views"] == 30 and rc["class_mismatches"] == 0 and rc["max_lse_diff"] < 1e-5
    # another checkpoint of the same architecture is not the cache's teacher 0
    other = save_teacher(tmp_path / "other.pth", seed=5)
    r = CliRunner().invoke(main, ["verify", str(out), "--shards", str(shards), "--recompute", "5",
                                  "--teacher-checkpoint", f"{other},{ckpts[1]}"])
    assert r.exit_code == 1 and "is not teacher 0 of 2 (test_resnet)" in r.output
    r = CliRunner().invoke(main, ["verify", str(out), "--shards", str(shards), "--recompute", "5",
                                  "--teacher-checkpoint", str(ckpts[0])])
    assert "1 checkpoint(s) for the cache's 2 teacher(s)" in error_line(r.output)
    r = CliRunner().invoke(main, ["audit", str(out), "--teacher-checkpoint", both, "--views", "20"])
    assert r.exit_code == 0, r.output
    _, attrs = schema.open_cache(out)
    rows = attrs["audit"]["rows"]
    assert all(row["top1_agreement"] == 1.0 for row in rows)  # the mixture's top-1 is the cached one
    assert rows[0]["tail_mass"] > rows[1]["tail_mass"] > 0 and rows[-1]["tail_mass"] == 0.0
    r = CliRunner().invoke(main, ["inspect", str(out), "--no-stats", "--members", "20", "--teacher-checkpoint", both,
                                  "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    a = rep["members"]
    assert a["views"] == 20 and len(a["accuracy"]["members"]) == 2 and len(a["pairwise"]) == 1
    assert a["cached_equals_mixture"] == 1.0 and 0 <= a["all_agree"] <= 1
    assert a["pairwise"][0]["agree"] == a["all_agree"]  # two members: the same thing
    assert [m["name"] for m in rep["summary"]["teacher"]["members"]] == [TEACHER, OTHER]
    text = CliRunner().invoke(main, ["inspect", str(out), "--no-stats"]).output
    assert "ensemble of 2 teachers" in text and "teacher 1" in text and "weight 0.75" in text


@pytest.mark.slow
def test_a_student_trains_on_an_ensemble_cache_under_torchrun(tmp_path, ckpts):
    train = make_shards(tmp_path / "train", n=24, per_shard=6)
    val = make_shards(tmp_path / "val", n=8, per_shard=4, seed=7)
    cache = tmp_path / "e.zarr"
    make(ensemble_args(train, ckpts, cache))
    run = tmp_path / "run"
    data = {"train": train, "val": val}
    r = run_py(["train_student.py", *train_args(data, run, "--cache", str(cache), batch_size=4, workers=0)],
               torchrun=2)
    assert r.returncode == 0, r.stdout + r.stderr
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    epochs = [e for e in log if "step" not in e]  # step records have a "step" key
    assert [e["epoch"] for e in epochs] == [0, 1] and all(e["ranks"] == 2 for e in epochs)
    assert [e["view"] for e in epochs] == [0, 1]  # the ensemble cache's views, replayed
    assert all(np.isfinite(e["train_loss"]) for e in epochs)
    assert json.loads((run / "config.json").read_text())["cache"] == str(cache)
    assert torch.load(run / "last.pth", weights_only=True)["epoch"] == 1
    # online KD with the same ensemble runs too
    r = run_py(["train_student.py", *train_args(data, tmp_path / "online", "--teacher", f"{TEACHER},{OTHER}",
                                                "--teacher-checkpoint", ",".join(map(str, ckpts)),
                                                "--teacher-weights", "1,3", "--max-steps", "2",
                                                batch_size=4, workers=0)])
    assert r.returncode == 0, r.stdout + r.stderr


def test_online_ensemble_is_tempered_as_a_cached_one():
    """At T != 1 online KD gives softmax(log p / T) of the mixture p, what stage 2 makes of a cached
    ensemble's stored log p (k = C), not the mixture of tempered members."""
    import torch

    from usi_cache.stage2.loss import teacher_distribution

    class Member:
        def __init__(self, seed):
            g = torch.Generator().manual_seed(seed)
            self.w = torch.randn(3 * 4 * 4, 5, generator=g)
            self.mean, self.std = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)

        def logits(self, x):
            return 3 * x.flatten(1) @ self.w

    from usi_cache.models.ensemble import Ensemble
    members = [Member(0), Member(1)]
    ens = Ensemble.__new__(Ensemble)
    ens.members = [type("M", (), {"teacher": m, "weight": w})() for m, w in zip(members, (0.25, 0.75))]
    x = torch.rand(6, 3, 4, 4)
    online = ens.distribution(x, temperature=2.0).double()
    p = sum(w * torch.softmax(m.logits(x).double(), dim=1) for m, w in zip(members, (0.25, 0.75)))
    log_p, classes = torch.sort(torch.log(p), dim=1, descending=True)
    cached, rest = teacher_distribution(log_p.float(), classes, None, 5, 2.0)  # dense (N, C), k = C
    np.testing.assert_allclose(online.numpy(), cached.double().numpy(), atol=1e-5)
    tempered_members = sum(w * torch.softmax(m.logits(x).double() / 2, dim=1)
                           for m, w in zip(members, (0.25, 0.75)))
    assert np.abs(tempered_members.numpy() - cached.double().numpy()).max() > 1e-3  # the other family differs
