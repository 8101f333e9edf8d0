"""The fidelity audit: its math against a direct float64 reference, and end to end on a real cache."""
from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner

from helpers import cache_args, save_teacher
from usi_cache import cache_format as schema
from usi_cache.checks.audit import audit_ks, bucket_fidelity
from usi_cache.cli.main import main


def reference(logits: list[float], k: int) -> tuple[float, float]:
    """Tail mass and KL(p || p̂_k), written out class by class."""
    m = max(logits)
    e = [math.exp(z - m) for z in logits]
    p = sorted((x / sum(e) for x in e), reverse=True)
    C = len(p)
    if k >= C:
        return 0.0, 0.0
    r = sum(p[k:])
    q = p[:k] + [r / (C - k)] * (C - k)
    return r, sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


@pytest.mark.parametrize("k", [1, 2, 5, 10, 20])
def test_bucket_fidelity_matches_the_reference(k):
    g = torch.Generator().manual_seed(k)
    logits = torch.randn(6, 20, generator=g, dtype=torch.float64) * 3
    logits[0, 3] += 40  # a sharp row: tail ~1e-17, no cancellation in r
    tail, kl = bucket_fidelity(logits, k)
    for i in range(6):
        r, d = reference(logits[i].tolist(), k)
        assert tail[i].item() == pytest.approx(r, rel=1e-9, abs=1e-300)
        assert kl[i].item() == pytest.approx(d, rel=1e-7, abs=1e-15)


def test_audit_ks():
    assert audit_ks(1000) == [1, 2, 5, 10, 20, 50, 100]
    assert audit_ks(5) == [1, 2, 5] and audit_ks(30) == [1, 2, 5, 10, 20, 30]


@pytest.mark.slow
def test_audit_end_to_end(tmp_path, shards, teacher_ckpt):
    out = tmp_path / "c.zarr"
    r = CliRunner().invoke(main, ["cache", *cache_args(shards, teacher_ckpt, out), "--audit", "20"])
    assert r.exit_code == 0, r.output
    assert "fidelity audit: teacher re-run with full logits on 20 replayed views (fp32, seed 42)" in r.output
    _, attrs = schema.open_cache(out)
    a = attrs["audit"]
    assert [row["k"] for row in a["rows"]] == [1, 2, 5] and a["cached_k"] == 3 and a["views"] == 20
    assert all(row["top1_agreement"] == 1.0 for row in a["rows"])  # the replay is exact
    tails = [row["tail_mass"] for row in a["rows"]]
    assert tails[0] > tails[1] > tails[2] == 0.0 and a["rows"][2]["kl"] == 0.0  # k = C: no tail
    n = attrs["op_slots"]
    # float16 log p + uint16 class per k; lse float32, boxes 4 int32, flip uint8, ops int8 + float16 + uint8
    assert [row["bytes_per_view"] for row in a["rows"]] == [4 * k + 4 + 16 + 1 + 4 * n for k in (1, 2, 5)]
    text = CliRunner().invoke(main, ["inspect", str(out), "--no-stats"]).output
    assert "fidelity audit" in text and "<- this cache" not in text  # k = 3 is not an audited k
    plot = tmp_path / "stats.png"
    r = CliRunner().invoke(main, ["inspect", str(out), "--plot", str(plot)])
    assert r.exit_code == 0, r.output
    assert plot.stat().st_size > 0
    # `usi audit` on the existing cache: another sample replaces the table
    r = CliRunner().invoke(main, ["audit", str(out), "--teacher-checkpoint", str(teacher_ckpt), "--views", "7",
                                  "--seed", "3"])
    assert r.exit_code == 0, r.output
    _, attrs = schema.open_cache(out)
    assert attrs["audit"]["views"] == 7 and attrs["audit"]["seed"] == 3
    other = save_teacher(tmp_path / "other.pth", seed=1)
    r = CliRunner().invoke(main, ["audit", str(out), "--teacher-checkpoint", str(other)])
    assert r.exit_code == 1 and "is not the cache's teacher" in r.output
    # the audit is volatile: resuming the cache with the same config is still allowed
    r = CliRunner().invoke(main, ["cache", *cache_args(shards, teacher_ckpt, out)])
    assert r.exit_code == 0, r.output
