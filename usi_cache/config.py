"""Frozen configs for each stage, loaded from YAML with strict checking.

A YAML recipe has one section per concern (`view`, `cache`, `train`); each maps onto one
frozen dataclass below. Every field carries its help text in its metadata (`setting`): the
command line's options and their `--help` are generated from it (cli_options.py), so a key,
its help and its default live in one place. Unknown keys and wrong types are errors that name
the key; values from the command line go through the same checks as YAML values.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type or out of range."""


def setting(default: Any = dataclasses.MISSING, doc: str = "", *, factory=None, flag: str | None = None,
            required: bool = False):
    """A config field with its help text `doc` (shown by --help). `flag` replaces the generated
    option name (--key, --section-key) where that reads badly; `required`: an empty value is an
    error, and --help says so instead of showing the empty default."""
    meta = {"help": doc, "flag": flag, "required": required}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True, kw_only=True)
class ViewSpec:
    """How one augmented view is drawn. Stored in every cache; stage 2 replays with it."""

    scale: tuple[float, float] = setting((0.08, 1.0), "RandomResizedCrop area fraction range (min,max).")
    ratio: tuple[float, float] = setting((0.75, 4 / 3), "RandomResizedCrop aspect-ratio range (min,max).")
    hflip: float = setting(0.5, "Probability of a horizontal flip.")
    randaugment: str = setting("rand-m7-mstd0.5-inc1", 'timm RandAugment policy; "" disables it.')
    interpolation: str = setting("bicubic", "Filter of the crop -> input-size resize: nearest, bilinear, "
                                            "bicubic, lanczos, box or hamming.")
    fill: tuple[int, int, int] = setting((0, 0, 0), "Fill colour (R,G,B) of geometric RandAugment ops.")

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
class MixConfig:
    """Mixup/CutMix, one recipe for both stages. Stage 1 mixes only in mode `paired` (the teacher
    sees each view mixed with a partner of its shard: exact targets); stage 2 in mode `batch`
    (each batch and its cached targets, linearly: an approximation). In mode `none` the other
    keys would be ignored, so setting one away from its default is an error."""

    mode: str = setting("none", "none: no mixing; paired (stage 1): the teacher sees each view mixed; "
                                "batch (stage 2): mix each batch and its targets.", flag="--mix")
    mixup: float = setting(0.8, "Mixup alpha (0 = off).", flag="--mixup")
    cutmix: float = setting(1.0, "CutMix alpha (0 = off).", flag="--cutmix")
    prob: float = setting(1.0, "Probability that a batch (paired cache: a view) is mixed.")
    switch: float = setting(0.5, "Probability of CutMix when both alphas are on.")

    def validate(self, where: str, modes: tuple[str, ...]) -> None:
        if self.mode not in modes:
            raise ConfigError(f"{where}.mode: expected {' or '.join(modes)}, got {self.mode!r}")
        for name in ("prob", "switch"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{where}.{name}: expected a probability, got {getattr(self, name)}")
        for name in ("mixup", "cutmix"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{where}.{name}: expected >= 0, got {getattr(self, name)}")
        if self.mode == "none":
            unused = [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)
                      if f.name != "mode" and getattr(self, f.name) != f.default]
            if unused:
                name, value = unused[0]
                mixing = next(m for m in modes if m != "none")
                raise ConfigError(f"{where}.{name}: set to {value}, but {where}.mode is none, which ignores it: "
                                  f"set {where}.mode to {mixing}, or drop the key")

    def sample_kwargs(self) -> dict:
        """The keywords of mixing.sample_mix / sample_pair; mode none never mixes."""
        if self.mode == "none":
            return {"mixup": 0.0, "cutmix": 0.0, "prob": 0.0, "switch": self.switch}
        return {"mixup": self.mixup, "cutmix": self.cutmix, "prob": self.prob, "switch": self.switch}


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """Stage 1: run the teacher over V augmented views of every shard sample."""

    shards: str = setting("", "Folder (or URL) holding dataset.json and the WebDataset tars.", required=True)
    out: str = setting("", "The Zarr cache to create or resume.", required=True)
    teacher: str = setting("", "timm model name of the teacher (USI names such as tresnet_l_v2 accepted).",
                           required=True)
    teacher_checkpoint: str | None = setting(None, "Teacher state_dict file; null = random (seeded) or "
                                                   "pretrained weights. Excludes pretrained.")
    pretrained: bool = setting(False, "Download timm's pretrained weights (needs the network). "
                                      "Excludes teacher_checkpoint.")
    random_teacher: bool = setting(False, "Cache a randomly initialised (seeded) teacher on purpose (tests, "
                                          "benchmarks); without it, no checkpoint and no pretrained is an error.")
    views: int = setting(8, "V: augmented views per image (with add_views: the cache's V before the grow).")
    add_views: int = setting(0, "Grow the existing cache `out` by N views (V .. V+N-1) without rewriting it; "
                                "rerunning resumes a killed grow. 0 = create or resume.")
    topk: int = setting(10, "k: logits kept per view.")
    seed: int = setting(42, "View seed: views are a pure function of (seed, key, view index).")
    input_size: int | None = setting(None, "Teacher input size; null = the model's default.")
    mean: tuple[float, float, float] | None = setting(None, "Normalisation mean (R,G,B); null = from the "
                                                            "model's pretrained config.")
    std: tuple[float, float, float] | None = setting(None, "Normalisation std (R,G,B); null = the model's.")
    batch_size: int = setting(64, "Teacher batch, in views.")
    workers: int = setting(2, "Decode/augment worker processes per rank.")
    compile: bool = setting(False, "torch.compile the teacher (CUDA only; ignored on CPU).")
    teacher_precision: str = setting("auto", "Teacher forward precision: fp32, fp16, bf16, or auto "
                                             "(fp16 on CUDA, fp32 on CPU).")
    audit: int = setting(0, "Then re-run the teacher with full logits on N cached views and store the "
                            "fidelity table (plain caches only); 0 = off.")
    overwrite: bool = setting(False, "Replace an existing cache made with another config.")
    part: str = setting("", "Compute only part I of N (I/N, 0 <= I < N) as an independent job, no process group: "
                            "the shards i with i mod N = I; auto: I and N from a Slurm array; auto/N: I from "
                            "SLURM_ARRAY_TASK_ID or JOB_COMPLETION_INDEX. \"\" = every shard.")
    mix: MixConfig = setting(factory=MixConfig, doc="Mixing: only mode paired mixes in stage 1.")
    view: ViewSpec = setting(factory=ViewSpec, doc="How each view is drawn.")

    def validate(self) -> None:
        self.view.validate()
        self.mix.validate("cache.mix", ("none", "paired"))
        for name in ("views", "topk", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"cache.{name}: expected a positive integer, got {getattr(self, name)}")
        if self.workers < 0:
            raise ConfigError(f"cache.workers: expected >= 0, got {self.workers}")
        if self.add_views < 0:
            raise ConfigError(f"cache.add_views: expected >= 0 views to add, got {self.add_views}")
        if self.add_views and self.overwrite:
            raise ConfigError("cache.add_views: grows the existing cache; it cannot be combined with overwrite")
        if self.teacher_precision not in ("auto", "fp32", "fp16", "bf16"):
            raise ConfigError(f"cache.teacher_precision: expected auto, fp32, fp16 or bf16, "
                              f"got {self.teacher_precision!r}")
        if self.audit < 0:
            raise ConfigError(f"cache.audit: expected >= 0 views, got {self.audit}")
        if self.audit and self.mix.mode == "paired":
            raise ConfigError("cache.audit: only plain caches are audited (a paired view is a mixed image)")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"cache.seed: expected 0 <= seed < 2**63, got {self.seed}")
        if self.input_size is not None and self.input_size < 1:
            raise ConfigError(f"cache.input_size: expected a positive integer, got {self.input_size}")
        if self.pretrained and self.teacher_checkpoint:
            raise ConfigError("cache.pretrained: excludes cache.teacher_checkpoint (the checkpoint would replace "
                              "the downloaded weights): give one of them")
        if self.random_teacher and (self.pretrained or self.teacher_checkpoint):
            raise ConfigError("cache.random_teacher: excludes cache.teacher_checkpoint and cache.pretrained")
        if self.part:
            from .parts import check_part_spec  # (parsed here so a bad part fails before any work)
            check_part_spec(self)
        _check_required(self, "cache")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Stage 2: train a timm student (the USI recipe) against a cache, labels or an online teacher."""

    model: str = setting("", "timm model name of the student.", required=True)
    model_kwargs: dict = setting(factory=dict, doc='Passed to timm.create_model, as JSON: '
                                                   '{"drop_path_rate": 0.1}.')
    pretrained_checkpoint: str | None = setting(None, "Start from these weights (fine-tuning).")
    train_shards: str = setting("", "Train shard folder (holding dataset.json).", required=True)
    val_shards: str = setting("", "Validation shard folder.", required=True)
    cache: str | None = setting(None, "Teacher cache (offline KD); null = labels only, or online KD with "
                                      "teacher. Excludes teacher.")
    teacher: str | None = setting(None, "Online KD: run this timm teacher on every batch. Excludes cache.")
    teacher_checkpoint: str | None = setting(None, "Weights of the online teacher (needs teacher).")
    out: str = setting("", "Run directory.", required=True)
    epochs: int = setting(300, "Cosine length, in epochs.")
    cooldown_epochs: int = setting(10, "Extra epochs at min_lr after the cosine.")
    warmup_epochs: int = setting(5, "Linear warmup epochs, from warmup_lr to lr.")
    warmup_lr: float = setting(1e-4, "Learning rate the warmup starts from (unused without warmup epochs).")
    lr: float = setting(2e-3, "Peak learning rate; not scaled with the batch size (USI).")
    min_lr: float = setting(1e-6, "Learning rate at the end of the cosine and during the cooldown.")
    weight_decay: float = setting(2e-2, "AdamW weight decay; not applied to norm and bias parameters.")
    betas: tuple[float, float] = setting((0.9, 0.999), "AdamW betas (b1,b2).")
    eps: float = setting(1e-8, "AdamW epsilon.")
    batch_size: int = setting(128, "Batch size per process.")
    input_size: int = setting(224, "Student input size.")
    eval_crop: float = setting(0.95, "Validation: resize to input_size / eval_crop, then centre crop.")
    mix: MixConfig = setting(factory=lambda: MixConfig(mode="batch"),
                             doc="Batch mixing; not used with a paired cache (its views are mixed already).")
    kd_alpha: float = setting(5.0, "Weight of the KD term (unused without cache or teacher).")
    kd_temperature: float = setting(1.0, "KD temperature; T != 1 approximates the tail "
                                         "(unused without cache or teacher).")
    kd_only: bool = setting(False, "Drop the ground-truth CE term (needs cache or teacher).")
    ema_decay: float = setting(0.99996, "EMA of the weights, updated every step; 0 = no EMA.")
    amp: bool = setting(True, "bf16 autocast (CUDA only; ignored on CPU).")
    channels_last: bool = setting(True, "channels_last memory format (CUDA only; ignored on CPU).")
    seed: int = setting(42, "Seed of the epoch plan, mixing and the student's init.")
    workers: int = setting(2, "Data-loading processes per rank.")
    shuffle_buffer: int = setting(1000, "Samples held for shuffling, per worker.")
    repeated_aug: int = setting(1, "Each sample is seen with this many distinct views per epoch "
                                   "(same steps; USI: 3 when distributed).")
    max_steps: int | None = setting(None, "Cap on steps per epoch (smoke tests, benchmarks); null = none.")
    allow_replay_mismatch: bool = setting(False, "Train although this machine's decoders re-render the "
                                                 "cache's views differently.")
    compile: bool = setting(False, "torch.compile the student's training forward (evaluation runs eager); "
                                    "the first compile takes minutes on a CPU: meant for GPUs.")
    log_every: int = setting(50, "Steps between per-step loss/lr lines in log.jsonl; 0 = off.")
    tensorboard: bool = setting(False, "Also write TensorBoard event files to the (local) run folder; needs "
                                        "the tensorboard extra.")
    view: ViewSpec = setting(factory=ViewSpec, doc="Views of label-only and online runs; a cache brings its own.")

    def validate(self) -> None:
        self.view.validate()
        self.mix.validate("train.mix", ("batch", "none"))
        _check_required(self, "train")
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
        if self.kd_only and not (self.cache or self.teacher):
            raise ConfigError("train.kd_only: needs a teacher (train.cache or train.teacher); without one "
                              "there is no KD term to keep")
        if not 0 < self.eval_crop <= 1:
            raise ConfigError(f"train.eval_crop: expected 0 < crop <= 1, got {self.eval_crop}")
        for name in ("kd_alpha", "lr", "min_lr", "warmup_lr", "weight_decay"):
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


def _check_required(cfg, section: str) -> None:
    for f in dataclasses.fields(cfg):
        if f.metadata.get("required") and not getattr(cfg, f.name):
            raise ConfigError(f"{section}.{f.name}: required: {f.metadata['help'][0].lower()}{f.metadata['help'][1:]}")


# Keys that moved: old key -> its key now (relative to the stage's section).
MOVED = {"mixup": "mix.mixup", "cutmix": "mix.cutmix", "mix_prob": "mix.prob", "mix_switch": "mix.switch"}
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


def from_dict(cls: type, data: dict, where: str, base=None):
    """Build dataclass `cls` from `data` over `base` (default: the class defaults), nested sections
    included; unknown keys and wrong types raise ConfigError naming the key."""
    base = cls() if base is None else base
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in sorted(set(data) - names, key=str):  # YAML keys need not be strings
        if key in MOVED and "mix" in names:
            raise ConfigError(f"{where}.{key}: moved to {where}.{MOVED[key]}")
        raise ConfigError(f"{where}.{key}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for key, value in data.items():
        tp, where_key = hints[key], f"{where}.{key}"
        if dataclasses.is_dataclass(tp) and not isinstance(value, tp):
            if not isinstance(value, dict):
                raise ConfigError(_not_a_section(where_key, value))
            kwargs[key] = from_dict(tp, value, where_key, getattr(base, key))
        else:
            kwargs[key] = _check_type(value, tp, where_key)
    return dataclasses.replace(base, **kwargs)


def _not_a_section(where: str, value) -> str:
    if where.endswith(".mix") and isinstance(value, str):  # the old `mix: paired`
        return f"{where}: is a section now: write `mix: {{mode: {value}}}` (on the command line: --mix {value})"
    return f"{where}: expected a mapping of keys, got {value!r:.80}"


RECIPES = "configs"  # packaged recipes: usi_cache/configs links to the repository's configs/


def recipe_path(name: str) -> Path:
    """A recipe shipped inside the package, e.g. recipe_path("usi.yaml")."""
    folder = importlib.resources.files("usi_cache") / RECIPES
    path = folder / name
    if not path.is_file():
        known = sorted(p.name for p in folder.iterdir() if p.name.endswith(".yaml")) if folder.is_dir() else []
        raise ConfigError(f"{name}: no such packaged recipe (packaged: {', '.join(known) or 'none'})")
    return Path(str(path))  # wheels install unzipped: a real file


def read_yaml(path: str | Path | None) -> dict:
    """Read a recipe YAML (safe loader); None gives an empty recipe. A bare name that is not a
    file here, such as `usi.yaml`, is looked up among the packaged recipes."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file() and path.parent == Path("."):
        try:
            path = recipe_path(path.name)
        except ConfigError:
            pass
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


