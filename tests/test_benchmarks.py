"""The benchmark scripts and the demo's stage bookkeeping, run small for real."""
from __future__ import annotations

import json
import subprocess

import pytest


from conftest import ROOT
from usi_cache import demo


@pytest.mark.slow
def test_gpu_check_tiny_runs_both_stages(tmp_path):
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--tiny"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path),
                            "USI_BENCH_RESULTS": str(tmp_path / "results")})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "bare teacher forward" in r.stdout and "cache / label-only" in r.stdout
    s2 = json.loads((tmp_path / "results/stage2_overhead.json").read_text())
    assert s2["median"]["cache"] > 0 and s2["ratios"]["FLOP ideal (1 + teacher_fwd / student_fwd_bwd)"] > 1
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


def test_curves_command_plots_mean_and_band_from_run_logs(tmp_path):
    from click.testing import CliRunner
    from usi_cache.cli import main
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
    import sys
    run = lambda *args: subprocess.run([sys.executable, "benchmarks/fidelity.py", "--demo", str(tmp_path / "demo"),
                                        "--work", str(tmp_path / "work"), *args], cwd=ROOT, capture_output=True,
                                       text=True, timeout=120)
    r = run("--rows", "labels,bogus")
    assert r.returncode != 0 and "unknown row 'bogus'" in r.stderr
    r = run("--rows", "labels,cached", "--seeds", "1")
    assert r.returncode != 0 and "run `make demo` first" in r.stderr
    assert not (tmp_path / "work").exists()
