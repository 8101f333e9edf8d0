"""Frozen configs for each stage, loaded from YAML with strict checking.

A YAML recipe has one section per concern (`view`, `cache`, `train`); each maps onto one
frozen dataclass below. Unknown keys and wrong types are errors that name the key, and
command-line options override YAML values (None = not given on the command line).
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type or out of range."""


@dataclass(frozen=True, kw_only=True)
class ViewSpec:
    """How one augmented view is drawn. Stored in every cache; stage 2 replays with it."""

    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area fraction range
    ratio: tuple[float, float] = (0.75, 4 / 3)  # RandomResizedCrop aspect-ratio range
    hflip: float = 0.5  # probability of a horizontal flip
    randaugment: str = "rand-m7-mstd0.5-inc1"  # timm RandAugment policy; "" disables
    interpolation: str = "bicubic"  # filter for the crop -> input-size resize
    fill: tuple[int, int, int] = (0, 0, 0)  # fill colour of geometric RandAugment ops

    def validate(self) -> None:
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"view.scale: expected 0 < min <= max <= 1, got {list(self.scale)}")
        lo, hi = self.ratio
        if not 0 < lo <= hi:
            raise ConfigError(f"view.ratio: expected 0 < min <= max, got {list(self.ratio)}")
        if not 0 <= self.hflip <= 1:
            raise ConfigError(f"view.hflip: expected a probability in [0, 1], got {self.hflip}")
        if self.interpolation not in ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"):
            raise ConfigError(f"view.interpolation: unknown filter {self.interpolation!r}")
        if any(not 0 <= c <= 255 for c in self.fill):
            raise ConfigError(f"view.fill: expected three ints in [0, 255], got {list(self.fill)}")
        from .randaugment import parse_policy  # (parsed here so a bad policy fails before any work)
        try:
            parse_policy(self.randaugment)
        except ValueError as e:
            raise ConfigError(f"view.randaugment: {e}") from None


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """Stage 1: run the teacher over V augmented views of every shard sample."""

    shards: str = ""  # folder holding dataset.json and the WebDataset tars
    out: str = ""  # the Zarr cache to create or resume
    teacher: str = ""  # timm model name (USI aliases such as tresnet_l_v2 accepted)
    teacher_checkpoint: str | None = None  # state_dict file; None = random or pretrained weights
    pretrained: bool = False  # download timm's pretrained weights (needs the network)
    views: int = 8  # V: augmented views per image
    topk: int = 10  # k: logits kept per view
    seed: int = 42  # view seed: views are a pure function of (seed, key, view index)
    input_size: int | None = None  # teacher input size; None = the model's default
    mean: tuple[float, float, float] | None = None  # None = from the model's pretrained config
    std: tuple[float, float, float] | None = None
    batch_size: int = 64  # teacher batch (views)
    workers: int = 2  # decode/augment worker processes per rank
    compile: bool = False  # torch.compile the teacher (CUDA only)
    teacher_precision: str = "auto"  # fp32 | fp16 | bf16 forward; auto = fp16 on CUDA, fp32 on CPU
    audit: int = 0  # then re-run the teacher with full logits on N cached views (audit.py); 0 = off
    overwrite: bool = False  # replace an existing cache made with another config
    mix: str = "none"  # "paired": the teacher sees each view mixed with a partner of its shard
    mixup: float = 0.8  # paired mixing, drawn per view: mixup alpha (0 = off)
    cutmix: float = 1.0  # cutmix alpha (0 = off)
    mix_prob: float = 1.0  # probability that a view is mixed
    mix_switch: float = 0.5  # probability of cutmix when both are on
    view: ViewSpec = field(default_factory=ViewSpec)

    def validate(self) -> None:
        self.view.validate()
        if self.mix not in ("none", "paired"):
            raise ConfigError(f"cache.mix: expected 'none' or 'paired', got {self.mix!r}")
        for name in ("mix_prob", "mix_switch"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"cache.{name}: expected a probability, got {getattr(self, name)}")
        for name in ("mixup", "cutmix"):
            if getattr(self, name) < 0:
                raise ConfigError(f"cache.{name}: expected >= 0, got {getattr(self, name)}")
        for name in ("views", "topk", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"cache.{name}: expected a positive integer, got {getattr(self, name)}")
        if self.workers < 0:
            raise ConfigError(f"cache.workers: expected >= 0, got {self.workers}")
        if self.teacher_precision not in ("auto", "fp32", "fp16", "bf16"):
            raise ConfigError(f"cache.teacher_precision: expected auto, fp32, fp16 or bf16, "
                              f"got {self.teacher_precision!r}")
        if self.audit < 0:
            raise ConfigError(f"cache.audit: expected >= 0 views, got {self.audit}")
        if self.audit and self.mix == "paired":
            raise ConfigError("cache.audit: only plain caches are audited (a paired view is a mixed image)")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"cache.seed: expected 0 <= seed < 2**63, got {self.seed}")
        if self.input_size is not None and self.input_size < 1:
            raise ConfigError(f"cache.input_size: expected a positive integer, got {self.input_size}")
        if not self.shards:
            raise ConfigError("cache.shards: required (the folder holding dataset.json)")
        if not self.out:
            raise ConfigError("cache.out: required (path of the Zarr cache)")
        if not self.teacher:
            raise ConfigError("cache.teacher: required (a timm model name)")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Stage 2: train a timm student (the USI recipe) against a cache, labels or an online teacher."""

    model: str = ""  # timm model name of the student
    model_kwargs: dict = field(default_factory=dict)  # passed to timm.create_model (drop_path_rate, ...)
    pretrained_checkpoint: str | None = None  # start from these weights (fine-tuning)
    train_shards: str = ""
    val_shards: str = ""
    cache: str | None = None  # teacher cache; None = labels only (or online KD with `teacher`)
    teacher: str | None = None  # online distillation: run this teacher on every batch
    teacher_checkpoint: str | None = None
    out: str = ""  # run directory
    epochs: int = 300  # cosine length (epochs)
    cooldown_epochs: int = 10  # extra epochs at min_lr after the cosine
    warmup_epochs: int = 5
    warmup_lr: float = 1e-4  # warmup starts here
    lr: float = 2e-3  # peak lr; not scaled with the batch size (USI)
    min_lr: float = 1e-6
    weight_decay: float = 2e-2  # not applied to norm and bias parameters
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    batch_size: int = 128  # per process
    input_size: int = 224  # student input size
    eval_crop: float = 0.95  # validation: resize to input_size / eval_crop, centre crop
    mixup: float = 0.8  # mixup alpha (0 = off); mixes cached targets linearly: an approximation
    cutmix: float = 1.0  # cutmix alpha (0 = off); same approximation
    mix_prob: float = 1.0  # probability of mixing a batch
    mix_switch: float = 0.5  # probability of cutmix when both are on
    kd_alpha: float = 5.0  # weight of the KD term
    kd_temperature: float = 1.0  # T != 1 approximates the tail (see targets.teacher_distribution)
    kd_only: bool = False  # drop the ground-truth CE term
    ema_decay: float = 0.99996  # EMA of the weights, updated every step; 0 = no EMA
    amp: bool = True  # bf16 autocast (CUDA only)
    channels_last: bool = True  # (CUDA only)
    seed: int = 42
    workers: int = 2  # data-loading processes per rank
    shuffle_buffer: int = 1000  # samples held for shuffling, per worker
    repeated_aug: int = 1  # each sample seen with this many distinct views per epoch (same steps)
    max_steps: int | None = None  # cap on steps per epoch (smoke tests, benchmarks)
    allow_replay_mismatch: bool = False  # train although this machine re-renders the cache's views differently
    compile: bool = False  # torch.compile the student's training forward
    log_every: int = 50  # steps between per-step loss/lr lines in log.jsonl; 0 = off
    tensorboard: bool = False  # also write TensorBoard event files to the run folder
    view: ViewSpec = field(default_factory=ViewSpec)  # label-only/online views; a cache brings its own

    def validate(self) -> None:
        self.view.validate()
        for name in ("model", "train_shards", "val_shards", "out"):
            if not getattr(self, name):
                raise ConfigError(f"train.{name}: required")
        for name in ("epochs", "batch_size", "input_size", "repeated_aug", "shuffle_buffer"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: expected a positive integer, got {getattr(self, name)}")
        for name in ("cooldown_epochs", "warmup_epochs", "workers", "log_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}: expected >= 0, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"train.max_steps: expected a positive integer, got {self.max_steps}")
        if not 0 <= self.seed < 2**63:  # torch.manual_seed overflows beyond 64 bits
            raise ConfigError(f"train.seed: expected 0 <= seed < 2**63, got {self.seed}")
        if self.cache and self.teacher:
            raise ConfigError("train: give either cache (offline KD) or teacher (online KD), not both")
        if self.teacher_checkpoint and not self.teacher:
            raise ConfigError("train.teacher_checkpoint: given without train.teacher")
        if not 0 < self.eval_crop <= 1:
            raise ConfigError(f"train.eval_crop: expected 0 < crop <= 1, got {self.eval_crop}")
        for name in ("mix_prob", "mix_switch"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"train.{name}: expected a probability, got {getattr(self, name)}")
        for name in ("mixup", "cutmix", "kd_alpha", "lr", "min_lr", "warmup_lr", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}: expected >= 0, got {getattr(self, name)}")
        if self.kd_temperature <= 0:
            raise ConfigError(f"train.kd_temperature: expected > 0, got {self.kd_temperature}")
        if self.eps <= 0:
            raise ConfigError(f"train.eps: expected > 0, got {self.eps}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"train.betas: expected two values in [0, 1), got {list(self.betas)}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"train.ema_decay: expected 0 <= decay < 1, got {self.ema_decay}")


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """Return `value` converted to `tp`, or raise ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_check_type(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                value = float(value)
            except OverflowError:  # an int too large for a float
                raise ConfigError(f"{where}: expected a finite number, got {value!r}") from None
            if not math.isfinite(value):  # nan/inf would silently poison a cache or a run
                raise ConfigError(f"{where}: expected a finite number, got {value!r}")
            return value
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if tp is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    raise ConfigError(f"{where}: unsupported config type {tp}")


def from_dict(cls: type, data: dict, where: str):
    """Build dataclass `cls` from `data`; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names, key=str)  # YAML keys need not be strings
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {k: _check_type(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def read_yaml(path: str | Path | None) -> dict:
    """Read a recipe YAML (safe loader); None gives an empty recipe."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}  # safe: a !!python/... tag is an error
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (not valid UTF-8)") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    unknown = sorted(set(data) - {"view", "cache", "train"}, key=str)
    if unknown:
        raise ConfigError(f"{path}: unknown section {unknown[0]!r} (known: cache, train, view)")
    return data


def load_stage_config(cls: type, section: str, path: str | Path | None, overrides: dict):
    """Merge YAML section `section` (+ the shared `view` section) with CLI overrides.

    Overrides whose value is None were not given and leave the YAML value in place.
    """
    recipe = read_yaml(path)
    for name in (section, "view"):
        if not isinstance(recipe.get(name) or {}, dict):
            raise ConfigError(f"{path}: section {name!r}: expected a mapping of keys, got {recipe[name]!r:.80}")
    data = dict(recipe.get(section) or {})
    if "view" in recipe and "view" in {f.name for f in dataclasses.fields(cls)}:
        data["view"] = dict(recipe["view"] or {})
    for key, value in overrides.items():
        if value is not None:
            data[key] = value
    cfg = from_dict(cls, data, section)
    cfg.validate()
    return cfg


def to_dict(cfg) -> dict:
    """A JSON-ready dict of a config (tuples become lists)."""
    return _jsonable(dataclasses.asdict(cfg))


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x