def recipe_section(cls: type, section: str, recipe: dict, path=None) -> dict:
    """The YAML keys of stage `section`: its section, plus the shared `view` section."""
    for name in (section, "view"):
        if not isinstance(recipe.get(name) or {}, dict):
            raise ConfigError(f"{path}: section {name!r}: expected a mapping of keys, got {recipe[name]!r:.80}")
    data = dict(recipe.get(section) or {})
    if "view" in recipe and "view" in {f.name for f in dataclasses.fields(cls)}:
        if "view" in data:  # one of the two would be ignored
            raise ConfigError(f"{path}: {section}.view: also given as the top-level view section: give one")
        data["view"] = dict(recipe["view"] or {})
    return data


def load_stage_config(cls: type, section: str, path: str | Path | None, overrides: dict, *,
                      none_means_unset: bool = True):
    """Dataclass defaults < YAML section `section` (+ the shared `view` section) < overrides.

    Override keys are field names or dotted paths into sections (`mix.prob`); a mapping given
    for a section is merged key by key. Overrides whose value is None were not given, unless
    `none_means_unset` is off (the command line passes only what it was given: null is a value).
    """
    data = recipe_section(cls, section, read_yaml(path), path)
    given = {k: v for k, v in overrides.items() if v is not None or not none_means_unset}
    if given.get("mix.mode") == "none" and isinstance(data.get("mix"), dict):
        # mixing switched off on the command line: the recipe's other mix keys go with it (only
        # mix keys given on the command line as well are an error: they would be ignored)
        data["mix"] = {}
    for key, value in given.items():
        _assign(cls, data, key.split("."), value, section)
    cfg = from_dict(cls, data, section)
    cfg.validate()
    return cfg


