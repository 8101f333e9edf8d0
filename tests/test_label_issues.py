"""`usi inspect --label-issues`, `--html` and `usi_cache.open_cache` on tiny real caches: the
streamed confident learning recomputed here from the raw arrays; the page's structure and
escaping; the notebook API against the arrays; the quality on flipped Fashion-MNIST labels
against cleanlab; the page in a real headless browser."""
from __future__ import annotations

import csv
import html
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import usi_cache
from helpers import ROOT, cache_of, make_samples, run_py
from usi_cache import cache_format as schema
from usi_cache.cli.main import main
from usi_cache.checks.inspect.label_issues import dense_probs, find_label_issues
from usi_cache.shards.tars import write_shards
from usi_cache.views.sampling import decode_view, replay_array

V, K, C = 8, 3, 5  # helpers.cache_args; its 5 classes
# class names with markup and quotes: every one must come out escaped in the page
CLASSES = ["<b>bold</b>", "a & b", "quote\"d", "it's", "plain"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("issues")
    shards = root / "shards"
    write_shards(make_samples(26, 0, bad=(4,)), CLASSES, shards, per_shard=10, seed=0, progress=False)
    return cache_of(root, shards)


def inspect(*args, code=0):
    r = CliRunner().invoke(main, ["inspect", *map(str, args)])
    assert r.exit_code == code, r.output
    return r.output


def reference(x) -> dict:
    """Confident learning written out sample by sample from the raw arrays (k = 3 < C = 5: the
    tail's uniform share is exercised)."""
    rows, labels, slots = [], [], []
    for s in np.flatnonzero(x["labels"] >= 0):
        row = np.zeros(C)
        for v in range(V):
            p = np.exp(x["logits"][s, v].astype(np.float64))
            tail = max(0.0, 1 - p.sum())
            dense = np.full(C, tail / (C - K))
            dense[x["classes"][s, v].astype(int)] = p
            row += dense / V
        rows.append(row), labels.append(int(x["labels"][s])), slots.append(int(s))
    rows, labels = np.array(rows), np.array(labels)
    t = np.array([rows[labels == j, j].mean() if (labels == j).any() else np.inf for j in range(C)])
    issues, strict = [], []
    for i, (row, y) in enumerate(zip(rows, labels)):
        above = [j for j in range(C) if row[j] >= t[j]]
        j = max(above, key=lambda c: row[c]) if above else int(row.argmax())  # unclaimed: the top class
        if j != y:
            issues.append((row[y], slots[i], j, row[j]))
            if above:
                strict.append((row[y], slots[i], j, row[j]))
    issues.sort(), strict.sort()
    return {"rows": rows, "labels": labels, "slots": slots, "thresholds": t, "issues": issues, "strict": strict}


def test_label_issues_are_confident_learning_on_the_arrays(tiny):
    ref = reference(tiny.x)
    r = find_label_issues(tiny.out, top=1000, progress=False)
    assert r["samples"] == 25 and r["issues_found"] == len(ref["issues"]) > 0
    assert r["thresholds"] == pytest.approx(list(ref["thresholds"]))
    assert [(i["slot"], i["teacher"]) for i in r["issues"]] == [(s, j) for _, s, j, _ in ref["issues"]]
    assert [i["p_given"] for i in r["issues"]] == pytest.approx([p for p, *_ in ref["issues"]])
    assert [i["p_teacher"] for i in r["issues"]] == pytest.approx([q for *_, q in ref["issues"]])
    assert [i["rank"] for i in r["issues"]] == list(range(1, len(ref["issues"]) + 1))
    for i in r["issues"]:
        s = i["slot"]
        assert i["key"] == tiny.x["keys"][s] and i["given"] == tiny.x["labels"][s]
        assert (i["shard"], i["position"]) == divmod(s, 10) and i["given_name"] == CLASSES[i["given"]]
        top1 = tiny.x["classes"][s, :, 0]
        assert i["views_agreeing_teacher"] == pytest.approx((top1 == i["teacher"]).mean())
        assert i["views_agreeing_given"] == pytest.approx((top1 == i["given"]).mean())
    # the densified rows (the cleanlab comparison's input) are the reference rows, summing to 1
    slots, labels, rows = dense_probs(tiny.out)
    assert slots.tolist() == ref["slots"] and labels.tolist() == ref["labels"].tolist()
    assert np.allclose(rows, ref["rows"]) and np.allclose(rows.sum(1), 1, atol=1e-3)
    # the per-class table and the least confident samples
    for c in r["per_class"]:
        mine = ref["labels"] == c["class"]
        assert c["samples"] == mine.sum()
        assert c["mean_p_given"] == pytest.approx(ref["rows"][mine, c["class"]].mean())
        assert c["accuracy"] == pytest.approx((ref["rows"][mine].argmax(1) == c["class"]).mean())
    conf = ref["rows"].max(1)
    want = [ref["slots"][i] for i in np.lexsort((ref["slots"], conf))[:5]]
    assert [s["slot"] for s in find_label_issues(tiny.out, least_confident=5, progress=False)["least_confident"]] == want
    # cleanlab's rule exactly: only the off-diagonal of the confident joint
    st = find_label_issues(tiny.out, top=1000, unclaimed=False, progress=False)
    assert [(i["slot"], i["teacher"]) for i in st["issues"]] == [(s, j) for _, s, j, _ in ref["strict"]]
    assert st["issues_found"] == len(ref["strict"]) == r["issues_found"] - r["issues_unclaimed"]
    assert all(i["claimed"] for i in st["issues"])
    assert sum(not i["claimed"] for i in r["issues"]) == r["issues_unclaimed"]
    # top bounds the list, not the count
    few = find_label_issues(tiny.out, top=2, progress=False)
    assert few["issues"] == r["issues"][:2] and few["issues_found"] == r["issues_found"]


def test_cli_label_issues_text_json_and_csv(tiny, tmp_path):
    d = json.loads(inspect(tiny.out, "--label-issues", "--top", 5, "--json", "--issues-csv", tmp_path / "i.csv"))
    li = d["label_issues"]
    assert len(li["issues"]) == 5 and li["csv"] == str(tmp_path / "i.csv")
    rows = list(csv.DictReader(io.StringIO((tmp_path / "i.csv").read_text())))
    assert [r["key"] for r in rows] == [i["key"] for i in li["issues"]]
    assert [float(r["p_given"]) for r in rows] == pytest.approx([i["p_given"] for i in li["issues"]], rel=1e-5)
    assert rows[0]["given_name"] == li["issues"][0]["given_name"]
    text = inspect(tiny.out, "--label-issues", "--top", 5, "--no-stats")
    assert f"label issues (shards 0..2, confident learning" in text and f"{li['issues_found']} of 25 samples" in text
    assert all(i["key"] in text for i in li["issues"])
    assert "teacher statistics" not in text
    # options that do not make one report: usage errors (exit status 2)
    assert "not one sample" in inspect(tiny.out, "--label-issues", "--key", "img0007", code=2)
    assert "add --label-issues" in inspect(tiny.out, "--issues-csv", tmp_path / "x.csv", code=2)
    assert "drop --no-stats" in inspect(tiny.out, "--html", tmp_path / "h", "--no-stats", code=2)


def test_incomplete_shards_are_skipped(tiny, tmp_path):
    out = tmp_path / "c.zarr"
    shutil.copytree(tiny.out, out)
    layout = schema.Layout.from_attrs(tiny.attrs)
    for f in map(Path, schema.chunk_files(out, schema.COMMIT_ARRAY, 1, layout)):
        f.unlink()
    r = find_label_issues(out, top=1000, progress=False)
    assert r["scope"]["incomplete_skipped"] == [1] and r["samples"] == 15
    assert all(i["shard"] != 1 for i in r["issues"])


def _page(folder: Path) -> str:
    return (folder / "index.html").read_text(encoding="utf-8")


def test_html_report_is_self_contained_and_escaped(tiny, tmp_path):
    out = tmp_path / "report"
    text = inspect(tiny.out, "--html", out, "--shards", tiny.shards, "--top", 7)
    assert f"report written to {out / 'index.html'}" in text
    page = _page(out)
    for section in ("summary", "statistics", "classes", "label-issues", "least-confident"):
        assert f'<section id="{section}">' in page
    # every class name appears escaped, never raw
    for name in CLASSES:
        if name != html.escape(name):
            assert name not in page
        assert html.escape(name) in page
    # images: beside the page, named from slot and view numbers, each one there and decodable
    srcs = re.findall(r'src="([^"]+)"', page)
    assert "stats.png" in srcs and len(srcs) > 10
    for src in srcs:
        assert re.fullmatch(r"stats\.png|img/s\d+(_v\d+)?\.png", src), src
        assert (out / src).is_file()
    assert not re.search(r'(src|href)="(https?:|//|file:)', page)  # no network, no absolute paths
    li = json.loads(inspect(tiny.out, "--label-issues", "--top", 7, "--json", "--no-stats"))["label_issues"]
    shown = li["issues"][:12]
    for r in shown:
        assert f"img/s{r['slot']}_v0.png" in srcs and html.escape(r["key"]) in page
    # a view image is the stored view rendered as the teacher saw it
    r = shown[0]
    slot = r["slot"]
    from usi_cache.shards.images import decode_image
    from usi_cache.shards.tars import read_shard
    from usi_cache.shards.manifest import load_manifest
    m = load_manifest(tiny.shards)
    sample = list(read_shard(m.path(r["shard"])))[r["position"]]
    x = tiny.x
    params = decode_view(x["boxes"][slot, 3], x["flips"][slot, 3], x["aug_ops"][slot, 3], x["aug_levels"][slot, 3],
                         x["aug_resample"][slot, 3])
    want = replay_array(decode_image(sample.data), params, 32, schema.view_spec(tiny.attrs))
    assert np.array_equal(np.asarray(Image.open(out / f"img/s{slot}_v3.png")), want)
    with open(out / "label_issues.csv") as f:
        assert [row["key"] for row in csv.DictReader(f)] == [i["key"] for i in li["issues"]]


def test_html_without_the_shards_is_a_one_line_error(tiny, tmp_path):
    moved = tmp_path / "moved.zarr"
    shutil.copytree(tiny.out, moved)
    meta = json.loads((moved / "zarr.json").read_text())
    meta["attributes"]["usi_cache"]["dataset"]["root"] = str(tmp_path / "gone")
    (moved / "zarr.json").write_text(json.dumps(meta))
    out = inspect(moved, "--html", tmp_path / "h", code=1)
    assert out.strip().splitlines() == [f"Error: the cache's shards were at {tmp_path / 'gone'}, which is gone: "
                                        "give --shards DIR"]
    assert not (tmp_path / "h" / "index.html").exists()


def test_open_cache_api(tiny):
    c = usi_cache.open_cache(tiny.out, shards=tiny.shards)
    x = tiny.x
    slot = list(x["keys"]).index("img0007")
    assert c.slot("img0007") == slot and c.slot(slot) == slot
    top = c.topk("img0007")
    assert len(top) == V and top == c.topk(slot)
    for v, t in enumerate(top):
        assert t["classes"] == x["classes"][slot, v].tolist()
        assert t["names"] == [CLASSES[i] for i in t["classes"]]
        assert t["probs"] == pytest.approx(np.exp(x["logits"][slot, v].astype(np.float64)).tolist())
        assert t["tail_mass"] == pytest.approx(max(0.0, 1 - sum(t["probs"])), abs=1e-9)
    im = c.view_image("img0007", view=3)
    from usi_cache.shards.images import decode_image
    from usi_cache.shards.tars import read_shard
    from usi_cache.shards.manifest import load_manifest
    m = load_manifest(tiny.shards)
    sample = list(read_shard(m.path(slot // 10)))[slot % 10]
    params = decode_view(x["boxes"][slot, 3], x["flips"][slot, 3], x["aug_ops"][slot, 3], x["aug_levels"][slot, 3],
                         x["aug_resample"][slot, 3])
    assert np.array_equal(np.asarray(im), replay_array(decode_image(sample.data), params, 32, schema.view_spec(tiny.attrs)))
    table = c.samples()
    ref = reference(x)
    assert table["slot"].tolist() == ref["slots"] and table["label"].tolist() == ref["labels"].tolist()
    assert table["p_label"].tolist() == pytest.approx(ref["rows"][np.arange(25), ref["labels"]].tolist())
    assert table["teacher"].tolist() == ref["rows"].argmax(1).tolist()
    assert c.samples(shards=[1])["shard"].tolist() == [1] * 10
    issues = c.label_issues(top=3)
    assert issues["slot"].tolist() == [s for _, s, *_ in ref["issues"][:3]]
    with pytest.raises(schema.CacheError, match="is not in the cache"):
        c.topk("nope")
    with pytest.raises(schema.CacheError, match="empty or undecodable"):
        c.topk("img0004")
    with pytest.raises(schema.CacheError, match="views 0..7"):
        c.view_image(slot, view=V)
    with pytest.raises(schema.CacheError, match="shards 0..2"):
        c.samples(shards=[5])


def test_import_stays_light():
    code = ("import sys, usi_cache; assert callable(usi_cache.open_cache); "
            "print(sorted(m for m in ('torch', 'zarr', 'usi_cache.api') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


@pytest.mark.slow
def test_same_output_for_any_split(tiny):
    """Label issues and the per-class table from 1 process, 2 worker processes and 2 torchrun ranks."""
    args = ["inspect", str(tiny.out), "--label-issues", "--no-stats", "--json", "--top", "50"]
    one = json.loads(CliRunner().invoke(main, args).output)
    two = json.loads(CliRunner().invoke(main, [*args, "--workers", "2"]).output)
    assert two == one and one["label_issues"]["issues"]
    r = run_py(["-m", "usi_cache.cli", *args], torchrun=2, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout) == one


@pytest.mark.slow
def test_open_cache_on_s3_reads_what_the_local_cache_holds(tiny, s3):
    url = f"s3://{BUCKET}/api"
    s3.put(str(tiny.out), f"{BUCKET}/api/c.zarr", recursive=True)
    s3.put(str(tiny.shards), f"{BUCKET}/api/shards", recursive=True)
    local = usi_cache.open_cache(tiny.out, shards=tiny.shards)
    remote = usi_cache.open_cache(f"{url}/c.zarr", shards=f"{url}/shards")
    assert remote.topk("img0007") == local.topk("img0007")
    assert np.array_equal(np.asarray(remote.view_image("img0007", 2)), np.asarray(local.view_image("img0007", 2)))
    assert remote.samples().equals(local.samples())
    assert remote.label_issues(top=5).equals(local.label_issues(top=5))


from test_object_storage import BUCKET, s3  # noqa: E402,F401  (the moto S3 server fixture)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={tmp_path / 'chromium-profile'}", *args],
                          capture_output=True, text=True, timeout=180)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian's `chromium`: make data installs it)")
def test_report_opens_in_a_real_browser(tiny, tmp_path):
    """The page, opened from disk by headless Chromium: its sections and images are in the
    rendered DOM, and the screenshot is not blank."""
    out = tmp_path / "report"
    inspect(tiny.out, "--html", out, "--shards", tiny.shards)
    url = (out / "index.html").as_uri()
    r = chromium(tmp_path, "--dump-dom", url)
    assert r.returncode == 0, r.stderr[-2000:]
    dom = r.stdout
    for section in ("summary", "statistics", "classes", "label-issues", "least-confident"):
        assert f'id="{section}"' in dom
    imgs = re.findall(r'<img[^>]* src="([^"]+)"', dom)
    assert "stats.png" in imgs and sum(s.startswith("img/s") for s in imgs) >= 2 * V
    assert "Least confident samples" in dom and "Label issues" in dom
    assert html.escape(CLASSES[0]) in dom and CLASSES[0] not in dom  # markup in a class name stays text
    shot = tmp_path / "shot.png"
    r = chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,2000", url)
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1200, 2000)
        gray = np.asarray(im.convert("L"), dtype=np.float64)
    assert gray.std() > 20  # text, figures and views, not a blank page
    assert len(np.unique(gray)) > 50


@pytest.mark.slow
def test_label_issue_quality_on_flipped_fashion_mnist(tmp_path):
    """A teacher trained on clean Fashion-MNIST; held-out student images with 5 % of their
    labels flipped: the flips are found (precision and recall at N = flips >= 0.8) and the
    ranking agrees with cleanlab's on the densified rows (benchmarks/label_quality.py, smaller)."""
    pytest.importorskip("cleanlab")
    from usi_cache.shards.fashion_mnist import FMNIST_DIR
    if not Path(FMNIST_DIR).is_dir():
        pytest.skip(f"{FMNIST_DIR}: Fashion-MNIST is not installed (make data)")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import label_quality as bench
    m = bench.run(tmp_path, **QUALITY)
    print({k: v for k, v in m.items() if isinstance(v, float)})  # shown with pytest -s
    assert m["flips"] == 100 and m["samples"] == QUALITY["students"]
    assert m["precision_at_n"] >= 0.8 and m["recall_at_n"] >= 0.8, m
    assert m["overlap_top_n_with_cleanlab"] >= 0.8, m
    assert m["same_set_as_cleanlab_confident_learning"] >= 0.9, m


QUALITY = dict(teacher_images=20000, epochs=3, students=2000, fraction=0.05, views=4, seed=0)
