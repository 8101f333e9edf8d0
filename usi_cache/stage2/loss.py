"""Soft targets from the cache (top-k log-probabilities, or logits + lse) and the USI loss.

Pure functions of tensors: no model or teacher object is hidden in here. Shapes use
N = batch, k = cached top-k, C = number of classes.

A teacher target is held *dense*: `P` (N, C) holds the teacher probabilities at the cached
classes and zero elsewhere, and `rest` (N,) the teacher mass outside them. The *support* of a
row is {c : P[n, c] > 0}; the *rest bucket* is every other class. This form is linear, which
is what batch mixing needs, and it is what the k+1-bucket KL in `kd_loss` reads.

Precision: the math runs in float32 whatever the input dtype (fp16/bf16 are cast up, so the
fp16 values straight from the cache are fine); float64 inputs stay float64 so that
`torch.autograd.gradcheck` runs in float64 end to end.

The teacher's top-k arrive either as log-probabilities log p_i (what a schema-3 cache stores
and `schema.read_block` returns as `log_probs` for every version; pass lse=None) or as raw
logits z_i with the log-sum-exp over all C classes (log p_i = z_i − lse).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half types are computed in float32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _tail_from_log_p(log_p: Tensor) -> Tensor:
    """Tail mass 1 − Σ exp(log_p) of each row of `log_p` (N, k) → (N,), clamped at 0.

    Computed as −expm1(logsumexp(log_p)): no cancellation when the tail is small (it is then
    only as exact as the stored lse, whose rounding also makes Σ p a hair above 1 at times —
    hence the clamp).
    """
    return (-torch.expm1(torch.logsumexp(log_p, dim=1))).clamp(min=0)


def topk_log_probs(values: Tensor, lse: Tensor | None) -> Tensor:
    """log p_i (N, k) in float32 (float64 for float64 inputs) from log-probabilities
    (lse=None) or from logits z (N, k) and their log-sum-exp lse (N,)."""
    if lse is None:
        return values.to(_dtype(values))
    dtype = _dtype(values, lse)
    return values.to(dtype) - lse.to(dtype)[:, None]


def topk_tail_mass(topk_logits: Tensor, lse: Tensor | None) -> Tensor:
    """Teacher mass outside the top-k: 1 − Σ_i p_i.

    topk_logits: (N, k) any float dtype, logits z (with lse: (N,) log-sum-exp over all C
    logits) or log-probabilities (lse=None). Returns (N,) in float32 (float64 for float64
    inputs), clamped at 0.
    """
    return _tail_from_log_p(topk_log_probs(topk_logits, lse))


def teacher_distribution(topk_logits: Tensor, classes: Tensor, lse: Tensor | None, num_classes: int,
                         temperature: float = 1.0, drop_tail: bool = False) -> tuple[Tensor, Tensor]:
    """Dense teacher target from one cached view per row.

    Args:
        topk_logits: (N, k) teacher top-k logits z, or their log-probabilities log p_i when
            lse is None (fp16 from the cache is fine).
        classes: (N, k) their class indices (any integer dtype, e.g. the cache's uint16/int32).
        lse: (N,) log-sum-exp of all C teacher logits; None: topk_logits are log-probabilities.
        num_classes: C.
        temperature: T > 0.
        drop_tail: the top-k renormalised to sum 1 and rest = 0 (tempered as softmax(log p / T)
            over the k classes): the form of stores that keep no tail mass (FKD's
            re-normalisation), for comparison; the default keeps the tail as a bucket.

    Returns:
        P: (N, C) float32 (float64 for float64 inputs); P[n, classes[n, i]] = p_i, 0 elsewhere.
        rest: (N,) mass outside the support, so that P.sum(1) + rest = 1.

    T = 1 (exact): p_i = exp(z_i − lse), rest = 1 − Σ_i p_i. With k = C there is no tail and
    rest is 0 by definition (1 − Σ p would only be rounding noise, which T > 1 would amplify).

    T ≠ 1 (approximation): the exact tempered target softmax(z / T) needs the tail logits,
    which are not cached. Instead the tail is treated as ONE pseudo-class with logit
    log(rest) + lse, and the k + 1 buckets are tempered and renormalised:

        q_i    = p_i^(1/T)    / Z,   i = 1..k
        q_rest = rest^(1/T)   / Z,   Z = Σ_i p_i^(1/T) + rest^(1/T)

    (equivalently, softmax over [z_1/T, …, z_k/T, (log(rest) + lse)/T]). The top-k part is
    exact up to the tail term in Z. It is exact when the tail is a single class (k = C − 1)
    or empty (k = C), and at T = 1. Otherwise, as x ↦ x^(1/T) is subadditive for T > 1,
    Σ_tail p_j^(1/T) ≥ rest^(1/T): for T > 1 the tempered tail mass is *under*-estimated
    (the top-k over-estimated), for T < 1 the reverse.
    """
    _check_temperature(temperature)
    if (topk_logits.shape != classes.shape or topk_logits.ndim != 2
            or (lse is not None and lse.shape != topk_logits.shape[:1])):
        raise ValueError(f"shapes: topk_logits {tuple(topk_logits.shape)}, classes {tuple(classes.shape)}, "
                         f"lse {None if lse is None else tuple(lse.shape)}; want (N, k), (N, k), (N,) or None")
    log_p = topk_log_probs(topk_logits, lse)                        # (N, k), exact log p_i
    dtype = log_p.dtype
    if drop_tail:
        log_p = log_p - torch.logsumexp(log_p, dim=1, keepdim=True)
    if drop_tail or topk_logits.shape[1] >= num_classes:
        rest = torch.zeros_like(log_p[:, 0])
    else:
        rest = _tail_from_log_p(log_p)
    if temperature == 1.0:
        p = log_p.exp()
    else:
        # log(0) = -inf gives an empty rest bucket zero weight, as it should.
        buckets = torch.cat([log_p, torch.log(rest)[:, None]], dim=1) / temperature
        q = torch.softmax(buckets, dim=1)
        p, rest = q[:, :-1], q[:, -1]
    # scatter_add rather than scatter: a (malformed) duplicate class keeps its mass instead
    # of one write winning nondeterministically.
    P = torch.zeros(log_p.shape[0], num_classes, dtype=dtype, device=log_p.device)
    P.scatter_add_(1, classes.long(), p)
    return P, rest


def _lam(lam: Tensor | float, like: Tensor) -> Tensor | float:
    """Mixing weight that broadcasts over rows: a float stays a float (a tensor made from it
    on the GPU would be a blocking host-to-device copy every step); (N,) becomes (N, 1) of
    `like`'s dtype/device."""
    if not isinstance(lam, Tensor):
        return float(lam)
    lam = lam.to(dtype=like.dtype, device=like.device, non_blocking=True)
    return lam.reshape(-1, 1) if lam.ndim else lam


def mix_targets(P: Tensor, rest: Tensor, perm: Tensor, lam: Tensor | float) -> tuple[Tensor, Tensor]:
    """Mixup/CutMix of cached teacher targets: row n ← lam·row n + (1 − lam)·row perm[n].

    P: (N, C), rest: (N,), perm: (N,) long, lam: float or (N,) (weight of the unpermuted row;
    for CutMix, its area fraction). Returns (P_mix (N, C), rest_mix (N,)), still summing to 1.

    APPROXIMATION: the teacher never saw the mixed image, and its output on a mixed image is
    not the mix of its outputs. Further, the mixed rest bucket covers only the classes outside
    the union of both supports, while part of row a's tail may really lie on row b's support.
    The exact alternative is a paired cache (the teacher sees the mixed image).
    """
    lam2 = _lam(lam, P)
    lam1 = lam2.reshape(-1) if isinstance(lam2, Tensor) and lam2.ndim else lam2
    return lam2 * P + (1 - lam2) * P[perm], lam1 * rest + (1 - lam1) * rest[perm]


def one_hot_mix(labels: Tensor, perm: Tensor, lam: Tensor | float, num_classes: int) -> Tensor:
    """Mixed ground truth: lam·onehot(labels) + (1 − lam)·onehot(labels[perm]).

    labels: (N,) int in [0, C); perm: (N,) long; lam: float or (N,). Returns (N, C) float32.
    """
    onehot = F.one_hot(labels.long(), num_classes).float()
    lam = _lam(lam, onehot)
    return lam * onehot + (1 - lam) * onehot[perm]


def kd_loss(student_logits: Tensor, P: Tensor, rest: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(teacher ‖ student) over k + 1 buckets, mean over the batch, times T².

    student_logits: (N, C) any float dtype. P: (N, C), rest: (N,) from `teacher_distribution`
    (called with the same `temperature`) or `mix_targets`. Returns a scalar (float32; float64
    for float64 inputs).

    With q = softmax(student_logits / T), the buckets are the support classes {c : P_c > 0}
    and one rest bucket whose student side is q_rest = 1 − Σ_support q_c:

        KL = Σ_support P_c log(P_c / q_c) + rest · log(rest / q_rest)

    With k = C (rest = 0) this is the full KL exactly. Multiplied by T² (Hinton et al.) so that
    gradient magnitudes do not shrink as 1/T² when T changes.

    Stability: log q_rest is taken as logsumexp of log q over the classes *outside* the
    support, which equals log(1 − Σ_support q) without its cancellation: it stays finite when
    the student puts ~all its mass on the support (where log1p(−Σ q) would give −inf).
    0·log 0 = 0 for zero entries of P and for rest = 0, in values and in gradients.

    A row whose support covers all C classes has an empty rest bucket: its `rest` (rounding
    noise at k = C, or after mixing tail mass that no class is left to carry) is dropped. P and
    rest are renormalised to sum to 1 (they already do up to rounding otherwise), so the loss
    is always a proper KL ≥ 0, and 0 when the student matches the teacher.
    """
    _check_temperature(temperature)
    dtype = _dtype(student_logits, P, rest)
    log_q = F.log_softmax(student_logits.to(dtype) / temperature, dim=1)        # (N, C)
    P, rest = P.to(dtype), rest.to(dtype)
    support = P > 0
    has_rest = ~support.all(dim=1)                                               # (N,)
    # Rows with no class outside the support get a dummy finite input (its value is discarded
    # by `rest = 0` below): logsumexp over all -inf would give nan gradients.
    outside = log_q.masked_fill(support, float("-inf")).masked_fill(~has_rest[:, None], 0.0)
    log_q_rest = torch.logsumexp(outside, dim=1)                                 # (N,)
    rest = torch.where(has_rest, rest, 0.0)
    total = P.sum(dim=1) + rest
    P, rest = P / total[:, None], rest / total
    # torch.where, not a product: 0 · (−inf) would be nan if the student has -inf logits.
    kl_support = torch.where(support, torch.xlogy(P, P) - P * log_q, 0.0).sum(dim=1)
    kl_rest = torch.where(rest > 0, torch.xlogy(rest, rest) - rest * log_q_rest, 0.0)
    return (kl_support + kl_rest).mean() * temperature ** 2


def soft_cross_entropy(student_logits: Tensor, target_probs: Tensor) -> Tensor:
    """−Σ_c t_c log softmax(student)_c, mean over the batch.

    student_logits: (N, C); target_probs: (N, C), rows summing to 1 (e.g. `one_hot_mix`).
    Returns a scalar (float32; float64 for float64 inputs).
    """
    dtype = _dtype(student_logits, target_probs)
    log_q = F.log_softmax(student_logits.to(dtype), dim=1)
    return -(target_probs.to(dtype) * log_q).sum(dim=1).mean()


def usi_loss(student_logits: Tensor, gt_probs: Tensor, P: Tensor, rest: Tensor, *,
             alpha: float = 5.0, temperature: float = 1.0,
             kd_only: bool = False) -> tuple[Tensor, dict[str, float]]:
    """USI loss: CE(student, mixed ground truth) + alpha · KD (USI: alpha = 5, T = 1).

    student_logits: (N, C); gt_probs: (N, C) mixed ground truth (`one_hot_mix`); P (N, C),
    rest (N,): the (mixed) teacher target. kd_only drops the CE term: total = alpha · KD.

    Returns (total, parts): total is the scalar to backpropagate; parts holds the unweighted
    terms as detached 0-d tensors on the device (reading them is a CPU-GPU sync point, left to
    the caller), "kd" always and "ce" only when it was computed (no made-up 0).
    """
    kd = kd_loss(student_logits, P, rest, temperature)
    if kd_only:
        return alpha * kd, {"kd": kd.detach()}
    ce = soft_cross_entropy(student_logits, gt_probs)
    return ce + alpha * kd, {"ce": ce.detach(), "kd": kd.detach()}
