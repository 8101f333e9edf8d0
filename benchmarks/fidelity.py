"""Benchmarks 4 and 5 — top-k fidelity and accuracy fidelity, on the demo's Fashion-MNIST
shards and its trained teacher (run `make demo` first).

4. On the demo cache: mean tail mass and mean KL(full teacher || k+1-bucket reconstruction)
   for several k over replayed views (the teacher re-run for its full logits), and the
   student's accuracy for several k.
5. The same student and epochs trained (a) label-only, (b) online KD, (c) cached KD with
   V = epochs, (d) cached KD with V = epochs / 4, (e) the "fixed teacher" V = 1, over seeds.

Smaller k and V are derived from the demo cache: top-k of a top-10 is its first k columns and
view v of a cache is a pure function of (seed, key, v), so truncating gives exactly what
stage 1 would write with that k or V.

    .venv/bin/python benchmarks/fidelity.py --demo runs/demo
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
import torch

from bench_common import table, train_config, write_result
from usi_cache import schema
from usi_cache.audit import bucket_fidelity
from usi_cache.shards import decode_image, load_manifest, read_shard
from usi_cache.teacher import load_teacher
from usi_cache.cache import run_cache
from usi_cache.config import CacheConfig
from usi_cache.train import run_train
from usi_cache.views import decode_view, replay_array


def derive(src: Path, dst: Path, *, k: int | None = None, views: int | None = None) -> Path:
    """A cache holding the first k classes and/or the first `views` views of `src`."""
    if schema.exists(dst):
        group, attrs = schema.open_cache(dst)
        if schema.completed_shards(group, schema.Layout.from_attrs(attrs)).all():
            return dst  # complete: reuse; an interrupted derivation is redone
    group, attrs = schema.open_cache(src)
    layout = schema.Layout.from_attrs(attrs)
    k, views = k or layout.topk, views or layout.views
    # the replay fingerprint and the audit describe the source's views and k: not carried over
    new = {n: a for n, a in dict(attrs, topk=k, views=views).items() if n not in ("replay", "audit")}
    new_layout = schema.Layout(layout.num_shards, layout.slots_per_shard, views, k, layout.num_classes,
                               layout.op_slots)
    out = schema.create(dst, new, new_layout)
    for shard in range(layout.num_shards):
        b = schema.read_block(group, layout, shard)
        for name in schema.PER_VIEW:
            setattr(b, name, getattr(b, name)[:, :views])
        b.logits, b.classes = b.logits[..., :k], b.classes[..., :k]
        schema.write_block(out, new_layout, shard, b)
    return dst


def topk_fidelity(cache: Path, shards: Path, ckpt: Path, teacher_name: str, n_views: int, ks: list[int]) -> dict:
    group, attrs = schema.open_cache(cache)
    spec = schema.view_spec(attrs)
    teacher, info = load_teacher(teacher_name, str(ckpt), num_classes=attrs["num_classes"],
                                 input_size=attrs["teacher"]["input_size"])
    m = load_manifest(shards)
    x = {n: group[n][:] for n in (*schema.VIEW_PARAMS, "labels")}
    images = []
    rng = np.random.default_rng(0)
    per_sample = max(1, n_views // m.num_samples + 1)
    for shard in range(len(m.shards)):
        for pos, s in enumerate(read_shard(m.path(shard))):
            slot = shard * m.per_shard + pos
            img = decode_image(s.data)
            for v in rng.choice(attrs["views"], size=min(per_sample, attrs["views"]), replace=False):
                p = decode_view(tuple(x["boxes"][slot, v]), bool(x["flips"][slot, v]), x["aug_ops"][slot, v],
                                x["aug_levels"][slot, v], x["aug_resample"][slot, v])
                images.append(replay_array(img, p, info.input_size, spec))
                if len(images) >= n_views:
                    break
            if len(images) >= n_views:
                break
        if len(images) >= n_views:
            break
    logits = torch.cat([teacher(torch.from_numpy(np.stack(images[i:i + 256]))) for i in range(0, len(images), 256)])
    out = {}
    for k in ks:
        r, kl = bucket_fidelity(logits, k)  # the audit's math (rest spread evenly over the tail)
        out[k] = {"tail_mass": float(r.mean()), "kl": float(kl.mean())}
    return {"views": len(images), "per_k": out}


def paired_cache(cache: Path, demo: Path, work: Path, ckpt: Path, teacher: str, views: int,
                 mix_prob: float = 0.5) -> Path:
    """A paired cache of the demo teacher: same shards, view spec, seed and k as the demo cache,
    and the demo recipe's mixing rate (mix_prob 0.5), so (f) mixes as often as (c)."""
    _, attrs = schema.open_cache(cache)
    out = work / f"paired-v{views}-p{mix_prob}.zarr"
    cfg = CacheConfig(shards=str(demo / "shards" / "train"), out=str(out), teacher=teacher,
                      teacher_checkpoint=str(ckpt), views=views, topk=attrs["topk"], seed=attrs["seed"],
                      input_size=attrs["teacher"]["input_size"], batch_size=256, workers=1, mix="paired",
                      mix_prob=mix_prob, view=schema.view_spec(attrs))
    s = run_cache(cfg, progress=False)  # resumes / reuses a complete cache
    print(f"  paired cache: {s['views']} views, {s['bytes_per_view']:.1f} bytes/view, "
          f"{s['views_computed']} computed in {s['wall_s']:.0f} s", flush=True)
    return out


