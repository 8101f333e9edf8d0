"""Ensemble teachers: does one cache of three teachers teach better than the best one's cache?

On the demo's shards (run `make demo` first; `--demo` names its folder). Three teachers of the
demo's teacher recipe (timm's `test_resnet`, label-only on all 60,000 training images, 4
epochs) that differ only in their seed: the demo's own (42) and two more trained here. Each
member's and the equal-weight ensemble's top-1 on the 10,000 test images (the ensemble predicts
with the mixture Σ w_m softmax(z_m) a cache stores; every model at the students' evaluation
transform), and how often the members agree. Then two caches with the demo cache's V, k, view
seed and shards: the best member's (the demo cache itself when that is the demo's teacher) and
the ensemble's (the best member is picked on the same test images, which favours it); and
students of the demo recipe, one per seed, from each. Finished runs with the
same config are reused: teachers and students in `--work`, the demo's own teacher and cached
student, and the `cached-s{seed}` runs of the fidelity benchmark's work folder (`--reuse`),
which are the demo teacher's students.

    .venv/bin/python benchmarks/ensemble_gain.py --demo runs/demo --seeds 42,43,44

The caches' columns (mean top-1 probability, entropy, the teacher's top-1 on the augmented
training views) are read from the caches themselves. The results file below was written by a
second invocation that rebuilt both caches (identical array by array to the first's) and reused
every finished teacher and student, so its wall time is not what the runs cost.

Interpretation:
Three seeds of one small architecture make a weak ensemble: they agree on most test images, and
the mixture gains about half a point over its best member. That gain did not reach the students:
at the same V and k, the ensemble cache's students are within the spread of their seeds of the
best member's. The mixture is more often right on the augmented training views, but softer
(lower top-1 probability, higher entropy), and the demo's small student on 4,000 images gains
about as much from either. Members of different architectures, whose errors differ more, are
where an ensemble has more to add; this benchmark does not show a gain at the demo's size.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from bench_common import publish, table, train_run
from usi_cache import cache_format as schema
from usi_cache import demo as demo_mod
from usi_cache.checks.inspect.stats import teacher_stats
from usi_cache.config.parser import load_stage_config
from usi_cache.config.stages import CacheConfig, TrainConfig
from usi_cache.models.ensemble import load_ensemble, mixture_log_probs
from usi_cache.shards.manifest import load_manifest
from usi_cache.stage1.run import run_cache
from usi_cache.stage2.eval_data import EvalStream


@torch.no_grad()
def member_accuracy(ensemble, val_shards: Path, cfg: TrainConfig, batch: int = 500) -> dict:
    """Top-1 (percent) of each member and of the ensemble's mixture on every image of
    `val_shards`, at the evaluation transform of `cfg` (a student's or a teacher's run config),
    and how often the members' top-1 agree."""
    stream = EvalStream(load_manifest(val_shards), cfg.input_size, cfg.eval_crop, cfg.view.interpolation, 0, 1)
    loader = torch.utils.data.DataLoader(stream, batch_size=batch)
    hits, mix_hits, agree, n = np.zeros(len(ensemble)), 0, 0, 0
    for b in loader:
        logits = ensemble.member_logits(b["image"].permute(0, 2, 3, 1).contiguous())  # (N, H, W, 3) uint8
        top = torch.stack([z.argmax(1) for z in logits])  # (M, N)
        y = b["label"]
        hits += (top == y).sum(1).numpy()
        mix_hits += int((mixture_log_probs(logits, ensemble.weights).argmax(1) == y).sum())
        agree += int((top == top[:1]).all(0).sum())
        n += len(y)
    return {"members": (100 * hits / n).round(2).tolist(), "ensemble": round(100 * mix_hits / n, 2),
            "all_agree": round(100 * agree / n, 2), "images": n}


def build_cache(demo: Path, out: Path, checkpoints: list[Path]) -> dict:
    """A cache of the demo's subset by the teachers of `checkpoints` (test_resnet each, equal
    weights), with the demo cache's recipe (V, k, seed, view); resumes or reuses a finished one."""
    cfg = load_stage_config(CacheConfig, "cache", demo_mod.CONFIG, {
        "shards": str(demo / "shards" / "train"), "out": str(out), "views": demo_mod.VIEWS,
        "teacher": [demo_mod.TEACHER_MODEL] * len(checkpoints), "teacher_checkpoint": [str(c) for c in checkpoints]})
    s = run_cache(cfg, progress=False)
    print(f"  cache {out}: {len(checkpoints)} teacher(s), {s['views']} views, {s['bytes_per_view']:.1f} bytes/view, "
          f"{s['views_computed']} computed in {s['wall_s']:.0f} s", flush=True)
    return {"path": str(out), "bytes_per_view": s["bytes_per_view"],
            "wall_s": s["wall_s"] if s["views_computed"] else None}


