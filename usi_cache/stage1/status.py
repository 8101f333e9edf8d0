"""`usi cache status CACHE`: how far stage 1 is, from the cache alone (no shards, no teacher).

Per view block (the V views of creation, then each grow): shards committed of the total, from
the commit markers; views per second and the time left, from the commit times the markers carry
(schema.COMMITS); and, for a cache written by independent parts (`--part I/N`), which parts still
have shards to commit: the ones to resubmit. Reads one small chunk per shard per block.
"""
from __future__ import annotations

import time

import numpy as np

from usi_cache import cache_format as schema
from usi_cache.stage1.parts import part_of

RATE_WINDOW = 200  # views/s is measured over the last this many commits: a resumed run's idle hours do not count


def cache_status(path: str, parts: int | None = None, now: float | None = None) -> dict:
    """The status report of the cache at `path` as a dict; `parts` = N of the parts that write it
    (default: the N the latest commits recorded)."""
    group, attrs = schema.open_cache(path)
    layout = schema.Layout.from_attrs(attrs)
    blocks = list(layout.blocks)
    growing = attrs.get("growing")
    if growing and f"{schema.BLOCKS_GROUP}/{len(blocks)}/{schema.BLOCK_MARKER}" in group:
        blocks.append(schema.ViewBlock(len(blocks), layout.views, int(growing)))
    counts = np.array([int(s["count"]) for s in attrs["dataset"]["shards"]], np.int64)
    now = time.time() if now is None else now
    rows = [_block_status(group, layout, b, counts, now) for b in blocks]
    records = [r.pop("_records") for r in rows]
    found = parts or next((part_of(rec) for rec in reversed(records) if part_of(rec)), None)
    current = next((r for r in rows if r["shards_committed"] < r["shards"]), None)
    todo = None
    if found:
        pending = np.array(current["_pending"]) if current else np.array([], np.int64)
        todo = {"parts": found, "from": "--parts" if parts else "the commit records",
                "with_work": [{"part": int(i), "shards_left": int((pending % found == i).sum())}
                              for i in range(found) if (pending % found == i).any()]}
    for r in rows:
        r.pop("_pending")
    if current:
        state = "in progress"
    elif growing or "replay" not in attrs:
        state = "committed, not finalised: rerun any part (or the run) once to finalise it"
    else:
        state = "complete"
    return {"cache": str(path), "views": layout.views, "growing": growing, "shards": layout.num_shards,
            "samples": int(counts.sum()), "blocks": rows, "parts": todo, "state": state}


def _block_status(group, layout: schema.Layout, block: schema.ViewBlock, counts: np.ndarray, now: float) -> dict:
    done = schema.completed_shards(group, layout, block)
    records = schema.read_commits(group, layout, block)
    views = counts * block.count  # per shard
    out = {"views": f"{block.start}..{block.start + block.count - 1}", "shards": layout.num_shards,
           "shards_committed": int(done.sum()), "views_committed": int(views[done].sum()),
           "views_left": int(views[~done].sum()), "views_per_s": None, "eta_s": None, "last_commit_s_ago": None,
           "_pending": [int(i) for i in np.flatnonzero(~done)], "_records": records}
    if records is None:
        return out
    timed = np.flatnonzero(done & (records[:, 0] > 0))
    if len(timed):
        out["last_commit_s_ago"] = float(now - records[timed, 0].max())
    recent = timed[np.argsort(records[timed, 0])][-RATE_WINDOW:]
    if len(recent) >= 2:
        span = float(records[recent[-1], 0] - records[recent[0], 0])
        if span > 0:  # the first commit of the window starts the clock: its views are not counted
            out["views_per_s"] = float(views[recent[1:]].sum()) / span
            out["eta_s"] = out["views_left"] / out["views_per_s"] if out["views_left"] else 0.0
    return out


def _duration(s: float | None) -> str:
    if s is None:
        return "unknown"
    if s < 120:
        return f"{s:.0f} s"
    return f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def format_status(st: dict) -> str:
    lines = [f"cache   {st['cache']}: {st['samples']} samples in {st['shards']} shards, V = {st['views']}"
             + (f" (+{st['growing']} being added)" if st["growing"] else "")]
    for b in st["blocks"]:
        rate = (f"{b['views_per_s']:.0f} views/s" + (f", ETA {_duration(b['eta_s'])}" if b["views_left"] else "")
                if b["views_per_s"] is not None else "views/s unknown (fewer than 2 timed commits)")
        last = "" if b["last_commit_s_ago"] is None else f"; last commit {_duration(b['last_commit_s_ago'])} ago"
        lines.append(f"views {b['views']}: {b['shards_committed']}/{b['shards']} shards committed, "
                     f"{b['views_left']} views left; {rate}{last}")
    p = st["parts"]
    if p and p["with_work"]:
        ids = ",".join(str(w["part"]) for w in p["with_work"])
        lines.append(f"parts   N = {p['parts']} ({p['from']}): {len(p['with_work'])} with shards left: "
                     + ", ".join(f"{w['part']} ({w['shards_left']})" for w in p["with_work"]))
        lines.append(f"resubmit parts {ids} (--part I/{p['parts']}; a Slurm array: --array={ids} "
                     f"when it counts from 0)")
    elif p:
        lines.append(f"parts   N = {p['parts']} ({p['from']}): none has shards left")
    lines.append(f"state   {st['state']}")
    return "\n".join(lines)