def _assign(cls: type, data: dict, parts: list[str], value, where: str) -> None:
    """data[parts...] = value, merging mappings given for a nested section."""
    key, where = parts[0], f"{where}.{parts[0]}"
    tp = typing.get_type_hints(cls).get(key)
    if tp is None or not dataclasses.is_dataclass(tp) or (len(parts) == 1 and not isinstance(value, dict)):
        if len(parts) > 1:
            field_type(cls, ".".join(parts), where.rsplit(".", 1)[0])  # raises: not a section
        data[key] = value
        return
    sub = data.get(key)
    if sub is None:
        sub = {}
    elif isinstance(sub, tp):
        sub = to_dict(sub)
    elif not isinstance(sub, dict):
        raise ConfigError(_not_a_section(where, sub))
    data[key] = sub = dict(sub)
    if len(parts) > 1:
        _assign(tp, sub, parts[1:], value, where)
    else:
        for k, v in value.items():
            _assign(tp, sub, [k], v, where)


def field_type(cls: type, path: str, where: str):
    """The type of the field at dotted `path` of `cls`; ConfigError for an unknown key."""
    for i, key in enumerate(path.split(".")):
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"{where}: not a section, has no key {key!r}")
        where = f"{where}.{key}"
        hints = typing.get_type_hints(cls)
        if key not in hints:
            from_dict(cls, {key: None}, where.rsplit(".", 1)[0])  # raises: moved or unknown key
        cls = hints[key]
    return cls


