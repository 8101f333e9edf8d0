"""The text of `usi inspect`, rendered from the report dict that run.py computes (the
same dict `--json` prints and figures.py draws), so every output shows the same numbers."""
from __future__ import annotations

import json

from usi_cache import cache_format as schema
from usi_cache.checks.inspect.stats import ENTROPY_NOTE, RELIABILITY_BINS


def _ranges(indices) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    out, run = [], []
    for i in indices:
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else f"{run[0]}")
        run = [i]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else f"{run[0]}")
    return ", ".join(out)


def format_summary(s: dict) -> str:
    t, d, c = s["teacher"], s["dataset"], s["completeness"]
    missing = f"; missing: shard {_ranges(c['missing'])}" if c["missing"] else ""
    inv = s["invalid"]
    shown = ", ".join(inv["keys"][:5]) + (" ..." if len(inv["keys"]) > 5 else "")
    spec = s["view_spec"]
    rows = [
        ("cache", s["cache"]),
        ("schema", f"version {s['schema_version']}, written by usi-cache {s['tool_version']} on {s['created']}"),
        ("teacher", f"ensemble of {len(t['members'])} teachers ({t['name']}), the mixture of their "
                    f"probabilities" if t.get("members") else f"{t['name']}, checkpoint sha256 {t['checkpoint_sha256'] or 'none (random or pretrained weights)'}"),
        ("teacher input", f"{t['input_size']} px, mean {_triple(t['mean'])}, std {_triple(t['std'])}, "
                          f"forward in {t['precision'] or 'unrecorded precision'}"),
        ("dataset", f"{d['samples']} samples in {d['shards']} shards of {d['per_shard']}, {d['num_classes']} classes, "
                    f"fingerprint {d['fingerprint'][:12]}"),
        ("views", f"V = {s['views']} per sample, top k = {s['topk']} logits per view, seed {s['seed']}"),
        ("view spec", f"scale {spec['scale']}, ratio [{spec['ratio'][0]:.3g}, {spec['ratio'][1]:.3g}], "
                      f"hflip {spec['hflip']}, {spec['randaugment'] or 'no RandAugment'}, {spec['interpolation']}"),
        ("shards", f"{c['complete']}/{c['total']} complete{missing}"),
        ("invalid samples", f"{inv['count']}" + (f" ({shown})" if inv["keys"] else "")),
        ("size on disk", f"{s['disk']['total'] / 1e6:.3f} MB, {_num(s['disk']['bytes_per_view'], 1)} bytes per view "
                         f"({s['disk']['cached_views']} views)"),
        ("replay", f"made with {s['replay']['recorded'] or 'unrecorded decoders'}; here {s['replay']['here']}: "
                   f"{s['replay']['pixels']}"),
    ]
    if t.get("members"):  # an ensemble: one row per teacher, each with its own input
        rows[3] = ("teacher input", f"each teacher's own (above); views shown at {t['input_size']} px, the largest")
        for i, m in enumerate(t["members"]):
            rows.insert(3 + i, (f"  teacher {i}", f"{m['name']} (weight {m['weight']:.3g}), {m['input_size']} px, "
                                                  f"mean {_triple(m['mean'])}, std {_triple(m['std'])}, "
                                                  f"{m.get('precision') or 'unrecorded precision'}, sha256 "
                                                  f"{(m.get('checkpoint_sha256') or 'none')[:12]}"))
    width = max(len(r[0]) for r in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    per = [f"{n} {s['disk']['bytes'][n] / 1e3:.1f} kB = {_num(s['disk']['bytes_per_view_by_array'][n], 1)} B/view"
           for n in schema.ARRAYS]
    for i in range(0, len(per), 4):
        lines.append(f"{'per array' if i == 0 else '':<{width}}  " + ", ".join(per[i:i + 4]))
    if s.get("audit"):
        from usi_cache.checks.common import format_audit
        lines.append(format_audit(s["audit"]))
    return "\n".join(lines)


def _triple(v) -> str:
    return "(" + ", ".join(f"{x:.4g}" for x in v) + ")"


def _num(x, digits: int) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f} %"


