"""Python in the sandbox for chat models, in the Hermes tool-call format Qwen2.5 uses.

    grpo train env=python model=qwen data=gsm8k

The model writes ``<tool_call>{"name": "python", "arguments": {"code": "print(17 * 23)"}}</tool_call>``;
decoding stops at ``</tool_call>``; the program runs in the code reward's sandbox (bubblewrap: no
network, read-only root, private /tmp, CPU, memory, process and output limits; ``rewards.sandbox``)
and what it printed comes back through the chat template's ``tool`` role. The observation is the
program's output, plain text, framed by the template's rendering of a tool message: everything after
the model's turn up to the output, and from the output to the opening of the model's next turn (for
Qwen2.5: ``<|im_end|>\n<|im_start|>user\n<tool_response>\n`` and
``\n</tool_response><|im_end|>\n<|im_start|>assistant\n``), cut as the difference against the
rendered prefix. So the glue the template adds around a tool message is the framing's, with its
control tokens, and nothing a program prints can close the tool message or open a turn. A template
that does not extend its own prefix when a tool message follows is refused at start.
"""

from __future__ import annotations

import json
from typing import Any

from grpo_cli.config import ConfigError, EnvConfig
from grpo_cli.envs.protocol import Observation
from grpo_cli.rewards.code import CodeReward

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_MARK = "TURN-END-MARK"  # stands for the model's turn while the template renders around it
_OUTPUT = "TOOL-OUTPUT-MARK"  # stands for the program's output likewise


class PythonEnv:
    """Runs each ``python`` call in the sandbox; stateless between calls (each program runs alone)."""

    stop_strings = (CLOSE,)

    def __init__(self, cfg: EnvConfig, tokenizer: Any):
        self.tokenizer = tokenizer
        self.runner = CodeReward(timeout=cfg.timeout_s, memory_mb=512, max_procs=16, max_output_bytes=65_536)
        self._prefix = self._render([], False)
        self._cut = self._prefix.index(_MARK) + len(_MARK)
        self._framing = self._split(self._glue(_OUTPUT))
        if self._glue("x") != self._framing[0] + "x" + self._framing[1]:
            raise ConfigError(
                "env=python: the model's chat template rewrites a tool message's content; token-exact "
                "turns need one that renders it as given"
            )

    def _glue(self, content: str) -> str:
        """The template's text after the model's turn when a tool message with ``content`` follows."""
        full = self._render([{"role": "tool", "content": content}], True)
        if not full.startswith(self._prefix[: self._cut]):
            raise ConfigError(
                "env=python: the model's chat template does not extend its own prefix when a tool message "
                "follows (earlier text re-rendered); token-exact turns need one that does"
            )
        return full[self._cut :]

    @staticmethod
    def _split(glue: str) -> tuple[str, str]:
        before, _, after = glue.partition(_OUTPUT)
        return before, after

    def _render(self, extra: list[dict], generation_prompt: bool) -> str:
        messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": _MARK}, *extra]
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as exc:  # noqa: BLE001 - a template without a tool role, or none at all
            raise ConfigError(
                f"env=python: the model's chat template cannot render a tool message ({exc})"
            ) from None

    def framing(self, obs: Observation) -> tuple[str, str]:
        """The template's glue before and after a tool message's content (the same for every message)."""
        return self._framing

    def reset(self, row: dict, seed: int) -> None:
        return None

    def step(self, state: Any, turn_text: str) -> Observation:
        code, problem = parse_call(turn_text)
        if problem:
            return Observation(f"error: {problem}", error=True)
        result = self.runner.run(code)
        out = result.output.decode("utf-8", "replace").strip()
        if result.status == "timeout":
            return Observation(f"error: timed out after {self.runner.limits.timeout:g} s", error=True)
        if result.status == "output_limit":
            return Observation("error: the program printed more than the output limit", error=True)
        if result.status == "error":
            return Observation("error: the sandbox could not run the program", error=True)
        return Observation(out or "(no output)", error="Traceback (most recent call last)" in out)

    def close(self) -> None:
        self.runner.close()


def parse_call(turn_text: str) -> tuple[str, str | None]:
    """(code, None) for a well-formed python call at the end of the turn, else ("", what is wrong)."""
    start = turn_text.rfind(OPEN)
    end = turn_text.rfind(CLOSE)
    if start < 0 or end < start:
        return "", f"no {OPEN} before {CLOSE}"
    try:
        call = json.loads(turn_text[start + len(OPEN) : end])
    except json.JSONDecodeError as exc:
        return "", f"the call is not JSON ({exc.msg})"
    if not isinstance(call, dict) or call.get("name") != "python":
        return "", 'the only tool is {"name": "python", "arguments": {"code": "..."}}'
    code = (call.get("arguments") or {}).get("code") if isinstance(call.get("arguments"), dict) else None
    if not isinstance(code, str) or not code.strip():
        return "", 'arguments must hold "code": a string of Python'
    return code, None
