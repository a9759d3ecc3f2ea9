"""The layout holds its design (STYLE 1, issue 17): no import cycle among epkit's modules, no module over 500 lines
and no function over 80 lines — outside Triton kernel bodies — unless docs/architecture.md ("Exceptions") says why
in one line. Read from the source with `ast`: nothing is imported."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "epkit"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imported(tree: ast.Module) -> list[str]:
    """Every epkit module name an import statement anywhere in the file names (inside functions too: a lazy
    import still makes the two modules depend on each other), less ``if TYPE_CHECKING:`` blocks."""
    skip = {id(n) for block in ast.walk(tree) if _type_checking_only(block) for n in ast.walk(block)}
    names = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names += [f"{node.module}.{a.name}" for a in node.names] + [node.module]
    return [n for n in names if n == "epkit" or n.startswith("epkit.")]


def graph() -> dict[str, set[str]]:
    mods = modules()

    def owner(name: str) -> str | None:  # the module a dotted name lives in (a name inside a module: that module)
        while name not in mods and "." in name:
            name = name.rsplit(".", 1)[0]
        return name if name in mods else None

    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for name in imported(ast.parse(path.read_text())):
            target = owner(name)
            if target is not None and target != mod and not mod.startswith(target + "."):
                edges[mod].add(target)  # a package's own __init__ is not a cycle of its submodules
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _is_triton_kernel(fn: ast.AST) -> bool:
    return any("jit" in ast.unparse(d) for d in getattr(fn, "decorator_list", []))


def oversized() -> list[str]:
    """``path`` of every module over the line limit and ``path::qualname`` of every function over it."""
    out = []
    for path in modules().values():
        rel = path.relative_to(ROOT).as_posix()
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            out.append(rel)

        def visit(node: ast.AST, prefix: str) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    name = f"{prefix}{child.name}"
                    if child.end_lineno - child.lineno + 1 > MAX_FUNCTION_LINES and not _is_triton_kernel(child):
                        out.append(f"{rel}::{name}")
                    visit(child, name + ".")
                elif isinstance(child, ast.ClassDef):
                    visit(child, f"{prefix}{child.name}.")

        visit(ast.parse(text), "")
    return out


def justified() -> dict[str, str]:
    """docs/architecture.md, section "Exceptions": one line per exception, `` `what` — why``."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## Exceptions", 1)[1].split("\n## ", 1)[0] if "## Exceptions" in text else ""
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^[-*] `([^`]+)` — (.+)$", section, re.MULTILINE)}


def test_no_import_cycle_among_epkit_modules():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_over_500_lines_and_no_function_over_80_without_a_reason():
    reasons = justified()
    unexplained = [item for item in oversized() if not reasons.get(item)]
    assert unexplained == [], f"add a one-line reason to docs/architecture.md, 'Exceptions', or split: {unexplained}"
    stale = sorted(set(reasons) - set(oversized()))
    assert stale == [], f"docs/architecture.md lists exceptions that no longer exist: {stale}"


def test_test_module_basenames_are_unique():
    """pytest imports test modules outside packages by basename: two tests/**/test_x.py in folders without
    __init__.py stop the whole suite at collection."""
    seen: dict[str, list[str]] = {}
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        if not (path.parent / "__init__.py").exists():
            seen.setdefault(path.name, []).append(str(path.relative_to(ROOT)))
    assert not {name: paths for name, paths in seen.items() if len(paths) > 1}
