"""Writes docs/benchmarks.md from benchmarks/results/*.json: one section per results file, with
the tables rendered by the `report()` of the script that wrote it (the function the script
prints its own tables with), so no number on that page is typed in by hand.

    .venv/bin/python benchmarks/report.py            # regenerate docs/benchmarks.md
    .venv/bin/python benchmarks/report.py --check    # exit 1 if the page is not what the results give

A section's prose comes from the script's module docstring: its first line is the title, the
text up to a line `Interpretation:` the description, the rest the interpretation. A script that
writes several results files (`fidelity.py --name NAME`) replaces them for one of its files
with parts headed `Title (NAME): ...`, `Description (NAME):` and `Interpretation (NAME):`.
The command is rebuilt from the results' `args` and the script's `parser()` (the options that
differ from their defaults). A script without `report()` yet is listed, not rendered.
"""
from __future__ import annotations

import argparse
import importlib
import json
import re
import shlex
import sys
import textwrap
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
DOC = ROOT / "docs" / "benchmarks.md"
SCRIPT = "benchmarks/report.py"

# results name -> script, where the name is not the script's (fidelity.py --name fidelity-topk; plan_shapes.py
# writes epoch_plan.json, teacher_precision.py precision.json: their results names predate the scripts' names)
MODULES = {"fidelity-topk": "fidelity", "fidelity-ksweep": "fidelity", "fidelity-ksweep-kdonly": "fidelity", "epoch_plan": "plan_shapes", "precision": "teacher_precision"}
# reading order of the page; results files not named here follow, by name
ORDER = ["stage2_overhead", "stage1_efficiency", "cache_cost", "fidelity-topk", "fidelity", "fidelity-ksweep", "fidelity-ksweep-kdonly", "ensemble_gain",
         "precision",
         "label_quality", "epoch_plan", "ingest_memory", "reshard_memory", "s3_requests", "verify_scale"]
PART = re.compile(r"^(Title|Description|Interpretation)(?: \(([\w.-]+)\))?:(.*)$")

INTRO = """\
Each benchmark script prints its tables and writes `benchmarks/results/NAME.json`. This page is
generated from those files by `.venv/bin/python benchmarks/report.py`, with the same `report()`
function each script prints its tables with. Do not edit it by hand: `report.py --check` and the
tests fail when it differs. Rerun a benchmark with the command in its section, then the
generator. Timings on a small shared machine are noisy: ratios are measured side by side in one
run, raw numbers can move a lot between runs."""

GPU_CHECK = """\
`bash benchmarks/gpu_check.sh` runs `stage1_efficiency.py` and `stage2_overhead.py` at GPU size
(synthetic 224-px shards, a TResNet-L teacher with random weights in half precision, a ResNet-50
student; the script's header says exactly what) as one command, and writes their results files
here: rerun the generator afterwards. `--tiny` runs the same pipeline at toy size on the CPU (part
of the test suite)."""


class Prose:
    """Title, description and interpretation of one results file, from its script's docstring."""

    def __init__(self, doc: str, name: str):
        lines = (doc or "").strip("\n").splitlines()
        parts: dict[tuple[str, str | None], list[str]] = {("Title", None): lines[:1], ("Description", None): []}
        current = parts[("Description", None)]
        for line in lines[1:]:
            m = PART.match(line)
            if m:
                current = parts.setdefault((m[1], m[2]), [])
                if m[3].strip():
                    current.append(m[3].strip())
            else:
                current.append(line)

        def get(kind: str) -> str:
            text = parts.get((kind, name), parts.get((kind, None), []))
            return textwrap.dedent("\n".join(text)).strip()

        self.title = get("Title").rstrip(".")
        self.description, self.interpretation = get("Description"), get("Interpretation")


def load(path: Path) -> dict:
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"{path}: not a readable JSON results file ({e})")
    for field in ("benchmark", "machine", "date"):
        if not isinstance(result, dict) or not isinstance(result.get(field), str):
            raise SystemExit(f"{path}: field '{field}' missing or not a string (every results file has it: "
                             "bench_common.write_result writes it)")
    return result


