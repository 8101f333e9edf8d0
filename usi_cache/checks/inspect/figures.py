"""PNG figures for `usi inspect --plot` (matplotlib on the Agg backend, loaded by `plotting.pyplot`).

Both figures are drawn from the dicts that `checks/inspect/run.py` builds, so a figure shows exactly
the numbers the text and `--json` reports print.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from usi_cache.plotting import _colors, _save, pyplot

MAX_VIEWS = 16  # views drawn in the one-sample figure (the rest are named in its title)
BARS = 5  # classes per view in the one-sample bar charts


def plot_sample(info: dict, image, views: list, path: str | Path, *, title: str = "") -> Path:
    """One sample: the original image with every view's crop box, each replayed view as a
    thumbnail, and a bar chart of each view's top-5 (top-k when k < 5) probabilities.

    info: `run.sample_info`; image: the decoded original (PIL); views: the replayed
    views (PIL, teacher input size), in view order.
    """
    shown = info["views"][:MAX_VIEWS]
    n = len(shown)
    colors = _colors(n)
    pairs = 2 if n > 3 else 1  # views per figure row (each view = thumbnail + bar chart)
    rows = math.ceil(n / pairs)
    height = max(4.5, 2.1 * rows + 1.3)
    thumb = 2.6 if info.get("paired") else 1.0  # paired: own view | partner's view | mixed image
    from matplotlib.patches import Rectangle
    plt = pyplot()
    fig = plt.figure(figsize=(4.5 + (5.4 + 1.6 * (thumb - 1)) * pairs, height), dpi=110)
    gs = fig.add_gridspec(rows, 1 + 2 * pairs, width_ratios=[3.2] + [thumb, 2.0] * pairs,
                          left=0.02, right=0.98, top=1 - 1.25 / height, bottom=0.5 / height,
                          wspace=0.4, hspace=0.6)
    ax = fig.add_subplot(gs[:, 0])
    ax.imshow(np.asarray(image), interpolation="nearest")
    placed: list[tuple[float, float]] = []
    step = 0.07 * image.width  # about one label's width, in image pixels
    for i, (v, c) in enumerate(zip(shown, colors)):
        b = v["box"]
        # pixel edges: a box covering rows top..top+h-1 spans top-0.5 .. top+h-0.5 in imshow coordinates.
        # Earlier views get thicker lines, so an edge shared by several boxes shows every colour.
        ax.add_patch(Rectangle((b["left"] - 0.5, b["top"] - 0.5), b["width"], b["height"], fill=False,
                               edgecolor=c, linewidth=1.5 + 3.0 * (n - 1 - i) / max(n - 1, 1)))
        x, y = b["left"] - 0.5, b["top"] - 0.5
        while any(abs(x - px) < step and abs(y - py) < step for px, py in placed):
            x += step  # boxes often share a corner: keep their labels readable side by side
        placed.append((x, y))
        ax.text(x, y, f"{v['view']}", color="white", fontsize=8, va="top", ha="left", fontweight="bold",
                bbox=dict(facecolor=c, edgecolor="none", pad=1.5, alpha=0.95))
    ax.set_title(f"original {image.width}x{image.height}\nground truth: {info['label_name']}", fontsize=10)
    ax.set_xticks([]), ax.set_yticks([])
    for i, (v, c) in enumerate(zip(shown, colors)):
        r, col = divmod(i, pairs)
        tax = fig.add_subplot(gs[r, 1 + 2 * col])
        tax.imshow(np.asarray(views[v["view"]]), interpolation="nearest")
        tax.set_xticks([]), tax.set_yticks([])
        for side in tax.spines.values():
            side.set_edgecolor(c), side.set_linewidth(3)
        ops = ", ".join(f"{o['op']} {o['level']:+.1f}" for o in v["ops"]) or "no ops"
        mix = v.get("mix") or {"kind": "none"}
        mixed = (f"\n+ {mix['partner_key']} ({mix['partner_label_name']}), {mix['kind']} lambda {mix['lam']:.2f}"
                 if mix["kind"] != "none" else "")
        tax.set_title(f"view {v['view']}{' flip' if v['flip'] else ''}\n{ops}{mixed}", fontsize=7)
        bax = fig.add_subplot(gs[r, 2 + 2 * col])
        top = v["topk"][:BARS]
        names = [t["name"] for t in top][::-1]
        probs = [t["prob"] for t in top][::-1]
        bar_colors = ["tab:green" if t["class"] == info["label"] else "tab:gray" for t in top][::-1]
        bax.barh(range(len(top)), probs, color=bar_colors)
        bax.set_yticks(range(len(top)), [nm[:18] for nm in names], fontsize=7)
        bax.set_xlim(0, 1)
        bax.tick_params(axis="x", labelsize=7)
        for y, pval in enumerate(probs):
            bax.text(min(pval, 1.0) + 0.01, y, f"{pval:.2f}", va="center", fontsize=7)
        rank = next((r for r, t in enumerate(v["topk"], 1) if t["class"] == info["label"]), None)
        truth = ("" if rank is not None and rank <= BARS else
                 f"; truth #{rank}, p {v['topk'][rank - 1]['prob']:.2f}" if rank is not None else
                 f"; truth not in top-{len(v['topk'])}")
        bax.set_title(f"top-{len(top)}, rest {v['tail_mass']:.2f}{truth}", fontsize=7)
    more = f" (views 0-{MAX_VIEWS - 1} of {len(info['views'])})" if len(info["views"]) > MAX_VIEWS else ""
    fig.suptitle((title + "\n" if title else "") + f"sample {info['key']} (slot {info['slot']}){more}: "
                 f"crop boxes on the original, views as the teacher saw them, top-{len(shown[0]['topk'][:BARS])} "
                 "probabilities "
                 "(green = ground truth)", fontsize=10, y=1 - 0.15 / height, va="top")
    return _save(fig, path)


def plot_stats(stats: dict, summary: dict, path: str | Path) -> Path:
    """Whole cache: histograms of top-1 probability and tail mass, a reliability diagram and
    the top-1 agreement of the worst classes. `stats` from `teacher_stats`, `summary` from
    `summarize`."""
    audit = summary.get("audit")
    plt = pyplot()
    fig, axes = plt.subplots(2, 3 if audit else 2, figsize=(18 if audit else 12, 8.5), dpi=110)
    edges = np.asarray(stats["histograms"]["edges"])
    width = np.diff(edges)
    k = summary["topk"]
    ax = axes[0, 0]
    ax.bar(edges[:-1], stats["histograms"]["top1_prob"], width=width, align="edge", color="tab:blue")
    ax.set_xlim(0, 1)
    ax.set_xlabel("top-1 probability p1 = exp(z1 - lse)")
    ax.set_ylabel("views")
    uniform = 1 / summary["dataset"]["num_classes"]
    ax.axvline(uniform, color="k", linestyle=":", linewidth=1, label=f"1/C = {uniform:.3g} (uniform)")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(f"top-1 probability (mean {_fmt(stats['mean_top1_prob'])})")
    ax = axes[0, 1]
    ax.bar(edges[:-1], stats["histograms"]["tail_mass"], width=width, align="edge", color="tab:orange")
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"tail mass r = 1 - sum of the top-{k} probabilities")
    ax.set_ylabel("views")
    no_tail = " (k = C: no tail)" if k >= summary["dataset"]["num_classes"] else ""
    ax.set_title(f"tail mass outside the top-{k} (mean {_fmt(stats['mean_tail_mass'])}){no_tail}")
    ax = axes[1, 0]
    bins = stats["reliability"]["bins"]
    lo = np.array([b["lo"] for b in bins])
    w = np.array([b["hi"] - b["lo"] for b in bins])
    acc = np.array([np.nan if b["accuracy"] is None else b["accuracy"] for b in bins])
    conf = np.array([np.nan if b["confidence"] is None else b["confidence"] for b in bins])
    has = ~np.isnan(acc)
    ax.bar(lo[has], acc[has], width=w[has], align="edge", color="tab:blue", edgecolor="white",
           label="top-1 agreement (accuracy)")
    ax.bar(lo[has], conf[has] - acc[has], bottom=acc[has], width=w[has], align="edge", color="tab:red",
           alpha=0.3, label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    for x, a, b in zip(lo[has], acc[has], np.array([b["views"] for b in bins])[has]):
        ax.text(x + w[0] / 2, min(a, 0.95) + 0.02, str(b), ha="center", fontsize=6, rotation=90)
    ax.set_xlim(0, 1), ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-1 probability), bins with view counts")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability diagram (ECE {_fmt(stats['reliability']['ece'])})")
    ax.legend(loc="upper left", fontsize=8)
    ax = axes[1, 1]
    worst = stats["worst_classes"]
    names = [f"{c['name'][:20]}" for c in worst][::-1]
    vals = [c["top1_agreement"] for c in worst][::-1]
    ax.barh(range(len(worst)), vals, color="tab:purple")
    ax.set_yticks(range(len(worst)), names, fontsize=8)
    ax.set_xlim(0, 1)
    for y, (val, c) in enumerate(zip(vals, worst[::-1])):
        ax.text(val + 0.01, y, f"{100 * val:.1f} %  ({c['views']} views)", va="center", fontsize=7)
    ax.set_xlabel("top-1 agreement with ground truth")
    ax.set_title(f"the {len(worst)} classes the teacher is worst at")
    if audit:
        _plot_audit(axes[0, 2], audit)
        axes[1, 2].axis("off")
    sc = stats["scope"]
    scope = f"shards {sc['shards'][0]}-{sc['shards'][1] - 1}"
    if sc["sample_views"] is not None:
        scope += f", sample of {sc['sample_views']} views"
    t = summary["teacher"]
    fig.suptitle(f"{Path(summary['cache']).name}: teacher {t['name']}, V = {summary['views']}, k = {k}, "
                 f"{stats['views']} views ({scope}); top-1 {100 * (stats['top1_agreement'] or 0):.1f} %, "
                 f"{stats['top5_label']} {100 * (stats['top5_agreement'] or 0):.1f} %", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    return _save(fig, path)


def _plot_audit(ax, audit: dict) -> None:
    """Tail mass and KL(full || k+1 buckets) against k, bytes per view on a second axis."""
    rows = [r for r in audit["rows"] if r["tail_mass"] > 0 or r["kl"] > 0]  # k = C: nothing to draw on a log axis
    ks = [r["k"] for r in rows]
    ax.plot(ks, [r["tail_mass"] for r in rows], "o-", color="tab:orange", label="mean tail mass")
    ax.plot(ks, [r["kl"] for r in rows], "s-", color="tab:blue", label="mean KL(full || k+1 buckets), nats")
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.axvline(audit["cached_k"], color="k", linestyle=":", linewidth=1, label=f"this cache: k = {audit['cached_k']}")
    ax.set_xlabel("k (classes kept per view)")
    ax.legend(loc="lower left", fontsize=8)
    twin = ax.twinx()
    twin.plot([r["k"] for r in audit["rows"]], [r["bytes_per_view"] for r in audit["rows"]], "^--",
              color="tab:gray")
    twin.set_ylabel("bytes per view (uncompressed)", color="tab:gray")
    ax.set_title(f"fidelity audit: {audit['views']} views re-run with full logits "
                 f"(top-1 agreement {100 * audit['rows'][0]['top1_agreement']:.1f} %)", fontsize=9)


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"