def cache_targets(path: str | Path) -> dict:
    """What a cache teaches, over every stored view, from `usi inspect`'s statistics: the mean
    top-1 probability, the teacher's top-1 accuracy against the labels on those (augmented)
    views and, where k = C, the mean entropy in nats (over the k classes and the float16
    rounding's rest bucket)."""
    s = teacher_stats(path, progress=False)
    _, attrs = schema.open_cache(path)
    return {"confidence": s["mean_top1_prob"], "view_accuracy": 100 * s["top1_agreement"],
            "entropy": s["mean_entropy_nats"] if attrs["topk"] >= attrs["num_classes"] else None,
            "views": s["views"]}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", default="runs/demo")
    p.add_argument("--teacher-seeds", default="42,43,44", help="the members; the demo's teacher has seed 42")
    p.add_argument("--seeds", default="42,43,44", help="students, one per seed and cache")
    p.add_argument("--work", default="runs/ensemble")
    p.add_argument("--reuse", default="runs/fidelity",
                   help="comma-separated folders whose cached-s{seed} runs are the demo teacher's students")
    p.add_argument("--name", default="ensemble_gain", help="results file benchmarks/results/NAME.json")
    p.add_argument("--no-train", action="store_true",
                   help="only collect finished teachers and students (caches are still built)")
    return p


def _mean(runs: list[dict]) -> float:
    return statistics.mean(x["top1"] for x in runs)


def _mean_std(runs: list[dict]) -> str:
    v = [x["top1"] for x in runs]
    return f"{v[0]:.2f}" if len(v) == 1 else f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}"