def paired_throughput(demo: Path, work: Path, plain: Path, paired: Path, student: str, rounds: int = 3,
                      steps: int = 15) -> dict:
    """Stage-2 images/s on the paired vs the plain cache, alternating short runs."""
    speeds = {"plain cache": [], "paired cache": []}
    for r in range(rounds):
        for name, c in (("plain cache", plain), ("paired cache", paired)):
            cfg = train_config(demo / "shards" / "train", demo / "shards" / "test", work / f"tp-{name[:5]}", student,
                               epochs=1, warmup_epochs=0, max_steps=steps, ema_decay=0.0, cache=str(c))
            speeds[name].append(run_train(cfg, progress=False)["last"]["img_per_s"])
    return speeds


def train_run(name, demo: Path, work: Path, seed: int, epochs: int, student: str, **extra) -> dict:
    out = work / f"{name}-s{seed}"
    cfg = train_config(demo / "shards" / "train", demo / "shards" / "test", out, student, epochs=epochs,
                       seed=seed, **extra)
    s = run_train(cfg, progress=False)
    last = s["last"]
    print(f"  {name} seed {seed}: top-1 {last['val_top1']:.2f} (EMA {last['val_top1_ema']:.2f}), "
          f"{last['img_per_s']:.0f} img/s", flush=True)
    return {"top1": last["val_top1"], "top1_ema": last["val_top1_ema"], "img_per_s": last["img_per_s"]}


