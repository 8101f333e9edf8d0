"""Shards: deterministic tars, a manifest that matches them, bad input reported."""
import hashlib
import json
from pathlib import Path

import pytest
import webdataset as wds
from click.testing import CliRunner
from helpers import make_folder, tar_hashes
from PIL import Image

from usi_cache.cli.main import main
from usi_cache.shards.fashion_mnist import FMNIST_DIR, samples_from_fashion_mnist
from usi_cache.shards.folder import shards_from_folder
from usi_cache.shards.manifest import ShardError, load_manifest
from usi_cache.shards.tars import read_shard, write_shards

needs_fmnist = pytest.mark.skipif(not Path(FMNIST_DIR).is_dir(), reason="dataset-fashion-mnist not installed")


@pytest.mark.slow
def test_from_folder_is_byte_identical_and_manifest_matches(tmp_path):
    src = make_folder(tmp_path / "src")
    runner = CliRunner()
    for out in ("a", "b"):
        r = runner.invoke(main, ["shards", "from-folder", str(src), str(tmp_path / out), "--per-shard", "4"])
        assert r.exit_code == 0, r.output
    assert tar_hashes(tmp_path / "a") == tar_hashes(tmp_path / "b")
    assert (tmp_path / "a/dataset.json").read_bytes() == (tmp_path / "b/dataset.json").read_bytes()
    m = load_manifest(tmp_path / "a")
    assert m.classes == ("cat", "dog", "eel") and m.per_shard == 4
    assert [s.count for s in m.shards] == [4, 4, 4, 3]
    src_bytes = {p.read_bytes() for p in src.rglob("*.*")}
    seen = []
    for i, info in enumerate(m.shards):
        assert hashlib.sha256(Path(m.path(i)).read_bytes()).hexdigest() == info.sha256
        samples = list(read_shard(m.path(i)))
        assert len(samples) == info.count
        for s in samples:
            assert "." not in s.key
            assert s.data in src_bytes  # original encoded bytes, no re-encode
            assert m.classes[s.cls] in s.key
        seen += [s.key for s in samples]
    assert len(set(seen)) == 15
    # the shuffle mixes classes across shards
    assert len({s.cls for s in read_shard(m.path(0))}) > 1
    # webdataset itself reads the tars
    ds = wds.WebDataset(str(m.path(0)), shardshuffle=False)
    got = list(ds)
    assert [g["__key__"] for g in got] == [s.key for s in read_shard(m.path(0))]
    assert all(int(g["cls"]) >= 0 for g in got)


def test_different_seed_changes_order_not_content(tmp_path):
    src = make_folder(tmp_path / "src")
    a = folder_shards(src, tmp_path / "a", per_shard=4, seed=0)
    b = folder_shards(src, tmp_path / "b", per_shard=4, seed=1)
    assert a.fingerprint != b.fingerprint
    keys = lambda m: sorted(s.key for i in range(len(m.shards)) for s in read_shard(m.path(i)))
    assert keys(a) == keys(b)


def folder_shards(src, out, **kw):
    return shards_from_folder(src, out, workers=1, progress=False, **kw)[0]


