"""Fuzzing `usi cache` and `usi train` in-process (click's CliRunner) with hypothesis.

Every example starts from arguments that work (checked by the first two tests) and breaks
them in one to three ways: wrong types, zero/negative/huge sizes, k > C, V = 0, nan/inf,
missing files, files where folders belong, damaged or code-running checkpoints, garbage YAML.
Whatever the input, the run must either succeed (garbage YAML can parse to an empty recipe) or
end with exit status != 0 and one `Error: ...` line, never a traceback; and a failed stage 1
must never leave a cache whose shards are all committed.

Unreadable folders (chmod 000) are part of the draw only when not running as root: root reads
them anyway.
"""
from __future__ import annotations

import json
import re
import os
import shutil
import string
import tempfile
import traceback
from pathlib import Path

import hypothesis.strategies as st
import pytest
import torch
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings

from helpers import TEACHER, error_line, make_samples, make_shards, save_teacher
from usi_cache import cache_format as schema
from usi_cache.cli.main import main
from usi_cache.config.stages import CacheConfig, TrainConfig, ViewSpec
from usi_cache.shards.tars import write_shards

AS_ROOT = os.geteuid() == 0
# USI_FUZZ_EXAMPLES=500 for a longer hunt; --hypothesis-show-statistics lists the errors met.
FUZZ = settings(max_examples=int(os.environ.get("USI_FUZZ_EXAMPLES", "30")), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class RunsCode:
    def __reduce__(self):
        return (os.system, ("true",))


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """Tiny real inputs, made once: shards (2 of 3 samples), a teacher, its cache, bad files."""
    root = tmp_path_factory.mktemp("fuzz")
    d = {"root": root, "train": make_shards(root / "train", n=6, per_shard=3),
         "val": make_shards(root / "val", n=4, per_shard=2, seed=7),
         "ckpt": save_teacher(root / "teacher.pth"), "ckpt7": save_teacher(root / "teacher7.pth", num_classes=7)}
    write_shards(make_samples(4), ["a", "b", "c", "d", "e"], root / "val_other", per_shard=2, progress=False)
    d["val_other"] = root / "val_other"  # other class names
    (root / "text.txt").write_text("not a checkpoint\n")
    (root / "garbage.pth").write_bytes(bytes(range(256)) * 4)
    torch.save({"fc.weight": torch.zeros(2), "x": RunsCode()}, root / "evil.pth")
    (root / "empty").mkdir()
    (root / "badmanifest").mkdir()
    (root / "badmanifest" / "dataset.json").write_text("{not json")
    d["cache"] = root / "cache.zarr"
    r = CliRunner().invoke(main, ["cache", *argv(cache_base(d, d["cache"]))])
    assert r.exit_code == 0, r.output
    unreadable = root / "unreadable"
    shutil.copytree(d["train"], unreadable)
    unreadable.chmod(0)
    d["paths"] = {"missing": root / "nope", "file": root / "text.txt", "empty": root / "empty",
                  "badmanifest": root / "badmanifest", "unreadable": unreadable, "garbage": root / "garbage.pth",
                  "evil": root / "evil.pth", "ckpt7": root / "teacher7.pth"}
    yield d
    unreadable.chmod(0o755)


def cache_base(d, out) -> dict:
    return {"--shards": d["train"], "--teacher": TEACHER, "--teacher-checkpoint": d["ckpt"], "--views": 2,
            "--topk": 3, "--input-size": 16, "--batch-size": 8, "--workers": 0, "--out": out}


def train_base(d, out) -> dict:
    return {"--model": TEACHER, "--train-shards": d["train"], "--val-shards": d["val"], "--cache": d["cache"],
            "--out": out, "--epochs": 1, "--cooldown-epochs": 0, "--warmup-epochs": 0, "--batch-size": 4,
            "--input-size": 16, "--workers": 0, "--max-steps": 1, "--quiet": None}


def argv(opts: dict) -> list[str]:
    """`--name=value` (so that a value such as -5 is never read as an option); None = a flag."""
    return [k if v is None else f"{k}={v}" for k, v in opts.items()]


def complete(cache: Path) -> bool:
    group, attrs = schema.open_cache(cache)
    return bool(schema.completed_shards(group, schema.Layout.from_attrs(attrs)).all())


# ------------------------------------------------------------------------------- strategies

letters = st.text(string.ascii_letters, min_size=1, max_size=8)
not_int = st.one_of(letters, st.sampled_from(["1.5", "", "0x10", "1e3", "[1]", "nan", "½", "--"]))
non_positive = st.integers(max_value=0)
negative = st.integers(max_value=-1)
huge_seed = st.integers(min_value=2**63, max_value=2**80)
not_float = st.one_of(letters.filter(lambda s: s.lower() not in {"nan", "inf", "infinity"}),
                      st.sampled_from(["1,5", "", "--", "0x1p"]))
non_finite = st.sampled_from(["nan", "inf", "-inf", "NaN", "1e999"])
negative_float = st.floats(max_value=-1e-6, allow_nan=False, allow_infinity=False)
unknown_model = letters.map(lambda s: f"zz_{s}")
bad_triple = st.one_of(
    st.lists(st.floats(-10, 10), max_size=5).filter(lambda v: len(v) != 3).map(lambda v: ",".join(map(str, v))),
    st.lists(st.sampled_from(["nan", "inf", "x", ""]), min_size=3, max_size=3).map(",".join),
    letters)


def path_of(*names):
    names = [n for n in names if n != "unreadable" or not AS_ROOT]
    return st.sampled_from(names)


bad_folder = path_of("missing", "file", "empty", "badmanifest", "unreadable")
bad_checkpoint = path_of("missing", "file", "garbage", "evil", "ckpt7", "empty")

yaml_text = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=120),
    st.sampled_from(["cache: [1, 2\n", "train: {a: }}\n", "- 1\n- 2\n", "view: !!python/object/apply:os.system ['true']\n",
                     "cache:\n  seed: &a [*a]\n", "\t\tcache:\n", "%YAML 9.9\n---\n"]))
