"""Episodes on any engine, token-exact: each turn's input is the last input, the sampled ids unchanged,
and the observation's ids. A single-turn rollout (``env=none``) is an episode with no tool stops.

    spec = episode_spec(cfg.env, policy, cfg.rollout)        # once per command; spec.close() at its end
    episodes = run_episodes(engine, spec, prompt_ids, rows, group_size, decoding, seeds)

Turn 0 asks the engine for G completions of each prompt (one request per group, so the G episodes share
the prompt's prefill; an environment's ``opening`` observation, where it has one, comes first, after
the prompt, and a group whose episodes open differently asks one request per episode); later turns ask
for one completion per active episode, with the tokens the episode has left of its budget
(``episode_budget``: model and tool tokens together). A turn that ends on one of the environment's stop
ids is answered by ``env.step``; one that ends on EOS, or is cut by the budget, ends the episode (a
call cut off mid-way runs no tool). An observation is the environment's framing around the tool's
text (``observation_ids``); a tool text longer than ``max_tool_tokens`` is cut and ends in ``CUT``, the
framing kept whole; an observation that would leave no room for another model token ends the episode
as truncated.

Turn t > 0 of episode j of a group samples from the stream ``runtime.rng.derive_seed(seed, j, t)`` of its group's
seed, so an episode's tokens depend on the run's seed and its place alone, not on its batch.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from grpo_cli.config import EnvConfig, RolloutConfig
from grpo_cli.engines import Completion, Decoding, Engine, Progress, Request
from grpo_cli.envs import Environment, Observation, build_env, plain_ids, stop_token_ids, token_ids
from grpo_cli.models import Policy
from grpo_cli.runtime.rng import derive_seed

CUT = " [cut]"  # ends a tool text cut to max_tool_tokens
# Seconds a step gets beyond env.timeout_s: a tool with its own limit (the sandbox) reports its timeout.
STEP_GRACE_S = 5.0


def single_turn(cfg: EnvConfig) -> bool:
    """Whether ``env`` names no environment (``env=none``): one model turn per completion."""
    return cfg.name == "none" and not cfg._target_


def episode_budget(cfg: EnvConfig, rollout_cfg: RolloutConfig) -> int:
    """The tokens an episode may hold after its prompt, model and tool tokens together: the one
    completion budget. ``rollout.max_new_tokens`` for a single turn; ``env.max_episode_tokens`` (default
    ``rollout.max_new_tokens``) with an environment. The engine is sized for it, DAPO's overlong
    penalty compares an episode's tokens with it, and Dr. GRPO's constant divisor defaults to it."""
    if single_turn(cfg):
        return rollout_cfg.max_new_tokens
    return cfg.max_episode_tokens or rollout_cfg.max_new_tokens


def extra_tokens(cfg: EnvConfig, rollout_cfg: RolloutConfig) -> int:
    """Tokens an episode may hold beyond ``rollout.max_new_tokens`` (an engine sized up front needs them)."""
    return max(0, episode_budget(cfg, rollout_cfg) - rollout_cfg.max_new_tokens)


@dataclass
class EpisodeSpec:
    """How episodes run: the environment (None: a single turn), its stop ids, the token budget, what a
    failed call does. It owns the environment: ``close()`` releases it, once."""

    env: Environment | None
    tokenizer: Any
    eos_ids: tuple[int, ...]  # the model's EOS set: a turn ending on one ends the episode
    tool_stop_ids: tuple[int, ...]  # a turn ending on one is a call
    budget: int  # tokens after the prompt, model and tool tokens together (``episode_budget``)
    max_turns: int
    max_tool_tokens: int
    end_on_error: bool
    banned_ids: tuple[int, ...] = ()  # never sampled: result markers; the call token when calls are off
    timeout_s: float = 10.0  # seconds a step may take: env.timeout_s + STEP_GRACE_S
    closed: bool = False

    @classmethod
    def of(
        cls, cfg: EnvConfig, tokenizer: Any, eos_ids: Sequence[int], rollout_cfg: RolloutConfig
    ) -> EpisodeSpec:
        """The spec of ``env`` (``env=none``: one turn, no tool stops)."""
        budget = episode_budget(cfg, rollout_cfg)
        env = build_env(cfg, tokenizer)
        if env is None:
            return cls(None, tokenizer, tuple(eos_ids), (), budget, 1, 0, False)
        try:
            help = getattr(env, "token_help", None)
            banned = tuple(getattr(env, "banned_strings", ()))
            if not cfg.allow_calls:
                banned += tuple(getattr(env, "call_strings", ()))
            # With calls forbidden a stray close marker is text, not a call: no tool stops at all.
            stops = stop_token_ids(tokenizer, env) if cfg.allow_calls else ()
            banned_ids = token_ids(tokenizer, banned, "banned", help)
        except Exception:
            _close(env)
            raise
        return cls(
            env, tokenizer, tuple(eos_ids), stops, budget, cfg.max_turns, cfg.max_tool_tokens,
            cfg.on_error == "end", banned_ids, cfg.timeout_s + STEP_GRACE_S,
        )  # fmt: skip

    def close(self) -> None:
        """Release the environment (its ``close()``, where it has one); a second call does nothing."""
        if not self.closed:
            self.closed = True
            _close(self.env)


def _close(env: Any) -> None:
    close = getattr(env, "close", None)
    if callable(close):
        close()


def episode_spec(cfg: EnvConfig, policy: Policy, rollout_cfg: RolloutConfig) -> EpisodeSpec:
    """The run's episodes: ``env`` over the policy's tokenizer and EOS set."""
    eos = policy.eos_ids or (policy.tokenizer.eos_token_id,)
    return EpisodeSpec.of(cfg, policy.tokenizer, eos, rollout_cfg)


@dataclass
class Episode:
    """One episode after its prompt: the ids, which of them the model sampled, and its record."""

    prompt_ids: list[int]
    state: Any
    ids: list[int] = field(default_factory=list)  # [T] model and tool tokens in order
    model: list[int] = field(default_factory=list)  # [T] 1 where the model sampled the token
    logprobs: list[float] | None = field(default_factory=list)  # [T] the engine's (0 on tool tokens)
    results: list[str] = field(default_factory=list)  # the tool's text of each call, uncut
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    truncated: bool = False
    done: bool = False
    env_reward: float | None = None  # the sum of the env's step rewards; None: the env gives none

    @property
    def tool_tokens(self) -> int:
        return len(self.model) - sum(self.model)


def run_episodes(
    engine: Engine,
    spec: EpisodeSpec,
    prompt_ids: Sequence[list[int]],
    rows: Sequence[dict],
    group_size: int,
    decoding: Decoding,
    seeds: Sequence[int] | None = None,
    progress: Progress | None = None,
) -> list[Episode]:
    """G episodes of each prompt, rows i*G .. (i+1)*G - 1 for prompt i; every one ends within the budget.

    ``progress(completions, tokens)``: a single turn reports as the engine finishes batches, episodes
    with tools once they are all done.

    Eight arguments: the engine and the spec, then per-prompt lists from three sources (the format's
    prompt ids, the data's rows, the seed streams), G, the decoding and the progress hook;
    ``rollout.generate.Sampler.generate`` is the one caller that builds them.
    """
    stop_ids = spec.eos_ids + spec.tool_stop_ids
    decoding = replace(decoding, banned_ids=decoding.banned_ids + spec.banned_ids)
    group_seed = [0 if seeds is None else int(s) for s in (seeds or [None] * len(rows))]
    reset = (lambda row, seed: None) if spec.env is None else spec.env.reset
    rewarded = bool(getattr(spec.env, "has_reward", False))
    episodes = [
        Episode(list(p), reset(row, group_seed[i]), env_reward=0.0 if rewarded else None)
        for i, (p, row) in enumerate(zip(prompt_ids, rows)) for _ in range(group_size)
    ]  # fmt: skip
    first, owners = _first_requests(
        spec, episodes, group_size, stop_ids, None if seeds is None else group_seed
    )
    for ks, group in zip(owners, engine.generate(first, decoding, progress if spec.env is None else None)):
        for k, c in zip(ks, group):
            _take_turn(episodes[k], c, spec)
    while live := [k for k, ep in enumerate(episodes) if not ep.done]:
        requests = []
        for k in live:
            ep, (i, j) = episodes[k], divmod(k, group_size)
            seed = None if seeds is None else derive_seed(group_seed[i], j, ep.turns)
            requests.append(Request(ep.prompt_ids + ep.ids, 1, spec.budget - len(ep.ids), stop_ids, seed))
        for k, group in zip(live, engine.generate(requests, decoding)):
            _take_turn(episodes[k], group[0], spec)
    end = getattr(spec.env, "end", None)
    if callable(end):  # the loop reset them, so it ends them: each episode's resources go here
        for ep in episodes:
            end(ep.state)
    if spec.env is not None and progress is not None:
        progress(len(episodes), sum(len(e.ids) for e in episodes))
    return episodes


def _first_requests(
    spec: EpisodeSpec,
    episodes: list[Episode],
    group_size: int,
    stop_ids: tuple[int, ...],
    group_seed: list[int] | None,
) -> tuple[list[Request], list[list[int]]]:
    """Turn 0's requests and, for each, the episodes its completions go to. One request of G per group
    (the G episodes share the prompt's prefill) while the group's openings are the same ids (none, or
    a seeded game's board); else one request per episode, on turn 0's stream of its place."""
    requests, owners = [], []
    for i in range(len(episodes) // group_size):
        ks = list(range(i * group_size, (i + 1) * group_size))
        opened = [_open(spec, episodes[k]) for k in ks]
        seed = None if group_seed is None else group_seed[i]
        ep = episodes[ks[0]]
        if all(o == opened[0] for o in opened) and not any(episodes[k].done for k in ks):
            requests.append(
                Request(ep.prompt_ids + ep.ids, group_size, spec.budget - len(ep.ids), stop_ids, seed)
            )
            owners.append(ks)
            continue
        for j, k in enumerate(ks):
            ep = episodes[k]
            if not ep.done:
                s = None if seed is None else derive_seed(seed, j, 0)
                requests.append(Request(ep.prompt_ids + ep.ids, 1, spec.budget - len(ep.ids), stop_ids, s))
                owners.append([k])
    return requests, owners


def _open(spec: EpisodeSpec, ep: Episode) -> list[int]:
    """Place the environment's opening observation (``opening(state)``, where it has one) after the
    prompt as observation tokens; its ids. One that leaves no room for a model token ends the episode
    as truncated before it starts."""
    opening = getattr(spec.env, "opening", None)
    obs = opening(ep.state) if callable(opening) else None
    if obs is None:
        return []
    ids = observation_ids(spec, obs)
    if len(ids) >= spec.budget:
        ep.truncated = ep.done = True
        return []
    ep.ids += ids
    ep.model += [0] * len(ids)
    if ep.logprobs is not None:
        ep.logprobs += [0.0] * len(ids)
    return ids


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
    ep.results.append(obs.text)
    if obs.reward is not None and ep.env_reward is not None:
        ep.env_reward += float(obs.reward)  # summed: the episode's return, undiscounted
    if obs.done:  # the environment ended the episode (a game won or lost): nothing more to show
        ep.done = True
        return
    ids = observation_ids(spec, obs)
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


def observation_ids(spec: EpisodeSpec, obs: Observation) -> list[int]:
    """The ids of an observation: the framing's text before (control tokens parsed), the tool's text as
    plain text, cut to ``max_tool_tokens`` (ending in ``CUT``) when longer, the framing's text after."""
    tok = spec.tokenizer
    framing = getattr(spec.env, "framing", None)
    before, after = framing(obs) if callable(framing) else ("", "")
    text = plain_ids(tok, obs.text)
    if len(text) > spec.max_tool_tokens:
        marker = plain_ids(tok, CUT)
        keep = max(spec.max_tool_tokens - len(marker), 0)
        text = text[:keep] + marker[: spec.max_tool_tokens - keep]
    control = [tok(s, add_special_tokens=False)["input_ids"] if s else [] for s in (before, after)]
    return list(control[0]) + text + list(control[1])
