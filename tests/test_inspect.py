"""`usi inspect` on a tiny real cache: every number recomputed here from the arrays."""
from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from helpers import ROOT, cache_of, make_shards
from usi_cache import cache_format as schema
from usi_cache.cli.main import main
from usi_cache.config.errors import ConfigError
from usi_cache.checks.inspect.run import inspect_report
from usi_cache.checks.inspect.text import format_stats, format_summary
from usi_cache.checks.common import pick_views, sample_slot_views, valid_positions

V, K = 8, 3  # helpers.cache_args


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    shards = make_shards(root / "shards", n=26, per_shard=10, bad=(4,))  # img0004 is undecodable
    return cache_of(root, shards)


def inspect(*args, ok=True):
    r = CliRunner().invoke(main, ["inspect", *map(str, args)])
    if ok:
        assert r.exit_code == 0, r.output
    return r


def expected_stats(x, rows=slice(None)):
    """The teacher statistics, computed independently from the raw arrays."""
    labels, classes = x["labels"][rows], x["classes"][rows].astype(np.int64)
    log_p = x["logits"][rows].astype(np.float64)  # schema 3: log-probabilities
    ok = labels >= 0
    lab = np.repeat(labels[ok][:, None], V, 1)  # (n, V)
    c = classes[ok]
    p = np.exp(log_p[ok])
    rest = np.maximum(0, 1 - p.sum(-1))
    ent = -(p * np.log(p)).sum(-1) - np.where(rest > 0, rest * np.log(np.where(rest > 0, rest, 1)), 0)
    top1 = c[..., 0] == lab
    top3 = (c == lab[..., None]).any(-1)
    confusions = Counter((int(t), int(q)) for t, q, hit in zip(lab.ravel(), c[..., 0].ravel(), top1.ravel())
                         if not hit)
    per_class = {int(k): top1[lab == k].mean() for k in np.unique(lab)}
    return dict(views=top1.size, samples=int(ok.sum()), top1=top1.mean(), top3=top3.mean(),
                top1_view=top1.mean(0), top3_view=top3.mean(0), conf=p[..., 0].mean(),
                mass=np.minimum(p.sum(-1), 1).mean(), rest=rest.mean(), entropy=ent.mean(),
                confusions=confusions, per_class=per_class)


def test_summary_and_stats_equal_the_arrays(tiny):
    d = json.loads(inspect(tiny.out, "--json").output)
    s, st = d["summary"], d["stats"]
    # summary
    assert (s["views"], s["topk"], s["schema_version"]) == (V, K, schema.SCHEMA_VERSION)
    assert s["teacher"]["name"] == "test_resnet" and s["teacher"]["input_size"] == 32
    assert s["teacher"]["checkpoint_sha256"] == tiny.attrs["teacher"]["checkpoint_sha256"]
    assert s["dataset"]["samples"] == 26 and s["dataset"]["shards"] == 3 and s["dataset"]["num_classes"] == 5
    assert s["completeness"]["complete"] == 3 and s["completeness"]["missing"] == []
    assert s["invalid"] == {"count": 1, "keys": ["img0004"]}
    for name in schema.ARRAYS:
        on_disk = sum(f.stat().st_size for f in (tiny.out / name).rglob("*") if f.is_file())
        assert s["disk"]["bytes"][name] == on_disk
    total = sum(f.stat().st_size for f in tiny.out.rglob("*") if f.is_file())
    assert s["disk"]["total"] == total and s["disk"]["bytes_per_view"] == pytest.approx(total / (26 * V))
    # statistics
    e = expected_stats(tiny.x)
    assert st["views"] == e["views"] == 25 * V and st["samples"] == 25
    assert st["scope"]["invalid_excluded"] == 1
    assert st["top1_agreement"] == pytest.approx(e["top1"])
    assert st["top5_agreement"] == pytest.approx(e["top3"])
    assert st["top5_k_used"] == K and st["top5_label"].startswith("top-3 (k = 3 < 5")
    assert [v["top1_agreement"] for v in st["per_view"]] == pytest.approx(list(e["top1_view"]))
    assert [v["top5_agreement"] for v in st["per_view"]] == pytest.approx(list(e["top3_view"]))
    assert st["mean_top1_prob"] == pytest.approx(e["conf"])
    assert st["mean_topk_mass"] == pytest.approx(e["mass"])
    assert st["mean_tail_mass"] == pytest.approx(e["rest"])
    assert st["mean_tail_mass"] > 0.01  # k = 3 < C = 5: the tail is real
    assert st["mean_entropy_nats"] == pytest.approx(e["entropy"])
    worst = sorted(e["per_class"].items(), key=lambda kv: kv[1])
    assert [w["top1_agreement"] for w in st["worst_classes"]] == pytest.approx([a for _, a in worst])
    top = sorted(e["confusions"].items(), key=lambda kv: (-kv[1], kv[0]))[:10]
    assert [(c["true"], c["predicted"], c["views"]) for c in st["confusions"]] == [(t, p, n) for (t, p), n in top]
    assert sum(st["histograms"]["top1_prob"]) == sum(st["histograms"]["tail_mass"]) == e["views"]
    assert sum(b["views"] for b in st["reliability"]["bins"]) == e["views"]


