"""The package as a user installs it: a wheel in a fresh venv, used from outside the repository."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from helpers import ROOT

from usi_cache.shards.fashion_mnist import FMNIST_DIR


def sh(*cmd, cwd, env=None, timeout=600) -> str:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))}\n{r.stdout}\n{r.stderr}"
    return r.stdout


@pytest.mark.slow
def test_wheel_ships_the_recipes_that_usi_demo_and_train_use(tmp_path):
    # build from a copy: a build writes build/ and *.egg-info beside its sources
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "build", "*.egg-info", "__pycache__", ".hypothesis", ".pytest_cache", "*.zarr"))
    sh(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist",
       src, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("usi_cache-*.whl"))
    with zipfile.ZipFile(wheel) as z:  # every module of every subpackage (found, not listed)
        shipped = {n for n in z.namelist() if n.endswith(".py")}
    assert shipped == {str(m.relative_to(ROOT)) for m in (ROOT / "usi_cache").rglob("*.py")}

    venv = tmp_path / "venv"
    sh(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv, cwd=tmp_path)
    py = venv / "bin" / "python"
    # torch & co. from this interpreter's environment, behind the venv's own site-packages (a .pth
    # path line adds the folder only: the editable install's finder there is not run)
    purelib = Path(sh(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).strip())
    (purelib / "base-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    sh(sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-index", wheel, cwd=tmp_path)

    elsewhere = tmp_path / "elsewhere"  # no configs/ folder here
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    usi = venv / "bin" / "usi"
    found = json.loads(sh(py, "-c", "import json, usi_cache, usi_cache.demo as d; from pathlib import Path; "
                                    "c = d.student_config(Path('demo'), Path('run')); "
                                    "print(json.dumps([usi_cache.__file__, str(d.CONFIG), c.epochs, c.mix.prob]))",
                          cwd=elsewhere, env=env))
    assert found[0].startswith(str(purelib)) and found[1].startswith(str(purelib)), found
    assert found[2:] == [10, 0.5]  # the demo recipe's student: 10 epochs, half the batches mixed
    assert "Fashion-MNIST end to end" in sh(usi, "demo", "--help", cwd=elsewhere, env=env)
    help_text = sh(usi, "train", "--config", "demo-fmnist.yaml", "--help", cwd=elsewhere,
                   env={**env, "COLUMNS": "300"})
    assert "demo-fmnist.yaml sets 10]" in help_text

    if not Path(FMNIST_DIR).is_dir():
        pytest.skip(f"{FMNIST_DIR} missing: the installed package was not run on data")
    sh(usi, "shards", "fashion-mnist", "fm", "--limit-train", "64", "--limit-test", "32", "--per-shard", "32",
       cwd=elsewhere, env=env)
    sh(usi, "train", "--config", "demo-fmnist.yaml", "--model", "test_efficientnet", "--train-shards", "fm/train",
       "--val-shards", "fm/test", "--out", "run", "--epochs", "1", "--warmup-epochs", "0", "--max-steps", "2",
       "--batch-size", "16", "--workers", "0", "--quiet", cwd=elsewhere, env=env)
    log = [json.loads(line) for line in (elsewhere / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["epoch"] == 0 and log[-1]["val_count"] == 32
    saved = json.loads((elsewhere / "run" / "config.json").read_text())
    assert saved["view"]["scale"] == [0.35, 1.0] and saved["mix"]["prob"] == 0.5  # the packaged recipe's