def format_stats(st: dict, k: int) -> str:
    sc = st["scope"]
    where = f"shards {sc['shards'][0]}..{sc['shards'][1] - 1}"
    if sc["sample_views"] is not None:
        where += f", a random sample of {sc['sample_views']} views (seed {sc['seed']})"
    lines = [f"teacher statistics ({where}): {st['views']} views of {st['samples']} samples; "
             f"{sc['invalid_excluded']} invalid sample(s) (label -1) excluded"]
    if sc["incomplete_skipped"]:
        lines.append(f"  incomplete shards skipped: {_ranges(sc['incomplete_skipped'])}")
    if not st["views"]:
        lines.append("  no committed views to measure")
        return "\n".join(lines)
    rows = [
        ("top-1 agreement with ground truth", _pct(st["top1_agreement"])),
        (st["top5_label"] + " agreement", _pct(st["top5_agreement"])),
        ("mean top-1 probability", f"{st['mean_top1_prob']:.4f}"),
        ("mean top-k probability mass", f"{st['mean_topk_mass']:.4f} (k = {k}; the tail holds "
                                        f"{st['mean_tail_mass']:.4f})"),
        ("mean entropy", f"{st['mean_entropy_nats']:.4f} nats (max log(k+1) = {st['max_entropy_nats']:.3f}; "
                         f"{ENTROPY_NOTE.split(', in nats')[0]})"),
        ("expected calibration error", f"{st['reliability']['ece']:.4f} ({RELIABILITY_BINS} bins)"),
    ]
    width = max(len(r[0]) for r in rows)
    lines += [f"  {name:<{width}}  {value}" for name, value in rows]
    lines.append("  per view index:  view   views   top-1    " + st["top5_label"].split(" ")[0] + "    mean top-1 prob")
    for pv in st["per_view"]:
        lines.append(f"                   {pv['view']:>4}  {pv['views']:>6}  {_pct(pv['top1_agreement']):>8}  "
                     f"{_pct(pv['top5_agreement']):>8}  {_num(pv['mean_top1_prob'], 4):>8}")
    lines.append(f"  the {len(st['worst_classes'])} classes the teacher is worst at (top-1 agreement, views, "
                 f"most often mistaken for):")
    for w in st["worst_classes"]:
        other = f"{w['most_confused_with']} ({w['most_confused_views']})" if w["most_confused_with"] else "-"
        lines.append(f"    {w['class']:>5}  {w['name']:<24} {_pct(w['top1_agreement']):>8}  {w['views']:>7}  {other}")
    lines.append("  most frequent confusions (ground truth -> teacher's top-1, views, share of that class):")
    for c in st["confusions"]:
        lines.append(f"    {c['true_name']} -> {c['predicted_name']}: {c['views']} "
                     f"({100 * c['share_of_true_class']:.1f} %)")
    return "\n".join(lines)


def format_sample(s: dict) -> str:
    head = (f"sample {s['key'] or '(empty)'}: slot {s['slot']} (shard {s['shard']}, position {s['position']}), "
            f"ground truth {s['label']}" + (f" {s['label_name']}" if s["label_name"] else f" ({s['status']})"))
    lines = [head]
    if not s["views"]:
        lines.append("  no views: " + {"not written": "this shard has not been committed yet",
                                       "empty slot": "no sample at this position (past the shard's end)",
                                       "undecodable image": "the image did not decode in stage 1"}[s["status"]])
        return "\n".join(lines)
    for v in s["views"]:
        b = v["box"]
        ops = ", ".join(f"{o['op']} {o['level']:+.2f}" + (f" ({o['resample']})" if o["resample"] else "")
                        for o in v["ops"]) or "none"
        lines.append(f"  view {v['view']}: crop top {b['top']} left {b['left']} height {b['height']} width "
                     f"{b['width']}, flip {'yes' if v['flip'] else 'no'}, RandAugment: {ops}")
        mix = v.get("mix")
        if mix and mix["kind"] != "none":
            box = (f", box (top, left, bottom, right) {tuple(round(f, 3) for f in mix['box'])} of the side"
                   if mix["box"] else "")
            lines.append(f"    mixed ({mix['kind']}, lambda {mix['lam']:.3f}{box}) with view {v['view']} of "
                         f"{mix['partner_key']} (slot {mix['partner_slot']}, ground truth "
                         f"{mix['partner_label_name']}); the top-k below is the teacher's on the mixed image")
        elif mix:
            lines.append("    not mixed (paired cache: this view was drawn without a partner)")
        for r, t in enumerate(v["topk"], 1):
            mark = "  <- ground truth" if t["class"] == s["label"] else ""
            lines.append(f"    {r:>3}. {t['name']:<24} p = {t['prob']:.4f}  (logit {t['logit']:+.3f}){mark}")
        lines.append(f"         rest (outside the top {len(v['topk'])}) = {v['tail_mass']:.4f}; entropy "
                     f"{v['entropy_nats']:.3f} nats over the k+1 buckets")
    return "\n".join(lines)


def format_report(report: dict, as_json: bool = False) -> str:
    """The whole report (`run.inspect_report`): JSON, or its parts as text."""
    if as_json:
        return json.dumps(report, indent=1)
    parts = [format_summary(report["summary"])]
    if report["stats"] is not None:
        parts.append(format_stats(report["stats"], report["summary"]["topk"]))
    if report["sample"] is not None:
        parts.append(format_sample(report["sample"]))
    if report.get("members") is not None:
        from usi_cache.checks.members import format_agreement
        parts.append(format_agreement(report["members"]))
    if report.get("label_issues") is not None:
        from usi_cache.checks.inspect.label_issues import format_issues
        parts.append(format_issues(report["label_issues"]))
    if report.get("html"):
        parts.append(f"report written to {report['html']}")
    if report["plot"]:
        parts.append(f"plot written to {report['plot']}")
    return "\n\n".join(parts)