yaml_bytes = st.binary(max_size=80)


def wrong_yaml_value(kind: str):
    """A YAML value that is not valid for a config field of this kind."""
    return {
        "int": st.one_of(letters, st.floats(), st.booleans(), st.lists(st.integers(), max_size=2)),
        "int>=0": st.one_of(negative, letters, st.floats()),
        "int>=1": st.one_of(st.integers(max_value=0), letters, st.floats()),
        "bool": st.one_of(st.integers(), letters, st.floats()),
        "float>=0": st.one_of(negative_float, letters, st.sampled_from([float("nan"), float("inf")]), st.booleans()),
        "prob": st.one_of(st.floats(1.0001, 1e9), negative_float, letters),
        "triple": st.one_of(letters, st.lists(st.floats(allow_nan=False), max_size=5).filter(lambda v: len(v) != 3),
                            st.lists(st.sampled_from([float("nan"), float("inf")]), min_size=3, max_size=3)),
        "pair01": st.lists(st.floats(-2, 3, allow_nan=False), max_size=4).filter(
            lambda v: not (len(v) == 2 and 0 < v[0] <= v[1] <= 1)),
        "pair+": st.one_of(st.lists(st.floats(-2, 3, allow_nan=False), max_size=4).filter(
            lambda v: not (len(v) == 2 and 0 < v[0] <= v[1])), letters),
        "policy": st.one_of(letters.filter(lambda s: s != "rand"), letters.map(lambda s: f"rand-{s}"), st.integers()),
        "filter": st.one_of(letters.filter(lambda s: s not in ("nearest", "bilinear", "bicubic", "lanczos", "box",
                                                               "hamming")), st.integers()),
        "fill": st.one_of(st.lists(st.integers(-300, 600), min_size=3, max_size=3).filter(
            lambda v: any(not 0 <= c <= 255 for c in v)), st.lists(st.integers(0, 255), max_size=2)),
        "mix": st.one_of(letters,  # the section's old scalar shape (`mix: paired`)
                         letters.filter(lambda s: s not in ("none", "paired", "batch")).map(lambda s: {"mode": s}),
                         negative_float.map(lambda v: {"mixup": v}), st.floats(1.0001, 1e9).map(lambda v: {"prob": v})),
        "dict": st.one_of(st.integers(), letters, st.lists(st.integers(), min_size=1)),
        "crop": st.one_of(st.floats(1.0001, 100), st.floats(-5, 0), letters),
        "betas": st.one_of(st.lists(st.floats(0, 0.99), max_size=4).filter(lambda v: len(v) != 2),
                           st.lists(st.floats(1, 5), min_size=2, max_size=2)),
        "eps": st.one_of(st.floats(-1, 0), letters),
        "seed": st.one_of(negative, huge_seed, letters),
    }[kind]


