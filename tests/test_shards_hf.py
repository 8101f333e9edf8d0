"""`usi shards from-hf`: a Hugging Face dataset split (saved to disk, or parquet) into shards,
through the same streaming writer as a folder."""
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import NUM_CLASSES, cache_args, error_line, make_samples, stats, tar_hashes

from usi_cache.cli.main import main
from usi_cache.shards.manifest import load_manifest
from usi_cache.shards.tars import read_shard
from usi_cache.shards.writer import SIDECARS

datasets = pytest.importorskip("datasets")

NAMES = [f"class {c}" for c in range(NUM_CLASSES)]
BAD_ROW = 4


def image_dataset(n: int = 13):
    """n rows of encoded PNG/JPEG bytes (an Image feature) and a ClassLabel; row BAD_ROW does not decode."""
    samples = make_samples(n, bad=(BAD_ROW,))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES),
                                  "caption": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": [{"bytes": s.data, "path": None} for s in samples],
                                       "label": [s.cls for s in samples],
                                       "caption": [f"row {i}" for i in range(n)]}, features=features), samples


@pytest.fixture
def saved(tmp_path) -> tuple[Path, Path, list]:
    """The same split saved with save_to_disk (a DatasetDict with train and test) and as parquet."""
    train, samples = image_dataset()
    test, _ = image_dataset(3)
    test = test.map(lambda row, i: {"label": -1 if i == 1 else row["label"]}, with_indices=True)  # unlabelled
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "saved"))
    train.to_parquet(str(tmp_path / "parquet" / "train-00000-of-00001.parquet"))
    return tmp_path / "saved", tmp_path / "parquet", samples


def from_hf(*args: str):
    return CliRunner().invoke(main, ["shards", "from-hf", *map(str, args), "--per-shard", "5", "--quiet"])


@pytest.mark.slow
def test_saved_and_parquet_give_the_same_shards_with_the_original_bytes(tmp_path, saved):
    disk, parquet, samples = saved
    r = from_hf(disk, tmp_path / "a", "--workers", "2")
    assert r.exit_code == 0, r.output
    assert "left out 1 row(s)" in r.output and f"{disk} train_00000004: unreadable image" in r.output
    assert "12 samples, 5 classes, 3 shards" in r.output
    r = from_hf(f"{parquet}/*.parquet", tmp_path / "b", "--workers", "1", "--cache-dir", tmp_path / "hf-cache")
    assert r.exit_code == 0, r.output
    r = from_hf(parquet, tmp_path / "c", "--workers", "1", "--cache-dir", tmp_path / "hf-cache")
    assert r.exit_code == 0, r.output
    # deterministic: the same rows give byte-identical tars and fingerprint, whatever holds them
    assert tar_hashes(tmp_path / "a") == tar_hashes(tmp_path / "b") == tar_hashes(tmp_path / "c")
    m = load_manifest(tmp_path / "a")
    assert m.fingerprint == load_manifest(tmp_path / "b").fingerprint
    assert m.classes == tuple(NAMES) and sorted(s.count for s in m.shards) == [3, 4, 5]  # row 4 left out
    got = {s.key: s for i in range(len(m.shards)) for s in read_shard(m.path(i))}
    assert sorted(got) == [f"train_{i:08d}" for i in range(13) if i != BAD_ROW]
    for i, original in enumerate(samples):
        if i != BAD_ROW:  # the stored bytes, not a re-encode
            s = got[f"train_{i:08d}"]
            assert (s.data, s.ext, s.cls) == (original.data, original.ext, original.cls)
    r = from_hf(disk, tmp_path / "d", "--split", "test", "--workers", "1")
    assert r.exit_code == 0 and "2 samples, 5 classes, 1 shards" in r.output, r.output
    assert f"{disk} test_00000001: no label (-1)" in r.output
    assert sorted(s.key for s in read_shard(load_manifest(tmp_path / "d").path(0))) == [
        "test_00000000", "test_00000002"]


def test_rerun_rebuilds_only_what_is_missing_and_stage_1_reads_the_shards(tmp_path, saved, teacher_ckpt):
    disk, _, _ = saved
    out = tmp_path / "out"
    assert from_hf(disk, out, "--workers", "1").exit_code == 0
    reference, before = tar_hashes(out), stats(out)
    manifest = (out / "dataset.json").read_bytes()
    (out / "dataset.json").unlink()  # what a kill leaves: no manifest, a shard not written yet
    (out / "shard-000001.tar").unlink()
    (out / SIDECARS / "shard-000001.tar.json").unlink()
    r = from_hf(disk, out, "--workers", "1")
    assert r.exit_code == 0, r.output
    after = stats(out)
    assert tar_hashes(out) == reference and (out / "dataset.json").read_bytes() == manifest
    assert after["shard-000000.tar"] == before["shard-000000.tar"]  # kept, not written again
    assert after["shard-000002.tar"] == before["shard-000002.tar"]
    r = CliRunner().invoke(main, ["cache", *cache_args(out, teacher_ckpt, tmp_path / "cache.zarr"), "--views", "2"])
    assert r.exit_code == 0, r.output


