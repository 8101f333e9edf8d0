"""Several teachers as one: the weighted mixture of their probabilities, p = sum_m w_m softmax(z_m).

Every consumer of a teacher (stage 1, the online teacher of stage 2, `verify --recompute`, the
audit) holds an `Ensemble`; one teacher is an ensemble of one and gives exactly the outputs of
that teacher (its raw logits), so a one-teacher cache is byte-identical to one made before
ensembles existed. With several members, each member sees the same view rendered at its own
input size (the caller renders once per distinct size, `sizes`), normalised with its own mean
and std, at its own precision; the members run one after another on each batch and all stay on
the device (a member's weights are loaded once; only activations of one member at a time).

The output of several members is the mixture's logits, in float64: log p + sum_m w_m lse_m, with
log p = logsumexp_m(log w_m + log_softmax(z_m)) and lse_m = logsumexp(z_m). The code that turns a
teacher's logits into the cache's top-k log-probabilities and lse (stage1/run.py) takes them
unchanged: the stored values are log p (rounded down, so the tail mass 1 - sum of the top-k stays
exact) and the stored lse is sum_m w_m lse_m; `verify --recompute` and the audit compare and
measure them as they do a lone teacher's.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from usi_cache import cache_format as schema
from usi_cache.models.errors import TeacherError
from usi_cache.models.checkpoints import sha256_file
from usi_cache.models.teacher import Teacher, TeacherInfo, load_teacher


def normalised_weights(weights: Sequence[float] | None, n: int) -> tuple[float, ...]:
    """Weights summing to 1 (equal when None); a list of another length is a TeacherError."""
    if weights is None:
        return tuple(1.0 / n for _ in range(n))
    if len(weights) != n:
        raise TeacherError(f"teacher_weights: {len(weights)} weight(s) for {n} teacher(s): give one per teacher")
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights):
        raise TeacherError(f"teacher_weights: expected weights >= 0 with a positive sum, got {list(weights)}")
    # rounded to 12 significant digits: 1,1,5 and 0.1,0.1,0.5 are the same ensemble, recorded alike
    return tuple(float(f"{float(w) / total:.12g}") for w in weights)


def mixture_log_probs(logits: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """log sum_m w_m softmax(z_m), float64 (N, C), from the members' logits (N, C) each.

    A member of weight 0 contributes nothing (log 0 = -inf is handled by logsumexp)."""
    terms = [torch.log_softmax(z.double(), dim=1) + float(np.log(w)) if w > 0 else None
             for z, w in zip(logits, weights)]
    terms = [t for t in terms if t is not None]
    return torch.logsumexp(torch.stack(terms), dim=0)


def mixture_logits(logits: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Logits of the mixture, float64 (N, C): log p + sum_m w_m logsumexp(z_m).

    softmax of them is the mixture p, and their log-sum-exp, what the cache stores as an
    ensemble's `lse`, is the weighted mean of the members' log-sum-exps: the logits coincide with
    every member's when the members agree, and the lse is never the all-zero fill value."""
    shift = sum(float(w) * torch.logsumexp(z.double(), dim=1) for z, w in zip(logits, weights))
    return mixture_log_probs(logits, weights) + shift[:, None]


@dataclass
class Member:
    teacher: Teacher
    info: TeacherInfo
    weight: float  # normalised


