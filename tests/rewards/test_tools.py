"""Rules that read an episode: a tool call's cost, and the rows a multi-turn rollout hands the rules."""

from __future__ import annotations

import torch

from grpo_cli.cli import compose_config
from grpo_cli.rewards import build_rewarder
from grpo_cli.rewards.tools import ToolCost
from grpo_cli.rollout.generate import score
from grpo_cli.rollout.record import Rollout


def test_tool_cost_charges_each_call_and_each_error_and_nothing_without_an_episode():
    rule = ToolCost(cost=0.1, error_cost=0.5)
    rows = [{"episode": {"tool_calls": 3.0, "tool_errors": 1.0}}, {"episode": {"tool_calls": 0.0}}, {}]
    assert rule(["a", "b", "c"], rows) == [-0.1 * 3 - 0.5, 0.0, 0.0]


def test_math_tools_scores_correct_minus_a_tenth_per_call():
    cfg, _ = compose_config("train", ["reward=math_tools", "env=calc"])
    rewarder = build_rewarder(cfg.reward)
    n = 4
    ro = Rollout(
        prompt_ids=torch.zeros(n, 1, dtype=torch.long),
        prompt_mask=torch.ones(n, 1, dtype=torch.long),
        completion_ids=torch.zeros(n, 1, dtype=torch.long),
        completion_mask=torch.ones(n, 1, dtype=torch.long),
        texts=["14", "14", "13", "14"],
        rows=[{"id": "0", "question": "Calculate 2 + 3 * 4", "answer": "14"}] * n,
        group_size=n,
        episode_stats={
            "tool_calls": [0.0, 2.0, 1.0, 1.0],
            "tool_errors": [0.0] * n,
            "turns": [1.0, 3.0, 2.0, 2.0],
        },
    )
    try:
        score(ro, rewarder)
    finally:
        rewarder.close()
    assert torch.allclose(ro.rewards, torch.tensor([1.0, 0.8, -0.1, 0.9]))
    assert ro.per_rule["tool_cost"] == [0.0, -0.2, -0.1, -0.1]
    assert "episode" not in ro.rows[0]  # the rollout's own rows stay as they were
