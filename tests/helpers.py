"""What the tests share: tiny real data (image shards made in tmp_path, a tiny timm teacher),
command-line arguments, running entry points, and reading the CLI's one error line.
Imported as `from helpers import ...` (pytest puts tests/ on the path); fixtures are in conftest.py."""
from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import yaml
from PIL import Image

from usi_cache.config.parser import load_stage_config
from usi_cache.config.stages import TrainConfig
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


def cache_args(shards: Path, ckpt: Path, out: Path, *extra: str) -> list[str]:
    return ["--shards", str(shards), "--teacher", TEACHER, "--teacher-checkpoint", str(ckpt),
            "--views", "8", "--topk", "3", "--input-size", "32", "--batch-size", "16",
            "--workers", "0", "--out", str(out), *extra]


def cache_of(root: Path, shards: Path) -> SimpleNamespace:
    """A teacher checkpoint and its cache of `shards` in `root`: root, shards, out (the cache),
    attrs, and x (every array of the cache read whole)."""
    from click.testing import CliRunner

    from usi_cache import cache_format as schema
    from usi_cache.cli import main
    ckpt = save_teacher(root / "teacher.pth")
    out = root / "c.zarr"
    r = CliRunner().invoke(main, ["cache", *cache_args(shards, ckpt, out)])
    assert r.exit_code == 0, r.output
    group, attrs = schema.open_cache(out)
    return SimpleNamespace(root=root, shards=shards, out=out, attrs=attrs, x={n: group[n][:] for n in schema.ARRAYS})


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


def error_line(output: str) -> str:
    """The CLI's one `Error: ...` line; it must be the last thing printed, with no traceback."""
    assert "Traceback" not in output, output
    segments = [s for line in output.splitlines() for s in line.split("\r")]  # tqdm uses \r
    errors = [s[s.index("Error: "):] for s in segments if "Error: " in s]
    assert len(errors) == 1, output
    assert output.rstrip().endswith(errors[0]), f"the error is not one line at the end:\n{output}"
    assert len(errors[0]) > len("Error: ")
    return errors[0]


def yaml_config(data, tmp_path: Path, **train) -> TrainConfig:
    """A 2-epoch label-only run of the tiny test model, written as a recipe YAML and loaded."""
    recipe = {"train": {"model": TEACHER, "train_shards": str(data["train"]), "val_shards": str(data["val"]),
                        "out": str(tmp_path / "run"), "epochs": 2, "cooldown_epochs": 0, "warmup_epochs": 1,
                        "batch_size": 4, "input_size": 32, "workers": 0, "max_steps": 3, **train}}
    path = tmp_path / "recipe.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe))
    return load_stage_config(TrainConfig, "train", path, {})


def make_folder(root: Path, per_class: int = 5, classes=("cat", "dog", "eel"), size=(20, 16)) -> Path:
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            fmt = "JPEG" if i % 2 else "PNG"
            Image.fromarray(arr).save(root / c / f"img.{i}.{'jpg' if i % 2 else 'png'}", format=fmt)
    return root


def tar_hashes(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))}


def stats(folder: Path) -> dict:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.glob("*.tar"))}
