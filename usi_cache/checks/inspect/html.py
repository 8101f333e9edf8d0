"""`usi inspect --html DIR`: the report as a self-contained page, opened from disk in a browser.

DIR/index.html with everything beside it (no server, no network, no script): the statistics
figure (plots.plot_stats), the galleries' images under DIR/img/, and the label issues as CSV.
The page is rendered from the same report dict as the text and `--json` outputs
(run.inspect_report with label issues), so it shows the same numbers. Gallery views
are rendered from the stored view parameters by the one renderer (views/render.py): what the teacher
saw, at its input size, mixed images included for a paired cache.

Every string that comes from the data (keys, class names, paths) is HTML-escaped; image file
names are made from slot and view numbers only, never from keys. Large caches: the galleries
show the first GALLERY samples of their ranked lists and the class table the MAX_CLASS_ROWS
classes the teacher agrees least with; the page says so where it leaves anything out.
"""
from __future__ import annotations

import html
from collections import defaultdict
from pathlib import Path

from usi_cache import cache_format as schema
from usi_cache.checks.inspect.text import format_summary
from usi_cache.checks.inspect.stats import bucket_probs
from usi_cache.views.render import render_stored, shard_images, stored_view
from usi_cache.checks.common import shards_for
from usi_cache.shards.manifest import ShardError