def test_text_report_and_json_round_trip(tiny):
    text = inspect(tiny.out).output
    d = json.loads(inspect(tiny.out, "--json").output)
    assert json.loads(json.dumps(d)) == d
    # the text report is rendered from exactly the content --json prints
    assert text.strip() == "\n\n".join([format_summary(d["summary"]), format_stats(d["stats"], K)])
    assert "top-3 (k = 3 < 5: this is top-k) agreement" in text
    assert "entropy over the k+1 buckets" in text and "1 invalid sample(s) (label -1) excluded" in text
    assert "3/3 complete" in text and "img0004" in text


def test_shard_range_and_view_sample(tiny):
    st = json.loads(inspect(tiny.out, "--json", "--shard-range", "1:2").output)["stats"]
    e = expected_stats(tiny.x, slice(10, 20))
    assert st["views"] == e["views"] and st["top1_agreement"] == pytest.approx(e["top1"])
    assert st["mean_entropy_nats"] == pytest.approx(e["entropy"])
    st = json.loads(inspect(tiny.out, "--json", "--sample-views", "50", "--seed", "3").output)["stats"]
    assert st["views"] == 50 and sum(v["views"] for v in st["per_view"]) == 50
    again = json.loads(inspect(tiny.out, "--json", "--sample-views", "50", "--seed", "3").output)["stats"]
    assert again == st
    r = inspect(tiny.out, "--shard-range", "2:9", ok=False)
    assert r.exit_code == 1 and "the cache has shards 0..2" in r.output


def test_one_sample(tiny):
    x, names = tiny.x, tiny.attrs["dataset"]["classes"]
    slot = list(x["keys"]).index("img0007")
    by_key = json.loads(inspect(tiny.out, "--key", "img0007", "--json").output)["sample"]
    by_slot = json.loads(inspect(tiny.out, "--slot", slot, "--json").output)["sample"]
    assert by_key == by_slot and by_key["slot"] == slot and by_key["label"] == x["labels"][slot]
    assert len(by_key["views"]) == V
    for v, view in enumerate(by_key["views"]):
        b = view["box"]
        assert [b["top"], b["left"], b["height"], b["width"]] == x["boxes"][slot, v].tolist()
        assert view["flip"] == bool(x["flips"][slot, v])
        ops = [tiny.attrs["op_names"][o] for o in x["aug_ops"][slot, v] if o >= 0]
        assert [o["op"] for o in view["ops"]] == ops
        assert [t["name"] for t in view["topk"]] == [names[c] for c in x["classes"][slot, v]]
        p = np.exp(x["logits"][slot, v].astype(np.float64))
        assert [t["prob"] for t in view["topk"]] == pytest.approx(p.tolist())
    text = inspect(tiny.out, "--key", "img0007").output
    assert f"ground truth {x['labels'][slot]} {names[x['labels'][slot]]}" in text
    assert "view 7: crop top" in text and "RandAugment:" in text and "entropy" in text
    in_topk = sum(int(x["labels"][slot]) in x["classes"][slot, v].tolist() for v in range(V))
    assert text.count("<- ground truth") == in_topk
    bad = json.loads(inspect(tiny.out, "--key", "img0004", "--json").output)["sample"]
    assert bad["status"] == "undecodable image" and bad["views"] == []
    r = inspect(tiny.out, "--key", "nope", ok=False)
    assert r.exit_code == 1 and "'nope' is not in the cache" in r.output and "Traceback" not in r.output
    r = inspect(tiny.out, "--key", "img0007", "--slot", "1", ok=False)
    assert r.exit_code == 2 and "not both" in r.output


def _png(path: Path, min_size: tuple[int, int]):
    assert path.is_file() and path.stat().st_size > 20_000
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width >= min_size[0] and im.height >= min_size[1]
        arr = np.asarray(im.convert("L"))
    assert arr.std() > 10  # not a blank canvas


@pytest.mark.slow
def test_plots(tiny, tmp_path):
    out = inspect(tiny.out, "--plot", tmp_path / "stats.png").output
    assert f"plot written to {tmp_path / 'stats.png'}" in out
    _png(tmp_path / "stats.png", (1000, 700))
    inspect(tiny.out, "--key", "img0007", "--shards", tiny.shards, "--plot", tmp_path / "one.png")
    _png(tmp_path / "one.png", (1000, 450))
    # without --shards, the shard folder recorded in the attributes is used while it exists
    inspect(tiny.out, "--key", "img0007", "--plot", tmp_path / "y.png")
    _png(tmp_path / "y.png", (1000, 450))
    moved = tmp_path / "moved.zarr"
    shutil.copytree(tiny.out, moved)
    meta = json.loads((moved / "zarr.json").read_text())
    meta["attributes"]["usi_cache"]["dataset"]["root"] = str(tmp_path / "gone")
    (moved / "zarr.json").write_text(json.dumps(meta))
    r = inspect(moved, "--key", "img0007", "--plot", tmp_path / "x.png", ok=False)
    assert r.exit_code == 1 and "give --shards DIR" in r.output and not (tmp_path / "x.png").exists()
    other = make_shards(tmp_path / "other", n=26, seed=3)
    r = inspect(tiny.out, "--key", "img0007", "--shards", other, "--plot", tmp_path / "x.png", ok=False)
    assert r.exit_code == 1 and "not the cache's dataset: dataset." in r.output


