"""The frozen config of each stage, one dataclass per YAML section (`view`, `mix`, `cache`,
`train`). Every field carries its help text in its metadata (`setting`): the command line's
options and their `--help` are generated from it (cli/options.py), so a key, its help and its
default live in one place. Loading, checking types and `--set` are parser.py's job.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from usi_cache.config.errors import ConfigError


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
        from usi_cache.views.randaugment import parse_policy  # (parsed here so a bad policy fails before any work)
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


def _parse_count(text: str, spec: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"cache.part: {spec!r}: N must be a positive integer (expected I/N, auto or auto/N)")
    return int(text)


def check_part_spec(cfg: "CacheConfig") -> None:
    """The syntax of cache.part, and what it excludes (the environment is read by `resolve_part`)."""
    spec = cfg.part.strip()
    head, sep, tail = spec.partition("/")
    if head != "auto":
        if not sep or not head.isdigit():
            raise ConfigError(f"cache.part: {spec!r}: expected I/N (0 <= I < N), auto or auto/N")
        index, count = int(head), _parse_count(tail, spec)
        if index >= count:
            raise ConfigError(f"cache.part: {spec!r}: part {index} of {count} does not exist: "
                              f"expected I/N with 0 <= I < N (parts count from 0)")
    elif sep:
        _parse_count(tail, spec)
    if cfg.overwrite:
        raise ConfigError("cache.part: a part joins the cache its siblings write; it cannot be combined with "
                          "overwrite (delete the old cache once, before the parts start)")


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """Stage 1: run the teacher over V augmented views of every shard sample."""

    shards: str = setting("", "Folder (or URL) holding dataset.json and the WebDataset tars.", required=True)
    out: str = setting("", "The Zarr cache to create or resume.", required=True)
    teacher: tuple[str, ...] = setting((), "timm model name of the teacher (USI names such as tresnet_l_v2 "
                                           "accepted); several (a,b,c) = an ensemble: the cache stores their "
                                           "weighted mixture of probabilities.", required=True)
    teacher_checkpoint: tuple[str, ...] | None = setting(None, "Teacher state_dict file, one per teacher; null = "
                                                               "pretrained weights, or a random seeded teacher with "
                                                               "random_teacher. Excludes pretrained.")
    teacher_weights: tuple[float, ...] | None = setting(None, "Ensemble: each teacher's weight in the mixture "
                                                              "(normalised to sum 1); null = equal.")
    pretrained: bool = setting(False, "Download timm's pretrained weights (needs the network). "
                                      "Excludes teacher_checkpoint.")
    random_teacher: bool = setting(False, "Cache a randomly initialised (seeded) teacher on purpose (tests, "
                                          "benchmarks); without it, no checkpoint and no pretrained is an error.")
    views: int = setting(8, "V: augmented views per image (with add_views: the cache's V before the grow).")
    add_views: int = setting(0, "Grow the existing cache `out` by N views (V .. V+N-1) without rewriting it; "
                                "rerunning resumes a killed grow. 0 = create or resume.")
    topk: int = setting(10, "k: logits kept per view.")
    seed: int = setting(42, "View seed: views are a pure function of (seed, key, view index).")
    input_size: tuple[int, ...] | None = setting(None, "Teacher input size: one for every teacher or one per "
                                                       "teacher; null = each model's default.")
    mean: tuple[float, float, float] | None = setting(None, "Normalisation mean (R,G,B) of every teacher; null = "
                                                            "from each model's pretrained config.")
    std: tuple[float, float, float] | None = setting(None, "Normalisation std (R,G,B); null = each model's.")
    batch_size: int = setting(64, "Teacher batch, in views.")
    workers: int = setting(2, "Decode/augment worker processes per rank.")
    compile: bool = setting(False, "torch.compile the teacher (CUDA only; ignored on CPU).")
    teacher_precision: tuple[str, ...] = setting(("auto",), "Teacher forward precision: fp32, fp16, bf16, or auto "
                                                           "(fp16 on CUDA, fp32 on CPU); one for every teacher "
                                                           "or one per teacher.")
    audit: int = setting(0, "Then re-run the teacher with full logits on N cached views and store the "
                            "fidelity table (a paired cache: on its mixed views); 0 = off.")
    overwrite: bool = setting(False, "Replace an existing cache made with another config.")
    part: str = setting("", "Compute only part I of N (I/N, 0 <= I < N) as an independent job, no process group: "
                            "the shards i with i mod N = I; auto: I and N from a Slurm array; auto/N: I from "
                            "SLURM_ARRAY_TASK_ID or JOB_COMPLETION_INDEX. \"\" = every shard.")
    mix: MixConfig = setting(factory=MixConfig, doc="Mixing: only mode paired mixes in stage 1.")
    view: ViewSpec = setting(factory=ViewSpec, doc="How each view is drawn.")

    def __post_init__(self) -> None:
        as_members(self, ("teacher", "teacher_checkpoint", "teacher_weights", "teacher_precision", "input_size"))

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
        bad = [p for p in self.teacher_precision if p not in ("auto", "fp32", "fp16", "bf16")]
        if bad:
            raise ConfigError(f"cache.teacher_precision: expected auto, fp32, fp16 or bf16, got {bad[0]!r}")
        check_members(self, "cache", ("teacher_checkpoint", "teacher_weights", "teacher_precision", "input_size"))
        if self.audit < 0:
            raise ConfigError(f"cache.audit: expected >= 0 views, got {self.audit}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"cache.seed: expected 0 <= seed < 2**63, got {self.seed}")
        if self.input_size is not None and min(self.input_size) < 1:
            raise ConfigError(f"cache.input_size: expected positive integers, got {list(self.input_size)}")
        if self.pretrained and self.teacher_checkpoint:
            raise ConfigError("cache.pretrained: excludes cache.teacher_checkpoint (the checkpoint would replace "
                              "the downloaded weights): give one of them")
        if self.random_teacher and (self.pretrained or self.teacher_checkpoint):
            raise ConfigError("cache.random_teacher: excludes cache.teacher_checkpoint and cache.pretrained")
        if self.part:  # parsed here so that a bad part fails before any work
            check_part_spec(self)
        _check_required(self, "cache")


KD_TAILS = ("bucket", "drop")  # train.kd_tail: how a top-k cache's tail mass enters the KD target


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
    teacher: tuple[str, ...] | None = setting(None, "Online KD: run this timm teacher on every batch (several, "
                                                    "a,b: their mixture, as a cache stores it). Excludes cache.")
    teacher_checkpoint: tuple[str, ...] | None = setting(None, "Weights of the online teacher(s), one per teacher "
                                                               "(needs teacher).")
    teacher_weights: tuple[float, ...] | None = setting(None, "Online ensemble: each teacher's weight (normalised "
                                                              "to sum 1); null = equal.")
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
    kd_tail: str = setting("bucket", "A top-k cache's tail: bucket = the stored tail mass as a (k+1)-th bucket of "
                                     "the KL; drop = the top-k renormalised to sum 1, tail dropped (as FKD's "
                                     "re-normalisation; needs cache; where k = C it only renormalises rounding).")
    ema_decay: float = setting(0.99996, "EMA of the weights, updated every step; 0 = no EMA.")
    amp: bool = setting(True, "bf16 autocast (CUDA only; ignored on CPU).")
    channels_last: bool = setting(True, "channels_last memory format (CUDA only; ignored on CPU).")
    seed: int = setting(42, "Seed of the epoch plan, mixing and the student's init.")
    workers: int = setting(2, "Data-loading processes per rank.")
    shuffle_buffer: int = setting(1000, "Samples held for shuffling, per worker.")
    repeated_aug: int = setting(1, "R: each epoch trains ~N/R samples, each with R distinct views in the "
                                   "same step on R ranks (same steps; USI: 3 when distributed).")
    max_steps: int | None = setting(None, "Cap on steps per epoch (smoke tests, benchmarks); null = none.")
    allow_ordered: bool = setting(False, "Train on class-ordered shards (a batch would hold under half the "
                                         "classes random sampling gives; see `usi shards reshard`).")
    allow_replay_mismatch: bool = setting(False, "Train although this machine's decoders re-render the "
                                                 "cache's views differently.")
    compile: bool = setting(False, "torch.compile the student's training forward (evaluation runs eager); "
                                    "the first compile takes minutes on a CPU: meant for GPUs.")
    log_every: int = setting(50, "Steps between per-step loss/lr lines in log.jsonl; 0 = off.")
    tensorboard: bool = setting(False, "Also write TensorBoard event files to the (local) run folder; needs "
                                        "the tensorboard extra.")
    view: ViewSpec = setting(factory=ViewSpec, doc="Views of label-only and online runs; a cache brings its own.")

    def __post_init__(self) -> None:
        as_members(self, ("teacher", "teacher_checkpoint", "teacher_weights"))

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
        if self.teacher_weights and not self.teacher:
            raise ConfigError("train.teacher_weights: given without train.teacher")
        if self.teacher:
            check_members(self, "train", ("teacher_checkpoint", "teacher_weights"))
        if self.kd_only and not (self.cache or self.teacher):
            raise ConfigError("train.kd_only: needs a teacher (train.cache or train.teacher); without one "
                              "there is no KD term to keep")
        if self.kd_tail not in KD_TAILS:
            raise ConfigError(f"train.kd_tail: expected one of {', '.join(KD_TAILS)}, got {self.kd_tail!r}")
        if self.kd_tail != KD_TAILS[0] and not self.cache:
            raise ConfigError(f"train.kd_tail: {self.kd_tail} needs train.cache (a top-k cache has a tail; online "
                              f"KD and labels have none)")
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


def as_members(cfg, names: tuple[str, ...]) -> None:
    """Per-teacher keys of a config built in code (CacheConfig(teacher="resnet50")): a single value,
    or comma-separated text for the names, becomes the tuple a recipe or the command line gives."""
    for name in names:
        value = getattr(cfg, name)
        if isinstance(value, str):
            value = tuple(v.strip() for v in value.split(",")) if name != "teacher_checkpoint" else (value,)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = (value,)
        elif isinstance(value, list):
            value = tuple(value)
        object.__setattr__(cfg, name, value)


def check_members(cfg, section: str, names: tuple[str, ...]) -> None:
    """Per-teacher lists hold one value per teacher (precision and input size: or one for all);
    weights are >= 0."""
    n = len(cfg.teacher)
    for i, name in enumerate(cfg.teacher):
        if not str(name).strip():
            raise ConfigError(f"{section}.teacher: teacher {i} of {n} has an empty name "
                              f"({','.join(cfg.teacher)!r}): expected timm model names, comma-separated")
    for name in names:
        value = getattr(cfg, name)
        if value is None or (name in ("teacher_precision", "input_size") and len(value) == 1):
            continue
        if len(value) != n:
            raise ConfigError(f"{section}.{name}: {len(value)} value(s) for {n} teacher(s) "
                              f"({', '.join(cfg.teacher)}): give one per teacher, in the same order")
    weights = getattr(cfg, "teacher_weights", None) or ()
    for i, w in enumerate(weights):
        if w < 0:
            raise ConfigError(f"{section}.teacher_weights: teacher {i} ({cfg.teacher[i]}) has weight {w}; "
                              f"expected >= 0")
    if weights and sum(weights) <= 0:
        raise ConfigError(f"{section}.teacher_weights: they sum to 0; give at least one positive weight")


def _check_required(cfg, section: str) -> None:
    for f in dataclasses.fields(cfg):
        if f.metadata.get("required") and not getattr(cfg, f.name):
            raise ConfigError(f"{section}.{f.name}: required: {f.metadata['help'][0].lower()}{f.metadata['help'][1:]}")
