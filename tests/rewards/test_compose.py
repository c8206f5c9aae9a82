"""Reward composition: rules from config by import path, weighted sums, None handling, contained
failures, and the shipped reward groups composed the way the command line composes them."""

from __future__ import annotations

import logging
import textwrap

import pytest

from grpo_cli.cli import compose_config
from grpo_cli.config import ConfigError
from grpo_cli.rewards import Rewarder, Rule, build_rewarder
from grpo_cli.rewards.format import FormatReward
from grpo_cli.rewards.math import MathReward

CUSTOM_RULES = '''
"""A user's reward module, importable by path: the way a custom _target_ plugs in."""


def length_rule(completions, rows, target=10):
    return [1.0 if len(c) <= target else 0.0 for c in completions]


def echo_rule(completions, rows):
    return [float(row.get("bonus", 0)) for row in rows]


class Counter:
    def __init__(self, scale=1.0):
        self.scale, self.calls = scale, 0

    def __call__(self, completions, rows):
        self.calls += 1
        return [self.scale * len(c) for c in completions]

    def metrics(self):
        return {"calls": self.calls}


def unsure(completions, rows):
    return [None if "?" in c else 1.0 for c in completions]


def broken(completions, rows):
    raise RuntimeError("boom")


def short(completions, rows):
    return [1.0]
'''


@pytest.fixture
def custom_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent(CUSTOM_RULES))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards"


def rule(name, path, weight=1.0, /, **kwargs):
    return {"name": name, "_target_": path, "weight": weight, **kwargs}


def test_weighted_sum_and_per_rule_means(custom_module):
    rewarder = build_rewarder(
        [
            rule("len", "my_rewards.length_rule", 0.5, target=3),
            rule("count", "my_rewards.Counter", 2.0, scale=0.1),
        ]
    )
    result = rewarder(["abc", "abcdef"], [{}, {}])
    assert result.per_rule == {"len": [1.0, 0.0], "count": pytest.approx([0.3, 0.6])}
    assert result.total == pytest.approx([0.5 * 1.0 + 2.0 * 0.3, 0.5 * 0.0 + 2.0 * 0.6])
    assert result.metrics["reward/len"] == 0.5
    assert result.metrics["reward/count"] == pytest.approx(0.45)
    assert result.metrics["reward/count/calls"] == 1  # a rule's own metrics() are logged under its name
    assert result.metrics["reward/unjudged"] == 0


def test_target_kinds(custom_module):
    plain, partial, instance = (
        build_rewarder([rule("a", "my_rewards.echo_rule")]).rules[0].fn,
        build_rewarder([rule("b", "my_rewards.length_rule", target=1)]).rules[0].fn,
        build_rewarder([rule("c", "my_rewards.Counter", scale=2.0)]).rules[0].fn,
    )
    assert plain.__name__ == "echo_rule"
    assert partial.keywords == {"target": 1}
    assert instance.scale == 2.0


def test_none_means_unjudged_unless_weight_is_zero(custom_module):
    rewarder = build_rewarder([rule("ok", "my_rewards.echo_rule"), rule("unsure", "my_rewards.unsure", 0.5)])
    result = rewarder(["fine", "what?"], [{"bonus": 1}, {"bonus": 1}])
    assert result.total == [1.5, None]
    assert result.per_rule["unsure"] == [1.0, None]
    assert result.metrics["reward/unjudged"] == 1 and result.metrics["reward/unsure"] == 1.0
    logged_only = build_rewarder(
        [rule("ok", "my_rewards.echo_rule"), rule("unsure", "my_rewards.unsure", 0.0)]
    )
    assert logged_only(["what?"], [{"bonus": 1}]).total == [1.0]


def test_unjudged_completions_are_counted_per_rule_and_warned_once(custom_module, caplog):
    rewarder = build_rewarder([rule("ok", "my_rewards.echo_rule"), rule("unsure", "my_rewards.unsure")])
    with caplog.at_level(logging.WARNING, logger="grpo_cli"):
        first = rewarder(["a?", "b", "c?"], [{}, {}, {}])
        second = rewarder(["d?"], [{}])
    assert first.per_rule["unsure"] == [None, 1.0, None]  # None, never a silent 0
    assert first.metrics["reward/unsure/unjudged"] == 2 and first.metrics["reward/ok/unjudged"] == 0
    assert second.metrics["reward/unsure/unjudged"] == 1
    warnings = [r.getMessage() for r in caplog.records if "could not judge" in r.getMessage()]
    assert len(warnings) == 1 and "'unsure' could not judge 2 of 3" in warnings[0]


