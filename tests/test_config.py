"""Configs: YAML + command line, one source for keys, help and defaults, strict checks."""
import dataclasses
import json

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import ROOT, yaml_config

import helpers
from usi_cache.cli.main import main
from usi_cache.cli.options import config_options, stage_config
from usi_cache.config.stages import CacheConfig, MixConfig, TrainConfig, ViewSpec
from usi_cache.config.errors import ConfigError
from usi_cache.config.parser import (load_stage_config, from_dict, read_yaml, recipe_path, settings, to_dict,
                                     upgrade_saved)
from usi_cache.views.mixing import sample_mix


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


BASE = {"shards": "s", "out": "o.zarr", "teacher": "resnet18"}
TRAIN = {"model": "m", "train_shards": "t", "val_shards": "v", "out": "run"}


def test_usi_recipe_loads_with_paper_defaults():
    cfg = load_stage_config(CacheConfig, "cache", "configs/usi.yaml", BASE)
    assert cfg.view.randaugment == "rand-m7-mstd0.5-inc1"
    assert cfg.view.scale == (0.08, 1.0) and cfg.view.interpolation == "bicubic"
    assert cfg.topk == 10 and cfg.seed == 42
    # stage 1 makes a paired cache by default, mixed with stage 2's rates; plain is --mix none
    assert cfg.mix == MixConfig(mode="paired", mixup=0.8, cutmix=1.0, prob=1.0, switch=0.5)
    plain = load_stage_config(CacheConfig, "cache", "configs/usi.yaml", {**BASE, "mix.mode": "none"})
    assert plain.mix == MixConfig()
    assert to_dict(cfg)["view"]["ratio"] == [0.75, 4 / 3]
    t = load_stage_config(TrainConfig, "train", "configs/usi.yaml", TRAIN)
    assert t.mix == MixConfig(mode="batch", mixup=0.8, cutmix=1.0, prob=1.0, switch=0.5)
    assert t.repeated_aug == 3 and t.lr == 2e-3


def test_overrides_win_and_none_means_not_given(tmp_path):
    p = write(tmp_path, "cache:\n  views: 3\n  topk: 5\n")
    cfg = load_stage_config(CacheConfig, "cache", p, {**BASE, "views": 7, "topk": None})
    assert cfg.views == 7 and cfg.topk == 5


