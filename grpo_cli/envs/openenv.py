"""OpenEnv environments (openenv-core 0.3.0) in this process, on the episode loop, scored by their own reward.

    pip install 'grpo-cli[openenv]'
    grpo train env=openenv env.openenv=my_envs.guess:GuessEnv reward=env data.path=prompts.jsonl

An OpenEnv ``Environment`` is a gym-style class: ``reset(seed=, episode_id=) -> Observation`` and
``step(action) -> Observation``, with pydantic Action and Observation models; an observation carries
``done``, ``reward`` and ``metadata`` beside its own fields. ``OpenEnvAdapter`` makes one a grpo-cli
environment (the protocol in ``grpo_cli.envs``):

- ``reset(row, seed)`` builds a new instance of the class per episode (an OpenEnv instance is one
  session) with ``env.openenv_args`` and resets it with the group's seed. Its observation is the
  episode's *opening*: placed after the prompt as observation tokens, before the model's first turn
  (the protocol's optional ``opening`` hook). Not prepended to the prompt text: the prompt is encoded
  from the data row before any environment exists, and the G episodes of a group may open differently.
- A model turn ends on one of ``env.turn_stops`` (default: the tokenizer's EOS). Its text, stop string
  removed and stripped, becomes the Action: the field ``env.action_field``, or a JSON object of the
  action's fields. A turn that does not parse or validate is an error observation (counted in
  ``tool_errors``; ``env.on_error`` says whether the episode goes on).
- The environment's observation goes back as text: its one own field's value, or a JSON object of
  its own fields (``done``, ``reward`` and ``metadata`` left out), between newlines. ``done`` ends the
  episode; each step's ``reward`` is summed into the episode's ``env_reward`` (``reward=env`` reads it).
- ``step`` runs under ``env.timeout_s`` (the episode loop's thread): a raise or an overrun is an error
  observation, and an instance still busy with an overrun step answers its episode's later turns with
  an error instead of being called again.
- An episode's instance is closed when the episode ends (``end``), and any left when the command ends.

The adapter is duck-typed: the class needs ``reset``/``step`` and observations with ``done`` and
``reward``; the Action class is the annotation of ``step``'s ``action`` parameter (or the first type
argument of ``Environment[Action, Observation, State]``). openenv-core itself is imported only by the
class's own module, so a class that needs it, without it installed, is a one-line ConfigError.

Not yet: environments served over HTTP/WebSocket (OpenEnv's ``EnvClient``), rubrics beyond the reward,
and a chat template's turn framing around observations (they are plain text between newlines).
"""

from __future__ import annotations

import itertools
import json
import threading
import typing
from dataclasses import dataclass, field
from typing import Any

from grpo_cli.config import ConfigError, EnvConfig
from grpo_cli.envs.protocol import Observation
from grpo_cli.rewards import resolve_target

INSTALL = "pip install 'grpo-cli[openenv]'"
OWN = ("done", "reward", "metadata")  # every OpenEnv observation's fields: the rest are its text
MAX_ERROR_CHARS = 300  # a validation error is shown to the model: one short line


def load_class(path: str | None) -> type:
    """The class at ``module:Class`` or ``module.Class`` (``rewards.resolve_target``, the one loader);
    ConfigError in one line, naming the install command when what is missing is openenv-core."""
    if not path:
        raise ConfigError("env=openenv needs env.openenv=module:Class, the OpenEnv Environment class to run")
    try:
        cls = resolve_target(path.replace(":", "."), "env", key="openenv")
    except ConfigError as exc:
        if "No module named 'openenv'" in str(exc) or "No module named 'openenv." in str(exc):
            raise ConfigError(f"env.openenv={path}: openenv-core is not installed: {INSTALL}") from None
        raise
    if not isinstance(cls, type) or not callable(getattr(cls, "step", None)):
        raise ConfigError(f"env.openenv={path}: {cls!r} is not an environment class (with reset and step)")
    return cls


def action_class(env_cls: type) -> type:
    """The Action model ``env_cls.step`` takes: its annotation, else ``Environment[Action, ...]``'s."""
    try:
        hint = typing.get_type_hints(env_cls.step).get("action")
    except Exception:  # noqa: BLE001 - an annotation that does not resolve: try the generic base
        hint = None
    if isinstance(hint, type):
        return hint
    for base in getattr(env_cls, "__orig_bases__", ()):
        args = typing.get_args(base)
        if args and isinstance(args[0], type):
            return args[0]
    raise ConfigError(
        f"env.openenv: {env_cls.__name__}.step's action has no Action class annotation "
        "(def step(self, action: MyAction)), so a turn cannot be parsed into one"
    )