def spread(vals: list[float]) -> str:
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return f"{statistics.mean(vals):.2f} ± {(max(vals) - min(vals)) / 2:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", default="runs/demo")
    p.add_argument("--teacher", default="test_resnet", help="the demo teacher's timm name")
    p.add_argument("--student", default="test_efficientnet")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seeds", default="42,43")
    p.add_argument("--ks", default="1,2,5,10", help="k for the tail statistics")
    p.add_argument("--train-ks", default="2,5", help="k for student runs (k = 10 is run (c))")
    p.add_argument("--fidelity-views", type=int, default=4000)
    p.add_argument("--work", default="runs/fidelity")
    a = p.parse_args()
    demo, work = Path(a.demo), Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    cache, ckpt = demo / "cache.zarr", demo / "teacher" / "best.pth"
    if not schema.exists(cache) or not ckpt.is_file():
        raise SystemExit(f"{demo}: no demo cache/teacher; run `make demo` first")
    _, attrs = schema.open_cache(cache)
    E, V = a.epochs, attrs["views"]
    if E > V:
        raise SystemExit(f"--epochs {E} > the demo cache's V = {V}")
    seeds = [int(s) for s in a.seeds.split(",")]

    print("4. top-k fidelity", flush=True)
    fid = topk_fidelity(cache, demo / "shards" / "train", ckpt, a.teacher, a.fidelity_views,
                        [int(k) for k in a.ks.split(",")])
    rows = [[k, f"{v['tail_mass']:.4f}", f"{v['kl']:.5f}"] for k, v in fid["per_k"].items()]
    print(table(["k", "mean tail mass", "mean KL(full ‖ k+1 buckets)"], rows))

    caches = {"c": derive(cache, work / f"cache-v{E}.zarr", views=E),
              "d": derive(cache, work / f"cache-v{max(1, E // 4)}.zarr", views=max(1, E // 4)),
              "e": derive(cache, work / "cache-v1.zarr", views=1)}
    runs = {
        "(a) label-only": {},
        "(b) online KD": {"teacher": a.teacher, "teacher_checkpoint": str(ckpt)},
        f"(c) cached KD, V = {E} (= epochs)": {"cache": str(caches["c"])},
        f"(d) cached KD, V = {max(1, E // 4)} (= epochs / 4)": {"cache": str(caches["d"])},
        "(e) fixed teacher, V = 1": {"cache": str(caches["e"])},
        f"(f) cached KD, paired mixing, V = {E}": {"cache": str(paired_cache(cache, demo, work, ckpt, a.teacher, E))},
    }
    print("\n5. accuracy fidelity", flush=True)
    results = {name: [train_run(name.split()[0].strip("()"), demo, work, s, E, a.student, **extra) for s in seeds]
               for name, extra in runs.items()}
    rows = [[name, spread([r["top1"] for r in rs]), spread([r["top1_ema"] for r in rs]),
             f"{statistics.mean(r['img_per_s'] for r in rs):.0f}"] for name, rs in results.items()]

    print("\n4b. student accuracy vs k", flush=True)
    k_results = {}
    for k in [int(x) for x in a.train_ks.split(",")]:
        ck = derive(caches["c"], work / f"cache-v{E}-k{k}.zarr", k=k)
        k_results[k] = train_run(f"k{k}", demo, work, seeds[0], E, a.student, cache=str(ck))
    k_results[attrs["topk"]] = results[f"(c) cached KD, V = {E} (= epochs)"][0]

    print()
    print(table(["k", "mean tail mass", "mean KL(full ‖ k+1 buckets)"], rows=[[k, f"{v['tail_mass']:.4f}",
                f"{v['kl']:.5f}"] for k, v in fid["per_k"].items()]))
    print()
    print(table(["k (cached KD, V = epochs, seed %d)" % seeds[0], "top-1", "top-1 EMA"],
                [[k, f"{r['top1']:.2f}", f"{r['top1_ema']:.2f}"] for k, r in sorted(k_results.items())]))
    print("\n6. stage-2 throughput, paired vs plain cache (alternating)", flush=True)
    tp = paired_throughput(demo, work, caches["c"], work / f"paired-v{E}-p0.5.zarr", a.student)
    med = {k: statistics.median(v) for k, v in tp.items()}

    print()
    print(table([f"{a.student}, {E} epochs, seeds {a.seeds}", "top-1 (raw)", "top-1 (EMA)", "img/s"], rows))
    print()
    print(table(["stage 2 on", "median img/s", "runs"],
                [[k, f"{med[k]:.0f}", ", ".join(f"{x:.0f}" for x in v)] for k, v in tp.items()]))
    print(f"paired / plain: {med['paired cache'] / med['plain cache']:.3f}")
    path = write_result("fidelity", {"args": vars(a), "topk_fidelity": fid, "accuracy": results,
                                     "accuracy_vs_k": k_results, "paired_throughput": tp})
    print(f"written {path}")


if __name__ == "__main__":
    main()