def script_of(path: Path, name: str) -> tuple[str, ModuleType]:
    module = MODULES.get(name, name)
    if not (HERE / f"{module}.py").is_file():
        raise SystemExit(f"{path}: benchmark '{name}' has no script benchmarks/{module}.py "
                         f"(add it to MODULES in {SCRIPT} if its script has another name)")
    if str(HERE) not in sys.path:  # the scripts import bench_common as a top-level module
        sys.path.insert(0, str(HERE))
    return module, importlib.import_module(module)


def command(module: str, mod: ModuleType, result: dict) -> tuple[str, str]:
    """The command that wrote `result`, and a note when its arguments were not recorded."""
    cmd = f".venv/bin/python benchmarks/{module}.py"
    defaults = vars(mod.parser().parse_args([]))
    if not defaults:  # a script without options: nothing to rebuild
        return cmd, ""
    args = result.get("args")
    if not isinstance(args, dict):
        return cmd, "(its arguments are not recorded in this results file)"
    opts = []
    for dest, default in defaults.items():
        value = args.get(dest, default)
        if value is None or str(value) == str(default):
            continue
        flag = "--" + dest.replace("_", "-")
        if isinstance(value, bool):
            opts.append(flag if value else "")  # store_true options default to False
        else:
            opts.append(f"{flag} {shlex.quote(str(value))}")
    return " ".join([cmd, *filter(None, opts)]), ""


def section(path: Path, result: dict, module: str, mod: ModuleType) -> str:
    prose = Prose(mod.__doc__, result["benchmark"])
    cmd, note = command(module, mod, result)
    out = [f"## {prose.title}", "", f"`{path.name}`, measured on {result['machine']}, {result['date']}:", "",
           "```", f"$ {cmd}", "```"]
    out += [note, ""] if note else [""]
    if prose.description:
        out += [prose.description, ""]
    try:
        tables = mod.report(result).strip()
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:  # a file the script cannot read
        raise SystemExit(f"{path}: {module}.report() cannot render it ({type(e).__name__}: {e})")
    out += [tables, ""]
    if prose.interpretation:
        out += [prose.interpretation, ""]
    return "\n".join(out)


def sort_key(path: Path) -> tuple[int, str]:
    return (ORDER.index(path.stem) if path.stem in ORDER else len(ORDER), path.stem)


def render(results: Path = RESULTS) -> str:
    paths = sorted(results.glob("*.json"), key=sort_key)
    if not paths:
        raise SystemExit(f"{results}: no results files (*.json)")
    rows, sections, skipped = [], [], []
    for path in paths:
        result = load(path)
        module, mod = script_of(path, result["benchmark"])
        rows.append([f"`{path.name}`", f"`{module}.py`", result["machine"], result["date"]])
        if hasattr(mod, "report"):
            sections.append(section(path, result, module, mod))
        else:
            skipped.append(f"`{path.name}` (`{module}.py` has no `report()` yet)")
    gpu = [r[0] for r in rows if not r[2].startswith("CPU")]
    header = "| results file | script | measured on | date |\n|---|---|---|---|\n"
    out = ["# Benchmarks", "", "<!-- generated by benchmarks/report.py from benchmarks/results/*.json -->", "",
           INTRO, "", header + "\n".join("| " + " | ".join(r) + " |" for r in rows), ""]
    if skipped:
        out += ["Not rendered on this page: " + ", ".join(skipped) + ".", ""]
    out += sections
    out += ["## GPU check", "", GPU_CHECK, "",
            "Results files on this page measured on a GPU: " + (", ".join(gpu) if gpu else "none") + ".", ""]
    return "\n".join(out)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of the results files")
    p.add_argument("--out", type=Path, default=DOC, help="the page to write (or to check)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if the page differs")
    return p


def main(argv: list[str] | None = None) -> None:
    a = parser().parse_args(argv)
    text = render(a.results)
    if a.check:
        current = a.out.read_text() if a.out.is_file() else None
        if current != text:
            what = "missing" if current is None else f"differs from what {a.results}/*.json generate"
            raise SystemExit(f"{a.out}: {what}; regenerate it: .venv/bin/python {SCRIPT}")
        print(f"{a.out}: up to date")
        return
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text)
    print(f"written {a.out} ({len(text.splitlines())} lines)")


if __name__ == "__main__":
    main()
