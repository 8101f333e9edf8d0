"""The epoch plan, enumerated at ImageNet shapes without reading an image.

1,282 shards of about 1,000 valid samples (uneven), 8 ranks x 8 workers, batch 128, as a USI
run on ImageNet-1k has them; the counts asserted here are what a real run's log.jsonl reports.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest
from helpers import ROOT

from usi_cache.stage2.plan import PlanError, PlanSpec, enumerate_plan, exact_shuffle, summarize, worker_pieces

sys.path.insert(0, str(ROOT / "benchmarks"))
from plan_shapes import imagenet_counts  # noqa: E402  (the benchmark's shapes, one definition)


IMAGENET = dict(counts=imagenet_counts(empty=5), seed=42, world=8, workers=8, batch=128)


@pytest.mark.slow
def test_r1_every_valid_sample_exactly_once_but_a_rotating_remainder():
    spec = PlanSpec(**IMAGENET)
    N, G = spec.num_samples, 8 * 128
    assert spec.steps == N // G == 1251
    left_out = []
    for epoch in (0, 1, 2):
        u = enumerate_plan(spec, epoch)
        uses = np.bincount(u["position"], minlength=N)
        assert len(u["position"]) == spec.steps * G
        assert uses.max() == 1  # no sample twice
        assert (uses == 0).sum() == N - spec.steps * G < G  # only a remainder under one global batch
        for r in range(8):  # every rank the same steps, every worker its batches
            for w in range(8):
                n = ((u["rank"] == r) & (u["worker"] == w)).sum()
                assert n == spec.worker_batches(w) * 128
        assert (u["view"] == epoch).all()
        left_out.append(set(np.flatnonzero(uses == 0)))
    assert not left_out[0] & left_out[1] and not left_out[1] & left_out[2]  # the remainder rotates


@pytest.mark.slow
def test_r3_repeated_augmentation_as_repeat_aug_sampler():
    """Same steps as R = 1; ~N/3 distinct samples, each 3 times with 3 distinct views on 3
    different ranks (so never in one local batch); 3 epochs select every sample once."""
    spec = PlanSpec(**IMAGENET, repeats=3)
    N, G = spec.num_samples, 8 * 128
    assert spec.steps == 1251
    selections = np.zeros(N, np.int64)
    for epoch in range(3):
        u = enumerate_plan(spec, epoch)
        assert len(u["position"]) == spec.steps * G
        uses = np.bincount(u["position"], minlength=N)
        used = np.flatnonzero(uses)
        assert len(used) == spec.selected == -(-spec.steps * G // 3)
        assert (uses[used] == 3).sum() >= len(used) - 2 and uses.max() == 3  # < R copies dropped
        order = np.lexsort((u["rank"], u["position"]))
        pos, rank, view = u["position"][order], u["rank"][order], u["view"][order]
        same = pos[1:] == pos[:-1]
        assert not (same & (rank[1:] == rank[:-1])).any()  # copies on different ranks
        assert not (same & (view[1:] == view[:-1])).any()  # distinct views
        selections += uses > 0
    # 3 epochs select 3 x D = 1,281,024 consecutive positions: all samples once but the 143
    # under one global batch that the next epoch starts with
    assert selections.max() == 1 and (selections == 0).sum() == N - 3 * spec.selected < G
    s = summarize(spec)
    assert s.uses == spec.steps * G and s.dropped_uses < 3


def test_views_walk_through_the_cache_before_repeating():
    """With R = 3 and V = 9, a sample's 9 uses over its first 3 selections are views 0..8."""
    spec = PlanSpec(counts=(50, 47, 0, 61, 58), seed=1, world=3, workers=2, batch=4, repeats=3)
    views: dict[int, list[int]] = {}
    for epoch in range(12):
        u = enumerate_plan(spec, epoch)
        for p, v in zip(u["position"], u["view"] % 9):
            views.setdefault(int(p), []).append(int(v))
    for p, seq in views.items():
        first = sorted(seq[:9])
        if len(seq) >= 9:
            assert first == list(range(9)), (p, seq)


@pytest.mark.parametrize("world,workers,batch,repeats", [(1, 0, 8, 1), (2, 3, 5, 1), (3, 2, 7, 2),
                                                          (1, 2, 4, 3), (5, 1, 3, 4)])
def test_small_shapes_are_exact(world, workers, batch, repeats):
    counts = (12, 0, 7, 12, 12, 3, 11)
    spec = PlanSpec(counts=counts, seed=5, world=world, workers=workers, batch=batch, repeats=repeats)
    for epoch in range(4):
        u = enumerate_plan(spec, epoch)
        assert len(u["position"]) == spec.steps * world * batch
        uses = np.bincount(u["position"], minlength=spec.num_samples)
        assert uses.max() <= repeats
        if repeats == 1:
            assert (uses == 0).sum() < world * batch
        for r in range(world):
            assert (u["rank"] == r).sum() == spec.steps * batch


def test_too_few_samples_for_one_global_batch_is_refused():
    with pytest.raises(PlanError, match="cannot fill one global batch of 2 ranks x 8"):
        PlanSpec(counts=(5, 4), seed=0, world=2, workers=1, batch=8).steps


def test_a_shard_piece_never_leaves_its_shard():
    spec = PlanSpec(**IMAGENET, repeats=3)
    for p in worker_pieces(spec, 5, 7, 7):
        assert 0 <= p.lo < p.hi <= spec.counts[p.shard]


def test_exact_shuffle_emits_each_item_once_and_keeps_copies_apart():
    rng = np.random.default_rng(0)
    # one worker holding 3 copies of each of 40 samples next to each other: the worst case
    items = [(i, r) for i in range(40) for r in range(3)]
    out = list(exact_shuffle(iter(items), 16, rng, batch=8, key=lambda t: t[0]))
    assert sorted(out) == sorted(items)
    batches = [out[i:i + 8] for i in range(0, len(out), 8)]
    assert sum(8 - len({k for k, _ in b}) for b in batches[:-2]) == 0  # the tail may run out of choice
    assert out[:16] != items[:16]


def test_in_batch_duplicates_at_imagenet_shapes_are_zero():
    """One rank's 8 workers through the shuffle buffer of 1,000, R = 3: no batch holds two copies."""
    spec = PlanSpec(**IMAGENET, repeats=3)
    u = enumerate_plan(spec, 0)
    dup = 0
    for w in range(8):
        mine = u["position"][(u["rank"] == 3) & (u["worker"] == w)]
        out = np.fromiter(exact_shuffle(iter(mine.tolist()), 1000, np.random.default_rng(w), 128,
                                        key=lambda p: p), np.int64)
        assert np.array_equal(np.sort(out), np.sort(mine))
        batches = out.reshape(-1, 128)
        dup += sum(128 - len(np.unique(b)) for b in batches)
    assert dup == 0
