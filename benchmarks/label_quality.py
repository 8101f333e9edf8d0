"""Label issues: how well confident learning over a cache finds flipped labels, against cleanlab.

A teacher (timm `test_resnet`) is trained label-only on clean Fashion-MNIST training images
the way the demo trains its teacher (`usi_cache.demo.TEACHER_RECIPE`, stage 2 with labels
only, fewer images and epochs). Student shards are made from held-out images (the test split,
never seen by the teacher) with a known fraction of their labels flipped to another class
drawn uniformly; stage 1 caches the teacher over V views of them (the teacher's own light
views: crops of scale 0.64-1, flips, no RandAugment). `usi inspect --label-issues` (the
streaming `label_issues.find_label_issues`) then ranks the issues, and:

* precision and recall at N = the number of flips (the N lowest-ranked issues against the
  flipped set; with at least N issues found the two are equal), and of the whole issue set;
* the same for the confident joint alone (`unclaimed=False`, cleanlab's own rule);
* cleanlab (`cleanlab.filter.find_label_issues` on the densified rows, `dense_probs`: the same
  view-averaged probabilities, N x C in memory) as the reference: the overlap of its top N with
  ours for its default filter (`prune_by_noise_rate`, ranked by self-confidence), and the
  agreement (Jaccard) of its `confident_learning` filter with our confident joint alone.

    .venv/bin/python benchmarks/label_quality.py [--work runs/bench-label-issues]

Interpretation:
A flipped label is one the teacher rejects on every view, with a self-confidence near 0; a
clean sample the teacher gets wrong is usually one of the confusable pairs (shirt, T-shirt,
pullover, coat), where the given class keeps some probability. The lowest self-confidences are
therefore mostly the flips, and precision at N is high although the teacher's own error rate
on these views is several times the flip rate. The whole issue set is larger than N: it holds
the teacher's mistakes too, so its recall is higher and its precision lower than at N. The
confident joint alone (cleanlab's `confident_learning` rule, which our streamed passes
reproduce on the same rows) misses the flips that no class claims: their true class is an easy
one whose threshold (its mean self-confidence) is higher than the teacher's probability on
them. Counting an unclaimed sample whose top class is not its label as an issue (the default)
recovers them, and brings the top N closer to cleanlab's default filter, which prunes by the
estimated noise rate of each class pair over all samples.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from bench_common import publish, table
from usi_cache import demo
from usi_cache.config.stages import CacheConfig, TrainConfig
from usi_cache.config.parser import load_stage_config
from usi_cache.checks.inspect.label_issues import dense_probs, find_label_issues
from usi_cache.shards.fashion_mnist import FMNIST_CLASSES, FMNIST_DIR, samples_from_fashion_mnist
from usi_cache.shards.manifest import MANIFEST
from usi_cache.shards.tars import write_shards

PER_SHARD = 500


def flip_labels(n: int, fraction: float, num_classes: int, seed: int) -> dict[int, int]:
    """index -> offset in 1..C-1 (new label = (old + offset) mod C) for round(fraction * n) indices."""
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(n, int(round(fraction * n)), replace=False))
    return {int(i): int(rng.integers(1, num_classes)) for i in chosen}


def make_data(work: Path, *, teacher_images: int, students: int, fraction: float, seed: int) -> dict:
    """Teacher shards (the first `teacher_images` training images), held-out validation shards
    and student shards (the first `students` test images, `fraction` of their labels flipped)."""
    test = samples_from_fashion_mnist(FMNIST_DIR, "test")
    student = test[:students]
    flips = flip_labels(len(student), fraction, len(FMNIST_CLASSES), seed)
    flipped = [dataclasses.replace(s, cls=(s.cls + flips[i]) % len(FMNIST_CLASSES)) if i in flips else s
               for i, s in enumerate(student)]
    sets = {"teacher": lambda: samples_from_fashion_mnist(FMNIST_DIR, "train", teacher_images),
            "val": lambda: test[students:students + 1000], "students": lambda: flipped}
    for name, samples in sets.items():
        if not (work / name / MANIFEST).is_file():
            write_shards(samples(), FMNIST_CLASSES, work / name, per_shard=PER_SHARD, seed=0, progress=False)
    return {"flipped_keys": sorted(student[i].key for i in flips), "students": len(student),
            "val_images": len(test[students:students + 1000])}


def train_teacher(work: Path, epochs: int, progress: bool) -> dict:
    """The demo's teacher recipe (label-only stage 2) on the teacher shards."""
    from usi_cache.stage2.loop import run_train
    out = work / "teacher"
    if (out / "best.pth").is_file() and (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    cfg = load_stage_config(TrainConfig, "train", demo.CONFIG, {
        "train_shards": str(work / "teacher"), "val_shards": str(work / "val"), "model": demo.TEACHER_MODEL,
        "out": str(out), **{**demo.TEACHER_RECIPE, "epochs": epochs}})
    t = time.perf_counter()
    s = run_train(cfg, resume=False, progress=progress)
    summary = {"val_top1": s["last"]["val_top1"], "epochs": epochs, "wall_s": time.perf_counter() - t}
    (out / "summary.json").write_text(json.dumps(summary) + "\n")
    return summary


def cache_students(work: Path, views: int, progress: bool) -> Path:
    from usi_cache.stage1.run import run_cache
    out = work / "cache.zarr"
    cfg = load_stage_config(CacheConfig, "cache", demo.CONFIG, {
        "shards": str(work / "students"), "out": str(out), "teacher": demo.TEACHER_MODEL,
        "teacher_checkpoint": str(work / "teacher" / "best.pth"), "views": views, "overwrite": True,
        "view": demo.TEACHER_RECIPE["view"]})
    run_cache(cfg, progress=progress)
    return out


def measure(cache: Path, flipped_keys: list[str]) -> dict:
    """Our ranking against the flips and against cleanlab on the densified rows."""
    flipped = set(flipped_keys)
    n = len(flipped)
    t = time.perf_counter()
    ours = find_label_issues(cache, top=1_000_000, least_confident=0, progress=False)
    stream_s = time.perf_counter() - t
    strict = find_label_issues(cache, top=1_000_000, least_confident=0, unclaimed=False, progress=False)
    ranked = [r["key"] for r in ours["issues"]]
    strict_ranked = [r["key"] for r in strict["issues"]]
    hits_n = len(flipped & set(ranked[:n]))
    hits_all = len(flipped & set(ranked))
    slots, labels, rows = dense_probs(cache)
    from usi_cache import cache_format as schema
    group, _ = schema.open_cache(cache)
    keys = np.array([str(k) for k in group["keys"][:]], dtype=object)[slots]
    from cleanlab.filter import find_label_issues as cl_find
    t = time.perf_counter()
    cl_ranked = list(keys[cl_find(labels, rows, return_indices_ranked_by="self_confidence")])
    cleanlab_s = time.perf_counter() - t
    cl_cl = set(keys[np.flatnonzero(cl_find(labels, rows, filter_by="confident_learning"))])
    strict_all = set(strict_ranked)
    return {
        "samples": ours["samples"], "flips": n, "issues_found": ours["issues_found"],
        "issues_unclaimed": ours["issues_unclaimed"],
        "precision_at_n": hits_n / max(min(n, len(ranked)), 1), "recall_at_n": hits_n / n,
        "listed_at_n": min(n, len(ranked)), "hits_at_n": hits_n,
        "precision_all": hits_all / max(len(ranked), 1), "recall_all": hits_all / n,
        "strict_found": len(strict_ranked),
        "strict_precision_at_n": len(flipped & set(strict_ranked[:n])) / max(min(n, len(strict_ranked)), 1),
        "strict_recall_at_n": len(flipped & set(strict_ranked[:n])) / n,
        "strict_precision_all": len(flipped & strict_all) / max(len(strict_all), 1),
        "strict_recall_all": len(flipped & strict_all) / n,
        "cleanlab_default_found": len(cl_ranked),
        "cleanlab_default_precision_at_n": len(flipped & set(cl_ranked[:n])) / n,
        "overlap_top_n_with_cleanlab": len(set(cl_ranked[:n]) & set(ranked[:n])) / n,
        "cleanlab_confident_learning_found": len(cl_cl),
        "overlap_top_n_strict_with_cleanlab": len(set(cl_ranked[:n]) & set(strict_ranked[:n])) / n,
        "same_set_as_cleanlab_confident_learning": len(cl_cl & strict_all) / max(len(cl_cl | strict_all), 1),
        "stream_s": stream_s, "cleanlab_s": cleanlab_s,
        "teacher_top1_on_student_views": _view_top1(ours),
    }


def _view_top1(result: dict) -> float:
    """Views whose top-1 is the given (partly flipped) label, from the per-class table."""
    pc = [c for c in result["per_class"] if c["samples"]]
    return sum(c["view_top1_agreement"] * c["samples"] for c in pc) / sum(c["samples"] for c in pc)


def run(work: Path, *, teacher_images: int, epochs: int, students: int, fraction: float, views: int, seed: int,
        progress: bool = False) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    demo.one_torch_thread()
    data = make_data(work, teacher_images=teacher_images, students=students, fraction=fraction, seed=seed)
    teacher = train_teacher(work, epochs, progress)
    t = time.perf_counter()
    cache = cache_students(work, views, progress)
    cache_s = time.perf_counter() - t
    return {"teacher": teacher, "val_images": data["val_images"], "cache_s": cache_s, "cache": str(cache),
            **measure(cache, data["flipped_keys"])}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("runs/bench-label-issues"))
    ap.add_argument("--teacher-images", type=int, default=20000, help="clean training images of the teacher")
    ap.add_argument("--epochs", type=int, default=3, help="teacher epochs")
    ap.add_argument("--students", type=int, default=4000, help="held-out images in the student shards")
    ap.add_argument("--fraction", type=float, default=0.05, help="fraction of the student labels flipped")
    ap.add_argument("--views", type=int, default=4, help="cached views per image")
    ap.add_argument("--seed", type=int, default=0, help="seed of the flips")
    return ap


