"""The class-order check: per-shard class counts in dataset.json, the predicted distinct classes
per stage-2 batch (against the issue's ImageNet-shaped numbers and against the real shuffle
buffer), and `usi shards index` refusing class-ordered tars."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
from click.testing import CliRunner

from helpers import make_samples
from usi_cache.shards.class_spread import (ClassOrderError, check_spread, predict_distinct, random_distinct,
                                           read_class_counts)
from usi_cache.cli.main import main
from usi_cache.stage2.plan import exact_shuffle
from usi_cache.shards.manifest import MANIFEST, load_manifest
from usi_cache.shards.tars import read_shard, write_shards, write_tar

C, PER_CLASS, PER_SHARD, B = 1000, 1281, 1000, 128  # ImageNet-shaped: 1,281,000 samples


def shard_counts(labels: np.ndarray, per_shard: int) -> list[dict[int, int]]:
    out = []
    for i in range(0, len(labels), per_shard):
        cls, n = np.unique(labels[i:i + per_shard], return_counts=True)
        out.append(dict(zip(cls.tolist(), n.tolist())))
    return out


@pytest.fixture(scope="module")
def imagenet():
    ordered = np.repeat(np.arange(C), PER_CLASS)  # written class by class
    shuffled = np.random.default_rng(0).permutation(ordered)
    return shard_counts(ordered, PER_SHARD), shard_counts(shuffled, PER_SHARD)


def test_imagenet_shaped_numbers(imagenet):
    """The issue's numbers: ~8 classes per batch (buffer 1,000), ~21-27 (buffer 5,000) for
    class-ordered shards; a shuffled set is a random sampler's 1000·(1 − (1 − 1/1000)^128)."""
    ordered, shuffled = imagenet
    assert len(ordered) == 1281
    random = 1000 * (1 - (1 - 1 / 1000) ** 128)
    assert random_distinct(ordered, C, B) == pytest.approx(random, abs=1e-9) == pytest.approx(120.2, abs=0.01)
    assert 6 <= predict_distinct(ordered, C, B, 1000) <= 11
    assert 18 <= predict_distinct(ordered, C, B, 5000) <= 30
    for buffer in (1000, 5000):
        assert predict_distinct(shuffled, C, B, buffer) == pytest.approx(random, rel=0.005)
    t0 = time.perf_counter()
    predict_distinct(shuffled, C, B, 1000)
    assert time.perf_counter() - t0 < 2.0  # ~0.15-0.3 s measured; generous for a loaded machine


def test_prediction_is_pure_and_grows_with_the_buffer(imagenet):
    ordered, _ = imagenet
    values = [predict_distinct(ordered, C, B, b) for b in (250, 1000, 5000, 20000, 100_000)]
    assert values == [predict_distinct(ordered, C, B, b) for b in (250, 1000, 5000, 20000, 100_000)]
    assert values == sorted(values) and values[-1] < random_distinct(ordered, C, B)
    # a buffer as large as the dataset holds its global class mix: a random sampler
    assert predict_distinct(ordered[:20], C, B, 10**7) == pytest.approx(random_distinct(ordered[:20], C, B), rel=0.01)


def simulate(labels: np.ndarray, per_shard: int, batch: int, buffer: int, batches: int, seed: int) -> float:
    """Mean distinct classes per batch out of the real `exact_shuffle`, shards read whole in a
    random order (epoch after epoch), each shard's samples in random order."""
    rng = np.random.default_rng(seed)
    shards = [labels[i:i + per_shard] for i in range(0, len(labels), per_shard)]

    def stream():
        n = 0
        while True:
            for s in rng.permutation(len(shards)):
                for c in rng.permutation(shards[s]).tolist():
                    n += 1
                    yield n, c
    found, current = [], []
    for i, (_, c) in enumerate(exact_shuffle(stream(), buffer, np.random.default_rng(seed + 1))):
        current.append(c)
        if len(current) == batch:
            if i > 5 * buffer:  # past the buffer's filling
                found.append(len(set(current)))
            current = []
            if len(found) == batches:
                return float(np.mean(found))


