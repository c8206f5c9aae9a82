"""The protocol every environment implements (see ``grpo_cli.envs``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass
class Observation:
    """What the environment says after a turn: the tool's text (its output, or an error message).

    ``text`` is data: it is tokenized as plain text, so a special-token string inside it
    (``<|im_end|>``, ``</calc>``) becomes ordinary tokens, never a turn boundary or a marker. The
    structure around it is the environment's ``framing``.
    """

    text: str
    error: bool = False  # a failed call: malformed, raised, timed out
    call: bool = True  # the turn made a tool call (counted in tool_calls)
    # The environment's own reward for this step (a game's score), summed into the episode's env_reward;
    # None: the step gives none (a tool).
    reward: float | None = None
    # The step ended the episode (the game is over): its reward counts, its text is not shown to the model.
    done: bool = False


class Environment(Protocol):
    """What an environment must have: ``stop_strings``, ``reset`` and ``step``.

    Optional attributes, each looked up with a default:

    - ``framing(obs) -> (before, after)``: the format's text around the tool's text, tokenized with
      its control tokens (the calculator's ``<result>`` ... ``</result>``; the chat template's tool
      role and the next turn's header). Default ``("", "")``: the tool's text alone, plain.
    - ``close()``: release what the environment holds (a sandbox, a process pool); called once when
      the command that built it ends or fails.
    - ``banned_strings``: tokens the model may never sample (a tool's result markers, so results cannot
      be forged); ``call_strings``: the tokens that open a call (banned when ``env.allow_calls=false``).
    - ``token_help``: how to get the environment's markers into a tokenizer, for the error a tokenizer
      without them gets.
    - ``end(state)``: an episode is over (called once per episode when its batch is done): release
      what its state holds.
    - ``has_reward``: True when the environment scores its episodes (``Observation.reward``): every
      episode's record then holds ``env_reward``, the sum of its steps' rewards (0 for none).
    - ``opening(state) -> Observation | None``: what the environment shows before the model's first
      turn (a game's board), placed after the prompt as observation tokens; None: nothing.
    """

    stop_strings: tuple[str, ...]

    def reset(self, row: dict, seed: int) -> Any:
        """The state of a new episode on ``row``."""

    def step(self, state: Any, turn_text: str) -> Observation | None:
        """The answer to a turn that ended on a stop string; None ends the episode."""
