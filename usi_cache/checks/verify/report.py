"""The report of `usi verify`: its problems and counts, as text or as a JSON-ready dict."""
from __future__ import annotations

from dataclasses import dataclass, field

# Every check by name, in report order: the cache-wide ones (cache_checks.py, called by
# run.py) interleave with the per-shard ones (shard_checks.SHARD_CHECKS).
CHECKS = ("attributes", "fingerprint", "complete", "chunk files", "checksums", "keys", "labels", "finite",
          "class range", "sorted", "top-k mass", "boxes", "view params", "replay", "recompute")
SHOWN = 8  # problems listed per check in the text report; the rest are counted


@dataclass
class Problem:
    check: str  # one of CHECKS
    shard: int | None  # None: about the whole cache
    message: str


@dataclass
class VerifyReport:
    cache: str
    shards_dir: str
    problems: list[Problem] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)  # checks that ran (a check can be skipped)
    shards: int = 0
    complete: int = 0
    samples: int = 0
    views: int = 0
    valid: int = 0  # valid samples in committed shards
    compared: int = 0  # of which compared with their image in the shards (key in place)
    recompute: dict | None = None
    replay: str = ""  # what the replay check compared

    @property
    def ok(self) -> bool:
        return not self.problems and bool(self.ran)

    def add(self, check: str, shard: int | None, message: str) -> None:
        self.problems.append(Problem(check, shard, message))

    def merge(self, part: VerifyReport) -> None:
        """Add one shard's part (its problems, counts and re-run statistics)."""
        self.problems += part.problems
        for name in ("complete", "views", "valid", "compared"):
            setattr(self, name, getattr(self, name) + getattr(part, name))
        if part.recompute is not None:
            rc, pr = self.recompute, part.recompute
            for name in ("views", "skipped", "class_mismatches", "near_ties"):
                rc[name] += pr[name]
            for name in ("max_logit_diff", "max_lse_diff"):
                rc[name] = max(rc[name], pr[name])


def recompute_counts() -> dict:
    """The statistics of the teacher re-run (--recompute), before any view."""
    return {"views": 0, "skipped": 0, "max_logit_diff": 0.0, "max_lse_diff": 0.0, "class_mismatches": 0,
            "near_ties": 0}


def _note(rep: VerifyReport, check: str) -> str:
    """What a check's line adds after ok/FAIL: what it could compare."""
    if check == "complete":
        return f"  ({rep.complete}/{rep.shards} shards committed)"
    if check in ("labels", "boxes", "view params") and rep.compared < rep.valid:
        return f"  (only {rep.compared} of {rep.valid} samples could be compared with the shards)"
    if check == "replay" and rep.replay:
        return f"  ({rep.replay})"
    if check == "recompute" and rep.recompute:
        r = rep.recompute
        return (f"  ({r['views']} views re-run on {r['device']}: largest log-probability "
                f"difference {r['max_logit_diff']:.3g}, lse {r['max_lse_diff']:.3g}; {r['class_mismatches']} top-k "
                f"order mismatch(es), {r['near_ties']} of them near-ties"
                + (f"; {r['skipped']} skipped (damaged or unmatched)" if r["skipped"] else "") + ")")
    return ""


def format_report(rep: VerifyReport) -> str:
    lines = [f"verify {rep.cache} against {rep.shards_dir}"
             + (f" ({rep.shards} shards, {rep.samples} samples)" if rep.shards else "")]
    width = max(len(c) for c in CHECKS)
    for check in CHECKS:
        if check not in rep.ran:
            continue
        found = [p for p in rep.problems if p.check == check]
        lines.append(f"  {check:<{width}}  {'FAIL' if found else 'ok'}{_note(rep, check)}")
        for p in found[:SHOWN]:
            lines.append(f"      {'shard ' + str(p.shard) if p.shard is not None else 'cache'}: {p.message}")
        if len(found) > SHOWN:
            lines.append(f"      ... and {len(found) - SHOWN} more")
    skipped = [c for c in CHECKS[2:-1] if c not in rep.ran]
    if skipped and rep.problems:
        lines.append(f"  not run (the attributes cannot be trusted to read the arrays): {', '.join(skipped)}")
    lines.append(_verdict(rep))
    return "\n".join(lines)


def _verdict(rep: VerifyReport) -> str:
    if rep.ok:
        extra = f", teacher re-run on {rep.recompute['views']} views" if rep.recompute else ""
        return (f"verdict: OK: the cache matches its shards ({rep.shards} shards, {rep.samples} samples, "
                f"{rep.views} views; {len(rep.ran)} checks passed{extra})")
    where: dict[str, list] = {}
    for p in rep.problems:
        w = where.setdefault(p.check, [])
        if p.shard not in w:
            w.append(p.shard)
    parts = []
    for check in CHECKS:
        if check in where:
            shards = [s for s in where[check] if s is not None]
            at = (["cache"] if None in where[check] else []) + (
                [f"shard{'s' if len(shards) > 1 else ''} {', '.join(map(str, shards[:6]))}"
                 f"{', ...' if len(shards) > 6 else ''}"] if shards else [])
            parts.append(f"{check} ({'; '.join(at)})")
    return f"verdict: FAILED: {len(rep.problems)} problem(s): {', '.join(parts)}"


def report_dict(rep: VerifyReport) -> dict:
    """The report for `--json`: every check that ran, in report order, with all its problems
    (none left out), and the counts."""
    return {
        "cache": rep.cache, "shards_dir": rep.shards_dir, "ok": rep.ok,
        "checks": [{"name": c, "ok": not any(p.check == c for p in rep.problems),
                    "problems": [{"shard": p.shard, "message": p.message} for p in rep.problems if p.check == c]}
                   for c in CHECKS if c in rep.ran],
        "not_run": [c for c in CHECKS if c not in rep.ran],
        "shards": rep.shards, "complete": rep.complete, "samples": rep.samples, "views": rep.views,
        "valid": rep.valid, "compared": rep.compared, "recompute": rep.recompute, "replay": rep.replay,
    }
