"""The benchmark scripts, their generated doc and the demo's stage bookkeeping, run small for real."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

from usi_cache import demo

BENCH = ROOT / "benchmarks"
DOC = ROOT / "docs" / "benchmarks.md"


def bench(name: str):
    """A benchmark script as a module (they import bench_common as a top-level module)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


@pytest.mark.slow
def test_gpu_check_tiny_runs_both_stages(tmp_path):
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--tiny"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path),
                            "USI_BENCH_RESULTS": str(tmp_path / "results")})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "bare teacher forward" in r.stdout and "cache / label-only" in r.stdout
    s2 = json.loads((tmp_path / "results/stage2_overhead.json").read_text())
    assert s2["median"]["cache"] > 0 and s2["ratios"]["FLOP ideal (1 + teacher_fwd / student_fwd_bwd)"] > 1
    # the tables the script printed are report() of the file it wrote: what docs/benchmarks.md shows
    s1 = json.loads((tmp_path / "results/stage1_efficiency.json").read_text())
    text = bench("stage1_efficiency").report(s1)
    assert text in r.stdout and f"| ratio | {s1['ratio']:.3f} |" in text
    assert f"| wall time | {s1['summary']['wall_s']:.1f} s for {128 * 2} views |" in text
    assert all(len(v) == 1 and v[0] > 0 for v in s2["wall_s"].values()) and len(s2["wall_s"]) == 3
    assert "whole run: cache / label-only wall" in r.stdout


def test_demo_stage_reuse_is_keyed_on_config(tmp_path, capsys):
    calls = []

    def work():
        calls.append(1)
        return {"value": len(calls)}

    assert demo._stage(tmp_path / "s", "key-a", "x", work)["value"] == 1
    assert demo._stage(tmp_path / "s", "key-a", "x", work)["value"] == 1  # reused
    assert "reusing" in capsys.readouterr().out
    assert demo._stage(tmp_path / "s", "key-b", "x", work)["value"] == 2  # config changed: recomputed
    assert "config changed" in capsys.readouterr().out
    assert len(calls) == 2


def _fake_run(folder, curve):
    folder.mkdir(parents=True)
    (folder / "log.jsonl").write_text("".join(json.dumps({"epoch": e, "val_top1": v}) + "\n"
                                              for e, v in enumerate(curve)))


@pytest.mark.slow
def test_curves_command_plots_mean_and_band_from_run_logs(tmp_path):
    from click.testing import CliRunner
    from usi_cache.cli.main import main
    for seed, c in ((42, [10.0, 50.0, 60.0]), (43, [12.0, 52.0, 64.0])):
        _fake_run(tmp_path / f"labels-s{seed}", c)
    _fake_run(tmp_path / "cached-s42", [20.0, 60.0, 70.0])
    png = tmp_path / "curves.png"
    r = CliRunner().invoke(main, ["curves", "--out", str(png), f"labels only={tmp_path}/labels-s*",
                                  f"cached KD, V = E={tmp_path}/cached-s*"])
    assert r.exit_code == 0, r.output
    assert "labels only: 2 run(s), last epoch: 60.00, 64.00" in r.output
    assert "cached KD, V = E: 1 run(s), last epoch: 70.00" in r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = CliRunner().invoke(main, ["curves", "--out", str(png), f"x={tmp_path}/nothing-*"])
    assert r.exit_code != 0 and "matches no run folder" in r.output


def test_demo_table_says_what_the_cache_cost():
    run = {"top1": 80.0, "top1_ema": None, "epochs": 10, "wall_s": 100.0, "val_images": 10000}
    r = {"shards": {"train-full": {"samples": 60000}, "train": {"samples": 4000}, "wall_s": 40.0},
         "teacher": {**run, "top1": 89.0, "epochs": 3}, "labels": run, "cached-kd": {**run, "top1": 83.5},
         "cache": {"views": 40000, "samples": 4000, "wall_s": 30.0, "bytes_on_disk": 1.4e6, "bytes_per_view": 35.0},
         "total_s": 370.0}
    text = demo.format_table(r)
    assert "| student | test_efficientnet, cached KD | 4000 | 10 | 83.50 | 100 s |" in text
    assert "+3.50 points" in text and "40000 teacher forward passes" in text
    assert "an online teacher would run 40000 forward passes (10 epochs x 4000 images) for every student" in text


