"""Package layout rules, checked by ``scripts/check_imports.py`` (also run by ``make lint``): no import
cycle, no project import inside a function outside the entry point, layers imported bottom-up only,
no command importing another; module and function sizes (``scripts/check_sizes.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import load_script


@pytest.fixture(scope="module")
def check_imports():
    return load_script("check_imports")


def test_the_package_keeps_every_layout_rule(check_imports):
    assert check_imports.problems() == []


def test_every_package_is_in_a_layer(check_imports):
    top, _ = check_imports.graph()
    assert {check_imports.layer(m) for m in top} <= set(check_imports.LAYERS)


def _package(root: Path, files: dict[str, str]) -> Path:
    pkg = root / "grpo_cli"
    for rel, text in files.items():
        path = pkg / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for d in [pkg, *[p for p in pkg.rglob("*") if p.is_dir()]]:
        (d / "__init__.py").touch()
    return pkg


def test_a_cycle_a_nested_import_and_an_upward_import_are_each_named(check_imports, tmp_path):
    pkg = _package(
        tmp_path,
        {
            "models/a.py": "from grpo_cli.models import b\n",
            "models/b.py": "from grpo_cli.models.a import x\n",
            "core/loss.py": "def f():\n    from grpo_cli.core import logprobs\n",
            "core/logprobs.py": "from grpo_cli.rollout.record import Rollout\n",
            "rollout/record.py": "",
            "commands/train.py": "from grpo_cli.commands import eval\n",
            "commands/eval.py": "",
        },
    )
    found = check_imports.problems(pkg)
    assert any("cycle" in p and "grpo_cli.models.a" in p and "grpo_cli.models.b" in p for p in found)
    assert any(
        p.startswith("grpo_cli.core.loss imports grpo_cli.core.logprobs inside a function") for p in found
    )
    assert any(
        p.startswith("grpo_cli.core.logprobs (layer core) imports grpo_cli.rollout.record") for p in found
    )
    assert any(p.startswith("grpo_cli.commands.train imports another command") for p in found)
    assert len(found) == 4


def test_the_size_report_warns_by_name_and_never_fails(capsys):
    """Sizes are a warning that names each module or function past STYLE.md's sizes (cohesion decides
    a split, not a line count), never a failed lint."""
    sizes = load_script("check_sizes")
    modules, functions = sizes.sizes()
    assert sizes.main() == 0
    err = capsys.readouterr().err
    over = [name for n, name in modules if n > sizes.MAX_MODULE]
    over += [name for n, name in functions if n > sizes.MAX_FUNCTION]
    assert all(name in err for name in over)
    assert err.count("warning:") == len(over)
