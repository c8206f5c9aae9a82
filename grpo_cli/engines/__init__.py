"""Generation engines behind one token-level protocol: ``hf`` (our prefix-shared decoding loop, the
default), ``vllm`` (colocated vLLM, weights pushed after every update) and ``vllm-server`` (vLLM
servers of their own, weights broadcast to them after every update: ``engines.server``).

    grpo train rollout.engine=vllm               # needs `make install-vllm`
    grpo eval rollout.engine=vllm checkpoint=outputs/run/checkpoint-300

An engine turns token ids into token ids. A ``Request`` is one prompt's exact tokens, how many
completions to draw from it, a token budget, the token ids that end a completion and the seed of its
sampling stream; the answer is one ``Completion`` per draw: the sampled token ids (the stop token
included) and, where the engine has them, the log-prob of each under the distribution it was
sampled from. Nothing is re-tokenised on the way, so a later turn (multi-turn, tool calls) can
extend a completion's exact tokens.

Engines sit below the rollout layer: ``rollout.generate`` encodes prompts, asks an engine, and builds
the ``Rollout``; an engine never calls back up. Every driver gets its engine from ``build_engine``
and passes it where it is used. ``sync()`` pushes the policy's current weights into an engine that
keeps its own copy (vLLM); the trainer calls it after every update.
"""

from __future__ import annotations

from grpo_cli.config import ENGINES, ConfigError, ModelConfig, RolloutConfig
from grpo_cli.engines.hf import HFEngine
from grpo_cli.engines.protocol import Completion, Decoding, Engine, Progress, Request
from grpo_cli.engines.server import ServerEngine
from grpo_cli.engines.vllm import VLLMEngine  # imports vllm itself only when an engine starts
from grpo_cli.models import Policy

__all__ = ["Completion", "Decoding", "Engine", "Progress", "Request", "build_engine", "check_engine"]

INSTALL_HINT = "rollout.engine=vllm needs vLLM, which is not installed: run `make install-vllm`"


def vllm_available() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):  # a broken or blocked install counts as missing
        return False


def check_engine(name: str) -> None:
    """ConfigError (one line, exit 2) for an unknown engine or a missing vLLM; runs before any model loads."""
    if name not in ENGINES:
        raise ConfigError(f"rollout.engine={name!r} is not allowed; choose one of: {', '.join(ENGINES)}")
    if name == "vllm" and not vllm_available():
        raise ConfigError(INSTALL_HINT)


def build_engine(
    policy: Policy,
    rollout: RolloutConfig,
    model: ModelConfig,
    seed: int,
    longest_prompt: int = 0,
    group_size: int = 1,
    owner: str = "",
) -> Engine:
    """The engine ``rollout.engine`` names, sampling from ``policy``.

    ``longest_prompt``: the longest prompt of the run in tokens (plus what an episode may hold beyond
    ``rollout.max_new_tokens``), to size the vLLM engine: it plus ``rollout.max_new_tokens`` is
    ``max_model_len`` unless ``rollout.max_model_len`` is set. ``owner`` (vllm-server): who the
    servers' weight group belongs to, a training run's directory; empty for a one-off client.
    """
    check_engine(rollout.engine)
    if rollout.engine == "vllm":
        return VLLMEngine.for_policy(policy, rollout, model, seed, longest_prompt, group_size)
    if rollout.engine == "vllm-server":
        engine = ServerEngine(policy, rollout.servers, rollout.request_timeout, rollout.sync_timeout, owner)
        engine.sync()  # the servers loaded the model from disk: they sample the policy's weights from here
        return engine
    return HFEngine(policy, rollout.batch_size)