def parse_text(text: str, tp: Any, where: str) -> Any:
    """A command-line value (text) for a field of type `tp`, checked like a YAML value.

    Numbers as Python writes them (1e-3 included, which YAML 1.1 reads as a string), pairs and
    triples comma-separated (0.35,1), booleans true/false, mappings as JSON, null for None.
    """
    return _check_type(_from_text(text, tp, where), tp, where)


def _from_text(text: str, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if text.strip().lower() == "null":
            return None
        return _from_text(text, args[0], where)  # the configs' unions are `X | None`
    if origin is tuple:
        args = typing.get_args(tp)
        parts = [p.strip() for p in text.strip().strip("[]()").split(",")]
        if len(parts) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} comma-separated values, got {text!r}")
        return [_from_text(p, a, f"{where}[{i}]") for i, (p, a) in enumerate(zip(parts, args))]
    if dataclasses.is_dataclass(tp):
        raise ConfigError(f"{where}: is a section: set its keys, e.g. {where}.<key>=VALUE")
    if tp is bool:
        word = text.strip().lower()
        if word in ("true", "false"):
            return word == "true"
        raise ConfigError(f"{where}: expected true/false, got {text!r}")
    if tp is dict:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise ConfigError(f"{where}: expected a JSON object, e.g. '{{\"drop_path_rate\": 0.1}}', "
                              f"got {text!r}") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {text!r}")
        return value
    converters = {int: (int, "an integer"), float: (float, "a number"), str: (str, "a string")}
    convert, what = converters[tp]
    try:
        return convert(text.strip() if tp is not str else text)
    except ValueError:
        raise ConfigError(f"{where}: expected {what}, got {text!r}") from None


