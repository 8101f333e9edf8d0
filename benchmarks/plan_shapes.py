"""Epoch plan: stage-2 epoch accounting at ImageNet shapes, by enumeration (no image is read).

ImageNet-1k's samples in its number of shards of uneven size, a few of them holding no valid
sample (every image undecodable), ranks × data workers, a per-rank batch and a shuffle buffer
as in the USI recipe; without and with repeated augmentation R. Counted: steps per rank, uses,
distinct samples, what is left out, copies of a sample sharing a local batch (every worker of
one rank through the real shuffle buffer), decodes and tar reads, and how often each sample is
selected over several epochs. `--shards`, `--samples`, `--world`, … enumerate other shapes.

Interpretation:
Without repeated augmentation only a remainder smaller than one global batch rests each epoch,
a different one each time; with R each epoch trains on 1/R of the samples, R copies each (each
decoded by the worker that reads it), and no copy shares a local batch with its own copy.
Workers read a few more tars than there are shards: a shard cut between two workers is read by
both, each up to its cut. `tests/test_epoch_plan.py` asserts these counts, and a torchrun test
checks them on real keys.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from bench_common import NOT_RECORDED, publish, table
from usi_cache.stage2.plan import PlanSpec, enumerate_plan, exact_shuffle, worker_pieces

IMAGENET_SHARDS, IMAGENET_SAMPLES = 1282, 1_281_167


def uneven_counts(shards: int, samples: int, seed: int = 0, empty: int = 0) -> tuple[int, ...]:
    """`samples` in `shards` of uneven size (±4 % around the mean), `empty` of them holding no
    valid sample (every image undecodable)."""
    rng = np.random.default_rng(seed)
    mean = -(-samples // shards)
    counts = rng.integers(mean - mean // 25, mean + mean // 25, shards)
    counts[rng.choice(shards, empty, replace=False)] = 0
    full = np.flatnonzero(counts)
    diff = samples - int(counts.sum())
    counts[full] += diff // len(full)
    counts[full[:diff % len(full)]] += 1
    assert counts.sum() == samples and counts[full].min() > 0.9 * mean
    return tuple(int(c) for c in counts)


def imagenet_counts(seed: int = 0, empty: int = 0) -> tuple[int, ...]:
    """1,281,167 samples in 1,282 shards of uneven size (960..1,040)."""
    return uneven_counts(IMAGENET_SHARDS, IMAGENET_SAMPLES, seed, empty)


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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=IMAGENET_SHARDS)
    p.add_argument("--samples", type=int, default=IMAGENET_SAMPLES, help="valid samples in all")
    p.add_argument("--empty", type=int, default=5, help="shards with no valid sample")
    p.add_argument("--world", type=int, default=8, help="ranks")
    p.add_argument("--workers", type=int, default=8, help="data workers per rank")
    p.add_argument("--batch", type=int, default=128, help="per rank")
    p.add_argument("--buffer", type=int, default=1000, help="shuffle buffer")
    p.add_argument("--epochs", type=int, default=6, help="epochs over which selections are counted")
    p.add_argument("--repeats", default="1,3", help="values of R (repeated augmentation), comma-separated")
    p.add_argument("--seed", type=int, default=42)
    return p


def report(r: dict) -> str:
    """The table and findings of an epoch_plan results file."""
    shape = r["shape"]
    plans = {int(k[2:]): v for k, v in r.items() if k.startswith("R=")}
    epochs = next(int(k.split("_")[2]) for k in plans[min(plans)] if k.startswith("selected_over_"))
    rows = [[R, v["steps"], v["uses"], v["distinct"], v["max_uses"], v["left_out"],
             f"{v['decodes_per_selected_sample']:.2f}", v["in_batch_duplicates_rank0"],
             f"{v['tar_reads']} / {v['shards']}", "{}..{}".format(*v[f"selected_over_{epochs}_epochs"])]
            for R, v in sorted(plans.items())]
    global_batch = shape["world"] * shape["batch"]
    empty = shape.get("empty_shards", NOT_RECORDED)
    lines = [f"{shape['shards']} shards of uneven size (with no valid sample: {empty}), {shape['samples']} valid "
             f"samples, {shape['world']} ranks × {shape['workers']} workers, batch {shape['batch']} per rank, shuffle "
             f"buffer {shape['shuffle_buffer']}, seed {shape['seed']}", "",
             table(["R", "steps/rank", "uses", "distinct samples", "max uses", "not used", "decodes/selected sample",
                    "copies sharing a batch (rank 0)", "tar reads / shards", f"times selected in {epochs} epochs"],
                   rows), ""]
    for R, v in sorted(plans.items()):
        if R == 1:
            lines.append(f"* R = 1: {v['left_out']} samples rest each epoch (one global batch: {global_batch})")
        else:
            lines.append(f"* R = {R}: each epoch trains on {v['distinct'] / shape['samples']:.3f} of the samples, "
                         f"{v['max_uses']} copies each; copies sharing a batch on rank 0: "
                         f"{v['in_batch_duplicates_rank0']}")
        lines.append(f"  workers read {100 * (v['tar_reads'] / v['shards'] - 1):.1f} % more tars than there are "
                     f"shards; each sample is selected {v[f'selected_over_{epochs}_epochs'][0]} to "
                     f"{v[f'selected_over_{epochs}_epochs'][1]} times in {epochs} epochs")
    lines.append(f"* enumerated in {r['wall_s']:.1f} s" if "wall_s" in r else f"* enumeration time: {NOT_RECORDED}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    a = parser().parse_args(argv)
    t0 = time.perf_counter()
    base = dict(counts=uneven_counts(a.shards, a.samples, empty=a.empty), seed=a.seed, world=a.world,
                workers=a.workers, batch=a.batch)
    payload = {"args": vars(a), "shape": {k: v for k, v in base.items() if k != "counts"} | {
        "shards": a.shards, "samples": a.samples, "empty_shards": a.empty, "shuffle_buffer": a.buffer}}
    for R in (int(x) for x in a.repeats.split(",")):
        payload[f"R={R}"] = measure(PlanSpec(**base, repeats=R), epochs=a.epochs, buffer=a.buffer)
        print(f"R = {R}: enumerated", flush=True)
    payload["wall_s"] = time.perf_counter() - t0
    publish("epoch_plan", payload, report)


if __name__ == "__main__":
    main()
