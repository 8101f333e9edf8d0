"""Tiny real data for the tests: image shards made in tmp_path, a tiny timm teacher."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from usi_cache.shards.tars import Sample, write_shards

ROOT = Path(__file__).resolve().parent.parent
NUM_CLASSES = 5
TEACHER = "test_resnet"  # timm's tiny test model: fast on the CPU, real architecture


def make_samples(n: int, seed: int = 0, bad: tuple[int, ...] = ()) -> list[Sample]:
    """n small images of varying size (PNG and JPEG); indices in `bad` are undecodable."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = int(rng.integers(24, 48)), int(rng.integers(24, 48))
        cls = i % NUM_CLASSES
        # class-dependent colour so a trained model can tell classes apart
        base = np.array([(cls * 50) % 256, (cls * 90 + 40) % 256, (255 - cls * 40) % 256])
        arr = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        fmt, ext = ("PNG", "png") if i % 3 else ("JPEG", "jpg")
        Image.fromarray(arr).save(buf, format=fmt)
        data = b"not an image at all" if i in bad else buf.getvalue()
        out.append(Sample(f"img{i:04d}", ext, data, cls))
    return out


def make_shards(folder: Path, n: int = 26, per_shard: int = 10, seed: int = 0, bad=()) -> Path:
    classes = [f"class{c}" for c in range(NUM_CLASSES)]
    write_shards(make_samples(n, seed, bad), classes, folder, per_shard=per_shard, seed=seed, progress=False)
    return folder


def save_teacher(path: Path, num_classes: int = NUM_CLASSES, seed: int = 0) -> Path:
    import timm
    torch.manual_seed(seed)
    model = timm.create_model(TEACHER, num_classes=num_classes)
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture
def shards(tmp_path) -> Path:
    return make_shards(tmp_path / "shards")


@pytest.fixture
def teacher_ckpt(tmp_path) -> Path:
    return save_teacher(tmp_path / "teacher.pth")


def cache_args(shards: Path, ckpt: Path, out: Path, *extra: str) -> list[str]:
    return ["--shards", str(shards), "--teacher", TEACHER, "--teacher-checkpoint", str(ckpt),
            "--views", "8", "--topk", "3", "--input-size", "32", "--batch-size", "16",
            "--workers", "0", "--out", str(out), *extra]


def make_train_data(root: Path, *, n: int, per_shard: int, n_val: int, val_per_shard: int) -> dict:
    """Train and val shards, a teacher checkpoint and its V = 3 cache of the train shards."""
    train = make_shards(root / "train", n=n, per_shard=per_shard)
    val = make_shards(root / "val", n=n_val, per_shard=val_per_shard, seed=7)
    ckpt = save_teacher(root / "teacher.pth")
    cache = root / "cache.zarr"
    from click.testing import CliRunner

    from usi_cache.cli.main import main
    r = CliRunner().invoke(main, ["cache", *cache_args(train, ckpt, cache), "--views", "3"])
    assert r.exit_code == 0, r.output
    return {"train": train, "val": val, "ckpt": ckpt, "cache": cache, "root": root}


def train_args(data: dict, out: Path, *extra: str, batch_size: int, workers: int) -> list[str]:
    """`usi train` arguments for a 2-epoch test run of the tiny teacher model on `data`."""
    return ["--model", TEACHER, "--train-shards", str(data["train"]), "--val-shards", str(data["val"]),
            "--out", str(out), "--epochs", "2", "--cooldown-epochs", "0", "--warmup-epochs", "1",
            "--batch-size", str(batch_size), "--input-size", "32", "--workers", str(workers), "--quiet", *extra]


def run_py(args: list[str], *, torchrun: int = 0, timeout: float = 300, env=None, **kw):
    """Run a project entry point in a fresh process (optionally under torchrun)."""
    e = {**os.environ, "USI_DIST_TIMEOUT": "60", "OMP_NUM_THREADS": "1", **(env or {})}
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={torchrun}", *args]
    else:
        cmd = [sys.executable, *args]
    return subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout, **kw)
