"""Episodes: the model's turns and what an environment answers between them, token-exact.

    grpo train                                     # env=none: one turn, today's single-turn rollout
    grpo train env=calc model.name_or_path=DIR     # the model may call a calculator between turns
    grpo train env=python model=qwen data=gsm8k    # Python in the sandbox, Hermes tool calls
    grpo train env=openenv env.openenv=pkg.mod:Env reward=env   # an OpenEnv environment, its own reward
    grpo train env._target_=my_pkg.MyEnv           # a user's environment (the protocol below)

An environment answers a model turn. Its protocol (``Environment``):

- ``reset(row, seed) -> state``: a new episode for a data row; the G episodes of a group get the
  same seed;
- ``stop_strings``: texts that end a model turn besides EOS, each one token of the tokenizer (the
  engine stops on token ids: ``</calc>`` for the calculator);
- ``step(state, turn_text) -> Observation | None``: what the environment says after a turn that
  ended on a stop string; None (or an Observation with ``done``) ends the episode. A tool that fails
  returns an ``Observation`` with ``error`` set (malformed call, exception, timeout): the model reads
  the error, the run goes on. An environment with its own reward (``has_reward``) puts each step's in
  ``Observation.reward``: the episode's ``env_reward`` is their sum (``reward=env`` scores it);
- optional: ``framing(obs) -> (before, after)``, the format's control text around the tool's text;
  ``opening(state)``, an observation before the first turn; ``end(state)``, once per episode;
  ``close()``, called once when the command ends or fails (``protocol.Environment`` lists the rest).

An observation's ids are ``framing[0]`` (control tokens parsed), the tool's text as plain text (a
special-token string in it stays ordinary characters), then ``framing[1]``: only the framing can
hold control tokens, and a cut to ``env.max_tool_tokens`` shortens the tool's text, never the framing.

The trainer owns the tokens (``envs.episode``): turn t+1's input is turn t's input, the ids the
model sampled, unchanged, and the observation's ids; nothing earlier is decoded and encoded again.
Only sampled tokens are the model's (``model_mask``): observation tokens get no loss and no KL and
count in no denominator.
"""

from __future__ import annotations

from typing import Any

from grpo_cli.config import ConfigError, EnvConfig
from grpo_cli.envs.calc import CalcEnv
from grpo_cli.envs.openenv import OpenEnvAdapter
from grpo_cli.envs.protocol import Environment, Observation
from grpo_cli.envs.python import PythonEnv
from grpo_cli.rewards import resolve_target

__all__ = ["ENVS", "Environment", "Observation", "build_env", "plain_ids", "stop_token_ids", "token_ids"]


ENVS = {"calc": CalcEnv, "python": PythonEnv, "openenv": OpenEnvAdapter}  # built with (cfg, tokenizer)


def build_env(cfg: EnvConfig, tokenizer: Any = None) -> Environment | None:
    """The environment ``env`` names; None for single-turn episodes (``env=none``)."""
    if cfg._target_:  # a user's class, by import path: the loader of reward rules and env.openenv
        cls = resolve_target(cfg._target_, "env")
        try:
            return cls(cfg)
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - the user's constructor failed: one config line
            raise ConfigError(
                f"env._target_={cfg._target_}: cannot be built: {type(exc).__name__}: {exc}"
            ) from None
    if cfg.name == "none":
        return None
    if cfg.name not in ENVS:
        raise ConfigError(f"env.name={cfg.name!r} is not allowed; choose one of: none, {', '.join(ENVS)}")
    return ENVS[cfg.name](cfg, tokenizer)


def stop_token_ids(tokenizer: Any, env: Environment) -> tuple[int, ...]:
    """The ids of the environment's stop strings; ConfigError when one is not a single token."""
    return token_ids(tokenizer, env.stop_strings, "stop", getattr(env, "token_help", None))


def token_ids(
    tokenizer: Any, strings: tuple[str, ...], what: str, help: str | None = None
) -> tuple[int, ...]:
    """One id per string; ConfigError naming the string, and ``help`` (how to get it), when it is not
    a single token."""
    ids = []
    for s in strings:
        enc = tokenizer(s, add_special_tokens=False)["input_ids"]
        if len(enc) != 1:
            raise ConfigError(
                f"env {what} string {s!r} is {len(enc)} tokens of this tokenizer: it must be one; "
                + (help or "add it as a token of the model's tokenizer")
            )
        ids.append(enc[0])
    return tuple(ids)


def plain_ids(tokenizer: Any, text: str) -> list[int]:
    """``text``'s ids as plain text: the tokenizer's normalizer, pre-tokenizer and model, without its
    added-token matching, so ``<|im_end|>`` or ``</calc>`` inside ``text`` become the ids of their
    characters, never the control token. Equal to ``tokenizer(text)`` on text without such strings.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow tokenizer: it splits special tokens, not other added ones
        return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    pieces = backend.pre_tokenizer.pre_tokenize_str(text) if backend.pre_tokenizer else [(text, None)]
    return [token.id for piece, _ in pieces for token in backend.model.tokenize(piece)]