def test_section_overrides_merge_key_by_key(tmp_path):
    """A section given as a mapping or as dotted keys changes only those keys; the YAML keeps the rest."""
    p = write(tmp_path, "view:\n  scale: [0.35, 1.0]\n  hflip: 0.25\ntrain:\n  mix:\n    prob: 0.5\n")
    cfg = load_stage_config(TrainConfig, "train", p, {**TRAIN, "view": {"hflip": 0.0}, "mix.mixup": 0.0})
    assert cfg.view.scale == (0.35, 1.0) and cfg.view.hflip == 0.0
    assert cfg.mix == MixConfig(mode="batch", mixup=0.0, prob=0.5)
    # a mapping-valued key that is not a section is replaced, not merged
    cfg = load_stage_config(TrainConfig, "train", write(tmp_path, "train:\n  model_kwargs: {a: 1}\n"),
                            {**TRAIN, "model_kwargs": {"b": 2}})
    assert cfg.model_kwargs == {"b": 2}


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
    ("trainer:\n  x: 1\n", r"unknown section 'trainer'"),
    ("cache: [1, 2\n", r"not valid YAML"),
    ("view:\n  hflip: 0.1\ncache:\n  view: {hflip: 0.2}\n", r"cache\.view: also given as the top-level view"),
    # keys that moved name their new place
    ("cache:\n  mixup: 0.5\n", r"^cache\.mixup: moved to cache\.mix\.mixup$"),
    ("cache:\n  mix_switch: 0.5\n", r"^cache\.mix_switch: moved to cache\.mix\.switch$"),
    ("cache:\n  mix: paired\n", r"^cache\.mix: is a section now: write `mix: \{mode: paired\}`"),
    ("cache:\n  mix: {mode: batch}\n", r"cache\.mix\.mode: expected none or paired, got 'batch'"),
    ("cache:\n  mix: {prob: 2}\n", r"cache\.mix\.prob: expected a probability"),
    # a mix key that mode none would ignore is an error, not silence
    ("cache:\n  mix: {cutmix: 0.0}\n", r"^cache\.mix\.cutmix: set to 0\.0, but cache\.mix\.mode is none, which "
                                      r"ignores it: set cache\.mix\.mode to paired"),
    ("cache:\n  pretrained: true\n  teacher_checkpoint: t.pth\n", r"cache\.pretrained: excludes cache\.teacher_ch"),
])
def test_bad_configs_name_the_key(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_stage_config(CacheConfig, "cache", write(tmp_path, text), BASE)


@pytest.mark.parametrize("text, match", [
    ("train:\n  mix_prob: 0.5\n", r"^train\.mix_prob: moved to train\.mix\.prob$"),
    ("train:\n  mix: {mode: paired}\n", r"train\.mix\.mode: expected batch or none, got 'paired'"),
    ("train:\n  mix: {mode: none, prob: 0.5}\n", r"^train\.mix\.prob: set to 0\.5, but train\.mix\.mode is none"),
    ("train:\n  cache: c.zarr\n  teacher: t\n", r"either cache .* or teacher .*, not both"),
    ("train:\n  teacher_checkpoint: t.pth\n", r"train\.teacher_checkpoint: given without train\.teacher"),
    ("train:\n  kd_only: true\n", r"train\.kd_only: needs a teacher"),
    ("train:\n  log_every: -1\n", r"train\.log_every: expected >= 0"),
    ("train:\n  kd_tail: renorm\n", r"^train\.kd_tail: expected one of bucket, drop, got 'renorm'$"),
    ("train:\n  kd_tail: drop\n  teacher: t\n", r"^train\.kd_tail: drop needs train\.cache"),
])
def test_bad_train_configs_name_the_key(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_stage_config(TrainConfig, "train", write(tmp_path, text), TRAIN)


def test_missing_file_and_required_fields(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_stage_config(CacheConfig, "cache", tmp_path / "nope.yaml", BASE)
    with pytest.raises(ConfigError, match="cache.teacher: required: timm model name"):
        load_stage_config(CacheConfig, "cache", None, {"shards": "s", "out": "o"})
    with pytest.raises(ConfigError, match="train.val_shards: required"):
        load_stage_config(TrainConfig, "train", None, {**TRAIN, "val_shards": ""})


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ViewSpec().hflip = 0.1


def test_new_train_fields_and_their_defaults():
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    assert names[-4:] == ["compile", "log_every", "tensorboard", "view"]
    t = TrainConfig()
    assert (t.compile, t.log_every, t.tensorboard) == (False, 50, False)


def test_mix_mode_none_never_mixes_and_paired_spec_keeps_the_cache_attrs_shape():
    rng = np.random.default_rng(0)
    for _ in range(20):
        assert sample_mix(rng, 8, 8, **MixConfig().sample_kwargs()).kind == "none"
    kinds = {sample_mix(rng, 8, 8, **MixConfig(mode="batch").sample_kwargs()).kind for _ in range(20)}
    assert kinds == {"mixup", "cutmix"}
    from usi_cache.stage1.run import _mix_spec
    # caches store this dict in their attributes (mix_spec): caches made before MixConfig
    # existed hold exactly this shape, so they still resume and verify
    paired = CacheConfig(**BASE, mix=MixConfig(mode="paired"))
    assert _mix_spec(paired) == {"mixup": 0.8, "cutmix": 1.0, "prob": 1.0, "switch": 0.5}
    assert _mix_spec(CacheConfig(**BASE)) is None


def old_train_config(cfg: TrainConfig) -> dict:
    """`cfg` saved the way runs saved their config before MixConfig (flat mix keys, no
    compile/log_every/tensorboard)."""
    d = to_dict(cfg)
    mix = d.pop("mix")
    for key in ("compile", "log_every", "tensorboard"):
        del d[key]
    return {**d, "mixup": mix["mixup"], "cutmix": mix["cutmix"], "mix_prob": mix["prob"], "mix_switch": mix["switch"]}


def test_saved_configs_of_older_runs_are_upgraded():
    cfg = TrainConfig(**TRAIN, mix=MixConfig(mode="batch", mixup=0.2, prob=0.5))
    old = old_train_config(cfg)
    assert "mix" not in old and old["mix_prob"] == 0.5
    assert upgrade_saved(TrainConfig, old) == to_dict(cfg)
    assert upgrade_saved(TrainConfig, to_dict(cfg)) == to_dict(cfg)  # today's shape is left as it is
    with pytest.raises(ConfigError, match=r"^x: config\.lrr: unknown key"):
        upgrade_saved(TrainConfig, {**old, "lrr": 1}, "x: config")


def test_packaged_recipes_are_the_repository_configs(tmp_path, monkeypatch):
    for name in ("usi.yaml", "demo-fmnist.yaml"):
        assert recipe_path(name).read_bytes() == (ROOT / "configs" / name).read_bytes()
    monkeypatch.chdir(tmp_path)  # a bare name that is no file here is a packaged recipe
    assert read_yaml("usi.yaml")["cache"]["views"] == 16
    (tmp_path / "usi.yaml").write_text("cache:\n  views: 2\n")  # ... but a file here comes first
    assert read_yaml("usi.yaml")["cache"]["views"] == 2
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        read_yaml("nope.yaml")
    with pytest.raises(ConfigError, match=r"nope\.yaml: no such packaged recipe \(packaged: demo-fmnist"):
        recipe_path("nope.yaml")


# ------------------------------------------------------------------ the command line

def probe(cls, section):
    """A click command with the stage's generated options that prints the resolved config."""
    @click.command()
    @config_options(cls, section)
    def command(**options):
        try:
            click.echo(json.dumps(to_dict(stage_config(cls, section, options))))
        except ConfigError as e:
            raise click.ClickException(str(e)) from None
    return command


def resolve(cls, section, args):
    r = CliRunner().invoke(probe(cls, section), args)
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def cli_base(cls, leave_out=()):
    base = BASE if cls is CacheConfig else TRAIN
    return [a for k, v in base.items() if k not in leave_out for a in (f"--{k.replace('_', '-')}", v)]


def other_value(cls, s):
    """A valid value for setting `s` that is not its default, as command-line text."""
    special = {"teacher_precision": "bf16", "view.interpolation": "bilinear", "view.randaugment": "rand-m9-mstd0.5",
               "mix.mode": "paired" if cls is CacheConfig else "none", "view.fill": "1,2,3",
               "teacher_checkpoint": "t.pth", "teacher": "t", "cache": "c.zarr", "pretrained_checkpoint": "w.pth",
               "mean": "0.5,0.25,0.125", "std": "0.5,0.25,0.125", "model_kwargs": '{"drop_path_rate": 0.1}',
               "betas": "0.5,0.25", "view.scale": "0.5,0.75", "view.ratio": "0.5,2.0",
               "part": "1/4", "teacher_weights": "2.0", "kd_tail": "drop"}
    if s.path in special:
        return special[s.path]
    if s.type is bool:
        return "true" if not s.default else "false"
    if s.default is None or isinstance(s.default, int):
        return str((s.default or 0) + 3)
    if isinstance(s.default, float):
        return repr(s.default / 2)
    return s.default + "x"


@pytest.mark.parametrize("cls, section", [(CacheConfig, "cache"), (TrainConfig, "train")])
def test_every_key_is_reachable_by_its_option_and_by_set(cls, section):
    """Every key, nested ones included, has its own option with help text, and --set reaches it
    too: both give the same config, with the key changed."""
    keys = settings(cls)
    assert len({s.flag for s in keys}) == len(keys) and all(s.help for s in keys)
    for s in keys:
        text = other_value(cls, s)
        base = cli_base(cls, leave_out=(s.path,))
        if s.path.startswith("mix.") and s.path != "mix.mode" and cls is CacheConfig:
            base += ["--mix", "paired"]  # stage 1 mixes only in mode paired
        if s.path in ("teacher_checkpoint", "teacher_weights", "kd_only") and cls is TrainConfig:
            base += ["--teacher", "t"]  # they need an online teacher
        if s.path == "kd_tail" and cls is TrainConfig:
            base += ["--cache", "c.zarr"]  # a tail to drop needs a cache
        option = ([f"--{s.flag[2:]}" if text == "true" else f"--no-{s.flag[2:]}"] if s.type is bool
                  else [s.flag, text])
        by_option = resolve(cls, section, [*base, *option])
        by_set = resolve(cls, section, [*base, "--set", f"{section}.{s.path}={text}"])
        assert by_option == by_set, s.path
        node = by_option
        for part in s.path.split("."):
            node = node[part]
        default = list(s.default) if isinstance(s.default, tuple) else s.default
        assert node != default, (s.path, node)


def test_options_and_set_parse_like_yaml(tmp_path):
    p = write(tmp_path, "train:\n  max_steps: 4\n")
    cfg = resolve(TrainConfig, "train", [*cli_base(TrainConfig), "--config", str(p), "--lr", "1e-3",
                                         "--set", "mix.prob=0.25", "--set", "view.scale=[0.35, 1]",
                                         "--set", "train.max_steps=null", "--model-kwargs", '{"drop_rate": 0.1}'])
    assert cfg["lr"] == 1e-3 and cfg["mix"]["prob"] == 0.25 and cfg["view"]["scale"] == [0.35, 1.0]
    assert cfg["max_steps"] is None and cfg["model_kwargs"] == {"drop_rate": 0.1}
    p = write(tmp_path, "train:\n  epochs: 3\n  mix: {prob: 0.5}\n")
    cfg = resolve(TrainConfig, "train", [*cli_base(TrainConfig), "--config", str(p), "--mixup", "0.1"])
    assert cfg["epochs"] == 3 and cfg["mix"] == {"mode": "batch", "mixup": 0.1, "cutmix": 1.0, "prob": 0.5,
                                                  "switch": 0.5}


@pytest.mark.parametrize("args, message", [
    (["--lr", "abc"], "train.lr: expected a number, got 'abc'"),
    (["--lr", "nan"], "train.lr: expected a finite number"),
    (["--epochs", "2.5"], "train.epochs: expected an integer, got '2.5'"),
    (["--view-scale", "0.5"], "train.view.scale: expected 2 comma-separated values, got '0.5'"),
    (["--model-kwargs", "[1]"], "train.model_kwargs: expected a JSON object, got '[1]'"),
    (["--set", "lrr=1"], "train.lrr: unknown key (known: "),
    (["--set", "mixup=0.5"], "train.mixup: moved to train.mix.mixup"),
    (["--set", "mix=none"], "train.mix: is a section: set its keys"),
    (["--set", "lr"], "--set 'lr': expected KEY=VALUE"),
    (["--set", "amp=yes"], "train.amp: expected true/false, got 'yes'"),
    (["--lr", "1e-3", "--set", "lr=2e-3"], "train.lr: given twice (--lr and --set lr=2e-3)"),
    (["--set", "mix.prob=0.1", "--set", "train.mix.prob=0.2"], "train.mix.prob: given twice"),
    (["--mix", "none", "--mix-prob", "0.5"], "train.mix.prob: set to 0.5, but train.mix.mode is none"),
])
def test_bad_command_lines_are_one_line_errors(args, message):
    r = CliRunner().invoke(probe(TrainConfig, "train"), [*cli_base(TrainConfig), *args])
    assert r.exit_code == 1 and message in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1


def test_every_option_of_cache_and_train_has_help():
    from usi_cache.cli.main import cache_command, train_command
    for command in (cache_command, train_command):
        for p in command.params:
            assert isinstance(p, click.Option) and p.help, (command.name, p.name)


def test_help_shows_defaults_and_the_recipe_values():
    r = CliRunner().invoke(main, ["train", "--help"], terminal_width=300)
    assert r.exit_code == 0, r.output
    for s in settings(TrainConfig):
        assert s.flag in r.output, s.flag
    lines = {ln.split()[0]: ln for ln in r.output.splitlines() if ln.strip().startswith("--")}
    assert "[default: 0.002]" in lines["--lr"] and "[required]" in lines["--model"]
    assert "[default: 1.0]" in lines["--mix-prob"] and "[default: batch]" in lines["--mix"]
    assert "--min-lr" in lines and "--weight-decay" in lines and "--shuffle-buffer" in lines
    r = CliRunner().invoke(main, ["train", "--config", "configs/demo-fmnist.yaml", "--help"], terminal_width=300)
    lines = {ln.split()[0]: ln for ln in r.output.splitlines() if ln.strip().startswith("--")}
    assert "[default: 1.0; demo-fmnist.yaml sets 0.5]" in lines["--mix-prob"]
    assert "[default: 0.002]" in lines["--lr"]  # the recipe sets the default value: not repeated
    r = CliRunner().invoke(main, ["cache", "--help"], terminal_width=300)
    assert "[default: none]" in r.output and "--view-randaugment" in r.output


def test_cache_command_refuses_conflicting_teacher_weights(tmp_path):
    r = CliRunner().invoke(main, ["cache", "--shards", str(tmp_path), "--out", str(tmp_path / "c.zarr"),
                                  "--teacher", "t", "--teacher-checkpoint", "t.pth", "--pretrained"])
    assert r.exit_code == 1 and "cache.pretrained: excludes cache.teacher_checkpoint" in r.output, r.output
    assert not (tmp_path / "c.zarr").exists()


@pytest.mark.slow
def test_resume_from_a_run_saved_before_mixconfig(tmp_path):
    """A checkpoint whose config has the old flat mix keys resumes; a changed mix key is still refused."""
    data = helpers.make_train_data(tmp_path, n=16, per_shard=8, n_val=8, val_per_shard=8)
    run = tmp_path / "run"
    args = ["train", *helpers.train_args(data, run, "--max-steps", "1", "--mix-prob", "0.5",
                                          batch_size=4, workers=0)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    state = torch.load(run / "last.pth", weights_only=True)
    cfg = from_dict(TrainConfig, state["config"], "saved")
    state["config"], state["epoch"] = old_train_config(cfg), 0  # as if made before, stopped after epoch 0
    torch.save(state, run / "last.pth")
    r = CliRunner().invoke(main, [*args, "--mix-prob", "0.25", "--resume"])
    assert r.exit_code == 1 and "made with mix = {" in r.output and "'prob': 0.5" in r.output, r.output
    r = CliRunner().invoke(main, [*args, "--resume"])
    assert r.exit_code == 0, r.output
    assert torch.load(run / "last.pth", weights_only=True)["epoch"] == 1


def test_mix_none_on_the_command_line_drops_the_recipes_mix_keys(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  mix:\n    prob: 0.5\n")
    cfg = load_stage_config(TrainConfig, "train", recipe, {**TRAIN, "mix.mode": "none"})
    assert cfg.mix.mode == "none" and cfg.mix.prob == 1.0
    with pytest.raises(ConfigError, match="train.mix.prob: set to 0.3, but train.mix.mode is none"):
        load_stage_config(TrainConfig, "train", recipe, {**TRAIN, "mix.mode": "none", "mix.prob": 0.3})
    with pytest.raises(ConfigError, match="train.mix.prob: set to 0.5"):  # in the recipe itself: an error
        recipe.write_text("train:\n  mix:\n    mode: none\n    prob: 0.5\n")
        load_stage_config(TrainConfig, "train", recipe, TRAIN)


def test_config_fields_from_yaml_are_checked(tmp_path):
    paths = {"train": tmp_path / "train", "val": tmp_path / "val"}  # not read: only the config is built
    cfg = yaml_config(paths, tmp_path, log_every=7, tensorboard=True, compile=True)
    assert (cfg.log_every, cfg.tensorboard, cfg.compile) == (7, True, True)
    assert TrainConfig().log_every == 50 and not TrainConfig().tensorboard and not TrainConfig().compile
    with pytest.raises(ConfigError, match="train.log_every: expected >= 0"):
        yaml_config(paths, tmp_path, log_every=-1)
    with pytest.raises(ConfigError, match="train.compile: expected true/false"):
        yaml_config(paths, tmp_path, compile="yes")
