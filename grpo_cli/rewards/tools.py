"""Reward rules that read an episode (``env=``): what a tool call costs.

    grpo train env=calc reward=math_tools       # correct - 0.1 x calls

Every rule reads the model's own words (its turns, without the tool's text); a multi-turn rollout
also hands it rows with an ``episode`` entry, the record beside the words: ``turns``,
``tool_calls``, ``tool_errors``, ``truncated``, ``tool_tokens``, ``model_turns`` (the model's turns as
text) and ``tool_results`` (the tool's text of each call) (``rollout.generate.rule_rows``). A
single-turn row has none: this rule scores 0 there.
"""

from __future__ import annotations


class ToolCost:
    """Score -cost per tool call of the episode (0 for a single-turn completion).

    Args:
        cost: what one call costs, in reward units (with a 1.0 correctness rule: 0.1 means ten calls
            cost as much as a wrong answer).
        error_cost: what a failed call costs on top.
    """

    def __init__(self, cost: float = 0.1, error_cost: float = 0.0):
        self.cost, self.error_cost = cost, error_cost

    def __call__(self, completions: list[str], rows: list[dict]) -> list[float]:
        scores = []
        for row in rows:
            ep = row.get("episode") or {}
            scores.append(
                -self.cost * ep.get("tool_calls", 0.0) - self.error_cost * ep.get("tool_errors", 0.0)
            )
        return scores