def test_pixel_arrays_are_encoded_as_png_and_classes_come_from_a_file(tmp_path):
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (8 + i, 9, 3), dtype=np.uint8) for i in range(7)]
    features = datasets.Features({"img": datasets.Array3D((None, 9, 3), "uint8"), "cls": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict({"img": pixels, "cls": [i % 3 for i in range(7)]}, features=features)
    ds.save_to_disk(str(tmp_path / "arrays"))
    names = tmp_path / "names.txt"
    names.write_text("a\nb\nc\nd\n")
    for out in ("x", "y"):
        r = from_hf(tmp_path / "arrays", tmp_path / out, "--classes", names, "--workers", "1")
        assert r.exit_code == 0, r.output
    assert tar_hashes(tmp_path / "x") == tar_hashes(tmp_path / "y")
    m = load_manifest(tmp_path / "x")
    assert m.classes == ("a", "b", "c", "d") and m.num_samples == 7
    from usi_cache.shards.images import decode_image
    for s in read_shard(m.path(0)):
        row = int(s.key.split("_")[1])
        assert s.ext == "png" and s.cls == row % 3
        assert (np.asarray(decode_image(s.data)) == pixels[row]).all()
    r = from_hf(tmp_path / "arrays", tmp_path / "z", "--workers", "1")  # no names: 0..max
    assert r.exit_code == 0 and load_manifest(tmp_path / "z").classes == ("0", "1", "2"), r.output


def test_bad_input_is_a_one_line_error(tmp_path, saved):
    disk, parquet, _ = saved
    datasets.Dataset.from_dict({"photo": [b"x"], "label": [1]}).save_to_disk(str(tmp_path / "photo"))
    floats = datasets.Features({"image": datasets.Array2D((2, 2), "float32"), "label": datasets.Value("int8")})
    datasets.Dataset.from_dict({"image": [np.zeros((2, 2))], "label": [1]}, features=floats).save_to_disk(
        str(tmp_path / "floats"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    neither = "neither a dataset saved with save_to_disk, parquet files, nor a dataset in the local Hugging Face cache"
    cases = [
        ((disk, "--split", "val"), f"{disk}: no split 'val' (splits: train, test)"),
        ((parquet, "--split", "val", "--cache-dir", tmp_path / "c"), f"{parquet}: no split 'val' (splits: train)"),
        ((disk, "--image-column", "photo"),
         f"{disk}: split 'train' has no column 'photo' (columns: image, label, caption)"),
        ((disk, "--label-column", "caption"),
         f"{disk}: label column 'caption' holds Value('string'), expected integer class indices"),
        ((tmp_path / "photo",), f"{tmp_path / 'photo'}: split 'train' has no image column (looked for image, img; "
                                "columns: photo, label; name it with --image-column)"),
        ((tmp_path / "floats",), f"{tmp_path / 'floats'}: image column 'image' holds Array2D"),
        ((disk, "--image-column", "caption"), f"{disk}: image column 'caption' holds Value('string'), expected images"),
        ((tmp_path / "empty",), f"{tmp_path / 'empty'}: {neither}"),
        ((tmp_path / "notes.txt",), f"{tmp_path / 'notes.txt'}: {neither}"),
        (("no-such-user/no-such-dataset",), f"no-such-user/no-such-dataset: {neither}"),
        ((tmp_path / "none-*.parquet",), f"{tmp_path / 'none-*.parquet'}: matches no files"),
    ]
    env = {"HF_HOME": str(tmp_path / "hf-home")}  # an empty hub cache: nothing to find offline
    for args, expected in cases:
        r = CliRunner(env=env).invoke(main, ["shards", "from-hf", *map(str, args), str(tmp_path / "out"), "--quiet"])
        assert r.exit_code == 1, (args, r.output)
        assert error_line(r.output).startswith(f"Error: {expected}"), (args, r.output)
    assert not (tmp_path / "out" / "dataset.json").exists()
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # what the command set: no download was tried
