"""Configs: YAML + overrides, unknown keys and wrong types refused with the key named."""
import pytest

from usi_cache.config import CacheConfig, ConfigError, ViewSpec, load_stage_config, to_dict


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


BASE = {"shards": "s", "out": "o.zarr", "teacher": "resnet18"}


def test_usi_recipe_loads_with_paper_defaults():
    cfg = load_stage_config(CacheConfig, "cache", "configs/usi.yaml", BASE)
    assert cfg.view.randaugment == "rand-m7-mstd0.5-inc1"
    assert cfg.view.scale == (0.08, 1.0) and cfg.view.interpolation == "bicubic"
    assert cfg.topk == 10 and cfg.seed == 42
    assert to_dict(cfg)["view"]["ratio"] == [0.75, 4 / 3]


def test_overrides_win_and_none_means_not_given(tmp_path):
    p = write(tmp_path, "cache:\n  views: 3\n  topk: 5\n")
    cfg = load_stage_config(CacheConfig, "cache", p, {**BASE, "views": 7, "topk": None})
    assert cfg.views == 7 and cfg.topk == 5


@pytest.mark.parametrize("text, match", [
    ("cache:\n  viewz: 3\n", r"cache\.viewz: unknown key"),
    ("cache:\n  views: three\n", r"cache\.views: expected an integer"),
    ("cache:\n  views: 0\n", r"cache\.views: expected a positive integer"),
    ("view:\n  scale: [0.5]\n", r"cache\.view\.scale: expected a list of 2"),
    ("view:\n  hflip: 2\n", r"view\.hflip"),
    ("view:\n  interpolation: fancy\n", r"view\.interpolation"),
    ("cache:\n  compile: 1\n", r"cache\.compile: expected true/false"),
    ("cache:\n  teacher_precision: fp8\n", r"cache\.teacher_precision: expected auto, fp32, fp16 or bf16"),
    ("cache:\n  audit: -1\n", r"cache\.audit: expected >= 0"),
    ("cache:\n  audit: 5\n  mix: {mode: paired}\n", r"cache\.audit: only plain caches"),
    ("trainer:\n  x: 1\n", r"unknown section 'trainer'"),
    ("cache: [1, 2\n", r"not valid YAML"),
])
def test_bad_configs_name_the_key(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_stage_config(CacheConfig, "cache", write(tmp_path, text), BASE)


def test_missing_file_and_required_fields(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_stage_config(CacheConfig, "cache", tmp_path / "nope.yaml", BASE)
    with pytest.raises(ConfigError, match="cache.teacher: required"):
        load_stage_config(CacheConfig, "cache", None, {"shards": "s", "out": "o"})


def test_configs_are_frozen():
    with pytest.raises(Exception):
        ViewSpec().hflip = 0.1