VIEW_FIELDS = {"scale": "pair01", "ratio": "pair+", "hflip": "prob", "randaugment": "policy",
               "interpolation": "filter", "fill": "fill"}
CACHE_FIELDS = {"seed": "seed", "pretrained": "bool", "compile": "bool", "overwrite": "bool", "mean": "triple",
                "std": "triple", "mix": "mix"}
TRAIN_FIELDS = {"warmup_lr": "float>=0", "min_lr": "float>=0", "weight_decay": "float>=0", "betas": "betas",
                "eps": "eps", "eval_crop": "crop", "mix": "mix", "log_every": "int>=0", "amp": "bool",
                "channels_last": "bool", "shuffle_buffer": "int>=1", "model_kwargs": "dict", "seed": "seed",
                "kd_only": "bool", "lr": "float>=0"}
FIELD_NAMES = {"cache": {f.name for f in CacheConfig.__dataclass_fields__.values()},
               "train": {f.name for f in TrainConfig.__dataclass_fields__.values()},
               "view": {f.name for f in ViewSpec.__dataclass_fields__.values()}}


def structured_yaml(section: str, fields: dict):
    """A recipe that parses but is wrong: unknown section/key, a wrong type or value, a non-mapping."""
    def one(sec, table):
        return st.sampled_from(sorted(table)).flatmap(
            lambda k: wrong_yaml_value(table[k]).map(lambda v: {sec: {k: v}}))
    return st.one_of(
        one(section, fields), one("view", VIEW_FIELDS),
        letters.filter(lambda s: s not in ("cache", "train", "view")).map(lambda s: {s: {"x": 1}}),
        letters.filter(lambda s: s not in FIELD_NAMES[section]).map(lambda s: {section: {s: 1}}),
        st.sampled_from([section, "view"]).flatmap(lambda s: wrong_yaml_value("dict").map(lambda v: {s: v})),
    ).map(lambda d: yaml.safe_dump(d))


def config_mutation(section: str, fields: dict):
    return st.one_of(
        st.tuples(st.just("yaml"), st.one_of(yaml_text, structured_yaml(section, fields))),
        st.tuples(st.just("yaml-bytes"), yaml_bytes))


def opt(name, values):
    return st.tuples(st.just("opt"), st.just(name), values)


cache_mutation = st.one_of(
    opt("--views", st.one_of(non_positive, not_int)),
    opt("--topk", st.one_of(non_positive, not_int, st.integers(6, 10**6))),  # the shards have C = 5
    opt("--batch-size", st.one_of(non_positive, not_int)),
    opt("--input-size", st.one_of(non_positive, not_int)),
    opt("--workers", st.one_of(negative, not_int)),
    opt("--seed", st.one_of(negative, huge_seed, not_int)),
    opt("--mean", bad_triple),
    opt("--std", st.one_of(bad_triple, st.sampled_from(["0,1,1", "-1,1,1", "1,0,0"]))),
    opt("--teacher", st.one_of(unknown_model, st.just(""))),
    st.tuples(st.just("path"), st.just("--shards"), bad_folder),
    st.tuples(st.just("path"), st.just("--teacher-checkpoint"), bad_checkpoint),
    st.tuples(st.just("out-is-file"), st.booleans()),
    config_mutation("cache", CACHE_FIELDS),
)

