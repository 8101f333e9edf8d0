"""Stage 2: train a timm student with the USI recipe against a cache, labels or an online teacher.

One loop, three target sources:
* cache   — offline KD: each view replayed exactly, its cached top-k teacher output as target;
* labels  — no teacher (the baseline; also how to train a teacher for your own data);
* online  — the teacher runs on the exact (mixed) batch the student sees, as in USI's code.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import timm.optim
import timm.scheduler
import timm.utils
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from . import replay_check, schema, storage
from .config import TrainConfig, ViewSpec, to_dict, upgrade_saved
from .dist import World, all_gather_objects, barrier, broadcast_object, close_world, init_world
from .epoch_plan import PlanError, PlanSpec, summarize
from .evaluate import evaluate
from .mixing import apply_mix, sample_mix
from .shards import ShardError, load_manifest
from .targets import one_hot_mix, soft_cross_entropy, teacher_distribution, mix_targets, usi_loss
from .teacher import build_model, load_teacher, refused_global
from .train_data import TrainStream, TrainStreamSpec, stable_seed, valid_counts


class TrainError(RuntimeError):
    """Training cannot go on (non-finite loss, mismatched inputs)."""


@dataclass
class Targets:
    """Where the teacher signal comes from in this run."""

    mode: str  # "cache", "labels" or "online"
    spec: ViewSpec
    layout: schema.Layout | None = None

    @property
    def paired(self) -> bool:
        """A paired cache: the teacher saw mixed images, so batch-level mixing is off."""
        return self.layout is not None and self.layout.paired
    teacher: object = None  # usi_cache.teacher.Teacher (online mode)


def resolve_targets(cfg: TrainConfig, world: World, manifest, log) -> Targets:
    """The run's target source, checked against the train shards' `manifest`."""
    fingerprint, num_classes = manifest.fingerprint, len(manifest.classes)
    if cfg.cache:
        group, attrs = schema.open_cache(cfg.cache)
        found = attrs["dataset"]["fingerprint"]
        if found != fingerprint:
            raise schema.CacheError(f"{cfg.cache}: dataset.fingerprint {found[:12]} does not match the train "
                                    f"shards {cfg.train_shards} ({fingerprint[:12]}): the cache belongs to other shards")
        if attrs["num_classes"] != num_classes:
            raise schema.CacheError(f"{cfg.cache}: num_classes {attrs['num_classes']} != {num_classes} classes of the shards")
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
            log(f"warning: {why}; training anyway (--allow-replay-mismatch)")
        spec = schema.view_spec(attrs)
        if spec != cfg.view:
            log(f"using the cache's view spec (randaugment {spec.randaugment!r}); the config's view section is not used")
        total = cfg.epochs + cfg.cooldown_epochs  # ~ uses of each sample over the run, whatever R
        if layout.views < total:
            rule = (f"epoch e uses view e mod {layout.views}" if cfg.repeated_aug == 1 else
                    f"a sample selected for the s-th time uses views (s*{cfg.repeated_aug} + r) mod "
                    f"{layout.views}, r < {cfg.repeated_aug}")
            log(f"cache has V = {layout.views} views for {total} epochs: {rule}, "
                f"so each view repeats about {total / layout.views:.1f} times")
        if layout.paired:
            log(f"paired cache: each view is rebuilt mixed exactly as the teacher saw it "
                f"({attrs['mix_spec']}); the config's batch-level mixup/cutmix is not used")
        return Targets("cache", spec, layout)
    if cfg.teacher:
        teacher, info = load_teacher(cfg.teacher, cfg.teacher_checkpoint, num_classes=num_classes,
                                     device=world.device)
        return Targets("online", cfg.view, teacher=teacher)
    return Targets("labels", cfg.view)


def save_atomic(obj, path: str) -> None:
    """torch.save so that a kill or a full disk never leaves a half-written file in place of
    the previous one: locally a temp file, fsync, then rename; on object storage one PUT of
    the whole object (atomic for readers)."""
    if storage.is_url(path):
        buf = io.BytesIO()
        torch.save(obj, buf)
        try:
            storage.write_bytes(path, buf.getvalue())
        except storage.StorageError as e:
            raise TrainError(f"{e}; the previous {storage.basename(path)} is kept") from None
        return
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        reason = "No space left on device" if "unexpected pos" in str(e) else str(e).splitlines()[0]
        raise TrainError(f"{path}: cannot write checkpoint ({reason}); the previous {path.name} is kept") from None


# Settings that may change on --resume without changing which samples each rank trains on in an
# epoch (the order within a rank's batches does change with them).
RESUMABLE_CHANGES = ("workers", "shuffle_buffer")


def load_resume_state(path: str, cfg: TrainConfig, device, world_size: int) -> dict:
    """last.pth (a path or URL), checked: readable, complete, and made with the same config."""
    try:
        src = io.BytesIO(storage.read_bytes(path)) if storage.is_url(path) else path
        state = torch.load(src, map_location=device, weights_only=True)
        for key in ("model", "optimizer", "scheduler", "epoch", "best", "config"):
            state[key]
    except pickle.UnpicklingError as e:
        why = refused_global(str(e)) or str(e).splitlines()[0]
        raise TrainError(f"{path}: checkpoint refused: loading it would run code ({why[:200]})") from None
    except (RuntimeError, EOFError, OSError, KeyError, TypeError) as e:
        raise TrainError(f"{path}: cannot resume from it ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); "
                         f"move it away to start over") from None
    now, saved = to_dict(cfg), upgrade_saved(TrainConfig, state["config"], f"{path}: config")  # older runs' shape too
    diff = sorted(k for k in set(now) | set(saved) if k not in RESUMABLE_CHANGES and now.get(k) != saved.get(k))
    if diff:
        k = diff[0]
        raise TrainError(f"{path}: made with {k} = {saved.get(k)!r}, this run has {now.get(k)!r}"
                         f"{f' (and {len(diff) - 1} more)' if len(diff) > 1 else ''}; --resume continues the "
                         f"same run: use a new --out to change settings")
    saved_world = state.get("world")
    epochs_left = state["epoch"] + 1 < cfg.epochs + cfg.cooldown_epochs
    if epochs_left and saved_world is not None and saved_world != world_size:
        raise TrainError(f"{path}: made by {saved_world} process(es), this run has {world_size}; the epoch plan "
                         f"(which samples each epoch selects) depends on the world size: resume with "
                         f"{saved_world}, or start a new --out")
    return state


def run_train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True) -> dict:
    world = init_world()
    try:
        return _train(cfg, world, resume, progress)
    finally:
        close_world(world)


def _train(cfg: TrainConfig, world: World, resume: bool, progress: bool) -> dict:
    out = cfg.out  # a folder or a URL prefix
    last, run_log = storage.join(out, "last.pth"), storage.join(out, "log.jsonl")
    log = (lambda msg: print(msg, flush=True)) if world.is_main else (lambda msg: None)
    train_m, val_m = load_manifest(cfg.train_shards), load_manifest(cfg.val_shards)
    if val_m.classes != train_m.classes:
        raise ShardError(f"{cfg.val_shards}: class names differ from the train shards {cfg.train_shards}")
    C = len(train_m.classes)
    targets = resolve_targets(cfg, world, train_m, log)
    dev = world.device
    cuda = dev.type == "cuda"

    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts them)
    model = build_model(cfg.model, num_classes=C, checkpoint=cfg.pretrained_checkpoint,
                        model_kwargs=cfg.model_kwargs).to(dev)
    # from here on each rank draws its own dropout / drop-path masks (CPU and CUDA generators)
    torch.manual_seed(stable_seed("rank", cfg.seed, world.rank) % 2**63)
    if cuda and cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    data_cfg = timm.data.resolve_model_data_config(model)
    mean = torch.tensor(data_cfg["mean"], device=dev).view(1, 3, 1, 1)
    std = torch.tensor(data_cfg["std"], device=dev).view(1, 3, 1, 1)
    ema = timm.utils.ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
    optimizer = timm.optim.create_optimizer_v2(model, opt="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay,
                                               betas=cfg.betas, eps=cfg.eps)  # no decay on norm/bias
    scheduler = timm.scheduler.CosineLRScheduler(optimizer, t_initial=cfg.epochs, lr_min=cfg.min_lr,
                                                 warmup_t=cfg.warmup_epochs, warmup_lr_init=cfg.warmup_lr)
    total_epochs = cfg.epochs + cfg.cooldown_epochs  # cooldown: the cosine has ended at min_lr
    ddp = DistributedDataParallel(model) if world.distributed else model
    amp = cuda and cfg.amp

    start_epoch, best = 0, {"top1": -1.0}
    if resume and storage.is_file(last):
        state = load_resume_state(last, cfg, dev, world.size)
        model.load_state_dict(state["model"])
        if ema is not None:
            ema.module.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best = state["epoch"] + 1, state["best"]
        restore_rng(state, world)
        log(f"resuming from {last} at epoch {start_epoch}")
        if world.is_main and storage.is_file(run_log):  # drop lines of epochs after the checkpoint
            lines = storage.read_bytes(run_log).decode().splitlines()
            kept = [ln for ln in lines if ln.strip() and json.loads(ln)["epoch"] <= state["epoch"]]
            storage.write_bytes(run_log, "".join(ln + "\n" for ln in kept).encode())
    elif world.is_main:
        if not storage.is_url(out):
            Path(out).mkdir(parents=True, exist_ok=True)
        storage.write_bytes(storage.join(out, "config.json"), (json.dumps(to_dict(cfg), indent=1) + "\n").encode())
        storage.write_bytes(run_log, b"")
    barrier(world)

    counts = None
    if world.is_main:  # the cache's labels say which slots hold a trainable sample
        group = schema.open_cache(cfg.cache)[0] if cfg.cache else None
        counts = valid_counts(train_m, group, targets.layout)
    plan = PlanSpec(counts=broadcast_object(world, counts), seed=cfg.seed, world=world.size, workers=cfg.workers,
                    batch=cfg.batch_size, repeats=cfg.repeated_aug, max_steps=cfg.max_steps)
    try:
        steps = plan.steps
    except PlanError as e:
        raise TrainError(f"{cfg.train_shards}: {e}") from None
    stream = TrainStream(TrainStreamSpec(
        manifest=train_m, cache=cfg.cache, layout=targets.layout, spec=targets.spec, size=cfg.input_size,
        plan=plan, rank=world.rank, shuffle_buffer=cfg.shuffle_buffer))
    log(f"training {cfg.model} ({targets.mode} targets) on {world.size} process(es), {steps} steps/epoch "
        f"of {cfg.batch_size} per process, epochs {start_epoch}..{total_epochs - 1}")
    log(f"epoch plan: {summarize(plan).describe(plan)}")

    summary = {}
    for epoch in range(start_epoch, total_epochs):
        t0 = time.perf_counter()
        scheduler.step(epoch)
        stream.set_epoch(epoch)
        loader = DataLoader(stream, batch_size=cfg.batch_size, num_workers=cfg.workers,
                            pin_memory=cuda, prefetch_factor=4 if cfg.workers else None)
        stats = train_epoch(cfg, epoch, steps, loader, ddp, model, ema, optimizer, targets, C, mean, std,
                            world, amp, progress)
        usage = gather_usage(stats.pop("sids"), stats.pop("duplicates"), world)
        train_s = time.perf_counter() - t0
        raw = evaluate(model, val_m, cfg, mean, std, world, amp)
        ema_m = evaluate(ema.module, val_m, cfg, mean, std, world, amp) if ema is not None else None
        in_sync = weights_in_sync(model, world)
        use_ema = ema_m is not None and ema_m["top1"] > raw["top1"]
        better = ema_m if use_ema else raw
        record = {
            "epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "train_loss": stats["loss"],
            **{f"train_{k}": v for k, v in stats["parts"].items()},
            "img_per_s": stats["img_per_s"], "train_s": train_s,
            "val_top1": raw["top1"], "val_top5": raw["top5"],
            "val_top1_ema": ema_m["top1"] if ema_m else None, "val_top5_ema": ema_m["top5"] if ema_m else None,
            "val_count": raw["count"], **usage,
            "view": epoch % targets.layout.views if targets.mode == "cache" and cfg.repeated_aug == 1 else None,
            "ranks": world.size, "rank_weights_equal": in_sync, "time_s": time.perf_counter() - t0,
        }
        rng = all_gather_objects(world, rng_state(cuda))  # every rank's generators, saved by rank 0
        if world.is_main:
            storage.append_text(run_log, json.dumps(record) + "\n")  # before last.pth: resume trims lines past it
            if better["top1"] > best["top1"]:
                best = {"top1": better["top1"], "top5": better["top5"], "epoch": epoch, "ema": use_ema}
                save_atomic((ema.module if use_ema else model).state_dict(), storage.join(out, "best.pth"))
            save_atomic({"model": model.state_dict(), "ema": ema.module.state_dict() if ema else None,
                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "epoch": epoch, "best": best, "config": to_dict(cfg),
                         # torch's generators drive dropout/drop-path, one per rank; every other draw
                         # is a pure function of (seed, epoch, step, rank, key). bf16 autocast needs no scaler.
                         "rng": rng, "world": world.size}, last)
            ema_txt = f", EMA {record['val_top1_ema']:.2f}" if ema_m else ""
            log(f"epoch {epoch}: loss {stats['loss']:.4f}, {stats['img_per_s']:.0f} img/s, "
                f"val top-1 {raw['top1']:.2f}{ema_txt} ({raw['count']} images), {record['time_s']:.1f} s")
        best = broadcast_object(world, best)
        summary = {"last": record, "best": best}
    return summary


def train_epoch(cfg, epoch, steps, loader, ddp, model, ema, optimizer, targets: Targets, C, mean, std,
                world, amp, progress) -> dict:
    ddp.train()
    dev = world.device
    bar = None
    if progress and world.is_main:
        from tqdm import tqdm
        bar = tqdm(total=steps, desc=f"epoch {epoch}", unit="step", dynamic_ncols=True, leave=False)
    # Loss parts and the first non-finite step are kept on the device: reading them is a CPU-GPU
    # sync point, done every CHECK_EVERY steps (and at the end), not every step.
    loss_sum = torch.zeros((), device=dev)
    parts_sum: dict[str, torch.Tensor] = {}
    first_bad = torch.full((), -1, dtype=torch.int64, device=dev)
    recent_keys: dict[int, list[str]] = {}  # batch keys since the last check, for the error message
    sids, duplicates = [], 0  # which samples this rank trained on (CPU tensors from the loader)
    seen, n_steps = 0, 0
    t0 = time.perf_counter()
    for step, batch in enumerate(loader):
        sids.append(batch["sid"])
        duplicates += len(batch["sid"]) - len(torch.unique(batch["sid"]))
        recent_keys[step] = batch["key"][:4]
        x = batch["image"].to(dev, non_blocking=True).float().div_(255)
        # non_blocking everywhere: a plain host-to-device copy waits for the previous step's work
        labels = batch["label"].to(dev, non_blocking=True)
        if targets.paired:  # each image is already the mixed view the teacher saw: no batch mixing
            lam = batch["lam"].to(dev, torch.float32, non_blocking=True)
            gt = (lam[:, None] * torch.nn.functional.one_hot(labels, C)
                  + (1 - lam[:, None]) * torch.nn.functional.one_hot(batch["label_b"].to(dev, non_blocking=True), C))
            perm, mix_lam = None, None
        else:
            rng = np.random.default_rng(stable_seed("mix", cfg.seed, epoch, step, world.rank))
            mix = sample_mix(rng, x.shape[2], x.shape[3], **cfg.mix.sample_kwargs())
            x, perm = apply_mix(x, mix)
            mix_lam = mix.lam
            gt = one_hot_mix(labels, perm, mix_lam, C)
        P = rest = None
        if targets.mode == "cache":
            # the cache's top-k log-probabilities (any schema version): no lse needed
            P, rest = teacher_distribution(batch["t_log_probs"].to(dev, non_blocking=True),
                                           batch["t_classes"].to(dev, non_blocking=True), None, C, cfg.kd_temperature)
            if perm is not None:  # linear mixing of cached targets: an approximation
                P, rest = mix_targets(P, rest, perm, mix_lam)
        elif targets.mode == "online":
            P, rest = online_distribution(targets.teacher, x, cfg.kd_temperature)
        if world.device.type == "cuda" and cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            logits = ddp((x - mean) / std)
        if P is None:
            loss, parts = soft_cross_entropy(logits, gt), {}
        else:
            loss, parts = usi_loss(logits, gt, P, rest, alpha=cfg.kd_alpha, temperature=cfg.kd_temperature,
                                   kd_only=cfg.kd_only)
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), step, first_bad)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ema is not None:
            ema.update(model)
        loss_sum += loss.detach()
        for k, v in parts.items():
            parts_sum[k] = parts_sum.get(k, 0.0) + v
        if (step + 1) % CHECK_EVERY == 0 or step + 1 == steps:
            check_finite(first_bad, recent_keys, epoch, world)
            recent_keys.clear()
        seen += x.shape[0]
        n_steps += 1
        if n_steps == 1:  # throughput excludes the first step (worker start-up, allocator warm-up)
            t_first, seen_first = time.perf_counter(), seen
        if bar is not None:
            if step % CHECK_EVERY == 0:  # loss.item() is a CPU-GPU sync point: not every step
                bar.set_postfix(loss=f"{loss.item():.3f}",
                                img_s=f"{seen * world.size / (time.perf_counter() - t0):.0f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    check_finite(first_bad, recent_keys, epoch, world)
    if n_steps != steps:
        raise TrainError(f"rank {world.rank} ran {n_steps} steps, expected {steps}")
    if n_steps > 1:
        t0, seen = t_first, seen - seen_first
    elapsed = time.perf_counter() - t0
    return {"loss": float(loss_sum) / max(n_steps, 1),
            "parts": {k: float(v) / max(n_steps, 1) for k, v in parts_sum.items()},
            "img_per_s": seen * world.size / elapsed if elapsed > 0 else 0.0,
            "sids": torch.cat(sids).numpy() if sids else np.zeros(0, np.int64), "duplicates": duplicates}


CHECK_EVERY = 20  # steps between CPU-GPU syncs (finite-loss check, progress bar)


def check_finite(first_bad: torch.Tensor, recent_keys: dict[int, list[str]], epoch: int, world: World) -> None:
    """Stop at a non-finite loss, naming its step and, on the rank that saw it, its batch (a CPU-GPU
    sync point). Every rank checks at the same steps and takes the first bad step of any rank,
    so all ranks stop together."""
    none = torch.iinfo(torch.int64).max
    bad = torch.where(first_bad >= 0, first_bad, torch.full_like(first_bad, none))
    own = int(bad)
    if world.distributed:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MIN)
    step = int(bad)
    if step != none:
        keys = recent_keys.get(step) if own == step else None  # another rank's batch: not ours to name
        raise TrainError(f"non-finite loss at epoch {epoch} step {step}"
                         + (f" (batch keys {', '.join(keys)}, ...)" if keys else ""))


def gather_usage(sids: np.ndarray, duplicates: int, world: World) -> dict:
    """The epoch's sample accounting over all ranks: distinct samples, total uses, the most
    uses of one sample, and copies of a sample that shared a local batch."""
    gathered = all_gather_objects(world, (sids, duplicates))
    every = np.concatenate([g[0] for g in gathered])
    _, uses = np.unique(every, return_counts=True)
    return {"samples_used": int(len(uses)), "sample_uses": int(len(every)),
            "max_uses_per_sample": int(uses.max()) if len(uses) else 0,
            "in_batch_duplicates": int(sum(g[1] for g in gathered))}


def rng_state(cuda: bool) -> dict:
    """This rank's torch generators (dropout, drop-path)."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if cuda else None}


