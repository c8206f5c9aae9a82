"""The package's import graph (ast-read): exits 1 when a rule of the layout breaks.

    python scripts/check_imports.py            # run by `make lint`

Rules:
- no import cycle between modules (imports at the top of a module; ``__init__`` counts as its package);
- a project module is imported inside a function only by the entry point (``cli.py``, for a fast
  ``grpo --help``); optional third-party packages (vllm, wandb, ...) may be imported anywhere;
- a layer imports only itself and the layers below it (``LAYERS``, bottom first);
- a command (``commands/train.py``, ``sample.py``, ``eval.py``, ``serve.py``) never imports another command.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "grpo_cli"
# Bottom first; a module's layer is its first package below grpo_cli (or its own name at the top).
LAYERS = [
    "grpo_cli", "core", "config", "runtime", "data", "rewards", "models", "engines", "envs", "rollout", "run",
    "commands",
    "cli", "__main__",
]  # fmt: skip
# Several packages on one layer may not import each other at all.
SAME_LAYER = {"data": 3, "rewards": 3}
ENTRY_POINTS = {"grpo_cli.cli", "grpo_cli.__main__"}
COMMANDS = {
    "grpo_cli.commands.train",
    "grpo_cli.commands.sample",
    "grpo_cli.commands.eval",
    "grpo_cli.commands.serve",
}


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(name: str, modules: set[str]) -> str | None:
    """The project module an imported dotted name refers to (``grpo_cli.run.checkpoint.save`` ->
    ``grpo_cli.run.checkpoint``); None outside the project."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports(path: Path, modules: set[str], package: Path = PACKAGE) -> tuple[set[str], set[str]]:
    """(project modules imported at the top, project modules imported inside a function or class body)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top: set[str] = set()
    nested: set[str] = set()

    def visit(node: ast.AST, inside: bool) -> None:
        for child in ast.iter_child_nodes(node):
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                names = [f"{child.module}.{a.name}" for a in child.names]
            found = {m for n in names if (m := _resolve(n, modules))}
            (nested if inside else top).update(found)
            deeper = inside or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            visit(child, deeper)

    visit(tree, False)
    self_name = module_name(path, package)
    return top - {self_name}, nested - {self_name}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def graph(package: Path = PACKAGE) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    files = {module_name(p, package): p for p in sorted(package.rglob("*.py"))}
    modules = set(files)
    top, nested = {}, {}
    for name, path in files.items():
        top[name], nested[name] = imports(path, modules, package)
    return top, nested


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            strong(v)
    return found


def problems(package: Path = PACKAGE) -> list[str]:
    top, nested = graph(package)
    out = [f"import cycle: {' <-> '.join(c)}" for c in cycles(top)]
    for mod, deps in sorted(nested.items()):
        if deps and mod not in ENTRY_POINTS:
            out.append(
                f"{mod} imports {', '.join(sorted(deps))} inside a function (only the entry point may)"
            )
    rank = {name: i for i, name in enumerate(LAYERS)}
    for mod, deps in sorted(top.items()):
        mine = layer(mod)
        if mine not in rank:
            out.append(f"{mod}: package {mine!r} is in no layer (scripts/check_imports.py LAYERS)")
            continue
        for dep in sorted(deps):
            theirs = layer(dep)
            if theirs == mine or theirs == "grpo_cli":
                continue
            same = SAME_LAYER.get(mine) is not None and SAME_LAYER.get(mine) == SAME_LAYER.get(theirs)
            if rank.get(theirs, -1) > rank[mine] or same:
                out.append(
                    f"{mod} (layer {mine}) imports {dep} (layer {theirs}): a layer imports only those below it"
                )
        if mod in COMMANDS and deps & (COMMANDS - {mod}):
            out.append(f"{mod} imports another command: {', '.join(sorted(deps & COMMANDS))}")
    return out


def main() -> int:
    top, _ = graph()
    print(f"import graph: {len(top)} modules, {sum(len(v) for v in top.values())} edges")
    found = problems()
    for line in found:
        print(line, file=sys.stderr)
    if not found:
        print("0 cycles; no project import inside a function outside the entry point; layers in order")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