train_mutation = st.one_of(
    *[opt(name, st.one_of(non_positive, not_int))
      for name in ("--epochs", "--batch-size", "--input-size", "--max-steps", "--repeated-aug")],
    *[opt(name, st.one_of(negative, not_int)) for name in ("--cooldown-epochs", "--warmup-epochs", "--workers")],
    opt("--repeated-aug", st.integers(3, 50)),  # the cache has V = 2
    *[opt(name, st.one_of(negative_float, non_finite, not_float)) for name in ("--lr", "--mixup", "--cutmix",
                                                                                "--kd-alpha")],
    opt("--kd-temperature", st.one_of(st.floats(-10, 0), non_finite, not_float)),
    opt("--ema-decay", st.one_of(st.floats(1, 1e6), negative_float, non_finite, not_float)),
    opt("--seed", st.one_of(negative, huge_seed, not_int)),
    opt("--model-kwargs", st.one_of(letters, st.sampled_from(["[1]", "1", '"x"', "null", "{", "{'a': 1}"]),
                                    letters.map(lambda s: json.dumps({f"zz_{s}": 1})))),
    opt("--model", unknown_model),
    opt("--teacher", st.just(TEACHER)),  # and --cache: both target sources
    st.tuples(st.just("path"), st.just("--teacher-checkpoint"), st.just("ckpt7")),  # without --teacher
    st.tuples(st.just("path"), st.just("--cache"), path_of("missing", "file", "empty", "unreadable")),
    st.tuples(st.just("path"), st.just("--train-shards"), bad_folder),
    st.tuples(st.just("path"), st.just("--val-shards"), st.one_of(bad_folder, st.just("val_other"))),
    st.tuples(st.just("path"), st.just("--pretrained-checkpoint"), bad_checkpoint),
    st.tuples(st.just("out-is-file"), st.just(False)),
    config_mutation("train", TRAIN_FIELDS),
)


def apply(w, base: dict, mutations, folder: Path) -> list[str]:
    opts = dict(base)
    config = None
    for m in mutations:
        if m[0] == "opt":
            opts[m[1]] = m[2]
        elif m[0] == "path":
            opts[m[1]] = w["paths"].get(m[2]) or w[m[2]]
        elif m[0] == "out-is-file":
            opts["--out"] = folder / "a_file"
            opts["--out"].write_text("I am not a cache\n")
            if m[1]:
                opts["--overwrite"] = None
        elif m[0] in ("yaml", "yaml-bytes"):
            config = folder / "recipe.yaml"
            config.write_bytes(m[1] if isinstance(m[1], bytes) else m[1].encode())
    return ([f"--config={config}"] if config else []) + argv(opts)


def check(r, what: str) -> bool:
    """No traceback, ever; on failure a one-line error. True when the run succeeded."""
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        tb = "".join(traceback.format_exception(r.exception))
        raise AssertionError(f"{what}: uncaught {type(r.exception).__name__}\n{tb}\noutput:\n{r.output}")
    assert "Traceback" not in r.output, r.output
    if r.exit_code == 0:
        event("succeeded")
        return True
    event(re.sub(r"/\S+", "PATH", error_line(r.output))[:60])  # --hypothesis-show-statistics
    return False


# ------------------------------------------------------------------------------------ tests

@pytest.mark.slow
def test_base_arguments_work(w, tmp_path):
    """The fuzz starts from arguments that succeed: every failure below is the mutation's."""
    r = CliRunner().invoke(main, ["cache", *argv(cache_base(w, tmp_path / "c.zarr"))])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["train", *argv(train_base(w, tmp_path / "run"))])
    assert r.exit_code == 0, r.output


@FUZZ
@given(mutations=st.lists(cache_mutation, min_size=1, max_size=3))
def test_fuzz_cache_command(w, mutations):
    folder = Path(tempfile.mkdtemp(dir=w["root"]))
    out = folder / "c.zarr"
    args = apply(w, cache_base(w, out), mutations, folder)
    r = CliRunner().invoke(main, ["cache", *args])
    ok = check(r, f"usi cache {' '.join(args)}")
    final_out = Path(args[[a.split("=")[0] for a in args].index("--out")].split("=", 1)[1])
    if schema.exists(final_out):
        # a cache that looks complete only ever comes from a run that succeeded
        assert complete(final_out) == ok, (ok, r.output)
    else:
        assert not ok
    shutil.rmtree(folder, ignore_errors=True)


@FUZZ
@given(mutations=st.lists(train_mutation, min_size=1, max_size=3))
def test_fuzz_train_command(w, mutations):
    folder = Path(tempfile.mkdtemp(dir=w["root"]))
    args = apply(w, train_base(w, folder / "run"), mutations, folder)
    r = CliRunner().invoke(main, ["train", *args])
    ok = check(r, f"usi train {' '.join(args)}")
    assert (folder / "run" / "last.pth").exists() == ok
    shutil.rmtree(folder, ignore_errors=True)
