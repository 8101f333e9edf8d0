"""Where stage 2's targets come from: one object per mode, chosen once per run.

Each source turns a loader batch into (student input x in [0, 1], ground truth (N, C), teacher
(P, rest) or None) on the device, with no CPU-GPU sync:
* LabelTargets      — labels only, batch Mixup/CutMix (the baseline);
* CacheTargets      — the cached top-k of the replayed view; batch mixing mixes them linearly
                      (an approximation, named in views/mixing.py);
* PairedCacheTargets — a paired cache: every image is already the mixed view the teacher saw;
* OnlineTargets     — the teacher runs on the very (mixed) batch the student sees.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from usi_cache.checks import replay as replay_check
from usi_cache import cache_format as schema
from usi_cache.config.stages import TrainConfig, ViewSpec
from usi_cache.dist import World, all_gather_objects, on_main
from usi_cache.stage2.plan import stable_seed
from usi_cache.views.mixing import apply_mix, sample_mix
from usi_cache.stage2.loss import mix_targets, one_hot_mix, teacher_distribution
from usi_cache.models.ensemble import load_ensemble

log = logging.getLogger(__name__)

Prepared = tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]  # x, gt, (P, rest) or None


class LabelTargets:
    """Labels only: the image batch, mixed batch-wise, and its mixed one-hot ground truth."""

    mode = "labels"

    def __init__(self, cfg: TrainConfig, num_classes: int, world: World, spec: ViewSpec,
                 layout: schema.Layout | None = None):
        self.cfg, self.C, self.world = cfg, num_classes, world
        self.spec = spec  # the views the student trains on
        self.layout = layout

    @property
    def views(self) -> int | None:
        """V of the cache the run trains on (None without a cache): part of the run's shape."""
        return self.layout.views if self.layout is not None else None

    def view_of(self, epoch: int) -> int | None:
        """The cached view every sample of `epoch` uses, when there is one such view."""
        return None

    def images(self, batch: dict) -> Tensor:
        # non_blocking: a plain host-to-device copy would wait for the previous step's work
        return batch["image"].to(self.world.device, non_blocking=True).float().div_(255)

    def mixed(self, batch: dict, epoch: int, step: int) -> tuple[Tensor, Tensor, Tensor, float]:
        """(mixed x, mixed ground truth, partner index, lambda): the mix is a pure function of
        (seed, epoch, step, rank), drawn on the host."""
        cfg, x = self.cfg, self.images(batch)
        labels = batch["label"].to(self.world.device, non_blocking=True)
        rng = np.random.default_rng(stable_seed("mix", cfg.seed, epoch, step, self.world.rank))
        mix = sample_mix(rng, x.shape[2], x.shape[3], **cfg.mix.sample_kwargs())
        x, perm = apply_mix(x, mix)
        return x, one_hot_mix(labels, perm, mix.lam, self.C), perm, mix.lam

    def __call__(self, batch: dict, epoch: int, step: int) -> Prepared:
        x, gt, _, _ = self.mixed(batch, epoch, step)
        return x, gt, None


class CacheTargets(LabelTargets):
    """The cache's top-k log-probabilities of each replayed view (any schema version)."""

    mode = "cache"

    def view_of(self, epoch: int) -> int | None:
        return epoch % self.layout.views if self.cfg.repeated_aug == 1 else None

    def teacher(self, batch: dict) -> tuple[Tensor, Tensor]:
        dev = self.world.device
        return teacher_distribution(batch["t_log_probs"].to(dev, non_blocking=True),
                                    batch["t_classes"].to(dev, non_blocking=True), None, self.C,
                                    self.cfg.kd_temperature, drop_tail=self.cfg.kd_tail == "drop")

    def __call__(self, batch: dict, epoch: int, step: int) -> Prepared:
        x, gt, perm, lam = self.mixed(batch, epoch, step)
        P, rest = self.teacher(batch)
        return x, gt, mix_targets(P, rest, perm, lam)  # linear mixing of cached targets: an approximation


class PairedCacheTargets(CacheTargets):
    """A paired cache: each image is the mixed view the teacher saw, so no batch mixing; the
    ground truth mixes the two labels with the stored lambda."""

    def __call__(self, batch: dict, epoch: int, step: int) -> Prepared:
        dev = self.world.device
        lam = batch["lam"].to(dev, torch.float32, non_blocking=True)[:, None]
        a = F.one_hot(batch["label"].to(dev, non_blocking=True), self.C)
        b = F.one_hot(batch["label_b"].to(dev, non_blocking=True), self.C)
        return self.images(batch), lam * a + (1 - lam) * b, self.teacher(batch)


