"""Stage-2 epoch accounting at ImageNet shapes, by enumeration (no image is read).

1,282 shards of uneven size (1,281,167 valid samples), 8 ranks x 8 workers, batch 128, shuffle
buffer 1,000, R = 1 and R = 3: steps, uses, distinct samples, what is left out, copies sharing a
local batch (every worker of one rank through the real shuffle buffer), decodes and tar reads.

    .venv/bin/python benchmarks/epoch_plan.py
"""
from __future__ import annotations

import time

import numpy as np

from bench_common import table, write_result
from usi_cache.epoch_plan import PlanSpec, enumerate_plan, exact_shuffle, worker_pieces


def imagenet_counts(seed: int = 0, empty: int = 0) -> tuple[int, ...]:
    """1,281,167 samples in 1,282 shards of uneven size (960..1,040), `empty` of them holding no
    valid sample (every image undecodable)."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(960, 1040, 1282)
    counts[rng.choice(1282, empty, replace=False)] = 0
    full = np.flatnonzero(counts)
    diff = 1_281_167 - int(counts.sum())
    counts[full] += diff // len(full)
    counts[full[:diff % len(full)]] += 1
    assert counts.sum() == 1_281_167 and counts[full].min() > 900
    return tuple(int(c) for c in counts)


def measure(spec: PlanSpec, epochs: int, buffer: int) -> dict:
    N = spec.num_samples
    selected = np.zeros(N, np.int64)
    out = {}
    for epoch in range(epochs):
        u = enumerate_plan(spec, epoch)
        uses = np.bincount(u["position"], minlength=N)
        selected += uses > 0
        if epoch == 0:
            dup = 0
            for w in range(max(spec.workers, 1)):  # one rank's workers through the shuffle buffer
                mine = u["position"][(u["rank"] == 0) & (u["worker"] == w)]
                order = np.fromiter(exact_shuffle(iter(mine.tolist()), buffer, np.random.default_rng(w),
                                                  spec.batch, key=lambda p: p), np.int64)
                dup += sum(len(b) - len(np.unique(b)) for b in order.reshape(-1, spec.batch))
            reads = sum(len(worker_pieces(spec, epoch, r, w)) for r in range(spec.world)
                        for w in range(max(spec.workers, 1)))
            out = {"steps": spec.steps, "uses": int(uses.sum()), "distinct": int((uses > 0).sum()),
                   "max_uses": int(uses.max()), "left_out": int((uses == 0).sum()),
                   "in_batch_duplicates_rank0": int(dup),
                   # each unit is decoded by the worker that reads it (copies on other ranks)
                   "decodes_per_selected_sample": float(uses.sum() / (uses > 0).sum()),
                   "tar_reads": reads, "shards": len(spec.counts)}
    out[f"selected_over_{epochs}_epochs"] = [int(selected.min()), int(selected.max())]
    return out


def main() -> None:
    t0 = time.perf_counter()
    base = dict(counts=imagenet_counts(empty=5), seed=42, world=8, workers=8, batch=128)
    rows, payload = [], {}
    for R in (1, 3):
        r = measure(PlanSpec(**base, repeats=R), epochs=6, buffer=1000)
        payload[f"R={R}"] = r
        rows.append([R, r["steps"], r["uses"], r["distinct"], r["max_uses"], r["left_out"],
                     f"{r['decodes_per_selected_sample']:.2f}",
                     r["in_batch_duplicates_rank0"], f"{r['tar_reads']} / {r['shards']}",
                     "{}..{}".format(*r["selected_over_6_epochs"])])
    print(table(["R", "steps/rank", "uses", "distinct samples", "max uses", "not used", "decodes/selected sample",
                 "copies sharing a batch (rank 0)", "tar reads / shards", "times selected in 6 epochs"], rows))
    print(f"enumerated in {time.perf_counter() - t0:.1f} s")
    write_result("epoch_plan", {"shape": {k: v for k, v in base.items() if k != "counts"} | {
        "shards": 1282, "samples": sum(base["counts"]), "shuffle_buffer": 1000}, **payload})


if __name__ == "__main__":
    main()