def test_fidelity_benchmark_refuses_unknown_rows_and_a_missing_demo(tmp_path):
    fidelity = bench("fidelity")
    run = lambda *args: fidelity.main(["--demo", str(tmp_path / "demo"), "--work", str(tmp_path / "work"), *args])
    with pytest.raises(SystemExit) as e:
        run("--rows", "labels,bogus")
    assert "unknown row 'bogus'" in str(e.value)
    with pytest.raises(SystemExit) as e:
        run("--rows", "labels,cached", "--seeds", "1")
    assert "run `make demo` first" in str(e.value)
    assert not (tmp_path / "work").exists()

def test_epoch_plan_prints_the_report_of_the_file_it_writes(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench("bench_common"), "RESULTS", tmp_path)
    ep = bench("plan_shapes")
    args = ["--shards", "12", "--samples", "1200", "--empty", "1", "--worlds", "2,4", "--workers", "2", "--batch", "16",
            "--buffer", "50", "--classes", "10", "--epochs", "3"]
    ep.main(args)
    r = json.loads((tmp_path / "epoch_plan.json").read_text())
    out = capsys.readouterr().out
    assert ep.report(r) in out
    one, three = r["W=2,R=1"], r["W=4,R=3"]
    assert one["uses"] + one["left_out"] == 1200 and one["left_out"] < 2 * 16 and three["max_uses"] == 3
    assert three["same_step"] == 1.0 and three["distinct_ranks"] == 1.0
    assert f"* 2 ranks, R = 1: {one['left_out']} samples rest each epoch (one global batch: 32)" in out
    assert "12 shards of uneven size (with no valid sample: 1), 1200 valid samples" in out
    cmd, note = bench("report").command("plan_shapes", ep, r)  # rebuilt from the recorded args
    assert cmd == ".venv/bin/python benchmarks/plan_shapes.py " + " ".join(args) and note == ""


def test_benchmark_doc_is_what_the_results_files_generate(tmp_path):
    report = bench("report")
    out = tmp_path / "benchmarks.md"
    report.main(["--out", str(out)])
    text = out.read_text()
    assert text == DOC.read_text(), "docs/benchmarks.md differs: regenerate it with benchmarks/report.py"
    results = sorted((BENCH / "results").glob("*.json"))
    assert len(results) >= 9
    for path in results:  # every results file: a section, or named as not rendered
        r = json.loads(path.read_text())
        module = report.MODULES.get(r["benchmark"], r["benchmark"])
        mod = bench(module)
        if hasattr(mod, "report"):
            assert f"`{path.name}`, measured on {r['machine']}, {r['date']}:" in text
            assert mod.report(r).strip() in text
        else:
            assert f"`{path.name}` (`{module}.py` has no `report()` yet)" in text
    s1 = json.loads((BENCH / "results/stage1_efficiency.json").read_text())
    assert f"| ratio | {s1['ratio']:.3f} |" in text
    cost = json.loads((BENCH / "results/cache_cost.json").read_text())["bytes_per_view"]["10"]
    assert f"| 10 | {cost['total']:.1f} | {cost['logits']:.1f} | {cost['classes']:.1f} |" in text
    # two results files of one script: each its own title, prose and command
    topk = text[text.index("## Top-k fidelity"):text.index("## Accuracy fidelity")]
    assert "fidelity.py --rows labels --seeds 42 --name fidelity-topk --topk-fidelity 4000" in topk
    assert "replays N of the demo cache's training views" in topk and "Rows (`--rows`)" not in topk
    assert "Rows (`--rows`)" in text[text.index("## Accuracy fidelity"):]


def test_report_check_and_bad_results_files_are_one_line_errors(tmp_path):
    report = bench("report")
    page = tmp_path / "benchmarks.md"
    page.write_text(DOC.read_text())
    report.main(["--check", "--out", str(page)])  # up to date: no error
    page.write_text(DOC.read_text().replace("| ratio | 0", "| ratio | 1", 1))
    with pytest.raises(SystemExit) as e:
        report.main(["--check", "--out", str(page)])
    assert str(e.value).startswith(f"{page}: differs from what ") and "\n" not in str(e.value)
    with pytest.raises(SystemExit) as e:
        report.main(["--check", "--out", str(tmp_path / "none.md")])
    assert str(e.value).startswith(f"{tmp_path / 'none.md'}: missing")

    res = tmp_path / "results"
    res.mkdir()
    bad = res / "x.json"
    for content, message in [("{", "not a readable JSON results file"),
                             ('{"machine": "m", "date": "d"}', "field 'benchmark' missing or not a string"),
                             ('{"benchmark": "nope", "machine": "m", "date": "d"}',
                              "benchmark 'nope' has no script benchmarks/nope.py"),
                             ('{"benchmark": "cache_cost", "machine": "m", "date": "d"}',
                              "cache_cost.report() cannot render it (KeyError: 'args')")]:
        bad.write_text(content)
        with pytest.raises(SystemExit) as e:
            report.main(["--results", str(res), "--out", str(tmp_path / "o.md")])
        assert str(e.value).startswith(f"{bad}: {message}"), e.value
    assert not (tmp_path / "o.md").exists()