def report(r: dict) -> str:
    acc, best = r["accuracy"], r["best"]
    rows = [[f"`{r['teacher']}` seed {t['seed']}" + (" (the demo's)" if t["demo"] else ""), f"{top1:.2f}",
             "best member" if i == best else ""] for i, (t, top1) in enumerate(zip(r["teachers"], acc["members"]))]
    rows.append([f"ensemble of the {len(r['teachers'])} (equal weights)", f"{acc['ensemble']:.2f}",
                 f"{acc['ensemble'] - acc['members'][best]:+.2f} vs the best member"])
    out = [f"teachers on the {acc['images']} test images; all members give the same top-1 on "
           f"{acc['all_agree']:.2f} % of them", "", table(["teacher", "top-1", ""], rows), ""]
    students = r["students"]
    cache = lambda name: r["caches"][name].get("targets") or {}  # noqa: E731 (files before the column: none)
    num = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    body = [[f"{name} cache", num(cache(name).get("confidence"), ".3f"), num(cache(name).get("entropy"), ".3f"),
             num(cache(name).get("view_accuracy"), ".2f"), f"{r['caches'][name]['bytes_per_view']:.1f}",
             _mean_std(runs), ", ".join(f"{x['top1']:.2f} ({x['seed']})" for x in runs)]
            for name, runs in students.items() if runs]
    out += [table([f"students `{r['student']}`, {r['epochs']} epochs, from the", "mean top-1 prob.", "entropy (nats)",
                   "teacher top-1 on the views", "bytes/view", "top-1 (mean ± std)", "per seed"], body),
            "", f"same V = {r['views']} and k = {r['topk']} in both caches; the caches' columns are means over their "
                f"stored (augmented training) views; students: top-1 of the last epoch on the test images", ""]
    b, e = students.get("best member", []), students.get("ensemble", [])
    pairs = [(x["seed"], y["top1"] - x["top1"]) for x in b for y in e if x["seed"] == y["seed"]]
    if pairs:
        wins = sum(d > 0 for _, d in pairs)
        out.append(f"* ensemble − best member cache: {_mean(e) - _mean(b):+.2f} points on average; per seed "
                   + ", ".join(f"{d:+.2f} ({s})" for s, d in pairs) + f"; the ensemble's students win {wins} of "
                   f"{len(pairs)}")
    c = r["caches"]
    if c["ensemble"]["wall_s"] and c["best member"]["wall_s"]:
        out.append(f"* stage 1: {c['ensemble']['wall_s']:.0f} s for the ensemble cache, "
                   f"{c['best member']['wall_s']:.0f} s for one member's")
    trained = sum(1 for runs in [*students.values(), r["teacher_runs"]] for x in runs if x["wall_s"])
    out += ["", f"benchmark wall time: {r['wall_s']:.0f} s ({trained} runs trained, the rest reused)"]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    a = parser().parse_args(argv)
    t0 = time.perf_counter()
    demo, work = Path(a.demo), Path(a.work)
    demo_cache, demo_ckpt = demo / "cache.zarr", demo / "teacher" / "best.pth"
    if not schema.exists(demo_cache) or not demo_ckpt.is_file():
        raise SystemExit(f"{demo}: no demo cache/teacher; run `make demo` first")
    _, demo_attrs = schema.open_cache(demo_cache)
    if demo_attrs["views"] != demo_mod.VIEWS or demo_attrs["topk"] != demo_attrs["num_classes"]:
        raise SystemExit(f"{demo_cache}: V = {demo_attrs['views']}, k = {demo_attrs['topk']}: not the demo's cache "
                         f"(V = {demo_mod.VIEWS}, k = C); rerun `make demo`")
    t_seeds, seeds = [int(s) for s in a.teacher_seeds.split(",")], [int(s) for s in a.seeds.split(",")]
    if len(set(t_seeds)) < 2:
        raise SystemExit(f"--teacher-seeds: an ensemble needs at least 2 distinct seeds, got {a.teacher_seeds!r}")
    demo_mod.one_torch_thread()
    work.mkdir(parents=True, exist_ok=True)

    print("1. teachers", flush=True)
    t_runs = []
    for s in t_seeds:
        cfg = demo_mod.teacher_config(demo, work / f"teacher-s{s}", seed=s)
        run = train_run("teacher", s, cfg, [demo / "teacher"], train=not a.no_train)
        if run is None:
            raise SystemExit(f"teacher seed {s}: not trained (--no-train)")
        t_runs.append(run)
    ckpts = [Path(x["run"]) / "best.pth" for x in t_runs]
    t_cfg = demo_mod.teacher_config(demo, work / "x")
    C = len(load_manifest(demo / "shards" / "test").classes)
    ensemble = load_ensemble([demo_mod.TEACHER_MODEL] * len(ckpts), [str(c) for c in ckpts], num_classes=C,
                             input_size=t_cfg.input_size)
    print("2. members and ensemble on the test images", flush=True)
    acc = member_accuracy(ensemble, demo / "shards" / "test", t_cfg)
    best = int(np.argmax(acc["members"]))
    print(f"  members {acc['members']}, ensemble {acc['ensemble']}, all agree {acc['all_agree']} %", flush=True)

    print("3. caches", flush=True)
    if ckpts[best].resolve() == demo_ckpt.resolve():  # the demo cache is that member's: read, never rewritten
        best_cache = {"path": str(demo_cache), "wall_s": None,
                      "bytes_per_view": schema.bytes_per_view(demo_cache, demo_attrs)}
    else:
        best_cache = build_cache(demo, work / f"cache-s{t_seeds[best]}.zarr", [ckpts[best]])
    caches = {"best member": best_cache,
              "ensemble": build_cache(demo, work / f"cache-ensemble{len(ckpts)}.zarr", ckpts)}
    _, attrs = schema.open_cache(caches["ensemble"]["path"])
    for c in caches.values():
        c["targets"] = cache_targets(c["path"])

    print("4. students", flush=True)
    reuse = [Path(d) for d in a.reuse.split(",") if d]
    students = {}
    for name, c in caches.items():
        runs = []
        for s in seeds:
            cfg = demo_mod.student_config(demo, work / f"{name.split()[0]}-s{s}", seed=s, cache=c["path"])
            runs.append(train_run(name, s, cfg, [demo / "student-cached-kd", *(d / f"cached-s{s}" for d in reuse)],
                                  train=not a.no_train))
        students[name] = [x for x in runs if x]
    base = demo_mod.student_config(demo, work / "x")
    publish(a.name, {"args": vars(a), "teacher": demo_mod.TEACHER_MODEL, "student": base.model, "epochs": base.epochs,
                     "views": attrs["views"], "topk": attrs["topk"],
                     "teachers": [{"seed": s, "checkpoint": str(c), "demo": c.resolve() == demo_ckpt.resolve()}
                                  for s, c in zip(t_seeds, ckpts)],
                     "teacher_runs": t_runs, "accuracy": acc, "best": best, "caches": caches,
                     "students": students, "seeds": seeds, "wall_s": time.perf_counter() - t0}, report)


if __name__ == "__main__":
    main()
