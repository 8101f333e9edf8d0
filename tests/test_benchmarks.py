"""The benchmark scripts and the demo's stage bookkeeping, run small for real."""
from __future__ import annotations

import json
import subprocess


from conftest import ROOT
from usi_cache import demo


def test_gpu_check_tiny_runs_both_stages(tmp_path):
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--tiny"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path),
                            "USI_BENCH_RESULTS": str(tmp_path / "results")})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "bare teacher forward" in r.stdout and "cache / label-only" in r.stdout
    s2 = json.loads((tmp_path / "results/stage2_overhead.json").read_text())
    assert s2["median"]["cache"] > 0 and s2["ratios"]["FLOP ideal (1 + teacher_fwd / student_fwd_bwd)"] > 1


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
