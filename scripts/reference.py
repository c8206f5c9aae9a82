"""Write docs/reference.md, the configuration reference, from the schema (``grpo_cli/config.py``).

    python scripts/reference.py            # rewrite docs/reference.md
    python scripts/reference.py --check    # exit 1 when the committed page differs from the schema (CI)

Every key of every group: its type, its default in the schema, the value ``grpo train`` composes by
default where a group's YAML sets another (e.g. ``data.max_new_tokens``), and the one line of help the
dataclass holds as the comment above the field. Nothing here is written by hand: a new key, a changed
default or a reworded comment changes the page, and ``tests/scripts/test_reference.py`` fails until
the page is written again (`make reference`).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
import textwrap
import typing
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PAGE = REPO / "docs" / "reference.md"

HEADER = """# Configuration reference

Written by `scripts/reference.py` from the schema in `grpo_cli/config.py` (`make reference`); do not
edit by hand: CI fails when this page and the schema differ. Each row: the key as you set it on the
command line (`grpo train algo.beta=0.0`), its type, its default in the schema, the value `grpo
train` composes when a group's YAML under `conf/` sets another, and the field's help. The pages in
`docs/` say what the options do together; this page lists every key once.
"""


def field_help(cls: type) -> dict[str, str]:
    """Field name -> its help: the comment lines right above the field in the class body, joined."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    tree = ast.parse(source)
    body = tree.body[0].body  # type: ignore[attr-defined]
    out = {}
    for node in body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        comments, i = [], node.lineno - 2  # the line above the field (0-based)
        while i >= 0 and lines[i].strip().startswith("#"):
            comments.insert(0, lines[i].strip().lstrip("#").strip())
            i -= 1
        inline = lines[node.lineno - 1].split("#", 1)[1].strip() if "  #" in lines[node.lineno - 1] else ""
        out[node.target.id] = " ".join([*comments, inline]).strip()
    return out


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _shown(value: Any) -> str:
    if dataclasses.is_dataclass(value):
        return "(group)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"' if value == "" or value != value.strip() else value
    return str(value)


def _type(hint: Any) -> str:
    """``str | None`` -> ``str or null``; ``list[str]`` as written."""
    args = typing.get_args(hint)
    if type(None) in args:
        return " or ".join([*(_type(a) for a in args if a is not type(None)), "null"])
    text = str(hint).replace("typing.", "")
    return text.replace("<class '", "").replace("'>", "")


def rows(cls: type, prefix: str, composed: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(key, type, schema default, grpo train default or "", help) of every leaf key under ``cls``."""
    helps: dict[str, str] = {}
    for base in reversed(cls.__mro__):  # a field inherited from _Common has its comment there
        if dataclasses.is_dataclass(base):
            helps.update(field_help(base))
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        key, hint = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(hint):
            out += rows(hint, f"{key}.", composed)
            continue
        default = _shown(_default(f))
        train = _shown(composed[key]) if key in composed else ""
        out.append((key, _type(hint), default, "" if train == default else train, helps.get(f.name, "")))
    return out


def render() -> str:
    from omegaconf import OmegaConf

    from grpo_cli.cli import compose_config
    from grpo_cli.config import EvalRoot, ExportRoot, SampleRoot, TrainRoot, leaves

    _, dcfg = compose_config("train")
    composed = leaves(OmegaConf.to_container(dcfg, resolve=True))
    groups: dict[str, list[tuple[str, str, str, str, str]]] = {}
    for root in (TrainRoot, SampleRoot, EvalRoot, ExportRoot):
        for row in rows(root, "", composed):
            head = row[0].split(".")[0] if "." in row[0] else "(root)"
            if row not in groups.setdefault(head, []):
                groups[head].append(row)
    parts = [HEADER]
    order = ["(root)", "model", "lora", "algo", "data", "reward", "rollout", "env", "train", "sample", "eval"]
    for head in sorted(groups, key=lambda g: order.index(g) if g in order else len(order)):
        title = "keys at the top level" if head == "(root)" else f"`{head}`"
        parts.append(
            f"\n## {title}\n\n| key | type | default | `grpo train` | help |\n| --- | --- | --- | --- | --- |"
        )
        for key, typ, default, train, help_ in groups[head]:
            cells = [
                f"`{key}`",
                typ,
                f"`{default}`",
                f"`{train}`" if train else "",
                help_.replace("|", "\\|"),
            ]
            parts.append("| " + " | ".join(cells) + " |")
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/reference.md is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not PAGE.is_file() or PAGE.read_text(encoding="utf-8") != text:
            print(
                "docs/reference.md differs from the schema: run `make reference` and commit it",
                file=sys.stderr,
            )
            return 1
        return 0
    PAGE.write_text(text, encoding="utf-8")
    print(f"wrote {PAGE.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