@pytest.mark.parametrize("per_class,buffer", [(300, 200), (300, 600), (120, 100)])
def test_prediction_matches_the_real_shuffle_buffer(per_class, buffer):
    """Class-ordered shards through stage2/plan.py's exact_shuffle itself: measured and predicted
    distinct classes per batch agree within 10 % (the measurement's own spread is ~2 %)."""
    labels = np.repeat(np.arange(60), per_class)
    counts = shard_counts(labels, 100)
    predicted = predict_distinct(counts, 60, 32, buffer)
    measured = simulate(labels, 100, 32, buffer, batches=400, seed=3)
    assert predicted == pytest.approx(measured, rel=0.10)


def test_shuffled_shards_pass_and_ordered_are_refused_with_one_line(imagenet):
    ordered, shuffled = imagenet
    assert check_spread("x", shuffled, C, B, 1000, allow_ordered=False).ok
    with pytest.raises(ClassOrderError) as e:
        check_spread("/data/train", ordered, C, B, 1000, allow_ordered=False)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("/data/train: class-ordered shards: a batch of 128 would hold ~")
    assert "of 1000 classes where random sampling gives ~120.2" in msg and "usi shards reshard" in msg
    assert not check_spread("x", ordered, C, B, 1000, allow_ordered=True).ok  # kept on purpose


def test_writers_store_the_class_counts(tmp_path):
    """write_shards (fashion-mnist, tests) stores each shard's real class counts; older manifests
    without them still load, and the reader then says None."""
    samples = make_samples(23)
    m = write_shards(samples, [f"c{i}" for i in range(5)], tmp_path / "s", per_shard=10, progress=False)
    counts = read_class_counts(m.root)
    for i, c in enumerate(counts):
        real = [s.cls for s in read_shard(m.path(i))]
        assert c == {k: real.count(k) for k in set(real)}
    d = json.loads((tmp_path / "s" / MANIFEST).read_text())
    for s in d["shards"]:
        del s["class_counts"]
    (tmp_path / "s" / MANIFEST).write_text(json.dumps(d))
    assert load_manifest(tmp_path / "s").fingerprint == m.fingerprint and read_class_counts(m.root) is None


def test_from_folder_output_passes_the_check(tmp_path):
    from helpers import make_folder
    src = make_folder(tmp_path / "src", per_class=40)
    r = CliRunner().invoke(main, ["shards", "from-folder", str(src), str(tmp_path / "out"), "--per-shard", "8",
                                  "--workers", "1", "--quiet"])
    assert r.exit_code == 0, r.output
    m = load_manifest(tmp_path / "out")
    counts = read_class_counts(m.root)
    assert sum(sum(c.values()) for c in counts) == m.num_samples
    assert check_spread(m.root, counts, len(m.classes), 8, 4, allow_ordered=False).ok


def class_ordered_tars(folder, per_class: int = 30, per_shard: int = 30):
    """Tars written class by class (the tests' 5 classes), as a script over an ImageFolder writes them."""
    folder.mkdir(parents=True)
    samples = sorted(make_samples(5 * per_class), key=lambda s: (s.cls, s.key))
    for i in range(0, len(samples), per_shard):
        write_tar(str(folder / f"part-{i // per_shard:04d}.tar"), samples[i:i + per_shard])
    return folder


def test_index_refuses_class_ordered_tars_unless_allowed(tmp_path):
    src = class_ordered_tars(tmp_path / "src")
    args = ["shards", "index", str(src), "--workers", "1", "--quiet", "--batch-size", "8", "--shuffle-buffer", "8"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1
    line = [ln for ln in r.output.splitlines() if ln.startswith("Error:")][-1]
    assert line.startswith(f"Error: {src}: class-ordered shards: a batch of 8 would hold ~")
    assert "of 5 classes where random sampling gives ~" in line and f"usi shards reshard {src} OUT" in line
    assert not (src / MANIFEST).exists()  # nothing written
    r = CliRunner().invoke(main, [*args, "--allow-ordered"])
    assert r.exit_code == 0, r.output
    assert "warning:" in r.output and "class-ordered shards kept (--allow-ordered)" in r.output
    counts = read_class_counts(str(src))
    assert counts == [{k: 30} for k in range(5)]  # one class per tar