def report(r: dict) -> str:
    m = r["results"]
    a = r["args"]
    rows = [
        ["usi inspect --label-issues (default), top N", f"{m['precision_at_n']:.3f}", f"{m['recall_at_n']:.3f}",
         m["listed_at_n"]],
        ["usi inspect --label-issues (default), every issue", f"{m['precision_all']:.3f}", f"{m['recall_all']:.3f}",
         m["issues_found"]],
        ["confident joint only (`unclaimed=False`), top N", f"{m['strict_precision_at_n']:.3f}",
         f"{m['strict_recall_at_n']:.3f}", min(m["flips"], m["strict_found"])],
        ["confident joint only (`unclaimed=False`), every issue", f"{m['strict_precision_all']:.3f}",
         f"{m['strict_recall_all']:.3f}", m["strict_found"]],
        ["cleanlab default filter (dense), top N", f"{m['cleanlab_default_precision_at_n']:.3f}",
         f"{m['cleanlab_default_precision_at_n']:.3f}", m["flips"]],
    ]
    lines = [f"Teacher: `{demo.TEACHER_MODEL}`, {a['teacher_images']} clean training images, {a['epochs']} epochs, "
             f"{m['teacher']['val_top1']:.2f} % top-1 on {m['val_images']} held-out images; student shards: "
             f"{m['samples']} held-out images, {m['flips']} labels ({100 * float(a['fraction']):.0f} %) flipped; "
             f"cache V = {a['views']}, k = 10; the teacher's top-1 is the given label on "
             f"{100 * m['teacher_top1_on_student_views']:.1f} % of the cached views.", "",
             table(["ranking", "precision", "recall", "listed"], rows), "",
             f"* N = {m['flips']} flips; {m['hits_at_n']} of the {m['listed_at_n']} top-ranked issues are flips.",
             f"* cleanlab (`find_label_issues` on the densified {m['samples']} x 10 rows) as the reference: its "
             f"default filter finds {m['cleanlab_default_found']} issues; the overlap of its top N with ours is "
             f"{100 * m['overlap_top_n_with_cleanlab']:.1f} % (confident joint only: "
             f"{100 * m['overlap_top_n_strict_with_cleanlab']:.1f} %). Its `confident_learning` filter finds "
             f"{m['cleanlab_confident_learning_found']} issues, our confident joint only {m['strict_found']}: "
             f"Jaccard {m['same_set_as_cleanlab_confident_learning']:.3f}. The default adds "
             f"{m['issues_unclaimed']} unclaimed samples whose top class is not their label.",
             f"* Time: the streamed two passes {m['stream_s']:.2f} s, cleanlab on the dense rows "
             f"{m['cleanlab_s']:.2f} s, stage 1 {m['cache_s']:.1f} s, the teacher's training "
             f"{m['teacher']['wall_s']:.0f} s."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    a = parser().parse_args(argv)
    results = run(a.work, teacher_images=a.teacher_images, epochs=a.epochs, students=a.students,
                  fraction=a.fraction, views=a.views, seed=a.seed, progress=sys.stderr.isatty())
    path = publish("label_quality", {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
                                    "results": results}, report)
    path.with_suffix(".txt").write_text(report(json.loads(path.read_text())) + "\n")


if __name__ == "__main__":
    main()
