"""DESIGN.md's boundary around the built-in engine, read from every import statement (top level or in a function):
the rest of epkit reaches the engine only through its command line (``epkit serve``, ``--check-args``) and HTTP
API; the engine imports from the rest of epkit only ``eplb/``, ``topology/models.py``, the EPLB key list
``topology/eplb.py``, the exception tree and the two tables shared with the rest: the all2all backends
``epkit/topology/backends.py`` and GPT-2's byte alphabet ``epkit/topology/byte_level.py``."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "epkit"
ENGINE_MAY_IMPORT = ("epkit.engine", "epkit.eplb", "epkit.topology.models", "epkit.topology.eplb", "epkit.errors",
                     "epkit.topology.backends", "epkit.topology.byte_level")


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
            if node.module == "epkit":  # `from epkit import engine`
                out += [(node.lineno, f"epkit.{alias.name}") for alias in node.names]
    return out


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_rest_of_epkit_imports_nothing_from_the_engine():
    found = [f"{path.relative_to(PACKAGE.parent)}:{line}: {module}"
             for path in PACKAGE.rglob("*.py") if "engine" not in path.relative_to(PACKAGE).parts[:1]
             for line, module in _imports(path) if _inside(module, "epkit.engine")]
    assert found == []


def test_the_engine_imports_only_what_design_allows():
    found = [f"{path.relative_to(PACKAGE.parent)}:{line}: {module}"
             for path in (PACKAGE / "engine").rglob("*.py")
             for line, module in _imports(path)
             if _inside(module, "epkit") and not any(_inside(module, ok) for ok in ENGINE_MAY_IMPORT)]
    assert found == []
    # and the tables both sides share stay plain data: importing them loads neither torch nor the engine
    import subprocess
    import sys

    code = ("import sys, epkit.topology.backends, epkit.topology.byte_level; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('epkit.engine')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
