"""The protocol every environment implements (see ``grpo_cli.envs``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass
class Observation:
    """What the environment says after a turn: text the model reads next (tool output, an error)."""

    text: str
    error: bool = False  # a failed call: malformed, raised, timed out
    call: bool = True  # the turn made a tool call (counted in tool_calls)


class Environment(Protocol):
    """Optional attributes: ``banned_strings`` (tokens the model may never sample: a tool's result
    markers, so results cannot be forged) and ``call_strings`` (the tokens that open a call: banned
    when ``env.allow_calls=false``)."""

    stop_strings: tuple[str, ...]

    def reset(self, row: dict, seed: int) -> Any:
        """The state of a new episode on ``row``."""

    def step(self, state: Any, turn_text: str) -> Observation | None:
        """The answer to a turn that ended on a stop string; None ends the episode."""