def test_a_rule_that_raises_is_contained_and_logged_once(custom_module, caplog):
    rewarder = build_rewarder(
        [
            rule("ok", "my_rewards.echo_rule"),
            rule("broken", "my_rewards.broken"),
            rule("short", "my_rewards.short"),
        ]
    )
    with caplog.at_level(logging.ERROR, logger="grpo_cli"):
        first = rewarder(["a", "b"], [{"bonus": 1}, {"bonus": 0}])
        second = rewarder(["a"], [{"bonus": 1}])
    assert first.total == [1.0, 0.0] and second.total == [2.0]  # "short" is right for a batch of one
    assert first.per_rule["broken"] == [0.0, 0.0] and first.per_rule["short"] == [0.0, 0.0]
    assert first.metrics["reward/broken/errors"] == 2 and second.metrics["reward/broken/errors"] == 1
    assert first.metrics["reward/short/errors"] == 2 and second.metrics["reward/short/errors"] == 0
    assert first.metrics["reward/ok/errors"] == 0
    assert caplog.text.count("'broken' raised") == 1 and caplog.text.count("'short' raised") == 1


@pytest.mark.parametrize(
    "rules, message",
    [
        ([{"_target_": "my_rewards.echo_rule"}], r"reward.rules\[0\]: missing key 'name'"),
        ([rule("a", "my_rewards.echo_rule"), {"name": "b"}], r"reward.rules\[1\]: missing key '_target_'"),
        (
            [rule("a", "no_such_pkg.rule")],
            r"reward.rules\[0\]._target_=no_such_pkg.rule: no module 'no_such_pkg'",
        ),
        (
            [rule("a", "my_rewards.nope")],
            r"reward.rules\[0\]._target_=my_rewards.nope: my_rewards has no attribute",
        ),
        ([rule("a", "not a path")], r"reward.rules\[0\]._target_='not a path'"),
        (
            [rule("a", "my_rewards.length_rule", limit=3)],
            r"reward.rules\[0\]: length_rule does not take \['limit'\]",
        ),
        ([rule("a", "my_rewards.Counter", size=3)], r"reward.rules\[0\]: cannot build Counter"),
        ([rule("a", "my_rewards.echo_rule", "heavy")], r"reward.rules\[0\].weight='heavy'"),
        (
            [rule("a", "my_rewards.echo_rule"), rule("a", "my_rewards.unsure")],
            r"names must be unique; repeated: a",
        ),
        ([], r"reward.rules: needs at least one rule"),
    ],
)
def test_config_errors_are_one_line_naming_the_rule(custom_module, rules, message):
    with pytest.raises(ConfigError, match=message) as info:
        build_rewarder(rules)
    assert "\n" not in str(info.value)


def test_shipped_groups_compose_from_the_command_line():
    _, dcfg = compose_config("sample", ["reward=math_format"])
    rewarder = build_rewarder(dcfg.reward)
    assert [(r.name, r.weight, type(r.fn)) for r in rewarder.rules] == [
        ("math", 1.0, MathReward),
        ("format", 0.2, FormatReward),
    ]
    result = rewarder(["<think>2+2</think> \\boxed{4}", "<think>hm</think> 5", "4"], [{"answer": "4"}] * 3)
    assert result.total == pytest.approx([1.2, 0.2, 1.0])
    assert (
        result.metrics["reward/math"] == pytest.approx(2 / 3) and result.metrics["reward/math/timeouts"] == 0
    )
    rewarder.close()
    for group in ("math", "format", "code"):
        cfg, _ = compose_config("train", [f"reward={group}"])
        build_rewarder(cfg.reward).close()  # builds without starting any worker


def test_custom_target_from_a_command_line_override(custom_module):
    override = "reward.rules=[{name: short, _target_: my_rewards.length_rule, weight: 0.5, target: 2}]"
    cfg, _ = compose_config("sample", [override])
    result = build_rewarder(cfg.reward)(["ab", "abc"], [{}, {}])
    assert result.total == [0.5, 0.0]


def test_rewarder_closes_its_rules():
    closed = []

    class Closable:
        def __call__(self, completions, rows):
            return [1.0] * len(completions)

        def close(self):
            closed.append(True)

    with Rewarder([Rule("c", 1.0, Closable())]) as rewarder:
        assert rewarder(["x"], [{}]).total == [1.0]
    assert closed == [True]