def test_ensemble_gain_scores_members_as_stage2_evaluates_them(tmp_path):
    """Each member's top-1 is what stage 2's Evaluator gives the same weights on the same images
    (the students' evaluation path); the ensemble's is the argmax of the stored mixture."""
    import torch
    from helpers import TEACHER, make_shards, save_teacher

    from usi_cache.config.stages import TrainConfig
    from usi_cache.dist import World
    from usi_cache.models.ensemble import load_ensemble, mixture_log_probs
    from usi_cache.shards.manifest import load_manifest
    from usi_cache.stage2.eval_data import EvalStream
    from usi_cache.stage2.evaluate import Evaluator
    val = make_shards(tmp_path / "val", n=23, per_shard=10)
    ckpts = [str(save_teacher(tmp_path / f"t{i}.pth", seed=i)) for i in range(2)]
    cfg = TrainConfig(model=TEACHER, train_shards=str(val), val_shards=str(val), out=str(tmp_path / "r"),
                      input_size=32, batch_size=7, workers=0)
    ens = load_ensemble([TEACHER] * 2, ckpts, num_classes=5, input_size=32)
    got = bench("ensemble_gain").member_accuracy(ens, val, cfg, batch=6)
    m = load_manifest(val)
    world = World(0, 1, 0, torch.device("cpu"))
    for i, member in enumerate(ens.members):
        t = member.teacher
        want = Evaluator(m, cfg, world, t.mean, t.std, amp=False)({"m": t.model})["m"]
        assert got["members"][i] == pytest.approx(want["top1"], abs=0.01) and want["count"] == got["images"] == 23
    images = torch.stack([s["image"] for s in EvalStream(m, 32, cfg.eval_crop, cfg.view.interpolation, 0, 1)])
    labels = torch.tensor([s["label"] for s in EvalStream(m, 32, cfg.eval_crop, cfg.view.interpolation, 0, 1)])
    logits = ens.member_logits(images.permute(0, 2, 3, 1).contiguous())
    hits = (mixture_log_probs(logits, ens.weights).argmax(1) == labels).sum().item()
    assert got["ensemble"] == pytest.approx(100 * hits / 23, abs=0.01)
    agree = (logits[0].argmax(1) == logits[1].argmax(1)).float().mean().item()
    assert got["all_agree"] == pytest.approx(100 * agree, abs=0.01) and agree < 1  # random teachers differ


def test_ensemble_gain_refuses_a_missing_demo(tmp_path):
    gain = bench("ensemble_gain")
    with pytest.raises(SystemExit, match="run `make demo` first"):
        gain.main(["--demo", str(tmp_path / "demo"), "--work", str(tmp_path / "w")])


def test_demo_stage_keys_leave_out_a_new_setting_at_its_old_behaviour(tmp_path):
    """A finished demo folder stays valid when a setting is added (kd_tail: bucket is what ran
    before it existed); another value of it is keyed."""
    import dataclasses
    s = demo.student_config(tmp_path, tmp_path / "s")
    assert s.kd_tail == "bucket" and "kd_tail" not in demo._keyed(s)
    assert demo._keyed(dataclasses.replace(s, kd_tail="drop"))["kd_tail"] == "drop"