def restore_rng(state: dict, world: World) -> None:
    """Put back this rank's generators from last.pth (one entry per rank)."""
    saved = state.get("rng")
    if saved is None or len(saved) != world.size:  # older checkpoint, or another world size
        return
    torch.set_rng_state(saved[world.rank]["cpu"].cpu())
    if saved[world.rank].get("cuda") is not None and world.device.type == "cuda":
        torch.cuda.set_rng_state(saved[world.rank]["cuda"].cpu())


@torch.no_grad()
def weights_in_sync(model, world) -> bool:
    """True when every rank holds bit-identical weights (a float64 checksum per rank)."""
    if not world.distributed:
        return True
    total = torch.zeros(2, dtype=torch.float64, device=world.device)
    for p in model.parameters():
        total[0] += p.double().sum()
        total[1] += (p.double() ** 2).sum()
    gathered = [torch.zeros_like(total) for _ in range(world.size)]
    torch.distributed.all_gather(gathered, total)
    return all(torch.equal(g, gathered[0]) for g in gathered)


@torch.no_grad()
def online_distribution(teacher, x: torch.Tensor, temperature: float):
    """Full teacher distribution on the very batch x (N, 3, H, W) in [0, 1] the student sees."""
    logits = teacher.logits((x - teacher.mean) / teacher.std)  # at the teacher's precision, float32 out
    P = torch.softmax(logits / temperature, dim=1)
    return P, torch.zeros(P.shape[0], device=P.device)