class Ensemble:
    """The teachers of a cache or of online KD. `sizes` are their distinct input sizes (sorted);
    `__call__` takes one uint8 batch per size, in that order."""

    def __init__(self, members: list[Member]):
        if not members:
            raise TeacherError("teacher: no teacher given")
        self.members = members
        self.sizes = tuple(sorted({m.info.input_size for m in members}))
        self.device = members[0].teacher.device
        self.precision = ",".join(dict.fromkeys(m.teacher.precision for m in members))
        self.num_classes = members[0].info.num_classes

    def __len__(self) -> int:
        return len(self.members)

    @property
    def weights(self) -> tuple[float, ...]:
        return tuple(m.weight for m in self.members)

    def member_logits(self, images: Sequence[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
        """Each member's float32 logits (N, C) on the CPU. images: uint8 (N, H, W, 3), one batch
        per size of `sizes` (or one batch when there is one size)."""
        if isinstance(images, torch.Tensor):
            images = [images]
        if len(images) != len(self.sizes):
            raise TeacherError(f"teacher input: {len(images)} batch(es) for input sizes {list(self.sizes)}")
        by_size = dict(zip(self.sizes, images))
        return [m.teacher(by_size[m.info.input_size]) for m in self.members]  # one after another

    def __call__(self, images: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """One member: its float32 logits (N, C), exactly as `Teacher`. Several: the mixture's
        logits, float64 (N, C) (see `mixture_logits`)."""
        logits = self.member_logits(images)
        if len(self.members) == 1:
            return logits[0]
        return mixture_logits(logits, self.weights)

    def distribution(self, x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Online KD: the mixture p = sum_m w_m softmax(z_m) tempered as a cached ensemble's is,
        softmax(log p / T), float32 (N, C) on the device, of a float batch x (N, 3, H, W) in [0, 1]
        on the device (every member sees x as it is). One member: softmax(z / T)."""
        if len(self.members) == 1:  # exactly what a lone teacher gives
            t = self.members[0].teacher
            return torch.softmax(t.logits((x - t.mean) / t.std) / temperature, dim=1)
        P = None
        for m in self.members:  # in float64, as stage 1 mixes
            t = m.teacher
            p = m.weight * torch.softmax(t.logits((x - t.mean) / t.std).double(), dim=1)
            P = p if P is None else P + p
        if temperature == 1.0:
            return P.float()
        return torch.softmax(torch.log(P) / temperature, dim=1).float()

    def attrs(self) -> list[dict]:
        """What the cache records of each member (`teachers` attribute): TeacherInfo + weight."""
        return [{**m.info.to_dict(), "weight": m.weight} for m in self.members]


def _member_error(i: int, name: str, n: int, e: Exception) -> TeacherError:
    if n == 1:
        return e if isinstance(e, TeacherError) else TeacherError(str(e))
    return TeacherError(f"teacher {i} of {n} ({name}): {str(e).splitlines()[0] if str(e) else type(e).__name__}")


def load_ensemble(names: Sequence[str], checkpoints: Sequence[str | None] | None, *, num_classes: int,
                  weights: Sequence[float] | None = None, precisions: Sequence[str] = ("auto",),
                  pretrained: bool = False, input_size: int | Sequence[int] | None = None, mean=None, std=None,
                  device="cpu", compile: bool = False) -> Ensemble:
    """Build every member (load_teacher), in order. `checkpoints`: one per member or None;
    `precisions` and `input_size`: one for all or one per member. Without checkpoints and not pretrained, member
    m has random weights seeded m (member 0: seed 0, as a lone teacher). Any member's error is
    one TeacherError naming the member."""
    n = len(names)
    if checkpoints is not None and len(checkpoints) != n:
        raise TeacherError(f"teacher_checkpoint: {len(checkpoints)} checkpoint(s) for {n} teacher(s) "
                           f"({', '.join(names)}): give one per teacher, in the same order")
    if len(precisions) not in (1, n):
        raise TeacherError(f"teacher_precision: {len(precisions)} value(s) for {n} teacher(s): one, or one per teacher")
    sizes = [input_size] * n if input_size is None or isinstance(input_size, int) else list(input_size)
    if len(sizes) == 1:
        sizes *= n
    if len(sizes) != n:
        raise TeacherError(f"input_size: {len(sizes)} value(s) for {n} teacher(s): one, or one per teacher")
    w = normalised_weights(weights, n)
    members = []
    for i, name in enumerate(names):
        try:
            teacher, info = load_teacher(name, None if checkpoints is None else checkpoints[i],
                                         num_classes=num_classes, pretrained=pretrained, input_size=sizes[i],
                                         mean=mean, std=std, device=device, compile=compile,
                                         precision=precisions[i if len(precisions) > 1 else 0], seed=i)
        except (TeacherError, OSError, RuntimeError, ValueError) as e:
            raise _member_error(i, name, n, e) from None
        if info.num_classes != num_classes:
            raise TeacherError(f"teacher {i} of {n} ({name}): {info.num_classes} classes, the dataset has "
                               f"{num_classes}")
        members.append(Member(teacher, info, w[i]))
    return Ensemble(members)


def _split_checkpoints(checkpoint: str | Sequence[str] | None) -> list[str] | None:
    if checkpoint is None:
        return None
    if isinstance(checkpoint, str):
        return [c.strip() for c in checkpoint.split(",")]
    return list(checkpoint)


def cache_ensemble_mismatch(attrs: dict, checkpoint: str | Sequence[str] | None) -> str | None:
    """Why `checkpoint` (comma-separated or a list, one per member) is not the cache's teachers (a
    sha256 differs), or None; a TeacherError when a checkpoint-made member gets none. No model is built."""
    members, given = schema.teacher_members(attrs), _split_checkpoints(checkpoint)
    n = len(members)
    if given is not None and len(given) != n:
        raise TeacherError(f"--teacher-checkpoint: {len(given)} checkpoint(s) for the cache's {n} teacher(s) "
                           f"({', '.join(m['name'] for m in members)}): give one per teacher, in order")
    for i, m in enumerate(members):
        want, who = m.get("checkpoint_sha256"), (f"teacher {i} of {n} ({m['name']})" if n > 1 else
                                                 f"the cache's teacher {m['name']}")
        if want and given is None:
            raise TeacherError(f"--teacher-checkpoint is needed: {who} was loaded from a "
                               f"checkpoint (sha256 {want[:12]}…)")
        if given is not None:
            try:
                have = sha256_file(given[i])
            except Exception as e:  # a missing or unreadable file: name the member
                raise TeacherError(f"{who}: checkpoint {given[i]}: {str(e).splitlines()[0]}") from None
            if have != want:
                return f"{given[i]}: sha256 {have[:12]}… is not {who} ({(want or 'no checkpoint')[:12]})"
    return None


def load_cache_ensemble(attrs: dict, checkpoint: str | Sequence[str] | None,
                        device: str | None = None) -> tuple[Ensemble, str | None]:
    """The teachers a cache was made with, each at its recorded size, normalisation, precision
    (caches from before precision was recorded: bf16 on CUDA, fp32 elsewhere) and weight, on
    `device` (default CUDA when available). Returns (ensemble, None), or (ensemble, why) when a
    checkpoint's sha256 is not the recorded one."""
    mismatch = cache_ensemble_mismatch(attrs, checkpoint)
    given = _split_checkpoints(checkpoint)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    fallback = "bf16" if torch.device(device).type == "cuda" else "fp32"
    members = schema.teacher_members(attrs)
    out = []
    for i, m in enumerate(members):
        try:
            teacher, info = load_teacher(m["name"], None if given is None else given[i],
                                         num_classes=int(attrs["num_classes"]), input_size=int(m["input_size"]),
                                         mean=m["mean"], std=m["std"], device=device,
                                         precision=m.get("precision") or fallback, seed=i)
        except (TeacherError, OSError, RuntimeError, ValueError) as e:
            raise _member_error(i, m["name"], len(members), e) from None
        out.append(Member(teacher, info, float(m.get("weight", 1.0))))
    return Ensemble(out), mismatch


def run_views(ensemble: Ensemble, views: Sequence[Sequence[np.ndarray]], batch: int) -> torch.Tensor:
    """The ensemble's output (see `__call__`) on rendered views, `batch` at a time: views[i] holds
    view i's pixels (S, S, 3) uint8 at each of `ensemble.sizes`, in that order."""
    return torch.cat([ensemble([torch.from_numpy(np.stack([v[j] for v in views[i:i + batch]]))
                                for j in range(len(ensemble.sizes))])
                      for i in range(0, len(views), batch)])