def test_train_run_reuses_a_finished_run_and_finds_its_weights(tmp_path):
    """A finished run is reused from its folder or a reuse folder; a copied run points at the
    folder holding the weights, on every later call; a folder without weights is passed over."""
    import dataclasses
    import shutil

    from helpers import make_shards, yaml_config
    common = bench("bench_common")
    data = {"train": make_shards(tmp_path / "train", n=16, per_shard=8),
            "val": make_shards(tmp_path / "val", n=8, per_shard=8, seed=3)}
    cfg = yaml_config(data, tmp_path / "a")
    first = common.train_run("row", 42, cfg, [])
    assert first["wall_s"] is not None and first["run"] == cfg.out and (tmp_path / "a/run/best.pth").is_file()
    again = common.train_run("row", 42, cfg, [])
    assert again["wall_s"] is None and again["top1"] == first["top1"] and again["run"] == cfg.out
    other = dataclasses.replace(cfg, out=str(tmp_path / "b"))
    for _ in range(2):  # copied, then read back through the pointer
        got = common.train_run("row", 42, other, [Path(cfg.out)], train=False)
        assert got["run"] == cfg.out and not (tmp_path / "b/best.pth").exists()
    bare = tmp_path / "bare"  # a log and config without weights: not a run to reuse
    bare.mkdir()
    for f in ("config.json", "log.jsonl"):
        shutil.copy(Path(cfg.out) / f, bare / f)
    third = dataclasses.replace(cfg, out=str(tmp_path / "c"))
    assert common.train_run("row", 42, third, [bare], train=False) is None
    assert common.train_run("row", 42, dataclasses.replace(cfg, seed=7, out=str(tmp_path / "d")), [Path(cfg.out)],
                            train=False) is None  # another config


def test_k_sweep_reads_tails_and_derives_caches_from_a_k_equals_c_cache(tmp_path):
    """The sweep's tail mass is stage 2's (1 − Σ of the k stored probabilities), its derived
    caches are the first k columns, and k outside 1..C is refused."""
    import numpy as np
    import torch
    from click.testing import CliRunner
    from helpers import cache_args, make_shards, save_teacher

    from usi_cache import cache_format as schema
    from usi_cache.cli.main import main
    from usi_cache.stage2.loss import topk_tail_mass
    shards = make_shards(tmp_path / "s", n=20, per_shard=10)
    full = tmp_path / "full.zarr"
    r = CliRunner().invoke(main, ["cache", *cache_args(shards, save_teacher(tmp_path / "t.pth"), full), "--topk", "5",
                                  "--views", "2"])
    assert r.exit_code == 0, r.output
    fidelity, gain = bench("fidelity"), bench("ensemble_gain")
    group, attrs = schema.open_cache(full)
    lp = torch.from_numpy(group["logits"][:].astype(np.float32))  # (20, 2, 5) log-probabilities, descending
    tail = fidelity.cache_tail(full, [1, 2, 5])
    assert tail["views"] == 40 and tail["per_k"][5] == {"tail_mass": 0.0, "kl": 0.0}
    for k in (1, 2):
        want = float(topk_tail_mass(lp.reshape(-1, 5)[:, :k], None).double().mean())
        assert tail["per_k"][k]["tail_mass"] == pytest.approx(want, rel=1e-6) and tail["per_k"][k]["kl"] > 0
    g2, a2 = schema.open_cache(fidelity.derive(full, tmp_path / "k2.zarr", k=2))
    assert a2["topk"] == 2 and a2["views"] == 2
    np.testing.assert_array_equal(g2["logits"][:], group["logits"][:][..., :2])
    np.testing.assert_array_equal(g2["classes"][:], group["classes"][:][..., :2])
    np.testing.assert_array_equal(g2["boxes"][:], group["boxes"][:])
    with pytest.raises(SystemExit, match=r"--k-sweep: expected values in 1\.\.5"):
        fidelity.k_sweep([0, 3], ["bucket"], tmp_path, tmp_path / "w", full, [42], train=False)
    taught = gain.cache_targets(full)
    p = lp.double().exp()
    labels = torch.from_numpy(group["labels"][:].astype(np.int64))
    assert taught["confidence"] == pytest.approx(float(p[..., 0].mean()), rel=1e-9)
    rest = (1 - p.sum(-1)).clamp(min=0)  # the float16 round-down's share, a bucket of its own
    entropy = -(p * lp.double()).sum(-1) - torch.where(rest > 0, rest * rest.log(), 0.0)
    assert taught["entropy"] == pytest.approx(float(entropy.mean()), rel=1e-9)
    top = torch.from_numpy(group["classes"][:][..., 0].astype(np.int64))
    assert taught["view_accuracy"] == pytest.approx(100 * float((top == labels[:, None]).double().mean()))
