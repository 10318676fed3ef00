"""Package structure: no import cycle between our modules, no oversized module, a torch-free planner.

The graph is built from the source text (``ast``), so it also counts imports that run late or never:
function-level imports and ``if TYPE_CHECKING:`` imports are edges too. A cycle hidden behind either still
means two modules each need the other to be understood, which is the thing this test forbids.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = "vllm_deepseek_v4"
ROOT = Path(__file__).resolve().parents[1] / "src" / PACKAGE
MAX_LINES = 450


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The module an ``ImportFrom`` names, made absolute (``from ..x import y`` inside ``a.b.c`` -> ``a.x``)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not is_package:                                  # a module's own package is its name minus the last part
        base = base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _parsed(module: str) -> ast.Module:
    path = MODULES[module]
    return ast.parse(path.read_text(encoding="utf-8"), str(path))


def external_imports(module: str) -> set[str]:
    """Top-level names of the other distributions and stdlib modules ``module`` imports anywhere."""
    out = set()
    for node in ast.walk(_parsed(module)):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            out.add((node.module or "").split(".")[0])
    return out - {PACKAGE, "__future__"}


def imports_of(module: str) -> set[str]:
    """Our modules that ``module`` imports anywhere in its text (top level, functions, TYPE_CHECKING)."""
    out: set[str] = set()
    for node in ast.walk(_parsed(module)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(module, MODULES[module].name == "__init__.py", node)
            # ``from pkg import sub`` imports the submodule ``pkg.sub`` when there is one, else a name of ``pkg``
            names = [f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:         # ``import a.b.c as x`` of a non-module attribute
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None (iterative depth-first search)."""
    state: dict[str, int] = {}                          # 1 on the current path, 2 done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_the_graph_sees_every_kind_of_import():
    """The walker itself: relative, absolute, function-level and TYPE_CHECKING imports are all edges."""
    graph = {m: imports_of(m) for m in MODULES}
    assert f"{PACKAGE}.loader.plan" in graph[f"{PACKAGE}.cli.inspect_cmd"]          # function-level
    assert f"{PACKAGE}.loader.plan" in graph[f"{PACKAGE}.loader.stream"]            # TYPE_CHECKING
    assert f"{PACKAGE}.errors" in graph[f"{PACKAGE}.checkpoint.format"]             # absolute
    assert "torch" in external_imports(f"{PACKAGE}.loader.stream")                   # in a function
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_between_package_modules():
    graph = {m: imports_of(m) for m in MODULES}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_planner_needs_only_the_standard_library():
    """``dsv4 inspect``/``verify`` plan without torch: everything the load plan imports, at any depth and in any
    function (and the packages that hold those modules), is ours or the standard library."""
    graph = {m: imports_of(m) for m in MODULES}
    seen, todo = set(), [f"{PACKAGE}.loader.plan"]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parents = [module.rsplit(".", k)[0] for k in range(1, module.count(".") + 1)]
        todo += sorted(graph[module]) + [p for p in parents if p in MODULES]
    assert f"{PACKAGE}.naming.resolver" in seen and f"{PACKAGE}.checkpoint.scan" in seen
    outside = {m: sorted(external_imports(m) - set(sys.stdlib_module_names)) for m in sorted(seen)}
    assert {m: ext for m, ext in outside.items() if ext} == {}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_is_at_most_450_lines(module):
    n = len(MODULES[module].read_text(encoding="utf-8").splitlines())
    assert n <= MAX_LINES, f"{MODULES[module].relative_to(ROOT.parent)}: {n} lines (at most {MAX_LINES})"


# ---- every name imported from our package exists (benchmarks and scripts have no other test of this) ----
REPO = ROOT.parents[1]
CALLERS = sorted(p for d in ("src", "tests", "scripts", "benchmarks") for p in (REPO / d).rglob("*.py"))


def bound_names(module: str) -> set[str] | None:
    """Names ``module`` binds at its top level (inside top-level ``if``/``try`` too); None when it has a
    module ``__getattr__`` (any name may resolve lazily)."""
    names: set[str] = set()
    todo = list(_parsed(module).body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {a.asname or a.name.split(".")[0] for a in node.names}
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            todo += node.body + getattr(node, "orelse", []) + getattr(node, "finalbody", [])
            todo += [n for h in getattr(node, "handlers", []) for n in h.body]
    return None if "__getattr__" in names else names


def missing_imports(path: Path, repo: Path = REPO) -> list[str]:
    """``from <our module> import name`` / ``import <our module>`` anywhere in ``path`` that names nothing."""
    is_src = ROOT in path.parents
    own = module_name(path) if is_src else ""
    rel = path.relative_to(repo)
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level and not is_src:
                continue                                      # tests' / scripts' own relative helpers
            target = _absolute(own, path.name == "__init__.py", node) if node.level else node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            if target not in MODULES:
                out.append(f"{rel}:{node.lineno}: no module {target}")
                continue
            bound = bound_names(target)
            out += [f"{rel}:{node.lineno}: {target} has no {a.name}" for a in node.names
                    if a.name != "*" and f"{target}.{a.name}" not in MODULES and bound is not None
                    and a.name not in bound]
        elif isinstance(node, ast.Import):
            out += [f"{rel}:{node.lineno}: no module {a.name}" for a in node.names
                    if a.name.split(".")[0] == PACKAGE and a.name not in MODULES]
    return out


def test_every_name_imported_from_the_package_exists():
    """A name moved or renamed in ``src`` must not leave a benchmark or script importing it lazily (in a child
    process or a function, where only running it would tell): ``benchmarks/native_load.py`` did, for weeks."""
    assert missing_imports(ROOT / "native" / "build.py") == []                  # the walker sees relative imports
    bad = [line for p in CALLERS for line in missing_imports(p)]
    assert bad == [], "\n".join(bad)


def test_missing_imports_are_found(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(f"def f():\n    from {PACKAGE}.native.session import _extra_ignored\n"
                     f"    from {PACKAGE}.native.quant_config import extra_ignored\n    import {PACKAGE}.nope\n")
    assert [line.split(": ", 1)[1] for line in missing_imports(probe, tmp_path)] == [
        f"{PACKAGE}.native.session has no _extra_ignored", f"no module {PACKAGE}.nope"]

