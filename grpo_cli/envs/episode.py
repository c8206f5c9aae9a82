"""Multi-turn episodes on any engine, token-exact: each turn's input is the last input, the sampled ids
unchanged, and the observation's ids.

    episodes = run_episodes(engine, spec, prompt_ids, rows, group_size, decoding, seeds)

Turn 0 asks the engine for G completions of each prompt (one request per group, as a single-turn
rollout does, so the G episodes share the prompt's prefill); later turns ask for one completion per
active episode, with the tokens the episode has left (``EpisodeSpec.budget`` for the whole episode,
model and tool tokens together). A turn that ends on one of the environment's stop ids is answered
by ``env.step``; one that ends on EOS, or is cut by the budget, ends the episode (a call cut off
mid-way runs no tool). A tool answer longer than ``max_tool_tokens`` is cut and ends in ``CUT``; an
answer that would leave no room for another model token ends the episode as truncated.

Turn t > 0 of episode j of a group samples from the stream ``turn_seed(seed, j, t)`` of its group's
seed, so an episode's tokens depend on the run's seed and its place alone, not on its batch.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from grpo_cli.config import EnvConfig, RolloutConfig
from grpo_cli.engines import Completion, Decoding, Engine, Request
from grpo_cli.envs import Environment, Observation, build_env, stop_token_ids, token_ids
from grpo_cli.models import Policy

CUT = " [cut]"  # ends a tool answer cut to max_tool_tokens
# Seconds a step gets beyond env.timeout_s: a tool with its own limit (the sandbox) reports its timeout.
STEP_GRACE_S = 5.0


@dataclass
class EpisodeSpec:
    """How episodes run: the environment, its stop ids, the token budgets, what a failed call does."""

    env: Environment
    tokenizer: Any
    eos_ids: tuple[int, ...]  # the model's EOS set: a turn ending on one ends the episode
    tool_stop_ids: tuple[int, ...]  # a turn ending on one is a call
    budget: int  # tokens after the prompt, model and tool tokens together
    max_turns: int
    max_tool_tokens: int
    end_on_error: bool
    banned_ids: tuple[int, ...] = ()  # never sampled: result markers; the call token when calls are off
    timeout_s: float = 10.0  # seconds a step may take: env.timeout_s + STEP_GRACE_S

    @classmethod
    def of(
        cls, cfg: EnvConfig, tokenizer: Any, eos_ids: Sequence[int], max_new_tokens: int
    ) -> EpisodeSpec | None:
        """The spec of ``env``; None for single-turn episodes (``env=none``)."""
        env = build_env(cfg, tokenizer)
        if env is None:
            return None
        banned = tuple(getattr(env, "banned_strings", ()))
        if not cfg.allow_calls:
            banned += tuple(getattr(env, "call_strings", ()))
        return cls(
            env, tokenizer, tuple(eos_ids), stop_token_ids(tokenizer, env), cfg.max_episode_tokens or max_new_tokens,
            cfg.max_turns, cfg.max_tool_tokens, cfg.on_error == "end", token_ids(tokenizer, banned, "banned"),
            cfg.timeout_s + STEP_GRACE_S,
        )  # fmt: skip


def episode_spec(cfg: EnvConfig, policy: Policy, rollout: RolloutConfig) -> EpisodeSpec | None:
    """The run's episodes: ``env`` over the policy's tokenizer and EOS set; None for ``env=none``."""
    eos = policy.eos_ids or (policy.tokenizer.eos_token_id,)
    return EpisodeSpec.of(cfg, policy.tokenizer, eos, rollout.max_new_tokens)


def extra_tokens(cfg: EnvConfig, rollout: RolloutConfig) -> int:
    """Tokens an episode may hold beyond ``rollout.max_new_tokens`` (an engine sized up front needs them)."""
    if cfg.name == "none" and not cfg._target_:
        return 0
    return max(0, (cfg.max_episode_tokens or rollout.max_new_tokens) - rollout.max_new_tokens)


@dataclass
class Episode:
    """One episode after its prompt: the ids, which of them the model sampled, and its counters."""

    prompt_ids: list[int]
    state: Any
    ids: list[int] = field(default_factory=list)  # [T] model and tool tokens in order
    model: list[int] = field(default_factory=list)  # [T] 1 where the model sampled the token
    logprobs: list[float] | None = field(default_factory=list)  # [T] the engine's (0 on tool tokens)
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    truncated: bool = False
    done: bool = False

    @property
    def tool_tokens(self) -> int:
        return len(self.model) - sum(self.model)


def turn_seed(seed: int, episode: int, turn: int) -> int:
    """The sampling seed of turn ``turn`` (> 0) of episode ``episode`` of a group seeded ``seed``."""
    return int(np.random.SeedSequence([seed, episode, turn]).generate_state(1, np.uint64)[0] >> 1)


def run_episodes(
    engine: Engine,
    spec: EpisodeSpec,
    prompt_ids: Sequence[list[int]],
    rows: Sequence[dict],
    group_size: int,
    decoding: Decoding,
    seeds: Sequence[int] | None = None,
) -> list[Episode]:
    """G episodes of each prompt, rows i*G .. (i+1)*G - 1 for prompt i; every one ends within the budget."""
    stops = spec.eos_ids + spec.tool_stop_ids
    decoding = replace(decoding, banned_ids=decoding.banned_ids + spec.banned_ids)
    group_seed = [0 if seeds is None else int(s) for s in (seeds or [None] * len(rows))]
    episodes = [
        Episode(list(p), spec.env.reset(row, group_seed[i])) for i, (p, row) in enumerate(zip(prompt_ids, rows))
        for _ in range(group_size)
    ]  # fmt: skip
    first = [
        Request(list(p), group_size, spec.budget, stops, None if seeds is None else group_seed[i])
        for i, p in enumerate(prompt_ids)
    ]
    for i, group in enumerate(engine.generate(first, decoding)):
        for j, c in enumerate(group):
            _take_turn(episodes[i * group_size + j], c, spec)
    while live := [k for k, ep in enumerate(episodes) if not ep.done]:
        requests = []
        for k in live:
            ep, (i, j) = episodes[k], divmod(k, group_size)
            seed = None if seeds is None else turn_seed(group_seed[i], j, ep.turns)
            requests.append(Request(ep.prompt_ids + ep.ids, 1, spec.budget - len(ep.ids), stops, seed))
        for k, group in zip(live, engine.generate(requests, decoding)):
            _take_turn(episodes[k], group[0], spec)
    return episodes


def _take_turn(ep: Episode, c: Completion, spec: EpisodeSpec) -> None:
    """Append the sampled turn; answer it when it ended on a call; mark the episode done when it ends."""
    ep.ids += c.token_ids
    ep.model += [1] * len(c.token_ids)
    if c.logprobs is None or ep.logprobs is None:
        ep.logprobs = None
    else:
        ep.logprobs += c.logprobs
    ep.turns += 1
    called = bool(c.token_ids) and c.token_ids[-1] in spec.tool_stop_ids
    if not called:  # EOS, or the budget cut the turn
        ep.truncated = not c.token_ids or c.token_ids[-1] not in spec.eos_ids
        ep.done = True
        return
    if ep.turns >= spec.max_turns or len(ep.ids) >= spec.budget:
        ep.truncated = ep.done = True
        return
    obs = _answer(spec.env, ep.state, spec.tokenizer.decode(c.token_ids), spec.timeout_s)
    if obs is None:
        ep.done = True
        return
    ep.tool_calls += int(obs.call)
    ep.tool_errors += int(obs.error)
    ids = _observation_ids(spec, obs.text)
    if (obs.error and spec.end_on_error) or len(ep.ids) + len(ids) >= spec.budget:
        ep.truncated = not obs.error or not spec.end_on_error
        ep.done = True
        return
    ep.ids += ids
    ep.model += [0] * len(ids)
    if ep.logprobs is not None:
        ep.logprobs += [0.0] * len(ids)


def _answer(env: Environment, state: Any, turn_text: str, timeout: float) -> Observation | None:
    """``env.step`` in a thread given ``timeout`` seconds; an exception or a step that does not return
    in time is an error the model reads, never a crash or a hang of the run. (A thread cannot be
    killed: a step that never returns keeps its thread; the sandboxed python tool kills its own
    program at ``env.timeout_s``.)"""
    box: dict[str, Any] = {}

    def call() -> None:
        try:
            box["obs"] = env.step(state, turn_text)
        except Exception as exc:  # noqa: BLE001 - a tool's failure is an observation
            box["obs"] = Observation(f"error: {type(exc).__name__}: {exc}"[:500], error=True)

    worker = threading.Thread(target=call, daemon=True, name="grpo-env-step")
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        return Observation(f"error: the tool did not answer within {timeout:g} s", error=True)
    return box["obs"]


def _observation_ids(spec: EpisodeSpec, text: str) -> list[int]:
    """The observation's token ids, cut to ``max_tool_tokens`` (ending in ``CUT``) when longer."""
    tok = spec.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= spec.max_tool_tokens:
        return list(ids)
    marker = tok(CUT, add_special_tokens=False)["input_ids"]
    keep = max(spec.max_tool_tokens - len(marker), 0)
    return list(ids[:keep]) + list(marker)[: spec.max_tool_tokens - keep]
