"""Teacher-target precision: what float16 storage and the teacher's compute precision do to the targets.

Measured against float64 references:

1. Storage. Rows whose rest mass 1 − Σ p_i came out negative (and is clamped to 0), and the
   largest |tail mass − float64 reference|, for the schema-1/2 storage (raw top-k logits z in
   float16 with a float32 lse), log-probabilities z − lse rounded to the nearest float16 (not
   stored, for comparison) and the schema-3 storage (log-probabilities rounded down), on
   (a) sharp synthetic fp32 teachers: many classes, Gaussian logits with one class lifted far
   above the rest, with and without a large shift of every logit (the values are in the
   teacher column), and (b) a Fashion-MNIST teacher like the demo's (timm `test_resnet` trained
   here, label-only) on replayed views of its cache; its few classes leave no tail at the cached
   k, so the storage is compared at a smaller k.
2. Teacher precision. fp16 and bf16 autocast against the fp32 forward on the same views: top-1
   agreement and mean |Δ log p| over the fp32 run's top-k classes. On the CPU, precisions whose
   ops do not run are reported as such.
3. The fidelity audit of that teacher's cache.

    .venv/bin/python benchmarks/teacher_precision.py [--work runs/bench-precision]

Interpretation:
float16 keeps a few significant digits of any value: a sharp teacher's raw logits are large,
so their float16 spacing is coarse and loses the digits that decide 1 − Σ p_i, which came out
negative (clamped to 0) on a large share of rows; log p of the top class is small and keeps
them. Rounding down makes every stored p_i at most the exact one, so Σ p_i ≤ 1 on every row;
rounding to nearest still goes over 1 whenever the tail is smaller than the rounding of log p_1,
which is common for a confident teacher. The remaining error is float16's own (one rounding
of each log p_i, a small relative error in p_i); the tail itself is never lost to
cancellation. For the teacher's compute, fp16's longer mantissa shows against bf16's in both
the agreement and |Δ log p|.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import timm
import torch

from bench_common import DEMO_VIEW, NOT_RECORDED, cache_config, fmnist_shards, publish, table
from usi_cache import cache_format as schema
from usi_cache.checks.common import format_audit
from usi_cache.checks.replay import replayed_views
from usi_cache.stage1.run import run_cache, topk_targets
from usi_cache.shards.images import decode_image
from usi_cache.shards.manifest import load_manifest
from usi_cache.shards.tars import read_shard
from usi_cache.models.teacher import Teacher

TEACHER = "test_resnet"
K = 10


def tail_errors(logits: torch.Tensor, k: int) -> dict:
    """Storage comparison for full logits (N, C): clamped-row fraction and max tail error."""
    full = logits.double()
    lse64 = torch.logsumexp(full, 1)
    top = torch.topk(full, k, 1).values
    ref = -torch.expm1(torch.logsumexp(top - lse64[:, None], 1))  # float64 reference tail
    log_p16, _, lse32 = topk_targets(logits.float(), k)  # schema 3, as stage 1 writes it
    old_lp = top.float().half().double() - torch.from_numpy(lse32).double()[:, None]  # schema 1-2
    nearest = (top - lse64[:, None]).half().double()  # log-probs rounded to nearest: not what is stored
    out = {}
    for name, lp in (("schema 1-2: fp16 logits", old_lp), ("fp16 log-probs, rounded to nearest", nearest),
                     ("schema 3: fp16 log-probs, rounded down", torch.from_numpy(log_p16).double())):
        raw = -torch.expm1(torch.logsumexp(lp, 1))  # 1 - sum p, before the clamp at 0
        out[name] = {"clamped_fraction": float((raw < 0).double().mean()),
                     "max_tail_error": float((raw.clamp_min(0) - ref).abs().max()),
                     "mean_tail": float(ref.mean())}
    return out


def synthetic(n: int, C: int, shift: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, C, generator=g) * 2
    z[torch.arange(n), torch.randint(0, C, (n,), generator=g)] += 14
    return z + torch.rand(n, 1, generator=g) * shift


def train_teacher(train: Path, out: Path, steps: int, batch: int = 64) -> Path:
    """test_resnet trained label-only on the shards' images (resized to 32 px) for `steps` steps."""
    if out.is_file():
        return out
    m = load_manifest(train)
    xs, ys = [], []
    for i in range(len(m.shards)):
        for s in read_shard(m.path(i)):
            xs.append(np.asarray(decode_image(s.data).resize((32, 32))))
            ys.append(s.cls)
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float() / 255
    y = torch.tensor(ys)
    torch.manual_seed(0)
    model = timm.create_model(TEACHER, num_classes=len(m.classes))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.02)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        idx = torch.randint(0, len(y), (batch,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(), loss.backward(), opt.step()
        if step % 100 == 0:
            print(f"  teacher step {step}: loss {loss.item():.3f}", flush=True)
    torch.save(model.state_dict(), out)
    return out


def precision_errors(model, t: dict, images: list[np.ndarray], k: int) -> dict:
    """fp16/bf16 autocast vs fp32 on the same views (CPU or CUDA, whichever runs here).
    t: the cache's teacher attributes (mean, std)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch = torch.from_numpy(np.stack(images))
    ref = Teacher(model, mean=t["mean"], std=t["std"], device=device, precision="fp32")(batch).double()
    ref_lp = torch.log_softmax(ref, 1)
    top_lp, top_c = torch.topk(ref_lp, k, 1)
    out = {"device": device, "views": len(images)}
    for precision in ("fp16", "bf16"):
        try:
            z = Teacher(model, mean=t["mean"], std=t["std"], device=device, precision=precision)(batch).double()
        except Exception as e:  # an op without a half-precision kernel on this device
            out[precision] = {"ran": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
            continue
        lp = torch.log_softmax(z, 1)
        out[precision] = {"ran": True, "top1_agreement": float((z.argmax(1) == ref.argmax(1)).double().mean()),
                          "mean_abs_dlogp_topk": float((lp.gather(1, top_c) - top_lp).abs().mean()),
                          "max_abs_dlogp_topk": float((lp.gather(1, top_c) - top_lp).abs().max())}
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("runs/bench-precision"))
    ap.add_argument("--steps", type=int, default=400, help="teacher training steps")
    ap.add_argument("--audit", type=int, default=2000, help="views re-run by the audit")
    return ap


def report(r: dict) -> str:
    """The tables and findings of a precision results file."""
    lines = ["### 1. Storage: rows with a clamped rest mass, max |tail − float64 reference|", ""]
    rows, worst = [], {}
    for teacher_name, per_storage in r["storage"].items():
        for storage, v in per_storage.items():
            rows.append([teacher_name, storage, f"{100 * v['clamped_fraction']:.3f} %", f"{v['max_tail_error']:.2e}",
                         f"{v['mean_tail']:.2e}"])
            w = worst.setdefault(storage, [0.0, 0.0])
            w[0], w[1] = max(w[0], v["clamped_fraction"]), max(w[1], v["max_tail_error"])
    lines += [table(["teacher", "storage", "rows clamped", "max \\|tail error\\|", "mean tail"], rows), ""]
    lines += [f"* {storage}: {f'at most {100 * c:.1f} % of the rows' if c else 'no row'} clamped, max |tail error| "
              f"{e:.1e} over these teachers" for storage, (c, e) in worst.items()]
    p = r["precision"]
    views = p.get("views", NOT_RECORDED)
    lines += ["", f"### 2. Teacher precision vs fp32 ({p['device']}, {TEACHER}, views: {views})", ""]
    prow, found = [], []
    for precision in ("fp16", "bf16"):
        v = p[precision]
        if not v["ran"]:
            prow.append([precision, "did not run: " + v["error"], "", ""])
            continue
        prow.append([precision, f"{100 * v['top1_agreement']:.2f} %", f"{v['mean_abs_dlogp_topk']:.2e}",
                     f"{v['max_abs_dlogp_topk']:.2e}"])
        found.append(f"* {precision}: the fp32 top-1 class for {100 * v['top1_agreement']:.2f} % of the views, "
                     f"mean |Δ log p| {v['mean_abs_dlogp_topk']:.3f} (max {v['max_abs_dlogp_topk']:.3f})")
    lines += [table(["autocast", "top-1 agreement", f"mean \\|Δ log p\\| (top-{K})", "max \\|Δ log p\\|"], prow), ""]
    lines += found
    lines += ["", f"### 3. Fidelity audit of the fp32 cache (teacher trained {r['args']['steps']} steps)", "",
              "```", format_audit(r["audit"]), "```"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    a = parser().parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    results = {"storage": {}, "precision": None, "audit": None}
    for shift in (0.0, 400.0):
        results["storage"][f"synthetic C=1000, +14 top, shift up to {shift:g}, k = {K}"] = tail_errors(
            synthetic(20000, 1000, shift), K)

    train, _ = fmnist_shards(a.work / "shards", 4000, 500)
    ckpt = train_teacher(train, a.work / "teacher.pth", a.steps)
    cfg = cache_config(train, a.work / "cache.zarr", TEACHER, teacher_checkpoint=str(ckpt), views=4, topk=K,
                       overwrite=True, teacher_precision="fp32", audit=a.audit, view=DEMO_VIEW)
    summary = run_cache(cfg, progress=False)
    results["audit"] = summary["audit"]
    group, attrs = schema.open_cache(cfg.out)
    layout = schema.Layout.from_attrs(attrs)
    views, _, _ = replayed_views(group, attrs, layout, load_manifest(train), 4000, seed=1)
    images = [v[0] for v in views]  # one teacher: one size
    model = timm.create_model(TEACHER, num_classes=layout.num_classes)
    model.load_state_dict(torch.load(ckpt, weights_only=True))
    model.eval()
    teacher = Teacher(model, mean=attrs["teacher"]["mean"], std=attrs["teacher"]["std"], precision="fp32")
    logits = torch.cat([teacher(torch.from_numpy(np.stack(images[i:i + 256]))) for i in range(0, len(images), 256)])
    # C = 10: at k = 10 there is no tail, so the storage is compared at k = 5
    results["storage"][f"Fashion-MNIST {TEACHER}, {len(images)} replayed views, k = 5"] = tail_errors(logits, 5)
    results["precision"] = precision_errors(model, attrs["teacher"], images[:2000], K)

    path = publish("precision", {"args": {k: str(v) for k, v in vars(a).items()}, **results}, report)
    path.with_suffix(".txt").write_text(report(json.loads(path.read_text())) + "\n")


if __name__ == "__main__":
    main()
