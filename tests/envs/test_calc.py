"""The calculator tool: arithmetic on the syntax tree, bounded, every failure an error observation."""

from __future__ import annotations

import pytest

from grpo_cli.envs.calc import CalcEnv, evaluate, format_number


@pytest.mark.parametrize(
    "expr, value",
    [
        ("2 + 3 * 4", 14),
        ("(2 + 3) * 4", 20),
        ("-7 // 2", -4),
        ("7 / 2", 3.5),
        ("2 ** 10", 1024),
        ("10 % 4", 2),
    ],
)
def test_arithmetic_follows_python_precedence(expr, value):
    assert evaluate(expr) == value


@pytest.mark.parametrize(
    "expr, message",
    [
        ("1 / 0", "division by zero"),
        ("2 ** 1000", "exponent above"),
        ("__import__('os').system('true')", "not allowed"),
        ("x + 1", "not allowed"),
        ("1 +", "not an arithmetic expression"),
        ("9" * 300, "longer than"),
        ("10 ** 40", "out of range"),
    ],
)
def test_anything_else_is_a_value_error_naming_why(expr, message):
    with pytest.raises(ValueError, match=message):
        evaluate(expr)


def test_numbers_print_as_the_model_would_write_them():
    assert [format_number(v) for v in (6, 6.0, 3.5, 1 / 3)] == ["6", "6", "3.5", "0.333333"]


def test_a_turn_is_answered_from_its_last_call_and_failures_are_observations():
    env = CalcEnv()
    ok = env.step(None, "first <calc>1+1</calc> then <calc>2 * 21</calc>")
    assert ok.text == "42" and env.framing(ok) == ("<result>", "</result>")  # the markers are the framing
    bad = env.step(None, "<calc>1/0</calc>")
    assert bad.error and bad.text == "error: division by zero"
    orphan = env.step(None, "no opening </calc>")
    assert orphan.error and "no <calc>" in orphan.text
