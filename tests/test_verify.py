"""`usi verify` on a tiny real cache: it passes when intact and names the shard and the check
for each kind of damage."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from helpers import cache_args, make_shards, run_py, save_teacher
from usi_cache import cache_format as schema
from usi_cache.checks.verify import shard_checks as verify_checks
from usi_cache.cli.main import main
from usi_cache.checks.verify.report import CHECKS, report_dict
from usi_cache.checks.verify.run import verify_cache


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    shards = make_shards(root / "shards", n=26, per_shard=10, bad=(4,))  # img0004 is undecodable
    ckpt = save_teacher(root / "teacher.pth")
    out = root / "c.zarr"
    r = CliRunner().invoke(main, ["cache", *cache_args(shards, ckpt, out)])
    assert r.exit_code == 0, r.output
    layout = schema.Layout.from_attrs(schema.open_cache(out)[1])
    return SimpleNamespace(shards=shards, ckpt=ckpt, out=out, layout=layout)


@pytest.fixture
def copy(tiny, tmp_path) -> Path:
    """A private copy of the tiny cache, to damage."""
    out = tmp_path / "c.zarr"
    shutil.copytree(tiny.out, out)
    return out


def verify(cache, shards, *extra, code=None):
    r = CliRunner().invoke(main, ["verify", str(cache), "--shards", str(shards), *map(str, extra)])
    if code is not None:
        assert r.exit_code == code, r.output
    assert "Traceback" not in r.output
    return r.output, r.output.strip().splitlines()[-1]


def failing(output: str) -> dict[str, list[str]]:
    """check -> its problem lines, for every check marked FAIL."""
    out, current = {}, None
    for line in output.splitlines():
        parts = line.split()
        if line.startswith("  ") and not line.startswith("      ") and parts:
            name = next((c for c in CHECKS if line.strip().startswith(c + " ")), None)
            current = name if name and line.split(name, 1)[1].lstrip().startswith("FAIL") else None
            if current:
                out[current] = []
        elif line.startswith("      ") and current:
            out[current].append(line.strip())
    return out


def test_good_cache_passes(tiny):
    output, verdict = verify(tiny.out, tiny.shards, code=0)
    assert verdict.startswith("verdict: OK") and "3 shards, 26 samples, 200 views" in verdict
    assert failing(output) == {}
    for check in CHECKS[:-1]:
        assert f"  {check} " in output


def test_recompute_reproduces_the_teacher(tiny):
    output, verdict = verify(tiny.out, tiny.shards, "--recompute", 12, "--teacher-checkpoint", tiny.ckpt,
                             "--device", "cpu", code=0)
    assert "recompute    ok  (12 views re-run on cpu" in output and "teacher re-run on 12 views" in verdict


def test_recompute_with_another_teacher_fails(tiny, tmp_path):
    other = save_teacher(tmp_path / "other.pth", seed=1)
    output, verdict = verify(tiny.out, tiny.shards, "--recompute", 12, "--teacher-checkpoint", other,
                             "--device", "cpu", code=1)
    problems = failing(output)["recompute"]
    assert any("is not the cache's teacher" in p for p in problems)
    assert any(p.startswith("shard ") and "differ" in p for p in problems)
    assert verdict.startswith("verdict: FAILED") and "recompute" in verdict
    output, _ = verify(tiny.out, tiny.shards, "--recompute", 3, code=1)
    assert "Error: --teacher-checkpoint is needed" in output


def test_deleted_chunk_file(tiny, copy):
    for f in map(Path, schema.chunk_files(copy, "logits", 1, tiny.layout)):
        f.unlink()
    output, verdict = verify(copy, tiny.shards, code=1)
    problems = failing(output)
    assert list(problems) == ["chunk files"], output
    assert problems["chunk files"][0].startswith("shard 1: logits: chunk file logits/c/1/0/0 is missing")
    assert verdict == "verdict: FAILED: 1 problem(s): chunk files (shard 1)"


def test_deleted_commit_marker(tiny, copy):
    for f in map(Path, schema.chunk_files(copy, schema.COMMIT_ARRAY, 2, tiny.layout)):
        f.unlink()
    output, verdict = verify(copy, tiny.shards, code=1)
    assert failing(output)["complete"][0].startswith("shard 2: not committed")
    assert "(2/3 shards committed)" in output and verdict.endswith("complete (shard 2)")


def test_corrupted_chunk_files_are_all_reported(tiny, copy):
    """Damage in two shards: both are found (no stop at the first), each named with its check."""
    for name, shard in (("classes", 2), ("lse", 0)):
        f = Path(schema.chunk_files(copy, name, shard, tiny.layout)[0])
        data = bytearray(f.read_bytes())
        data[20:28] = b"\xa5" * 8  # inside the first inner chunk (view 0), not the index at the end
        f.write_bytes(bytes(data))
    output, verdict = verify(copy, tiny.shards, code=1)
    problems = failing(output)
    assert list(problems) == ["checksums"], output
    lines = sorted(problems["checksums"])
    assert lines[0].startswith("shard 0: lse: view 0 unreadable") and "checksum" in lines[0]
    assert lines[1].startswith("shard 2: classes: view 0 unreadable") and "checksum" in lines[1]
    assert verdict == "verdict: FAILED: 2 problem(s): checksums (shards 0, 2)"


def test_shards_that_do_not_match(tiny, tmp_path):
    other = make_shards(tmp_path / "other", n=26, per_shard=10, seed=3)
    output, verdict = verify(tiny.out, other, code=1)
    problems = failing(output)
    assert any(p.startswith("shard 0: sha256 differs") for p in problems["fingerprint"])
    assert [p.split(":")[0] for p in problems["keys"]] == ["shard 0", "shard 1", "shard 2"]
    assert "out of place" in problems["keys"][0]
    assert verdict.startswith("verdict: FAILED") and "fingerprint (shards 0, 1, 2)" in verdict
    fewer = make_shards(tmp_path / "fewer", n=12, per_shard=10)
    output, _ = verify(tiny.out, fewer, code=1)
    problems = failing(output)
    assert "cache: the cache has 3 shards" in problems["fingerprint"][0]
    assert any(p.startswith("shard 2:") and "has no shard 2" in p for p in problems["keys"])


@pytest.mark.parametrize("edit, check, message", [
    (lambda a: a.update(seed=7), "view params", "shard 0: not the seeded sampler's views (seed 7)"),
    (lambda a: a["dataset"]["shards"][1].update(count=9), "fingerprint", "shard 1: sample count differs"),
    (lambda a: a.update(topk=2), "attributes", "cache: array 'logits' has shape (30, 8, 3)"),
    (lambda a: a["view_spec"].update(hflip=0.0), "view params", "shard 0: not the seeded sampler's views"),
    (lambda a: a.update(invalid=[*a["invalid"], "img0001"]), "labels",
     "cache: the cache's invalid list names 1 key(s) that are not stored with label -1: img0001"),
    (lambda a: a["replay"].update(sha256="0" * 64), "replay", "cache: "),
])
def test_tampered_attribute(tiny, copy, edit, check, message):
    group = zarr.open_group(str(copy), mode="r+")
    attrs = dict(group.attrs[schema.ATTR])
    edit(attrs)
    group.attrs[schema.ATTR] = attrs
    output, verdict = verify(copy, tiny.shards, code=1)
    problems = failing(output)
    assert any(p.startswith(message) for p in problems[check]), output
    assert verdict.startswith("verdict: FAILED") and check in verdict


def test_undecodable_image_missing_from_the_invalid_list(tiny, copy):
    group = zarr.open_group(str(copy), mode="r+")
    group.attrs[schema.ATTR] = {**group.attrs[schema.ATTR], "invalid": []}
    slot = list(group["keys"][:]).index("img0004")
    output, _ = verify(copy, tiny.shards, code=1)
    assert failing(output) == {"labels": [f"shard {slot // 10}: 1 wrong label(s), first slot {slot} (img0004) has "
                                          "label -1 but is not in the cache's invalid list"]}, output


def test_chunks_that_zarr_leaves_out_are_not_problems(tiny, tmp_path):
    """Zarr writes no chunk that holds only fill values: with hflip 0 no flips chunk exists,
    and that is a correct cache."""
    config = tmp_path / "noflip.yaml"
    config.write_text("view:\n  hflip: 0.0\n")
    out = tmp_path / "noflip.zarr"
    r = CliRunner().invoke(main, ["cache", "--config", str(config),
                                  *cache_args(tiny.shards, tiny.ckpt, out, "--views", "2")])
    assert r.exit_code == 0, r.output
    assert not any(f.is_file() for f in map(Path, schema.chunk_files(out, "flips", 0, tiny.layout)))
    _, verdict = verify(out, tiny.shards, code=0)
    assert verdict.startswith("verdict: OK")


def test_recompute_fails_a_corrupted_box(tiny, copy):
    """A crop one pixel shorter than the one the teacher saw: the re-run no longer matches."""
    group = zarr.open_group(str(copy), mode="r+")
    boxes = group["boxes"][:]
    boxes[..., 2] = (boxes[..., 2] - 1).clip(min=1)
    group["boxes"][:] = boxes
    output, verdict = verify(copy, tiny.shards, "--recompute", 12, "--teacher-checkpoint", tiny.ckpt, code=1)
    assert verdict.startswith("verdict: FAILED") and "recompute" in failing(output), output


@pytest.mark.slow
def test_report_is_the_same_for_any_split(tiny, copy):
    """Damage in every shard, then --workers 1, --workers 2 and a 2-rank torchrun run: the same
    report (problems, their order, counts and the re-run's statistics), printed once."""
    group = zarr.open_group(str(copy), mode="r+")
    labels = group["labels"][:]
    labels[3] = (labels[3] + 1) % 5  # shard 0: a wrong label
    group["labels"][:] = labels
    boxes = group["boxes"][:]
    boxes[12:15, :, 2] = (boxes[12:15, :, 2] - 1).clip(min=1)  # shard 1: crops the teacher did not see
    group["boxes"][:] = boxes
    f = Path(schema.chunk_files(copy, "lse", 2, tiny.layout)[0])
    data = bytearray(f.read_bytes())
    data[20:28] = b"\xa5" * 8  # shard 2: a damaged chunk
    f.write_bytes(bytes(data))
    args = ["verify", str(copy), "--shards", str(tiny.shards), "--recompute", "60", "--teacher-checkpoint",
            str(tiny.ckpt), "--device", "cpu"]
    one = CliRunner().invoke(main, args).output
    assert all(c in failing(one) for c in ("labels", "view params", "checksums", "recompute")), one
    two = CliRunner().invoke(main, [*args, "--workers", "2"]).output
    assert two == one
    r = run_py(["-m", "usi_cache.cli", *args], torchrun=2, timeout=400)
    assert r.returncode != 0 and r.stdout == one, r.stdout + r.stderr


# ---------------------------------------------------------------------------------------------
# one fault per named check, all in one cache: each check names its own slot and view

def _valid_slots(x, shard: int, n: int) -> list[int]:
    return [int(s) for s in np.flatnonzero(x["labels"][shard * 10:(shard + 1) * 10] >= 0)[:n] + shard * 10]


@pytest.fixture(scope="module")
def faults(tiny, tmp_path_factory):
    """A copy of the tiny cache with one fault per value check; where each fault sits."""
    out = tmp_path_factory.mktemp("faults") / "c.zarr"
    shutil.copytree(tiny.out, out)
    group = zarr.open_group(str(out), mode="r+")
    x = {n: group[n][:] for n in schema.ARRAYS}
    tar_labels = x["labels"].copy()  # the cache was made from the shards: their classes
    a, a2, c, c2, neg = _valid_slots(x, 0, 5)
    b, d, h = _valid_slots(x, 1, 3)
    e, f, g = _valid_slots(x, 2, 3)
    x["logits"][a, 2, 1] = np.nan  # finite (and top-k mass: a NaN sum is not <= 1)
    x["lse"][a2, 5] = np.inf  # finite
    x["classes"][c, 0, 2] = 9  # class range: C = 5
    x["classes"][c2, 3, 1] = x["classes"][c2, 3, 0]  # class range: repeated
    x["labels"][neg] = -1  # labels: a decodable image stored as invalid
    x["logits"][b, 4] = 0.0  # top-k mass: p = 1, 1, 1
    x["logits"][d, 1] = [-2.0, -0.5, -3.0]  # sorted
    x["keys"][h] = "elsewhere"  # keys
    x["boxes"][e, 2, 2] = 500  # boxes (and view params)
    x["flips"][f, 0] ^= 1  # view params
    x["labels"][g] = (x["labels"][g] + 1) % 5  # labels
    for name in ("logits", "lse", "classes", "labels", "keys", "boxes", "flips"):
        group[name][:] = x[name]
    output, verdict = verify(out, tiny.shards, code=1)
    found = json.loads(verify(out, tiny.shards, "--json", code=1)[0])
    where = dict(a=a, a2=a2, c=c, c2=c2, neg=neg, b=b, d=d, h=h, e=e, f=f, g=g, neg_key=str(x["keys"][neg]),
                 g_label=int(x["labels"][g]), g_tar=int(tar_labels[g]))
    return SimpleNamespace(out=out, shards=tiny.shards, text=output, verdict=verdict, json=found, at=where)


EXPECTED = {  # check -> the start of each of its problems (in report order), from the slots above
    "keys": lambda w: [f"shard 1: 1 key(s) out of place, first at slot {w['h']}: cache has 'elsewhere'"],
    "labels": lambda w: [f"shard 0: 1 wrong label(s), first slot {w['neg']} ({w['neg_key']}) has label -1 "
                         "but its image decodes",
                         f"shard 2: 1 wrong label(s), first slot {w['g']}: cache {w['g_label']}, tar {w['g_tar']}"],
    "finite": lambda w: [f"shard 0: non-finite logits in 1 view(s), first at slot {w['a']} view 2",
                         f"shard 0: non-finite lse in 1 view(s), first at slot {w['a2']} view 5"],
    "class range": lambda w: [f"shard 0: class index >= C = 5 in 1 view(s), first at slot {w['c']} view 0",
                              f"shard 0: a class repeated within one view's top-k in 1 view(s), first at slot "
                              f"{w['c2']} view 3"],
    "sorted": lambda w: [f"shard 1: logits not descending in 1 view(s), first at slot {w['d']} view 1"],
    "top-k mass": lambda w: [f"shard 0: top-k probabilities sum above 1 in 1 view(s), first at slot {w['a']} view 2",
                             f"shard 1: top-k probabilities sum above 1 in 1 view(s), first at slot {w['b']} view 4 "
                             "(sum 3.000000)"],
    "boxes": lambda w: [f"shard 2: crop box outside the image in 1 view(s), first at slot {w['e']} view 2 (box "],
    "view params": lambda w: ["shard 2: not the seeded sampler's views (seed 42): boxes in 1 view(s), flips in 1 "
                              f"view(s); first at slot {min(w['e'], w['f'])} view "],
}


@pytest.mark.parametrize("check", sorted(EXPECTED))
def test_each_check_names_its_own_fault(faults, check):
    problems = failing(faults.text)
    assert set(problems) == set(EXPECTED), faults.text  # no check fires on another check's fault
    want = EXPECTED[check](faults.at)
    assert len(problems[check]) == len(want), problems[check]
    for line, start in zip(problems[check], want):
        assert line.startswith(start), (line, start)


def test_json_report_lists_the_checks_that_ran(faults):
    """--json: every check of the lists in report order, with the same problems as the text."""
    d = faults.json
    names = [c["name"] for c in d["checks"]]
    shard_checks = [name for name, _ in verify_checks.SHARD_CHECKS]
    assert names == [c for c in CHECKS if c != "recompute"] and d["not_run"] == ["recompute"]
    assert names == ["attributes", "fingerprint"] + shard_checks[:-1] + ["replay"]
    assert not d["ok"] and {c["name"] for c in d["checks"] if not c["ok"]} == set(EXPECTED)
    text = failing(faults.text)
    for c in d["checks"]:
        lines = [f"{'shard ' + str(p['shard']) if p['shard'] is not None else 'cache'}: {p['message']}"
                 for p in c["problems"]]
        assert lines == text.get(c["name"], []), c["name"]
    assert (d["views"], d["valid"], d["compared"]) == (192, 24, 23)  # img0004 and one -1; one key moved


def test_the_check_list_is_what_runs(faults, monkeypatch):
    """Take `boxes` out of SHARD_CHECKS: its fault goes unreported and the report says it did not
    run; the other checks still find theirs."""
    whole = report_dict(verify_cache(faults.out, faults.shards, progress=False))
    monkeypatch.setattr(verify_checks, "SHARD_CHECKS",
                        tuple((n, f) for n, f in verify_checks.SHARD_CHECKS if n != "boxes"))
    rep = verify_cache(faults.out, faults.shards, progress=False)
    assert "boxes" not in rep.ran and not any(p.check == "boxes" for p in rep.problems)
    without = report_dict(rep)
    assert without["not_run"] == ["boxes", "recompute"]
    assert [c for c in whole["checks"] if c["name"] != "boxes"] == without["checks"]
    assert any(c["name"] == "boxes" and not c["ok"] for c in whole["checks"])