def test_incomplete_shard_is_reported_and_skipped(tiny, tmp_path):
    out = tmp_path / "c.zarr"
    shutil.copytree(tiny.out, out)
    layout = schema.Layout.from_attrs(tiny.attrs)
    for f in map(Path, schema.chunk_files(out, schema.COMMIT_ARRAY, 1, layout)):
        f.unlink()  # as if stage 1 was killed before committing shard 1
    d = json.loads(inspect(out, "--json").output)
    assert d["summary"]["completeness"]["missing"] == [1]
    assert d["stats"]["scope"]["incomplete_skipped"] == [1]
    e = expected_stats(tiny.x, slice(0, 10))
    e2 = expected_stats(tiny.x, slice(20, 30))
    assert d["stats"]["views"] == e["views"] + e2["views"]
    text = inspect(out).output
    assert "2/3 complete; missing: shard 1" in text and "incomplete shards skipped: 1" in text


@pytest.mark.slow
def test_stats_are_the_same_for_any_worker_count(tiny):
    """Shards counted by 2 processes: the same statistics, to the last bit of every float sum."""
    for extra in ([], ["--sample-views", "50", "--seed", "3"]):
        one = json.loads(inspect(tiny.out, "--json", *extra).output)
        two = json.loads(inspect(tiny.out, "--json", "--workers", "2", *extra).output)
        assert two == one and one["stats"]["views"] == (50 if extra else 25 * V)


def test_sampled_views_are_the_shared_samplers(tiny):
    """--sample-views counts exactly the (slot, view) pairs of common.pick_views, the sampler
    `usi verify --recompute` and `usi audit` draw from."""
    group, attrs = schema.open_cache(tiny.out)
    layout = schema.Layout.from_attrs(attrs)
    picks = pick_views(group, layout, 50, 3)
    slots = np.concatenate([i * 10 + p for i, (p, _) in sorted(picks.items())])
    views = np.concatenate([v for _, (_, v) in sorted(picks.items())])
    assert len(set(zip(slots.tolist(), views.tolist()))) == 50 and (tiny.x["labels"][slots] >= 0).all()
    st = json.loads(inspect(tiny.out, "--json", "--sample-views", "50", "--seed", "3").output)["stats"]
    top1 = tiny.x["classes"][slots, views, 0] == tiny.x["labels"][slots]
    assert [v["views"] for v in st["per_view"]] == np.bincount(views, minlength=V).tolist()
    assert st["top1_agreement"] == pytest.approx(top1.mean())
    assert st["samples"] == len(set(slots.tolist()))
    other = pick_views(group, layout, 50, 4)  # the seed matters
    assert any(not np.array_equal(other[i][0], picks[i][0]) for i in picks)


def test_sampler_draws_distinct_valid_pairs(tiny):
    group, attrs = schema.open_cache(tiny.out)
    layout = schema.Layout.from_attrs(attrs)
    valid = {i: valid_positions(group, layout, i) for i in range(layout.num_shards)}
    assert sum(len(p) for p in valid.values()) == 25  # img0004 is left out
    total = 25 * V
    for n in (1, 37, total - 1):
        picks = sample_slot_views(valid, V, n, seed=5)
        pairs = [(i, p, v) for i, (ps, vs) in picks.items() for p, v in zip(ps.tolist(), vs.tolist())]
        assert len(pairs) == len(set(pairs)) == n
        assert all(p in valid[i] and 0 <= v < V for i, p, v in pairs)
        assert sample_slot_views(valid, V, n, seed=5).keys() == picks.keys()
    every = sample_slot_views(valid, V, total + 10, seed=5)  # more than there are: all of them
    assert sum(len(p) for p, _ in every.values()) == total


def test_library_raises_project_errors_not_click(tiny):
    """Bad option combinations are ConfigError in the library (the command line maps them to usage
    errors), and no library module of inspect or verify imports click."""
    with pytest.raises(ConfigError, match="give --key or --slot, not both"):
        inspect_report(tiny.out, key="img0007", slot=1)
    with pytest.raises(ConfigError, match="do not apply to one sample"):
        inspect_report(tiny.out, slot=1, sample_views=5)
    with pytest.raises(ConfigError, match="drop --no-stats"):
        inspect_report(tiny.out, stats=False, plot="x.png")
    r = inspect(tiny.out, "--no-stats", "--plot", "x.png", ok=False)
    assert r.exit_code == 2 and "drop --no-stats" in r.output
    modules = [*(ROOT / "usi_cache" / "checks" / "inspect").glob("*.py"),
               *(ROOT / "usi_cache" / "checks" / "verify").glob("*.py"), ROOT / "usi_cache" / "checks" / "common.py"]
    assert len(modules) >= 10
    for m in modules:
        assert "click" not in m.read_text(), m
