"""The environment's own reward (``env=openenv``, or any environment with ``has_reward``).

    grpo train env=openenv env.openenv=my_envs.guess:GuessEnv reward=env

The episode loop sums the rewards an environment's steps report into the episode record's
``env_reward`` (``rollout.generate.rule_rows``); this rule reads it from the row alone, so it needs no
environment of its own. A row without one (a single turn, an environment without rewards) cannot be
judged: None, counted in ``reward/env/unjudged`` (and warned about once).
"""

from __future__ import annotations

from math import isfinite


def env_reward(completions: list[str], rows: list[dict]) -> list[float | None]:
    """Each completion's episode ``env_reward``, in the environment's own units; None without one."""
    scores: list[float | None] = []
    for row in rows:
        value = (row.get("episode") or {}).get("env_reward")
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and isfinite(value)
        scores.append(float(value) if ok else None)
    return scores