def test_bad_files_are_reported_and_left_out(tmp_path):
    src = make_folder(tmp_path / "src", per_class=2)
    (src / "cat" / "notes.txt").write_text("hello")
    (src / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    r = CliRunner().invoke(main, ["shards", "from-folder", str(src), str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert "left out 2 file(s)" in r.output
    assert "notes.txt: not an image file" in r.output
    assert "broken.jpg: unreadable image" in r.output
    assert load_manifest(tmp_path / "out").num_samples == 6


def test_empty_source_is_an_error_naming_the_path(tmp_path):
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(main, ["shards", "from-folder", str(tmp_path / "empty"), str(tmp_path / "o")])
    assert r.exit_code == 1
    assert str(tmp_path / "empty") in r.output and "no class folders" in r.output
    assert "Traceback" not in r.output
    (tmp_path / "empty" / "cls").mkdir()
    r = CliRunner().invoke(main, ["shards", "from-folder", str(tmp_path / "empty"), str(tmp_path / "o")])
    assert r.exit_code == 1 and "no readable images" in r.output


def test_manifest_errors(tmp_path):
    with pytest.raises(ShardError, match="no dataset manifest"):
        load_manifest(tmp_path)
    src = make_folder(tmp_path / "src", per_class=2)
    m = folder_shards(src, tmp_path / "s", per_shard=4)
    d = json.loads((tmp_path / "s/dataset.json").read_text())
    d["shards"][0]["count"] = 3
    (tmp_path / "s/dataset.json").write_text(json.dumps(d))
    with pytest.raises(ShardError, match="fingerprint"):
        load_manifest(tmp_path / "s")
    Path(m.path(1)).unlink()
    with pytest.raises(ShardError, match="missing"):
        load_manifest(tmp_path / "s")


def test_truncated_tar_is_named(tmp_path):
    src = make_folder(tmp_path / "src", per_class=3)
    m = folder_shards(src, tmp_path / "s", per_shard=9)
    data = Path(m.path(0)).read_bytes()
    Path(m.path(0)).write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(ShardError, match="shard-000000.tar"):
        list(read_shard(m.path(0)))


@pytest.mark.slow
@needs_fmnist
def test_fashion_mnist_cli(tmp_path):
    r = CliRunner().invoke(main, ["shards", "fashion-mnist", str(tmp_path), "--per-shard", "100",
                                  "--limit-train", "250", "--limit-test", "120"])
    assert r.exit_code == 0, r.output
    train, test = load_manifest(tmp_path / "train"), load_manifest(tmp_path / "test")
    assert [s.count for s in train.shards] == [100, 100, 50]
    assert test.num_samples == 120 and len(train.classes) == 10
    s = next(read_shard(train.path(0)))
    assert s.ext == "png"
    with Image.open(__import__("io").BytesIO(s.data)) as im:
        assert im.size == (28, 28) and im.mode == "L"
    first = samples_from_fashion_mnist(FMNIST_DIR, "train", 3)
    assert [x.key for x in first] == ["fmnist_train_00000", "fmnist_train_00001", "fmnist_train_00002"]


def test_fashion_mnist_missing_source_is_clear(tmp_path):
    r = CliRunner().invoke(main, ["shards", "fashion-mnist", str(tmp_path / "o"), "--source", str(tmp_path)])
    assert r.exit_code == 1 and "Fashion-MNIST file not found" in r.output


def test_write_shards_streams_in_order_without_a_seed(tmp_path):
    from helpers import make_samples
    samples = make_samples(7)
    m = write_shards(iter(samples), ["a", "b", "c", "d", "e"], tmp_path / "s", per_shard=3, seed=None,
                     progress=False)
    assert [s.count for s in m.shards] == [3, 3, 1]
    got = [s for i in range(len(m.shards)) for s in read_shard(m.path(i))]
    assert got == samples  # the stream's own order, bytes and classes unchanged


def test_a_reader_starting_mid_shard_passes_over_the_samples_before_it_by_their_headers(tmp_path, monkeypatch):
    """read_shard(path, skip) yields the samples from `skip` on, exactly, and reads only the tar
    headers of the ones before (a stage-2 piece that starts mid-shard)."""
    import io

    import numpy as np

    from usi_cache import storage
    from usi_cache.shards.tars import Sample
    rng = np.random.default_rng(0)
    samples = []
    for i in range(20):  # ~12 KB each: incompressible noise
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
        samples.append(Sample(f"s{i:03d}", "png", buf.getvalue(), i % 3))
    write_shards(samples, ["a", "b", "c"], tmp_path, per_shard=20, seed=0, progress=False)
    path = str(next(tmp_path.glob("*.tar")))
    read = []
    real_open = storage.open_read

    class Counting(io.RawIOBase):
        def __init__(self, f):
            self.f = f

        def readable(self):
            return True

        def seekable(self):
            return self.f.seekable()

        def seek(self, *a):
            return self.f.seek(*a)

        def tell(self):
            return self.f.tell()

        def readinto(self, b):
            n = self.f.readinto(b)
            read[-1] += n
            return n

    def counting_open(p, *a, **k):
        read.append(0)
        return Counting(real_open(p, *a, **k))
    monkeypatch.setattr(storage, "open_read", counting_open)
    full = list(read_shard(path))
    for skip in (0, 1, 7, 19, 20, 25):
        part = list(read_shard(path, skip))
        assert [(s.key, s.data, s.cls) for s in part] == [(s.key, s.data, s.cls) for s in full[skip:]]
    whole, from_19 = read[0], read[4]  # opens: the whole read, then one per skip above
    assert from_19 < whole / 5  # the last sample's bytes and 19 samples' headers, not the shard