def observation_text(obs: Any) -> str:
    """The text the model reads: the observation's one own field as it is (a string) or as JSON, or a
    JSON object of its own fields; ``done``, ``reward`` and ``metadata`` are the loop's, not text."""
    fields = obs.model_dump() if hasattr(obs, "model_dump") else dict(vars(obs))
    own = {k: v for k, v in fields.items() if k not in OWN}
    if len(own) == 1:
        (value,) = own.values()
        return value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
    return json.dumps(own, default=str, ensure_ascii=False) if own else ""


@dataclass
class Session:
    """One episode's OpenEnv instance and the observation its reset gave."""

    env: Any
    opening: Any
    busy: threading.Lock = field(default_factory=threading.Lock)  # held while a step runs
    closed: bool = False


class OpenEnvAdapter:
    """An OpenEnv Environment class as a grpo-cli environment: one instance per episode."""

    has_reward = True  # each step's reward is summed into the episode's env_reward

    def __init__(self, cfg: EnvConfig, tokenizer: Any = None):
        self.cls = load_class(cfg.openenv)
        self.action_cls = action_class(self.cls)
        self.args = dict(cfg.openenv_args or {})
        self.field = cfg.action_field
        stops = tuple(cfg.turn_stops or ())
        if not stops:
            eos = getattr(tokenizer, "eos_token", None)
            if not eos:
                raise ConfigError("env=openenv: the tokenizer has no EOS token; set env.turn_stops=[...]")
            stops = (eos,)
        self.stop_strings = stops
        self.token_help = "set env.turn_stops to strings that are single tokens of this tokenizer"
        self._ids = itertools.count()
        self._live: list[Session] = []  # instances not closed yet: end() and close() close them

    def reset(self, row: dict, seed: int) -> Session:
        env = self.cls(**self.args)
        session = Session(env, None)
        self._live.append(session)
        session.opening = env.reset(seed=seed, episode_id=f"grpo-{next(self._ids)}")
        return session

    def opening(self, state: Session) -> Observation | None:
        text = observation_text(state.opening) if state.opening is not None else ""
        return Observation(text, call=False) if text else None

    def framing(self, obs: Observation) -> tuple[str, str]:
        return "\n", "\n"

    def parse(self, turn_text: str) -> Any:
        """The Action of a turn's text; ValueError saying why it is not one."""
        text = turn_text
        for stop in self.stop_strings:  # the turn ends on one stop string: the loop stopped there
            if text.endswith(stop):
                text = text[: -len(stop)]
                break
        text = text.strip()
        if self.field is not None:
            values = {self.field: text}
        else:
            try:
                values = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"the turn is not a JSON object ({exc.msg})") from None
            if not isinstance(values, dict):
                raise ValueError("the turn is not a JSON object of the action's fields")
        try:
            return self.action_cls(**values)
        except Exception as exc:  # noqa: BLE001 - pydantic's ValidationError, or the class's own check
            raise ValueError(f"not a valid {self.action_cls.__name__}: {_why(exc)}") from None

    def step(self, state: Session, turn_text: str) -> Observation:
        try:
            action = self.parse(turn_text)
        except ValueError as exc:
            return Observation(f"error: {exc}"[:MAX_ERROR_CHARS], error=True)
        if not state.busy.acquire(blocking=False):  # an earlier step overran and is still running
            return Observation("error: the environment is still busy with an earlier step", error=True)
        try:
            obs = state.env.step(action)
        finally:
            state.busy.release()
        reward = getattr(obs, "reward", None)
        return Observation(
            observation_text(obs),
            reward=None if reward is None else float(reward),
            done=bool(getattr(obs, "done", False)),
        )

    def end(self, state: Session) -> None:
        """Close the episode's instance (not while an overrun step still runs in it)."""
        if not state.closed and state.busy.acquire(blocking=False):
            state.closed = True
            state.busy.release()
            self._live.remove(state)
            _close(state.env)

    def close(self) -> None:
        for session in list(self._live):
            self.end(session)


def _why(exc: Exception) -> str:
    """One line: pydantic's field errors as ``field: message`` (without its help links), else the text."""
    try:
        return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - not a ValidationError
        return " ".join(str(exc).split())


def _close(env: Any) -> None:
    close = getattr(env, "close", None)
    if callable(close):
        close()
