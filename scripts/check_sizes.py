"""Module and function sizes in grpo_cli/ (ast-measured): prints the five largest of each and a warning
for each module past 400 lines or function past 60 (STYLE.md's sizes that fit a head).

    python scripts/check_sizes.py            # run by `make lint`; a warning, never a failure

A warning is a place to look for a second concept, not an order to split: modules are cut by
cohesion, and a split that only moves lines (and re-exports them) is worse than a long cohesive
module (STYLE.md).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "grpo_cli"
MAX_MODULE, MAX_FUNCTION = 400, 60


def sizes(package: Path = PACKAGE) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(lines, module) and (lines, module:function) for every module and function under ``package``."""
    modules, functions = [], []
    for path in sorted(package.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        name = str(path.relative_to(package.parent))
        modules.append((len(text.splitlines()), name))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                # From the first decorator to the last line of the body, docstring included.
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                functions.append((node.end_lineno - first + 1, f"{name}:{node.lineno} {node.name}"))
    return sorted(modules, reverse=True), sorted(functions, reverse=True)


def main() -> int:
    modules, functions = sizes()
    print(f"largest modules (limit {MAX_MODULE} lines):")
    for n, name in modules[:5]:
        print(f"  {n:4d}  {name}")
    print(f"largest functions (limit {MAX_FUNCTION} lines):")
    for n, name in functions[:5]:
        print(f"  {n:4d}  {name}")
    over = [f"{name}: {n} lines" for n, name in modules if n > MAX_MODULE]
    over += [f"{name}: {n} lines" for n, name in functions if n > MAX_FUNCTION]
    for line in over:
        print(f"warning: larger than a head holds, look for a second concept: {line}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