class OnlineTargets(LabelTargets):
    """Online KD: the full teacher distribution on the exact mixed batch."""

    mode = "online"

    def __init__(self, cfg: TrainConfig, num_classes: int, world: World, spec: ViewSpec, teacher):
        super().__init__(cfg, num_classes, world, spec)
        self.teacher = teacher  # usi_cache.models.ensemble.Ensemble (one teacher: an ensemble of one)

    def __call__(self, batch: dict, epoch: int, step: int) -> Prepared:
        x, gt, _, _ = self.mixed(batch, epoch, step)
        return x, gt, online_distribution(self.teacher, x, self.cfg.kd_temperature)


@torch.no_grad()
def online_distribution(teacher, x: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Full teacher distribution on the very batch x (N, 3, H, W) in [0, 1] the student sees: an
    Ensemble's mixture p = sum_m w_m softmax(z_m), tempered as a cached ensemble is,
    softmax(log p / T) (one teacher: softmax(z / T)), each member at its precision and
    normalisation; a lone `Teacher` works too."""
    if hasattr(teacher, "distribution"):
        P = teacher.distribution(x, temperature)
    else:
        P = torch.softmax(teacher.logits((x - teacher.mean) / teacher.std) / temperature, dim=1)
    return P, torch.zeros(P.shape[0], device=P.device)


def resolve_targets(cfg: TrainConfig, world: World, manifest) -> LabelTargets:
    """The run's target source, checked against the train shards' `manifest`."""
    C = len(manifest.classes)
    if cfg.teacher:
        # the same mixture a cache of these teachers stores, so cached and online KD stay comparable
        teacher = load_ensemble(cfg.teacher, cfg.teacher_checkpoint, num_classes=C, weights=cfg.teacher_weights,
                                device=world.device)
        return OnlineTargets(cfg, C, world, cfg.view, teacher)
    if not cfg.cache:
        return LabelTargets(cfg, C, world, cfg.view)
    # rank 0 reads the attributes and every rank takes its copy, as the plan is: a grow
    # (--add-views) that commits between two ranks' reads cannot give the ranks different V
    attrs = on_main(world, lambda: schema.open_cache(cfg.cache)[1])
    group = schema.open_cache(cfg.cache)[0]
    found = attrs["dataset"]["fingerprint"]
    if found != manifest.fingerprint:
        raise schema.CacheError(f"{cfg.cache}: dataset.fingerprint {found[:12]} does not match the train "
                                f"shards {cfg.train_shards} ({manifest.fingerprint[:12]}): the cache belongs "
                                f"to other shards")
    if attrs["num_classes"] != C:
        raise schema.CacheError(f"{cfg.cache}: num_classes {attrs['num_classes']} != {C} classes of the shards")
    layout = schema.Layout.from_attrs(attrs)
    if cfg.repeated_aug > layout.views:
        raise schema.CacheError(f"{cfg.cache}: train.repeated_aug = {cfg.repeated_aug} needs that many distinct "
                                f"views per epoch, the cache has V = {layout.views}")
    if not schema.completed_shards(group, layout).all():
        raise schema.CacheError(f"{cfg.cache}: incomplete (some shards were never committed); "
                                f"finish it with cache_teacher.py first")
    # every rank re-renders the fingerprint (nodes may differ); all stop together on any mismatch
    whys = all_gather_objects(world, replay_check.mismatch(group, attrs, manifest))
    why = next((f"rank {r}: {w}" if world.distributed else w for r, w in enumerate(whys) if w), None)
    if why and not cfg.allow_replay_mismatch:
        raise schema.CacheError(f"{cfg.cache}: {why}; the student would be taught with pixels the teacher "
                                f"never saw (--allow-replay-mismatch trains anyway)")
    if why:
        log.warning(f"warning: {why}; training anyway (--allow-replay-mismatch)")
    spec = schema.view_spec(attrs)
    if spec != cfg.view:
        log.info(f"training views: the cache's view spec (randaugment {spec.randaugment!r}); the config's "
                 f"view section only sets the validation filter ({cfg.view.interpolation})")
    total = cfg.epochs + cfg.cooldown_epochs  # ~ uses of each sample over the run, whatever R
    if layout.views < total:
        rule = (f"epoch e uses view e mod {layout.views}" if cfg.repeated_aug == 1 else
                f"a sample selected for the s-th time uses views (s*{cfg.repeated_aug} + r) mod "
                f"{layout.views}, r < {cfg.repeated_aug}")
        log.info(f"cache has V = {layout.views} views for {total} epochs: {rule}, "
                 f"so each view repeats about {total / layout.views:.1f} times")
    if layout.paired:
        log.info(f"paired cache: each view is rebuilt mixed exactly as the teacher saw it "
                 f"({attrs['mix_spec']}); the config's batch mixing (train.mix) is not used")
        return PairedCacheTargets(cfg, C, world, spec, layout)
    return CacheTargets(cfg, C, world, spec, layout)
