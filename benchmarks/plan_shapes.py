"""Epoch plan: stage-2 epoch accounting at ImageNet shapes, by enumeration (no image is read).

ImageNet-1k's samples in its number of shards of uneven size, a few of them holding no valid
sample (every image undecodable), data workers per rank, a per-rank batch and a shuffle buffer as
in the USI recipe; for each world size (8, 16 and 2 ranks by default) without and with repeated
augmentation R. Every unit of one epoch goes through the data path's own `assemble` and shuffle
(`usi_cache.stage2.plan.enumerate_plan`). Counted: steps per rank, uses, distinct samples, what is
left out, samples with fewer than R copies, copies sharing one global step and on distinct ranks,
copies sharing a local batch, distinct classes per local batch (classes drawn at random per
sample, as in shards made by `usi shards`) beside timm's `RepeatAugSampler` over a random
permutation, tar bytes each rank reads (in samples whose bytes it reads; samples before a piece
that starts mid-shard are passed over by their tar headers) against R = 1, and how often
each sample is selected over several epochs. `--shards`, `--samples`, `--worlds`, … enumerate
other shapes.

Interpretation:
Without repeated augmentation only a remainder smaller than one global batch rests each epoch, a
different one each time. With R each epoch trains on ≈ 1/R of the samples, R copies each with R
distinct views, all R in the same global step: on R different ranks where world ≥ R, in one local
batch where world < R forces it (world 2, R = 3). timm's sampler, for comparison, splits the copies
of a sample over two steps whenever its group straddles a step boundary. A local batch holds as
many classes as under timm's sampler. The R ranks that share a copy group read the same shard
pieces, so a rank reads the samples it trains and no more, as with R = 1, at every world size
(a rank has R / gcd(W, R) times more streams, and so passes over more samples by their headers).
`tests/test_epoch_plan.py` asserts these on a smaller enumerated shape, and torchrun tests
check them on real keys in log.jsonl.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from bench_common import NOT_RECORDED, publish, table
from usi_cache.stage2.plan import PlanSpec, copy_stats, enumerate_plan, rank_reads, selected_pieces

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


def classes_per_batch(classes: np.ndarray, rank: np.ndarray, step: np.ndarray, steps: int) -> float:
    """Mean distinct classes in a local batch, from one row per unit."""
    batch_id = rank.astype(np.int64) * steps + step
    pairs = np.unique(batch_id * (int(classes.max()) + 1) + classes)
    return float(len(pairs) / len(np.unique(batch_id)))


def repeat_aug_sampler(spec: PlanSpec, seed: int) -> dict[str, np.ndarray]:
    """timm's RepeatAugSampler over a random permutation: indices repeat-interleaved R times and
    dealt round-robin to the ranks, each rank's first steps × batch taken in order."""
    perm = np.random.default_rng(seed).permutation(spec.num_samples)
    dealt = np.repeat(perm, spec.repeats)
    take = spec.steps * spec.batch
    per_rank = [dealt[r::spec.world][:take] for r in range(spec.world)]
    return {"position": np.concatenate(per_rank), "rank": np.repeat(np.arange(spec.world), take),
            "step": np.tile(np.arange(take) // spec.batch, spec.world)}


def measure(spec: PlanSpec, epochs: int, buffer: int, classes: int) -> dict:
    N = spec.num_samples
    u = enumerate_plan(spec, 0, buffer)
    uses = np.bincount(u["position"], minlength=N)
    label = np.random.default_rng(0).integers(0, classes, N)  # shuffled shards: classes at random
    stats = copy_stats(u["position"], u["step"], u["rank"], spec.repeats, spec.world)
    timm = repeat_aug_sampler(spec, spec.seed)
    timm_stats = copy_stats(timm["position"], timm["step"], timm["rank"], spec.repeats, spec.world)
    reads = [rank_reads(spec, 0, r) for r in range(spec.world)]
    selected = np.zeros(N, np.int64)
    for epoch in range(epochs):  # selections over several epochs, from the plan's windows
        for p in selected_pieces(spec, epoch):
            selected[p.position + p.lo:p.position + p.hi] += 1
    return {"steps": spec.steps, "uses": int(uses.sum()), "distinct": int((uses > 0).sum()),
            "max_uses": int(uses.max()), "left_out": int((uses == 0).sum()), "trimmed": spec.trimmed,
            "same_step": stats.get("repeat_same_step"), "distinct_ranks": stats.get("repeat_distinct_ranks"),
            "timm_same_step": timm_stats.get("repeat_same_step"),
            "timm_distinct_ranks": timm_stats.get("repeat_distinct_ranks"),
            "in_batch_duplicates": stats["in_batch_duplicates"],
            "classes_per_batch": classes_per_batch(label[u["position"]], u["rank"], u["step"], spec.steps),
            "timm_classes_per_batch": classes_per_batch(label[timm["position"]], timm["rank"], timm["step"],
                                                        spec.steps),
            "tar_opens_per_rank": float(np.mean([o for o, _, _ in reads])),
            "read_per_rank": float(np.mean([t for _, t, _ in reads])),
            "read_per_rank_max": int(max(t for _, t, _ in reads)),
            "passed_over_per_rank": float(np.mean([p for _, _, p in reads])),
            f"selected_over_{epochs}_epochs": [int(selected.min()), int(selected.max())]}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=IMAGENET_SHARDS)
    p.add_argument("--samples", type=int, default=IMAGENET_SAMPLES, help="valid samples in all")
    p.add_argument("--empty", type=int, default=5, help="shards with no valid sample")
    p.add_argument("--worlds", default="8,16,2", help="world sizes (ranks), comma-separated")
    p.add_argument("--workers", type=int, default=8, help="data workers per rank")
    p.add_argument("--batch", type=int, default=128, help="per rank")
    p.add_argument("--buffer", type=int, default=1000, help="shuffle buffer")
    p.add_argument("--classes", type=int, default=1000, help="classes, drawn at random per sample")
    p.add_argument("--epochs", type=int, default=6, help="epochs over which selections are counted")
    p.add_argument("--repeats", default="1,3", help="values of R (repeated augmentation), comma-separated")
    p.add_argument("--seed", type=int, default=42)
    return p


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f} %"


