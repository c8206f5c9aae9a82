"""Format reward: the default <think> pattern, custom patterns, and partial credit."""

from __future__ import annotations

import pytest

from grpo_cli.rewards.format import FormatReward, format_reward


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>2 + 2 is 4</think> 4", 1.0),
        ("  <think>multi\nline\nreasoning</think>\n\nThe answer is 4\n", 1.0),  # outer whitespace ignored
        ("<think>no answer after</think>   ", 0.0),
        ("4 <think>late</think> 4", 0.0),
        ("<think>unclosed 4", 0.0),
        ("just 4", 0.0),
    ],
)
def test_default_pattern(text, expected):
    assert FormatReward().score(text) == expected


def test_partial_credit_per_tag_pair():
    reward = FormatReward(partial=True)
    assert reward.tags == ["think"]
    assert reward.score("<think>thinking</think> 4") == 1.0
    assert reward.score("<think>thinking only</think>") == 0.5  # the pair is there, no answer after it
    assert reward.score("</think> backwards <think>") == 0.0
    assert reward.score("no tags") == 0.0


def test_custom_pattern_with_two_pairs():
    reward = FormatReward(pattern=r"<think>.*?</think>\s*<answer>.*?</answer>", partial=True)
    assert reward.tags == ["answer", "think"]
    assert reward.score("<think>a</think><answer>4</answer>") == 1.0
    assert reward.score("<think>a</think> 4") == 0.25
    assert reward.score("<think>a</think><answer>4</answer> trailing") == 0.5  # both pairs, no full match


def test_callable_contract():
    completions = ["<think>x</think> 1", "1"]
    assert format_reward(completions, [{}, {}]) == [1.0, 0.0]
    assert FormatReward()(completions, [{}, {}]) == [1.0, 0.0]
