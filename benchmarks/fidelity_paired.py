"""Row (f) of benchmark 5 alone — cached KD on a paired cache at the demo recipe's mixing rate —
and stage-2 throughput paired vs plain, reusing the caches of `benchmarks/fidelity.py`.

    .venv/bin/python benchmarks/fidelity_paired.py      # after benchmarks/fidelity.py
"""
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import table, write_result  # noqa: E402
from fidelity import paired_cache, paired_throughput, spread, train_run  # noqa: E402
demo, work = Path("runs/demo"), Path("runs/fidelity")
ckpt = demo / "teacher" / "best.pth"
pc = paired_cache(demo / "cache.zarr", demo, work, ckpt, "test_resnet", 8)
rs = [train_run("f05", demo, work, s, 8, "test_efficientnet", cache=str(pc)) for s in (42, 43)]
tp = paired_throughput(demo, work, work / "cache-v8.zarr", pc, "test_efficientnet")
med = {k: statistics.median(v) for k, v in tp.items()}
print(table(["(f) cached KD, paired mixing (mix_prob 0.5), V = 8", "top-1 (raw)", "top-1 (EMA)"],
            [["seeds 42,43", spread([r["top1"] for r in rs]), spread([r["top1_ema"] for r in rs])]]))
print(table(["stage 2 on", "median img/s", "runs"], [[k, f"{med[k]:.0f}", ", ".join(f"{x:.0f}" for x in v)] for k, v in tp.items()]))
print(f"paired / plain: {med['paired cache'] / med['plain cache']:.3f}")
write_result("fidelity_paired", {"runs": rs, "paired_throughput": tp})