GALLERY = 12  # samples per gallery
MAX_VIEWS = 10  # views shown per sample
BARS = 3  # top classes drawn under each view
MAX_CLASS_ROWS = 100  # rows of the per-class table
THUMB = 84  # CSS pixels of a view thumbnail (views are scaled up, pixelated, from the teacher's size)
CSV_NAME = "label_issues.csv"

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#1d2433;background:#f5f6f8}
header{background:#1d2433;color:#fff;padding:18px 32px}
header h1{margin:0 0 4px;font-size:22px}header p{margin:0;color:#c4cad6;font-size:14px}
nav{padding:8px 32px;background:#e8ebf0;font-size:14px}nav a{margin-right:18px;color:#2454a6}
section{background:#fff;margin:18px 32px;padding:14px 22px;border-radius:8px;box-shadow:0 1px 3px #0002}
h2{font-size:18px;margin:4px 0 10px}.lead{font-size:14px}caption{text-align:left;padding:2px 0}
pre{background:#f5f6f8;padding:10px;white-space:pre-wrap;font-size:12px;line-height:1.35}
table{border-collapse:collapse;font-size:13px}th,td{padding:3px 9px;text-align:right;border-bottom:1px solid #e3e6eb}
th{background:#f0f2f5}td.l,th.l{text-align:left}
.note{color:#5b6475;font-size:13px}.kpi{display:inline-block;margin:0 26px 8px 0}
.kpi b{display:block;font-size:20px}.kpi span{font-size:12px;color:#5b6475}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(540px,1fr));gap:10px}
.card{border:1px solid #e3e6eb;border-radius:6px;padding:8px 10px}
.card h3{font-size:14px;margin:0 0 6px}.card h3 small{font-weight:normal;color:#5b6475}
.views{display:flex;flex-wrap:wrap;gap:8px;align-items:flex-start}
.view{width:%(t)dpx;font-size:9.5px}.view img,.orig img{width:%(t)dpx;height:%(t)dpx;image-rendering:pixelated;
 display:block;border:1px solid #ccd}
.orig{width:%(t)dpx;font-size:10px;margin-right:8px}
.bar{position:relative;height:13px;background:#eef0f3;margin-top:2px;overflow:hidden;white-space:nowrap}
.bar i{position:absolute;left:0;top:0;bottom:0;background:#9aa5b8}.bar.g i{background:#3c9d5d}
.bar.t i{background:#d0643b}.bar span{position:relative;padding-left:2px}
img.fig{max-width:100%%;width:1000px}
""" % {"t": THUMB}


def e(x) -> str:
    """Escape a value for HTML text or an attribute."""
    return html.escape(str(x), quote=True)


def write_html(report: dict, path: str, out_dir: str | Path, shards_dir: str | None) -> str:
    """Write DIR/index.html (+ stats.png, img/, label_issues.csv) for `report`; returns the page's
    path. The galleries need the cache's shards (`shards_dir`, default the recorded folder)."""
    from usi_cache.checks.inspect.label_issues import write_csv
    out = Path(out_dir)
    (out / "img").mkdir(parents=True, exist_ok=True)
    group, attrs = schema.open_cache(path)
    layout = schema.Layout.from_attrs(attrs)
    manifest = shards_for(attrs, shards_dir)
    li, st, summary = report["label_issues"], report["stats"], report["summary"]
    stats_png = None
    if st is not None and st["views"]:
        from usi_cache.checks.inspect.figures import plot_stats
        stats_png = plot_stats(st, summary, out / "stats.png").name
    write_csv(li["issues"], out / CSV_NAME)
    least, issues = li["least_confident"][:GALLERY], li["issues"][:GALLERY]
    cards = _render_cards(group, attrs, layout, manifest, least + issues, out / "img")
    parts = [_head(summary), _summary(summary), _stats(st, stats_png), _classes(li),
             _issues(li, issues, cards), _least(li, least, cards), "</body></html>"]
    page = out / "index.html"
    page.write_text("\n".join(parts), encoding="utf-8")
    return str(page)


# ---------------------------------------------------------------------------------------------
# gallery images


def _render_cards(group, attrs, layout, manifest, records: list[dict], img_dir: Path) -> dict[int, dict]:
    """slot -> {"orig": file, "views": [{"file", "top": [(class, prob)], "tail"}]}: each sample's
    stored views rendered as the teacher saw them, one shard read per shard."""
    from PIL import Image
    by_shard: dict[int, set[int]] = defaultdict(set)
    for r in records:
        by_shard[r["shard"]].add(r["position"])
    spec, size = schema.view_spec(attrs), schema.view_size(attrs)
    S = layout.slots_per_shard
    cards = {}
    for shard in sorted(by_shard):
        wanted = by_shard[shard]
        block = schema.read_block(group, layout, shard)
        images = shard_images(manifest.path(shard), wanted, layout.paired, block.keys)
        p, rest = bucket_probs(block.log_probs)
        for pos in sorted(wanted):
            slot = shard * S + pos
            image = images.get(pos) if pos < len(images.encoded) else None
            if image is None:
                raise ShardError(f"{manifest.path(shard)}: position {pos} ({block.keys[pos]!r}) does not decode")
            orig = f"s{slot}.png"
            image.convert("RGB").save(img_dir / orig)
            views = []
            for v in range(min(layout.views, MAX_VIEWS)):
                try:
                    pixels = render_stored(stored_view(block, pos, v, shard * S, S), image, images.get, size, spec)
                except ValueError as err:
                    raise schema.CacheError(f"slot {slot} view {v}: {err}") from None
                name = f"s{slot}_v{v}.png"
                Image.fromarray(pixels).save(img_dir / name)
                views.append({"file": name, "tail": float(rest[pos, v]),
                              "top": [(int(c), float(q)) for c, q in zip(block.classes[pos, v][:BARS], p[pos, v][:BARS])]})
            cards[slot] = {"orig": orig, "views": views}
    return cards


# ---------------------------------------------------------------------------------------------
# the page's parts


def _head(s: dict) -> str:
    t = s["teacher"]
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>usi inspect: {e(Path(s['cache']).name)}</title><style>{CSS}</style></head><body>"
            f"<header><h1>Cache report: {e(s['cache'])}</h1><p>teacher {e(t['name'])} at {e(t['input_size'])} px; "
            f"{e(s['dataset']['samples'])} samples in {e(s['dataset']['shards'])} shards, "
            f"{e(s['dataset']['num_classes'])} classes; V = {e(s['views'])} views, top k = {e(s['topk'])}</p></header>"
            "<nav><a href=\"#summary\">Summary</a><a href=\"#statistics\">Statistics</a>"
            "<a href=\"#classes\">Classes</a><a href=\"#label-issues\">Label issues</a>"
            "<a href=\"#least-confident\">Least confident</a></nav>")


def _summary(s: dict) -> str:
    return f"<section id=\"summary\"><h2>Summary</h2><pre>{e(format_summary(s))}</pre></section>"


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def _stats(st: dict | None, png: str | None) -> str:
    if st is None:
        return "<section id=\"statistics\"><h2>Statistics</h2><p class=\"note\">not computed</p></section>"
    sc = st["scope"]
    where = f"shards {sc['shards'][0]}..{sc['shards'][1] - 1}"
    if sc["sample_views"] is not None:
        where += f", a random sample of {sc['sample_views']} views (seed {sc['seed']})"
    kpis = [("top-1 agreement", _pct(st["top1_agreement"])), (st["top5_label"].split(" (")[0] + " agreement",
            _pct(st["top5_agreement"])), ("mean top-1 probability", f"{st['mean_top1_prob'] or 0:.3f}"),
            ("mean tail mass", f"{st['mean_tail_mass'] or 0:.4f}"),
            ("calibration error (ECE)", f"{st['reliability']['ece'] or 0:.3f}")]
    body = "".join(f"<div class=\"kpi\"><b>{e(v)}</b><span>{e(k)}</span></div>" for k, v in kpis)
    fig = f"<img class=\"fig\" src=\"{e(png)}\" alt=\"teacher statistics\">" if png else ""
    return (f"<section id=\"statistics\"><h2>Confidence, calibration and tail mass</h2>{body}"
            f"<p class=\"note\">{e(st['views'])} views of {e(st['samples'])} samples ({e(where)}); agreement with "
            f"the given labels on the augmented training views.</p>{fig}</section>")


def _classes(li: dict) -> str:
    rows = [c for c in li["per_class"] if c["samples"]]
    rows.sort(key=lambda c: (c["accuracy"], c["class"]))
    note = ""
    if len(rows) > MAX_CLASS_ROWS:
        note = (f"<p class=\"note\">Showing the {MAX_CLASS_ROWS} classes with the lowest teacher accuracy of "
                f"{len(rows)}; every class is in the JSON report.</p>")
        rows = rows[:MAX_CLASS_ROWS]
    body = "".join(
        f"<tr><td>{e(c['class'])}</td><td class=\"l\">{e(c['name'])}</td><td>{e(c['samples'])}</td>"
        f"<td>{_pct(c['accuracy'])}</td><td>{_pct(c['view_top1_agreement'])}</td><td>{c['mean_p_given']:.3f}</td>"
        f"<td>{c['mean_top1_prob']:.3f}</td><td class=\"l\">{_confused(c)}</td></tr>" for c in rows)
    return ("<section id=\"classes\"><h2>Per class</h2><p class=\"note\">Teacher accuracy: samples whose "
            "view-averaged top class is the given label; view top-1: views whose top class is; mean p(given) is "
            "also the class's confident-learning threshold. Worst first.</p>" + note +
            "<table><tr><th>class</th><th class=\"l\">name</th><th>samples</th><th>teacher accuracy</th>"
            "<th>view top-1</th><th>mean p(given)</th><th>mean confidence</th><th class=\"l\">most confused with "
            f"(samples)</th></tr>{body}</table></section>")


def _confused(c: dict) -> str:
    if not c["most_confused_name"]:
        return "-"
    return f"{e(c['most_confused_name'])} ({e(c['most_confused_samples'])})"


def _card(r: dict, cards: dict, names: list[str] | None, headline: str) -> str:
    c = cards[r["slot"]]
    views = []
    for i, v in enumerate(c["views"]):
        bars = "".join(
            f"<div class=\"bar{' g' if k == r['given'] else ' t' if k == r['teacher'] else ''}\"><i style=\"width:"
            f"{100 * min(max(q, 0.0), 1.0):.1f}%\"></i><span>{e(_name(names, k)[:14])} {q:.2f}</span></div>"
            for k, q in v["top"])
        views.append(f"<div class=\"view\"><img src=\"img/{e(v['file'])}\" alt=\"view {i}\">{bars}</div>")
    return (f"<div class=\"card\"><h3>{e(r['key'])} <small>slot {e(r['slot'])}, shard {e(r['shard'])} &middot; "
            f"{headline}</small></h3><div class=\"views\"><div class=\"orig\"><img src=\"img/{e(c['orig'])}\" "
            f"alt=\"original\">original</div>{''.join(views)}</div></div>")


def _name(names, k: int) -> str:
    return names[k] if names else str(k)


def _class_names(li: dict) -> list[str]:
    return [c["name"] for c in li["per_class"]]


def _headline(r: dict) -> str:
    return (f"given <b>{e(r['given_name'])}</b> (mean p {r['p_given']:.3f}), teacher <b>{e(r['teacher_name'])}</b> "
            f"(mean p {r['p_teacher']:.3f}); {100 * r['views_agreeing_teacher']:.0f} % of the views pick the teacher's "
            f"class, {100 * r['views_agreeing_given']:.0f} % the given one")


def _legend(n: int, total: int, what: str, views: int) -> str:
    more = f" (the first {n} of {total})" if total > n else ""
    cut = f"; views 0..{MAX_VIEWS - 1} of {views}" if views > MAX_VIEWS else ""
    return (f"<p class=\"note\">{n} {what}{more}, each with its views as the teacher saw them (rendered from the "
            f"stored parameters){cut} and each view's top-{BARS}: <span style=\"color:#3c9d5d\">green</span> the "
            f"given label, <span style=\"color:#d0643b\">orange</span> the teacher's class.</p>")


def _issues(li: dict, shown: list[dict], cards: dict) -> str:
    names = _class_names(li)
    pairs = "".join(f"<tr><td class=\"l\">{e(p['given_name'])}</td><td class=\"l\">{e(p['teacher_name'])}</td>"
                    f"<td>{e(p['samples'])}</td></tr>" for p in li["noise_pairs"][:10])
    views = len(cards[shown[0]["slot"]]["views"]) if shown else 0
    gallery = "".join(_card(r, cards, names, f"rank {e(r['rank'])}: " + _headline(r)) for r in shown)
    return (f"<section id=\"label-issues\"><h2>Label issues</h2><p class=\"lead\">{e(li['issues_found'])} of {e(li['samples'])} "
            f"samples have a given label the teacher rejects ({e(li['method'])}). Ranked by "
            f"{e(li['score']['name'])}: {e(li['score']['meaning'])}. The ranked list (the first "
            f"{e(li['scope']['top'])}) is in <a href=\"{CSV_NAME}\">{CSV_NAME}</a>.</p>"
            f"<table><caption class=\"note\">the confident joint's largest cells</caption><tr><th class=\"l\">given "
            f"label</th><th class=\"l\">teacher's class</th><th>samples</th></tr>{pairs}</table>"
            f"{_legend(len(shown), li['issues_found'], 'label issues', views)}<div class=\"gallery\">{gallery}</div>"
            "</section>")


def _least(li: dict, shown: list[dict], cards: dict) -> str:
    names = _class_names(li)
    views = len(cards[shown[0]["slot"]]["views"]) if shown else 0
    gallery = "".join(_card(r, cards, names, f"confidence {r['p_teacher']:.3f}: " + _headline(r)) for r in shown)
    return (f"<section id=\"least-confident\"><h2>Least confident samples</h2><p class=\"note\">Confidence: the "
            f"largest view-averaged class probability.</p>"
            f"{_legend(len(shown), li['samples'], 'least confident samples', views)}<div class=\"gallery\">{gallery}"
            "</div></section>")

