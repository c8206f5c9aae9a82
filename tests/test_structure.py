"""Package layout rules: drivers import only shared modules; renamed config keys keep working a release."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from grpo_cli import config

PACKAGE = Path(__file__).resolve().parent.parent / "grpo_cli"
DRIVERS = {"grpo_cli.train", "grpo_cli.sample", "grpo_cli.evaluate"}


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function (``from grpo_cli import x`` as grpo_cli.x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize("driver", sorted(DRIVERS))
def test_a_driver_imports_no_other_driver(driver):
    path = PACKAGE / f"{driver.split('.')[-1]}.py"
    assert _imports(path) & (DRIVERS - {driver}) == set()


def test_no_shared_module_imports_a_driver():
    shared = [p for p in PACKAGE.rglob("*.py") if p.stem not in {"train", "sample", "evaluate", "cli"}]
    assert shared and all(not _imports(p) & DRIVERS for p in shared)


def test_renamed_keys_keep_working_with_a_one_line_warning(monkeypatch, caplog):
    monkeypatch.setattr(config, "RENAMED_KEYS", {"train.old_steps": "train.steps", "algo.name": None})
    with caplog.at_level("WARNING", logger="grpo_cli"):
        got = config.apply_renames(["train.old_steps=3", "+algo.name=dapo", "seed=1", "train.steps_x=2"])
    assert got == ["train.steps=3", "seed=1", "train.steps_x=2"]
    assert [r.getMessage() for r in caplog.records] == [
        "train.old_steps is deprecated (renamed train.steps; use that)",
        "algo.name is deprecated (no longer read; drop it)",
    ]


def test_the_cli_drops_algo_name_with_a_warning(capsys):
    """algo.name was never read: the key is gone from the schema, but an old command still runs."""
    from grpo_cli.cli import compose_config

    overrides = config.apply_renames(["algo.name=grpo", "train.steps=1"])
    cfg, _ = compose_config("train", overrides)
    assert cfg.train.steps == 1 and not hasattr(cfg.algo, "name")
