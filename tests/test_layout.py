"""The package's layout holds: no import cycle (imports inside functions included), only
`__init__.py` files re-export, verify/inspect/audit share checks/common.py and never import one
another, click stays in cli/, and the heavy optional imports stay deferred to the functions that
need them. Read from the source with `ast`: nothing is imported."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
from helpers import ROOT

PACKAGE = ROOT / "usi_cache"
DEFERRED = ("matplotlib", "datasets", "tensorboard", "torch.utils.tensorboard")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
TREES = {m: ast.parse(p.read_text(), filename=str(p)) for m, p in MODULES.items()}


def is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def absolute(module: str, node: ast.ImportFrom) -> str:
    """The module an ImportFrom reads from, relative imports resolved."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package(module) else module.split(".")[:-1]
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str):
    """(imported module, name or None, node, at top level) for every import of `module`."""
    top = set(map(id, TREES[module].body))
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, None, node, id(node) in top
        elif isinstance(node, ast.ImportFrom):
            src = absolute(module, node)
            for a in node.names:
                yield src, a.name, node, id(node) in top


def package_edges(module: str) -> set[str]:
    """The package modules `module` imports (a `from P import m` of a submodule m: P.m)."""
    out = set()
    for src, name, _, _ in imports(module):
        if name is not None and f"{src}.{name}" in MODULES:
            out.add(f"{src}.{name}")
        elif src in MODULES:
            out.add(src)
    out.discard(module)
    return out


def defined(module: str) -> set[str]:
    names = set()
    for n in TREES[module].body:
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(n.name)
        elif isinstance(n, (ast.Assign, ast.AnnAssign)):
            for t in (n.targets if isinstance(n, ast.Assign) else [n.target]):
                names |= {x.id for x in ast.walk(t) if isinstance(x, ast.Name)}
    return names


def all_names(module: str) -> list[str]:
    for n in TREES[module].body:
        if isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in n.targets):
            return [e.value for e in n.value.elts]
    return []


def test_the_layout_is_read_from_every_folder():
    folders = {m.rsplit(".", 1)[0] for m in MODULES if not is_package(m)}
    assert {"usi_cache.config", "usi_cache.shards", "usi_cache.views", "usi_cache.cache_format", "usi_cache.models",
            "usi_cache.stage1", "usi_cache.stage2", "usi_cache.checks", "usi_cache.checks.inspect",
            "usi_cache.checks.verify", "usi_cache.cli"} <= folders
    assert len(MODULES) > 60


def test_no_import_cycle_between_modules_function_local_imports_included():
    graph = {m: package_edges(m) for m in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = path[path.index(n):] + [n] if n in path else [m, n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_only_init_files_re_export():
    """A module imports a name only from the module that defines it (or from a package's
    `__init__`, which lists it in `__all__`), and lists in `__all__` only what it defines."""
    wrong = []
    for m in MODULES:
        for src, name, node, _ in imports(m):
            if name is None or src not in MODULES or f"{src}.{name}" in MODULES:
                continue
            if is_package(src):
                if name not in all_names(src) and name not in defined(src):
                    wrong.append(f"{m}:{node.lineno}: {name} from package {src}, whose __all__ does not list it")
            elif name not in defined(src):
                wrong.append(f"{m}:{node.lineno}: {name} from {src}, which does not define it")
        if not is_package(m):
            wrong += [f"{m}: __all__ lists {n}, defined elsewhere" for n in all_names(m) if n not in defined(m)]
    assert not wrong, "\n".join(wrong)


def test_verify_inspect_and_audit_share_common_and_never_import_each_other():
    siblings = ("usi_cache.checks.verify", "usi_cache.checks.inspect", "usi_cache.checks.audit")
    for m in MODULES:
        mine = [s for s in siblings if m == s or m.startswith(s + ".")]
        for target in package_edges(m):
            other = [s for s in siblings if (target == s or target.startswith(s + ".")) and s not in mine]
            assert not (mine and other), f"{m} imports {target}: siblings share usi_cache.checks.common instead"
    users = {m.split(".")[2] for m in MODULES
             if m.startswith("usi_cache.checks.") and "usi_cache.checks.common" in package_edges(m)}
    assert {"verify", "inspect", "audit"} <= users


def test_click_only_in_cli_and_heavy_optional_imports_only_inside_functions():
    for m in MODULES:
        for src, name, node, top in imports(m):
            full = src if name is None else f"{src}.{name}"
            if src.split(".")[0] == "click":
                assert m.startswith("usi_cache.cli."), f"{m}:{node.lineno} imports click outside cli/"
            heavy = [d for d in DEFERRED if src == d or src.startswith(d + ".") or full == d]
            assert not (heavy and top), f"{m}:{node.lineno} imports {heavy[0]} at module level: defer it"


BENCHMARKS = ROOT / "benchmarks"
NOT_BENCHMARKS = {"bench_common.py", "report.py"}  # the scripts' shared helpers, and the doc generator


def test_every_benchmark_script_follows_the_pattern_and_names_no_package_module():
    """A module docstring with its interpretation, `parser()`, `report()` and `main(argv)`."""
    scripts = sorted(p for p in BENCHMARKS.glob("*.py") if p.name not in NOT_BENCHMARKS)
    assert len(scripts) >= 9
    package_names = {p.stem for p in PACKAGE.rglob("*.py")}
    for p in scripts:
        tree = ast.parse(p.read_text())
        doc = ast.get_docstring(tree) or ""
        assert "\nInterpretation" in doc, f"{p.name}: its docstring says no Interpretation"
        funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert {"parser", "report", "main"} <= set(funcs), f"{p.name}: has {sorted(funcs)}"
        assert [a.arg for a in funcs["main"].args.args] == ["argv"], f"{p.name}: main takes argv"
        assert p.stem not in package_names, f"{p.name} shares its name with a package module"
