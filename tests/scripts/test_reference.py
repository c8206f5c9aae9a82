"""docs/reference.md is the schema written out: CI fails when a key, a default or a help line changes
and the page is not written again (`make reference`)."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("reference", REPO / "scripts" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["reference"] = module
    spec.loader.exec_module(module)
    return module


def test_the_committed_reference_is_the_schema_written_out():
    ref = _script()
    assert (REPO / "docs" / "reference.md").read_text(encoding="utf-8") == ref.render(), (
        "docs/reference.md differs from grpo_cli/config.py: run `make reference` and commit the page"
    )


def test_every_key_has_a_row_with_its_help():
    from grpo_cli.config import EvalRoot, ExportRoot, SampleRoot, TrainRoot

    ref = _script()
    page = (REPO / "docs" / "reference.md").read_text(encoding="utf-8")
    for root in (TrainRoot, SampleRoot, EvalRoot, ExportRoot):
        for key, _type, _default, _train, help_ in ref.rows(root, "", {}):
            assert f"| `{key}` |" in page, key
            assert help_, f"{key} has no help line above its field in grpo_cli/config.py"


def test_a_changed_default_makes_the_check_fail(monkeypatch):
    """The check is not a rubber stamp: a schema default changed without the page fails it."""
    from grpo_cli import config

    ref = _script()
    fields = {f.name: f for f in dataclasses.fields(config.AlgoConfig)}
    monkeypatch.setattr(fields["beta"], "default", 0.5)
    assert "| `algo.beta` | float | `0.5` |" in ref.render()
    assert ref.main(["--check"]) == 1


def test_help_is_the_comment_block_above_the_field():
    ref = _script()

    @dataclasses.dataclass
    class Example:
        # First line
        # and its second.
        a: int = 1
        b: str = "x"  # inline help
        c: float = 0.0

    helps = ref.field_help(Example)
    assert helps == {"a": "First line and its second.", "b": "inline help", "c": ""}
