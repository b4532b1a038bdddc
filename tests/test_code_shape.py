"""The codebase stays easy to read: no function over 60 lines, ARCHITECTURE.md within 40 lines."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OURS = ["vesl", "operators", "schemas", "pipelines", "benchmarks", "scripts", "tests"]
MAX_FUNCTION_LINES = 60
MAX_ARCHITECTURE_LINES = 40


def long_functions(source: str, limit: int) -> list[tuple[str, int]]:
    """(name, lines) of every function or method in SOURCE longer than LIMIT lines, decorators excluded."""
    return [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > limit]


def test_long_functions_are_found():
    body = "\n".join(f"    x{i} = {i}" for i in range(60))
    assert long_functions(f"def f():\n{body}\n", 60) == [("f", 61)]
    method = "\n".join(f"        y{i} = {i}" for i in range(59))
    assert long_functions(f"class A:\n    def g(self):\n{method}\n", 60) == []  # 60 lines: fine


def test_no_function_over_60_lines():
    found = [f"{path.relative_to(REPO)}: {name} ({lines} lines)"
             for top in OURS for path in sorted((REPO / top).rglob("*.py"))
             for name, lines in long_functions(path.read_text(encoding="utf-8"), MAX_FUNCTION_LINES)]
    assert not found, "split these functions:\n" + "\n".join(found)


def test_architecture_md_stays_short():
    lines = (REPO / "ARCHITECTURE.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_ARCHITECTURE_LINES, f"ARCHITECTURE.md has {len(lines)} lines"
