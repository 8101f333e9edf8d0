"""Targets and KD losses against float64 references written plainly here."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from usi_cache.stage2.loss import (kd_loss, mix_targets, one_hot_mix, soft_cross_entropy, teacher_distribution,
                                   topk_tail_mass, usi_loss)


def make_cache(full_logits: torch.Tensor, k: int):
    """What stage 1 stores for full teacher logits (N, C): top-k logits, classes, lse."""
    values, classes = full_logits.topk(k, dim=1)
    return values, classes, torch.logsumexp(full_logits, dim=1)


def logits(n, c, seed, scale=3.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, generator=g, dtype=torch.float64) * scale).to(dtype)


def ref_bucket_kl(student, P, rest, T=1.0):
    """Plain float64 k+1-bucket KL, row by row; mean over rows, times T²."""
    student, P, rest = student.double(), P.double(), rest.double()
    total = 0.0
    for n in range(student.shape[0]):
        q = torch.softmax(student[n] / T, dim=0)
        kl, q_support = 0.0, 0.0
        for c in range(student.shape[1]):
            if P[n, c] > 0:
                kl += P[n, c].item() * math.log(P[n, c].item() / q[c].item())
                q_support += q[c].item()
        if rest[n] > 0:
            kl += rest[n].item() * math.log(rest[n].item() / (1.0 - q_support))
        total += kl
    return total / student.shape[0] * T * T


def full_kl(teacher, student, T=1.0):
    """float64 KL(softmax(teacher/T) || softmax(student/T)), batch mean, times T²."""
    return F.kl_div(F.log_softmax(student.double() / T, 1), F.log_softmax(teacher.double() / T, 1),
                    log_target=True, reduction="batchmean").item() * T * T


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_kd_equals_full_kl_when_k_equals_c(dtype, tol):
    teacher, student = logits(8, 10, 0), logits(8, 10, 1)
    z, cls, lse = make_cache(teacher.to(dtype), 10)
    P, rest = teacher_distribution(z, cls, lse, 10)
    assert torch.all(rest == 0)
    assert kd_loss(student.to(dtype), P, rest).item() == pytest.approx(full_kl(teacher, student), abs=tol)


@pytest.mark.parametrize("n,c,k", [(8, 10, 1), (8, 10, 3), (8, 10, 9), (4, 1000, 10)])
def test_kd_zero_when_student_is_teacher(n, c, k):
    teacher = logits(n, c, 2, dtype=torch.float32)
    P, rest = teacher_distribution(*make_cache(teacher, k), c)
    assert abs(kd_loss(teacher, P, rest).item()) < 1e-6


def test_topk_tail_bookkeeping():
    teacher = logits(16, 50, 3, dtype=torch.float32)
    z, cls, lse = make_cache(teacher, 5)
    P, rest = teacher_distribution(z, cls, lse, 50)
    exact = torch.softmax(teacher.double(), dim=1)
    topk_mask = torch.zeros_like(exact, dtype=torch.bool).scatter_(1, cls, True)
    torch.testing.assert_close(P.double(), torch.where(topk_mask, exact, 0.0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(rest.double(), torch.where(topk_mask, 0.0, exact).sum(1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(topk_tail_mass(z, lse), rest)
    torch.testing.assert_close(P.sum(1) + rest, torch.ones(16), atol=1e-6, rtol=0)


def test_kd_matches_bucket_reference():
    n, c, k = 6, 12, 4
    teacher, student = logits(n, c, 4), logits(n, c, 5)
    P, rest = teacher_distribution(*make_cache(teacher, k), c)
    assert kd_loss(student, P, rest).item() == pytest.approx(ref_bucket_kl(student, P, rest), abs=1e-10)
    # Mixed targets: support is the union of two top-k sets.
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    Pm, rm = mix_targets(P, rest, perm, torch.linspace(0.1, 0.9, n))
    assert kd_loss(student, Pm, rm).item() == pytest.approx(ref_bucket_kl(student, Pm, rm), abs=1e-10)
    # float32 path agrees with the float64 reference.
    assert kd_loss(student.float(), P.float(), rest.float()).item() == pytest.approx(
        ref_bucket_kl(student, P, rest), abs=1e-5)


@pytest.mark.parametrize("k", [2, 6])
def test_kd_gradcheck(k):
    n, c = 3, 6
    P, rest = teacher_distribution(*make_cache(logits(n, c, 6), k), c)
    P, rest = mix_targets(P, rest, torch.tensor([1, 2, 0]), 0.7)
    student = logits(n, c, 7).requires_grad_()
    assert torch.autograd.gradcheck(lambda s: kd_loss(s, P, rest), (student,))
    assert torch.autograd.gradcheck(lambda s: kd_loss(s, P, rest, temperature=2.0), (student,))


def test_kd_finite_when_student_puts_all_mass_on_support():
    n, c, k = 4, 20, 3
    teacher = logits(n, c, 8, dtype=torch.float32)
    z, cls, lse = make_cache(teacher, k)
    P, rest = teacher_distribution(z, cls, lse, c)
    student = torch.full((n, c), -1e4).scatter_(1, cls, 50.0).requires_grad_()
    loss = kd_loss(student, P, rest)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 100  # the tail is missed badly: a big but finite loss
    assert torch.isfinite(student.grad).all()
    # k = C and a P with zeros on classes the student ignores: finite gradients too.
    P, rest = teacher_distribution(*make_cache(teacher, c), c)
    P[:, 0] = 0.0
    student = logits(n, c, 9, dtype=torch.float32).requires_grad_()
    kd_loss(student, P, rest).backward()
    assert torch.isfinite(student.grad).all()


def test_empty_rest_bucket_after_mixing():
    # C = 4, k = 2, disjoint supports: the mix covers every class, no class is left for rest.
    teacher = torch.tensor([[5.0, 4.0, 0.0, -1.0], [0.0, -1.0, 5.0, 4.0]], dtype=torch.float64)
    P, rest = teacher_distribution(*make_cache(teacher, 2), 4)
    Pm, rm = mix_targets(P, rest, torch.tensor([1, 0]), 0.5)
    assert (Pm > 0).all() and (rm > 0).all()
    student = logits(2, 4, 10).requires_grad_()
    loss = kd_loss(student, Pm, rm)
    # Rest is dropped, P renormalised: a full KL against Pm / Pm.sum.
    expected = F.kl_div(F.log_softmax(student, 1), Pm / Pm.sum(1, keepdim=True), reduction="batchmean")
    assert loss.item() == pytest.approx(expected.item(), abs=1e-12)
    loss.backward()
    assert torch.isfinite(student.grad).all()
    assert kd_loss(torch.log(Pm / Pm.sum(1, keepdim=True)), Pm, rm).item() == pytest.approx(0, abs=1e-12)


def test_mixing():
    n, c, k = 8, 10, 3
    P, rest = teacher_distribution(*make_cache(logits(n, c, 11), k), c)
    ident = torch.arange(n)
    for lam in (0.3, torch.rand(n, dtype=torch.float64)):
        Pm, rm = mix_targets(P, rest, ident, lam)
        torch.testing.assert_close(Pm, P)
        torch.testing.assert_close(rm, rest)
    perm = torch.randperm(n)
    lam = torch.rand(n)
    Pm, rm = mix_targets(P, rest, perm, lam)
    torch.testing.assert_close(Pm.sum(1) + rm, torch.ones(n, dtype=torch.float64))
    torch.testing.assert_close(Pm[2], lam[2].double() * P[2] + (1 - lam[2].double()) * P[perm[2]])
    labels = torch.randint(0, c, (n,))
    for lam in (0.25, lam):
        gt = one_hot_mix(labels, perm, lam, c)
        assert gt.shape == (n, c) and gt.dtype == torch.float32
        torch.testing.assert_close(gt.sum(1), torch.ones(n))
    gt = one_hot_mix(labels, perm, 0.25, c)
    for i in range(n):
        want = torch.zeros(c)
        want[labels[i]] += 0.25
        want[labels[perm[i]]] += 0.75
        torch.testing.assert_close(gt[i], want)


def test_temperature_one_is_exact_path():
    teacher = logits(5, 30, 12)
    z, cls, lse = make_cache(teacher, 4)
    P, rest = teacher_distribution(z, cls, lse, 30, temperature=1.0)
    torch.testing.assert_close(P.gather(1, cls), torch.exp(z - lse[:, None]), rtol=1e-12, atol=0)
    # The tempered (k+1-bucket) path is continuous at T = 1.
    P1, rest1 = teacher_distribution(z, cls, lse, 30, temperature=1.0 + 1e-9)
    torch.testing.assert_close(P1, P, rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(rest1, rest, rtol=1e-7, atol=1e-12)
    student = logits(5, 30, 13)
    assert kd_loss(student, P, rest, temperature=1.0).item() == kd_loss(student, P, rest).item()


@pytest.mark.parametrize("T", [2.0, 0.5])
def test_temperature_exact_cases(T):
    c = 10
    teacher, student = logits(6, c, 14), logits(6, c, 15)
    for k in (c, c - 1):  # empty tail, or a tail of one class: the approximation is exact
        P, rest = teacher_distribution(*make_cache(teacher, k), c, temperature=T)
        tempered = torch.softmax(teacher / T, dim=1)
        torch.testing.assert_close(P.sum(1) + rest, torch.ones(6, dtype=torch.float64))
        _, cls = teacher.topk(k, dim=1)
        torch.testing.assert_close(P.gather(1, cls), tempered.gather(1, cls))
        assert kd_loss(student, P, rest, temperature=T).item() == pytest.approx(
            full_kl(teacher, student, T), abs=1e-10)


@pytest.mark.parametrize("T", [2.0, 4.0, 0.5])
def test_temperature_approximation(T):
    n, c, k = 6, 40, 5
    teacher, student = logits(n, c, 16), logits(n, c, 17)
    z, cls, lse = make_cache(teacher, k)
    P, rest = teacher_distribution(z, cls, lse, c, temperature=T)
    assert torch.isfinite(P).all() and torch.isfinite(rest).all()
    torch.testing.assert_close(P.sum(1) + rest, torch.ones(n, dtype=torch.float64))
    # The documented formula: q_i ∝ p_i^(1/T), q_rest ∝ rest^(1/T).
    p = torch.softmax(teacher, 1).gather(1, cls)
    r = 1 - p.sum(1)
    Z = (p ** (1 / T)).sum(1) + r ** (1 / T)
    torch.testing.assert_close(P.gather(1, cls), p ** (1 / T) / Z[:, None])
    torch.testing.assert_close(rest, r ** (1 / T) / Z)
    # Direction of the error: tail under-estimated for T > 1, over-estimated for T < 1.
    true_tail = 1 - torch.softmax(teacher / T, 1).gather(1, cls).sum(1)
    assert torch.all(rest <= true_tail) if T > 1 else torch.all(rest >= true_tail)
    loss = kd_loss(student.float(), P.float(), rest.float(), temperature=T)
    assert torch.isfinite(loss) and loss.item() >= 0
    assert loss.item() == pytest.approx(ref_bucket_kl(student, P, rest, T), rel=1e-5)


def test_usi_loss_parts():
    n, c = 8, 10
    teacher, student = logits(n, c, 18, dtype=torch.float32), logits(n, c, 19, dtype=torch.float32)
    P, rest = teacher_distribution(*make_cache(teacher, 3), c)
    perm = torch.roll(torch.arange(n), 1)
    gt = one_hot_mix(torch.arange(n) % c, perm, 0.6, c)
    Pm, rm = mix_targets(P, rest, perm, 0.6)
    total, parts = usi_loss(student, gt, Pm, rm, alpha=5.0)
    ce, kd = soft_cross_entropy(student, gt).item(), kd_loss(student, Pm, rm).item()
    assert set(parts) == {"ce", "kd"} and all(v.dim() == 0 and not v.requires_grad for v in parts.values())
    assert float(parts["ce"]) == pytest.approx(ce) and float(parts["kd"]) == pytest.approx(kd)
    assert total.item() == pytest.approx(ce + 5.0 * kd, rel=1e-6)
    assert soft_cross_entropy(student, gt).item() == pytest.approx(
        -(gt.double() * torch.log_softmax(student.double(), 1)).sum(1).mean().item(), rel=1e-6)
    total, parts = usi_loss(student, gt, Pm, rm, alpha=2.0, kd_only=True)
    assert set(parts) == {"kd"}
    assert total.item() == pytest.approx(2.0 * kd, rel=1e-6)


def test_half_precision_inputs():
    n, c, k = 16, 100, 10
    teacher, student = logits(n, c, 20, dtype=torch.float32), logits(n, c, 21, dtype=torch.float32)
    z, cls, lse = make_cache(teacher, k)
    # As stage 1 stores them: fp16 logits, uint16 classes, float32 lse.
    P16, rest16 = teacher_distribution(z.half(), cls.to(torch.uint16), lse, c)
    P32, rest32 = teacher_distribution(z, cls, lse, c)
    assert P16.dtype == torch.float32
    loss16, loss32 = kd_loss(student, P16, rest16), kd_loss(student, P32, rest32)
    # fp16 storage rounds logits (ulp 2^-8 near 8): ~1e-3 relative in p, less in the loss.
    assert loss16.item() == pytest.approx(loss32.item(), rel=1e-3)
    # Half inputs are cast up, not computed in half: same as the rounded values in float32.
    P_r, rest_r = teacher_distribution(z.half().float(), cls, lse, c)
    torch.testing.assert_close(P16, P_r, rtol=0, atol=0)
    s16 = student.to(torch.bfloat16)
    assert kd_loss(s16, P16, rest16).dtype == torch.float32
    assert kd_loss(s16, P16, rest16).item() == pytest.approx(kd_loss(s16.float(), P16, rest16).item(), abs=1e-6)
    assert kd_loss(s16, P16, rest16).item() == pytest.approx(loss32.item(), abs=2e-2)


def test_bad_temperature():
    with pytest.raises(ValueError):
        kd_loss(torch.zeros(1, 3), torch.tensor([[1.0, 0, 0]]), torch.zeros(1), temperature=0.0)


def test_sharp_teacher_tail_survives_the_cache_storage():
    """Schema 3 stores log-probabilities: with large logits (a sharp teacher) the tail mass read
    back stays within float16 rounding of the exact one, where float16 raw logits (schema 1-2)
    pushed sum p above 1 and the tail was clamped to 0."""
    from usi_cache.stage1.run import topk_targets
    g = torch.Generator().manual_seed(0)
    C, k = 1000, 10
    logits = torch.randn(2000, C, generator=g) * 2
    logits[torch.arange(2000), torch.randint(0, C, (2000,), generator=g)] += 14
    logits = logits + torch.rand(2000, 1, generator=g) * 400  # |z| up to ~420: the fp16 spacing is 0.25
    exact = torch.topk(logits.double(), k, 1).values - torch.logsumexp(logits.double(), 1, keepdim=True)
    ref_tail = -torch.expm1(torch.logsumexp(exact, 1))
    log_p, _, lse = topk_targets(logits, k)
    assert log_p.dtype == np.float16
    tail = topk_tail_mass(torch.from_numpy(log_p), None).double()
    assert ((-torch.expm1(torch.logsumexp(torch.from_numpy(log_p).double(), 1))) < 0).sum() == 0  # never clamped
    assert (tail - ref_tail).abs().max() < 2e-3 * ref_tail.max()
    # a confident teacher: the tail (~1e-9) is below the float16 rounding of log p_1, and still
    # sum p <= 1 on every row (the stored log-probabilities are rounded down)
    sure = torch.randn(2000, 10, generator=g) * 3
    sure[:, 0] += 30
    sure_lp, _, _ = topk_targets(sure, 5)
    assert (torch.logsumexp(torch.from_numpy(sure_lp).double(), 1) <= 0).all()
    # the old storage: raw logits in float16 with the float32 lse
    z16 = torch.topk(logits, k, 1).values.half()
    old = z16.double() - torch.from_numpy(lse).double()[:, None]
    assert (torch.logsumexp(old, 1) > 0).float().mean() > 0.1  # a large share of rows over 1
    # either form gives the same target through teacher_distribution
    cls = torch.topk(logits, k, 1).indices
    P, rest = teacher_distribution(torch.from_numpy(log_p), cls, None, C)
    P2, rest2 = teacher_distribution(torch.from_numpy(log_p).double() + torch.from_numpy(lse).double()[:, None],
                                     cls, torch.from_numpy(lse).double(), C)
    torch.testing.assert_close(P.double(), P2, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(rest.double(), rest2, rtol=0, atol=1e-6)  # float32 vs float64 sum


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_drop_tail_is_the_renormalised_top_k(T):
    """kd_tail: drop — the target is softmax(log p / T) over the k cached classes, no tail; the KD
    term is then the plain KL from that renormalised top-k to the student (its tail classes count
    only through q's normalisation)."""
    n, c, k = 6, 12, 3
    teacher, student = logits(n, c, 8), logits(n, c, 9)
    z, cls, lse = make_cache(teacher, k)
    P, rest = teacher_distribution(z, cls, lse, c, temperature=T, drop_tail=True)
    assert torch.all(rest == 0)
    want = torch.softmax((z - lse[:, None]) / T, dim=1)  # the renormalised, tempered top-k
    torch.testing.assert_close(P.gather(1, cls), want)
    assert torch.count_nonzero(P, dim=1).tolist() == [k] * n
    log_q = F.log_softmax(student / T, dim=1).gather(1, cls)
    by_hand = (want * (want.log() - log_q)).sum(1).mean().item() * T * T
    assert kd_loss(student, P, rest, temperature=T).item() == pytest.approx(by_hand, abs=1e-10)
    kept = teacher_distribution(z, cls, lse, c, temperature=T)
    assert kd_loss(student, *kept, temperature=T).item() != pytest.approx(by_hand, abs=1e-3)  # the forms differ


def test_drop_tail_changes_nothing_when_k_equals_c():
    teacher, student = logits(8, 10, 10), logits(8, 10, 11)
    z, cls, lse = make_cache(teacher, 10)
    kept, dropped = (teacher_distribution(z, cls, lse, 10, drop_tail=d) for d in (False, True))
    torch.testing.assert_close(dropped[0], kept[0])
    assert kd_loss(student, *dropped).item() == pytest.approx(kd_loss(student, *kept).item(), abs=1e-12)