def parse_assignment(cls: type, section: str, item: str) -> tuple[str, Any]:
    """`--set KEY=VALUE` -> (dotted key, checked value). KEY may start with the section name."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. {section}.seed=1")
    if key.startswith(section + "."):
        key = key[len(section) + 1:]
    return key, parse_text(text, field_type(cls, key, section), f"{section}.{key}")


@dataclass(frozen=True)
class Setting:
    """One leaf key of a stage config, as the command line shows it."""

    path: str  # dotted key in the section, e.g. "mix.prob"
    type: Any
    default: Any  # the stage's default (a nested section's default comes from its parent)
    help: str
    flag: str  # the option, e.g. --mix-prob
    required: bool


def settings(cls: type, base=None, prefix: str = "") -> list[Setting]:
    """Every leaf key of config class `cls`, nested sections included, in declaration order."""
    base = cls() if base is None else base
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp, value, path = hints[f.name], getattr(base, f.name), prefix + f.name
        if dataclasses.is_dataclass(tp):
            out += settings(tp, value, path + ".")
            continue
        flag = f.metadata.get("flag") or "--" + path.replace(".", "-").replace("_", "-")
        out.append(Setting(path, tp, value, f.metadata.get("help", ""), flag, f.metadata.get("required", False)))
    return out


def upgrade_saved(cls: type, saved: dict, where: str = "saved config") -> dict:
    """A config dict saved by an older version (a run's config.json or checkpoint) in today's
    shape: the flat mix keys move into the `mix` section (an old train config mixed batches),
    keys added since take their defaults."""
    data = dict(saved)
    if "mix" in {f.name for f in dataclasses.fields(cls)}:
        mix = {new.split(".", 1)[1]: data.pop(old) for old, new in MOVED.items() if old in data}
        if isinstance(data.get("mix"), str):
            mix["mode"] = data.pop("mix")
        if mix:
            data["mix"] = {**data.get("mix", {}), **mix}
    return to_dict(from_dict(cls, data, where))


def to_dict(cfg) -> dict:
    """A JSON-ready dict of a config (tuples become lists)."""
    return _jsonable(dataclasses.asdict(cfg))


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x