def report(r: dict) -> str:
    """The table and findings of an epoch_plan results file."""
    shape = r["shape"]
    plans = {tuple(int(x) for x in k[2:].split(",R=")): v for k, v in r.items() if k.startswith("W=")}
    epochs = next(int(k.split("_")[2]) for k in next(iter(plans.values())) if k.startswith("selected_over_"))
    rows = []
    for (W, R), v in sorted(plans.items()):
        base = plans.get((W, 1))
        ratio = f"{v['read_per_rank'] / base['read_per_rank']:.3f}" if base else "—"
        rows.append([W, R, v["steps"], v["uses"], v["distinct"], v["max_uses"], v["left_out"], v["trimmed"],
                     _pct(v["same_step"]), _pct(v["timm_same_step"]), _pct(v["distinct_ranks"]),
                     v["in_batch_duplicates"], f"{v['classes_per_batch']:.1f}", f"{v['timm_classes_per_batch']:.1f}",
                     f"{v['read_per_rank']:,.0f}", ratio, f"{v['passed_over_per_rank']:,.0f}",
                     f"{v['tar_opens_per_rank']:.0f}",
                     "{}..{}".format(*v[f"selected_over_{epochs}_epochs"])])
    empty = shape.get("empty_shards", NOT_RECORDED)
    lines = [f"{shape['shards']} shards of uneven size (with no valid sample: {empty}), {shape['samples']} valid "
             f"samples, {shape['workers']} workers per rank, batch {shape['batch']} per rank, shuffle buffer "
             f"{shape['shuffle_buffer']}, {shape['classes']} classes, seed {shape['seed']}", "",
             table(["ranks", "R", "steps/rank", "uses", "distinct samples", "max uses", "not used", "fewer than R copies",
                    "copies in one step", "(timm sampler)", "copies on distinct ranks", "copies sharing a local batch",
                    "classes / local batch", "(timm sampler)", "samples read / rank", "read vs R = 1",
                    "passed over by header / rank", "tar opens / rank", f"times selected in {epochs} epochs"], rows), ""]
    for (W, R), v in sorted(plans.items()):
        if R == 1:
            lines.append(f"* {W} ranks, R = 1: {v['left_out']} samples rest each epoch (one global batch: "
                         f"{W * shape['batch']})")
        else:
            base = plans.get((W, 1))
            lines.append(f"* {W} ranks, R = {R}: {v['distinct']} distinct samples ({v['distinct'] / shape['samples']:.3f}"
                         f" of them), copies in one step {_pct(v['same_step'])} (timm's sampler "
                         f"{_pct(v['timm_same_step'])}), on distinct ranks {_pct(v['distinct_ranks'])}"
                         + (f"; each rank reads {v['read_per_rank'] / base['read_per_rank']:.3f}× what it reads "
                            f"with R = 1" if base else ""))
    lines.append(f"* enumerated in {r['wall_s']:.1f} s" if "wall_s" in r else f"* enumeration time: {NOT_RECORDED}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    a = parser().parse_args(argv)
    t0 = time.perf_counter()
    counts = uneven_counts(a.shards, a.samples, empty=a.empty)
    payload = {"args": vars(a), "shape": {"seed": a.seed, "workers": a.workers, "batch": a.batch,
                                          "shards": a.shards, "samples": a.samples, "empty_shards": a.empty,
                                          "shuffle_buffer": a.buffer, "classes": a.classes}}
    for W in (int(x) for x in a.worlds.split(",")):
        for R in (int(x) for x in a.repeats.split(",")):
            spec = PlanSpec(counts=counts, seed=a.seed, world=W, workers=a.workers, batch=a.batch, repeats=R)
            payload[f"W={W},R={R}"] = measure(spec, epochs=a.epochs, buffer=a.buffer, classes=a.classes)
            print(f"{W} ranks, R = {R}: enumerated", flush=True)
    payload["wall_s"] = time.perf_counter() - t0
    publish("epoch_plan", payload, report)


if __name__ == "__main__":
    main()
