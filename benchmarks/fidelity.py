"""Benchmark 5 — accuracy fidelity: does the cache teach as well as an online teacher?
(and, on request, benchmark 4 — top-k fidelity — and stage-2 speed on a paired cache).

On the demo's shards and strong teacher (run `make demo` first): the teacher trained on all
60,000 Fashion-MNIST training images, students trained on the demo's subset with the demo's
student recipe (configs/demo-fmnist.yaml: same epochs E, mixing rate and EMA for every row),
evaluated on all 10,000 test images, one run per (row, seed). Rows:

  labels   labels only (no teacher)
  fixed    cached KD, V = 1: one fixed teacher target per image (Beyer et al.'s "fixed teacher")
  quarter  cached KD, V = E / 4 (views repeat about 4 times)
  cached   cached KD, V = E (= the demo's cache: a fresh view every epoch)
  paired   cached KD on a paired cache, V = E, mixed at the recipe's rate (exact mixed targets)
  online   online KD: the teacher runs on the exact mixed batch the student sees

V = 1 and V = E / 4 are derived from the demo cache: view v of a cache is a pure function of
(seed, key, v), so its first V views are exactly what stage 1 writes with that V (likewise top-k
of a top-10 is its first k columns). A run whose folder already holds a finished log made with
the same config is reused, and the demo's own two students are reused for its seed, so
`--rows` / `--seeds` can build the table up piece by piece.

    .venv/bin/python benchmarks/fidelity.py --demo runs/demo --seeds 42,43,44
    .venv/bin/python benchmarks/fidelity.py --rows labels,cached,online --seeds 42
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from bench_common import table, train_config, write_result
from usi_cache import schema
from usi_cache.audit import bucket_fidelity
from usi_cache.shards import decode_image, load_manifest, read_shard
from usi_cache.teacher import load_teacher
from usi_cache import demo as demo_mod
from usi_cache.cache import run_cache
from usi_cache.config import CacheConfig, to_dict
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


def paired_cache(cache: Path, demo: Path, out: Path, ckpt: Path, teacher: str, views: int, mix: dict) -> Path:
    """A paired cache of the demo teacher: same shards, view spec, seed and k as the demo cache,
    mixed as the student recipe mixes batches (`mix`: mixup, cutmix, prob, switch), so the
    paired row mixes exactly as often as the others."""
    _, attrs = schema.open_cache(cache)
    cfg = CacheConfig(shards=str(demo / "shards" / "train"), out=str(out), teacher=teacher,
                      teacher_checkpoint=str(ckpt), views=views, topk=attrs["topk"], seed=attrs["seed"],
                      input_size=attrs["teacher"]["input_size"], batch_size=256, workers=1, mix="paired",
                      mixup=mix["mixup"], cutmix=mix["cutmix"], mix_prob=mix["prob"], mix_switch=mix["switch"],
                      view=schema.view_spec(attrs))
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



ROWS = {  # name -> label in the table
    "labels": "labels only",
    "fixed": "fixed teacher, V = 1",
    "quarter": "cached KD, V = E/4",
    "cached": "cached KD, V = E",
    "paired": "cached KD, paired cache, V = E",
    "online": "online KD (teacher on the mixed batch)",
}


def read_log(run: Path) -> list[dict]:
    path = run / "log.jsonl"
    records = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []
    return [r for r in records if "step" not in r]  # epoch records only


def same_config(a: dict, b: dict) -> bool:
    return {k: v for k, v in a.items() if k != "out"} == {k: v for k, v in b.items() if k != "out"}


def train_run(row: str, seed: int, cfg, reuse: list[Path], train: bool = True) -> dict | None:
    """One student run, or a finished one with the same config (this folder, or one of `reuse`);
    None when there is none and `train` is off."""
    out, want = Path(cfg.out), to_dict(cfg)
    total = cfg.epochs + cfg.cooldown_epochs
    for src in [out, *reuse]:
        log = read_log(src)
        if (src / "config.json").is_file() and len(log) == total and same_config(
                json.loads((src / "config.json").read_text()), want):
            if src != out:  # keep every (row, seed) log in the benchmark's folder, for the curves
                out.mkdir(parents=True, exist_ok=True)
                for f in ("config.json", "log.jsonl"):
                    shutil.copy(src / f, out / f)
            print(f"  {row} seed {seed}: reusing {src}", flush=True)
            wall = None
            break
    else:
        if not train:
            print(f"  {row} seed {seed}: no finished run, left out (--no-train)", flush=True)
            return None
        t = time.perf_counter()
        run_train(cfg, progress=False)
        wall, log = time.perf_counter() - t, read_log(out)
    last = log[-1]
    print(f"  {row} seed {seed}: top-1 {last['val_top1']:.2f}"
          + (f" (EMA {last['val_top1_ema']:.2f})" if last["val_top1_ema"] is not None else "")
          + (f", {wall:.0f} s" if wall else ""), flush=True)
    return {"seed": seed, "top1": last["val_top1"], "top1_ema": last["val_top1_ema"], "wall_s": wall,
            "curve": [r["val_top1"] for r in log], "val_images": last["val_count"]}


def mean_std(vals: list[float]) -> str:
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", default="runs/demo")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    p.add_argument("--seeds", default="42,43,44")
    p.add_argument("--work", default="runs/fidelity")
    p.add_argument("--name", default="fidelity", help="results file benchmarks/results/NAME.json")
    p.add_argument("--topk-fidelity", type=int, default=0, metavar="N",
                   help="also benchmark 4 over N replayed views: tail mass and KL for k = 1, 2, 5, 10")
    p.add_argument("--paired-throughput", action="store_true",
                   help="also stage-2 img/s on the paired vs the plain cache (alternating short runs)")
    p.add_argument("--no-train", action="store_true",
                   help="only collect finished runs: a (row, seed) without one is left out of the table")
    a = p.parse_args()
    t_start = time.perf_counter()
    demo_mod.one_torch_thread()  # as the demo's own students ran
    demo, work = Path(a.demo), Path(a.work)
    rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        raise SystemExit(f"--rows: unknown row {(unknown or [''])[0]!r} (known: {', '.join(ROWS)})")
    seeds = [int(s) for s in a.seeds.split(",")]
    cache, ckpt = demo / "cache.zarr", demo / "teacher" / "best.pth"
    if not schema.exists(cache) or not ckpt.is_file():
        raise SystemExit(f"{demo}: no demo cache/teacher; run `make demo` first")
    work.mkdir(parents=True, exist_ok=True)
    base = demo_mod.student_config(demo, work / "x")  # the demo's student recipe
    E, teacher = base.epochs, demo_mod.TEACHER_MODEL
    _, attrs = schema.open_cache(cache)
    if attrs["views"] != E:
        raise SystemExit(f"{cache}: V = {attrs['views']}, the recipe trains {E} epochs: rerun `make demo`")
    mix = {"mixup": base.mixup, "cutmix": base.cutmix, "prob": base.mix_prob, "switch": base.mix_switch}

    fid = None
    if a.topk_fidelity:
        print("4. top-k fidelity", flush=True)
        fid = topk_fidelity(cache, demo / "shards" / "train", ckpt, teacher, a.topk_fidelity, [1, 2, 5, 10])
        print(table(["k", "mean tail mass", "mean KL(full ‖ k+1 buckets)"],
                    [[k, f"{v['tail_mass']:.4f}", f"{v['kl']:.5f}"] for k, v in fid["per_k"].items()]))

    paths = {"fixed": work / "cache-v1.zarr", "quarter": work / f"cache-v{max(1, E // 4)}.zarr",
             "cached": cache, "paired": work / f"paired-v{E}-p{mix['prob']}.zarr"}

    def targets(row: str) -> dict:  # caches built only for the rows asked for, and not with --no-train
        if row == "online":
            return {"teacher": teacher, "teacher_checkpoint": str(ckpt)}
        if row == "labels":
            return {}
        if not a.no_train and row == "fixed":
            derive(cache, paths[row], views=1)
        if not a.no_train and row == "quarter":
            derive(cache, paths[row], views=max(1, E // 4))
        if not a.no_train and row == "paired":
            paired_cache(cache, demo, paths[row], ckpt, teacher, E, mix)
        return {"cache": str(paths[row])}

    reuse = {"labels": [demo / "student-labels"], "cached": [demo / "student-cached-kd"]}
    print(f"\n5. accuracy fidelity: rows {', '.join(rows)}; seeds {a.seeds}; {base.model}, {E} epochs", flush=True)
    results = {}
    for row in rows:
        extra = targets(row)
        runs = [train_run(row, s, demo_mod.student_config(demo, work / f"{row}-s{s}", seed=s, **extra),
                          reuse.get(row, []), train=not a.no_train) for s in seeds]
        if any(runs):
            results[row] = [r for r in runs if r]
    wall = time.perf_counter() - t_start
    header = [f"{base.model}, {E} epochs", "top-1 (mean ± std over seeds)", "per seed"]
    body = [[ROWS[row], mean_std([r["top1"] for r in rs]), ", ".join(f"{r['top1']:.2f} ({r['seed']})" for r in rs)]
            for row, rs in results.items()]
    tp = None
    if a.paired_throughput:
        print("\n6. stage-2 throughput, paired vs plain cache (alternating)", flush=True)
        targets("paired")
        tp = paired_throughput(demo, work, cache, paths["paired"], base.model)
    print()
    print(table(header, body))
    n_val = {r["val_images"] for rs in results.values() for r in rs}
    print(f"top-1 of the last epoch on {', '.join(map(str, sorted(n_val)))} test images; std = sample std over seeds")
    if tp:
        med = {k: statistics.median(v) for k, v in tp.items()}
        print(table(["stage 2 on", "median img/s", "runs"],
                    [[k, f"{med[k]:.0f}", ", ".join(f"{x:.0f}" for x in v)] for k, v in tp.items()]))
        print(f"paired / plain: {med['paired cache'] / med['plain cache']:.3f}")
    print(f"benchmark wall time: {wall:.0f} s ({sum(1 for rs in results.values() for r in rs if r['wall_s'])} "
          f"runs trained, the rest reused)")
    groups = " ".join(f"'{ROWS[r]}={work}/{r}-s*'" for r in rows)
    print(f"curves: usi curves --out docs/{a.name}-top1.png {groups}")
    path = write_result(a.name, {"args": vars(a), "epochs": E, "student": base.model, "teacher": teacher,
                                 "rows": {r: ROWS[r] for r in rows}, "seeds": seeds, "accuracy": results,
                                 "topk_fidelity": fid, "paired_throughput": tp, "wall_s": wall})
    print(f"written {path}")


if __name__ == "__main__":
    main()
