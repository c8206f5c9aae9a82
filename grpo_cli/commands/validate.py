"""Checks of a composed config that types alone cannot express, run before any model loads.

``validate`` (every subcommand), ``validate_eval`` (``grpo eval``) and ``validate_export``
(``grpo export``) raise ``ConfigError`` with one line naming the key and what it accepts; the CLI turns that into exit code 2. The allowed values of
each option come from the table that implements it (``option_choices``), so adding an option is
one edit there.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from grpo_cli.commands.validate_algo import validate_algo, validate_engine_is
from grpo_cli.config import (
    ENGINE_IS_LEVELS,
    ENGINE_IS_MODES,
    ENGINES,
    EXPORT_DTYPES,
    STRATEGIES,
    ConfigError,
    get_key,
)
from grpo_cli.core.advantages import ADVANTAGES, REWARD_SCALES
from grpo_cli.core.loss import AGGREGATIONS, IMPORTANCE_LEVELS, KL_ESTIMATORS
from grpo_cli.core.mismatch import SEQUENCE_STATISTICS
from grpo_cli.core.objectives import OBJECTIVES
from grpo_cli.core.schedule import LR_SCHEDULES
from grpo_cli.data.reasoning_gym import check_installed
from grpo_cli.data.split import GENERATED
from grpo_cli.data.split import test_size as held_out_size
from grpo_cli.engines import check_engine
from grpo_cli.engines.server.http import reachable
from grpo_cli.envs import ENVS
from grpo_cli.models import DTYPES, EMBEDDED
from grpo_cli.models.identity import checkpoint_kind
from grpo_cli.run.manifest import MANIFEST
from grpo_cli.run.trackers import check as check_trackers


def option_choices() -> dict[str, tuple[str, ...]]:
    """The allowed values of each option key, read from the tables that implement the options."""
    return {
        "algo.kl_estimator": tuple(KL_ESTIMATORS),
        "algo.aggregation": tuple(AGGREGATIONS),
        "algo.importance_level": tuple(IMPORTANCE_LEVELS),
        "algo.scale_rewards": tuple(REWARD_SCALES),
        "algo.advantage": tuple(ADVANTAGES),
        "algo.objective": tuple(OBJECTIVES),
        "model.dtype": ("auto", *DTYPES),
        "rollout.engine": ENGINES,
        "algo.engine_is.level": ENGINE_IS_LEVELS,
        "algo.engine_is.mode": ENGINE_IS_MODES,
        "algo.engine_is.statistic": tuple(SEQUENCE_STATISTICS),
        "console": ("rich", "plain"),
    }


def validate(cfg: Any) -> None:
    """Range and path checks that types alone cannot express. Raises ConfigError (one line)."""
    for key, allowed in option_choices().items():
        value = get_key(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(allowed)}")
    algo = cfg.algo
    if algo.group_size < 2:
        raise ConfigError(
            f"algo.group_size={algo.group_size}: must be >= 2 (advantages compare within a group)"
        )
    validate_algo(algo)
    if algo.num_iterations < 1:
        raise ConfigError(f"algo.num_iterations={algo.num_iterations}: must be >= 1")
    ro = cfg.rollout
    if cfg.data.max_new_tokens < 1:
        raise ConfigError(f"data.max_new_tokens={cfg.data.max_new_tokens}: must be >= 1")
    if ro.max_new_tokens < 1:
        raise ConfigError(f"rollout.max_new_tokens={ro.max_new_tokens}: must be >= 1")
    if ro.temperature <= 0:
        raise ConfigError(f"rollout.temperature={ro.temperature}: must be > 0")
    if not 0 < ro.top_p <= 1:
        raise ConfigError(f"rollout.top_p={ro.top_p}: must be in (0, 1]")
    if ro.top_k < 0:
        raise ConfigError(f"rollout.top_k={ro.top_k}: must be >= 0 (0 disables)")
    if not 0 <= ro.min_p <= 1:
        raise ConfigError(f"rollout.min_p={ro.min_p}: must be in [0, 1] (0 disables)")
    _validate_engine(cfg)
    _validate_env(cfg.env)
    if hasattr(cfg, "train"):
        tr = cfg.train
        if tr.prompts_per_step < 1:
            raise ConfigError(f"train.prompts_per_step={tr.prompts_per_step}: must be >= 1")
        if tr.steps < 0:
            raise ConfigError(f"train.steps={tr.steps}: must be >= 0")
        if tr.lr <= 0:
            raise ConfigError(f"train.lr={tr.lr}: must be > 0")
        _validate_micro_batch_tokens(cfg)
        _validate_robustness(cfg)
        _validate_updates_per_batch(tr, cfg.algo)
    test_size = held_out_size(cfg.data)
    if cfg.data.name in GENERATED and (test_size < 1 or test_size != int(test_size)):
        raise ConfigError(
            f"data.test_size={test_size:g}: data={cfg.data.name} generates its held-out problems: a count >= 1"
        )
    if test_size < 0 or (test_size >= 1 and test_size != int(test_size)):
        raise ConfigError(
            f"data.test_size={test_size:g}: a count of rows (1, 2, ...) or a fraction in [0, 1) of data.path"
        )
    if cfg.data.name in GENERATED and cfg.data.train_size < 1:
        raise ConfigError(
            f"data.train_size={cfg.data.train_size}: must be >= 1 (training problems generated)"
        )
    if cfg.data.test_path and not Path(cfg.data.test_path).expanduser().is_file():
        raise ConfigError(f"data.test_path={cfg.data.test_path}: no such file")
    if cfg.data.name == "reasoning_gym":
        check_installed()  # the optional extra: one line naming it, before any model loads
    if cfg.lora.enabled and cfg.lora.r < 1:
        raise ConfigError(f"lora.r={cfg.lora.r}: must be >= 1")
    check_model_path(cfg.model.name_or_path)


def _validate_engine(cfg: Any) -> None:
    """The generation engine's keys; rollout.engine=vllm without vLLM names the make target."""
    ro = cfg.rollout
    check_engine(ro.engine)
    if ro.max_model_len is not None and ro.max_model_len <= ro.max_new_tokens:
        raise ConfigError(
            f"rollout.max_model_len={ro.max_model_len}: must exceed rollout.max_new_tokens={ro.max_new_tokens}"
        )
    if ro.kv_cache_bytes is not None and ro.kv_cache_bytes < 1:
        raise ConfigError(f"rollout.kv_cache_bytes={ro.kv_cache_bytes}: must be >= 1 (or null to size it)")
    validate_engine_is(cfg.algo.engine_is, cfg.algo.objective)
    _validate_servers(ro, cfg.algo)


def _validate_micro_batch_tokens(cfg: Any) -> None:
    """train.micro_batch_size / train.micro_batch_tokens: their ranges, one of the two, and the attention
    the packed layout needs."""
    tr = cfg.train
    if tr.micro_batch_size is not None and tr.micro_batch_size < 1:
        raise ConfigError(f"train.micro_batch_size={tr.micro_batch_size}: must be >= 1 (or null for 64)")
    if tr.micro_batch_tokens < 0:
        raise ConfigError(
            f"train.micro_batch_tokens={tr.micro_batch_tokens}: must be >= 0 (0: micro_batch_size completions)"
        )
    if tr.micro_batch_tokens and tr.micro_batch_size is not None:
        raise ConfigError(
            f"train.micro_batch_tokens={tr.micro_batch_tokens} replaces train.micro_batch_size="
            f"{tr.micro_batch_size}: set one of them (micro_batch_size=null with a token budget)"
        )
    attn = cfg.model.attn_implementation or ""
    if tr.micro_batch_tokens and cfg.model.gradient_checkpointing and not attn.startswith("flash"):
        raise ConfigError(
            f"train.micro_batch_tokens={tr.micro_batch_tokens} with model.gradient_checkpointing=true needs "
            "model.attn_implementation=flash_attention_2 (the sdpa/eager packed rows read each prompt's "
            "key/value cache, which checkpointing drops): set train.micro_batch_tokens=0 or turn "
            "checkpointing off"
        )


def _validate_servers(ro: Any, algo: Any) -> None:
    """rollout.engine=vllm-server: its URLs, each answering now (before any model loads)."""
    if ro.max_staleness < 0:
        raise ConfigError(f"rollout.max_staleness={ro.max_staleness}: must be >= 0 (0: on-policy)")
    if ro.max_staleness and algo.dynamic_sampling:
        raise ConfigError(
            f"rollout.max_staleness={ro.max_staleness} with algo.dynamic_sampling=true: not supported (a "
            "step's extra sampling rounds would overlap the update); use one or the other"
        )
    if ro.engine != "vllm-server":
        if ro.max_staleness:
            raise ConfigError(
                f"rollout.max_staleness={ro.max_staleness} needs rollout.engine=vllm-server (generation "
                f"overlaps training only where it runs elsewhere); rollout.engine={ro.engine} alternates"
            )
        return
    if not ro.servers:
        raise ConfigError(
            "rollout.engine=vllm-server needs rollout.servers: start one with `grpo serve --port 8000` "
            "and pass rollout.servers='[http://127.0.0.1:8000]'"
        )
    for key in ("request_timeout", "sync_timeout"):
        if not getattr(ro, key) > 0:
            raise ConfigError(f"rollout.{key}={getattr(ro, key)}: must be > 0 (seconds)")
    for url in ro.servers:
        if not str(url).startswith(("http://", "https://")):
            raise ConfigError(f"rollout.servers: {url!r} is not an http(s) URL, e.g. http://127.0.0.1:8000")
        if why := reachable(str(url)):
            raise ConfigError(f"rollout.servers: {why} (is `grpo serve` running there?)")


def _validate_env(env: Any) -> None:
    """The episode keys (``env``): names, budgets and the failed-call policy."""
    if env._target_ is None and env.name not in ("none", *ENVS):
        raise ConfigError(f"env.name={env.name!r} is not allowed; choose one of: none, {', '.join(ENVS)}")
    for key in ("max_turns", "max_tool_tokens"):
        if getattr(env, key) < 1:
            raise ConfigError(f"env.{key}={getattr(env, key)}: must be >= 1")
    if env.max_episode_tokens is not None and env.max_episode_tokens < 1:
        raise ConfigError(f"env.max_episode_tokens={env.max_episode_tokens}: must be >= 1 (or null)")
    if env.timeout_s <= 0:
        raise ConfigError(f"env.timeout_s={env.timeout_s}: must be > 0")
    if env.on_error not in ("observe", "end"):
        raise ConfigError(f"env.on_error={env.on_error!r} is not allowed; choose one of: observe, end")
    if env._target_ is None and env.name == "openenv" and not env.openenv:  # before any model loads
        raise ConfigError("env=openenv needs env.openenv=module:Class, the OpenEnv Environment class to run")


def _validate_updates_per_batch(tr: Any, algo: Any) -> None:
    """algo.steps_per_generation, train.lr_schedule and train.min_lr_ratio."""
    if tr.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(
            f"train.lr_schedule={tr.lr_schedule!r} is not allowed; choose one of: {', '.join(LR_SCHEDULES)}"
        )
    if not 0 <= tr.min_lr_ratio <= 1:
        raise ConfigError(f"train.min_lr_ratio={tr.min_lr_ratio}: must be in [0, 1] (a fraction of train.lr)")
    k, ranks = algo.steps_per_generation, max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    groups = tr.prompts_per_step // ranks  # each rank splits its own share (the rank check comes later)
    if k < 1 or groups % k:
        per_rank = f" per rank ({ranks} ranks)" if ranks > 1 else ""
        raise ConfigError(
            f"algo.steps_per_generation={k}: must be >= 1 and divide the {groups} groups of a "
            f"step{per_rank} (train.prompts_per_step={tr.prompts_per_step}): each optimizer step takes whole groups"
        )


def _validate_robustness(cfg: Any) -> None:
    """Checkpointing, guards, dynamic sampling and logging fields of a train config."""
    tr, algo = cfg.train, cfg.algo
    check_trackers(tr.logger)  # a known name whose extra is installed
    for key in ("save_every", "eval_every", "eval_problems", "log_completions_every"):
        if getattr(tr, key) < 0:
            raise ConfigError(f"train.{key}={getattr(tr, key)}: must be >= 0 (0 turns it off)")
    if tr.keep_checkpoints < 0:
        raise ConfigError(
            f"train.keep_checkpoints={tr.keep_checkpoints}: must be >= 0 (0 keeps every checkpoint)"
        )
    if tr.strategy not in STRATEGIES:
        raise ConfigError(
            f"train.strategy={tr.strategy!r} is not allowed; choose one of: {', '.join(STRATEGIES)}"
        )
    if tr.strategy == "fsdp" and cfg.lora.enabled:
        raise ConfigError(
            "train.strategy=fsdp shards full fine-tuning; with LoRA use train.strategy=ddp (or lora=none)"
        )
    if tr.max_bad_steps < 1:
        raise ConfigError(f"train.max_bad_steps={tr.max_bad_steps}: must be >= 1")
    if not 0 <= tr.zero_std_warn <= 1:
        raise ConfigError(f"train.zero_std_warn={tr.zero_std_warn}: must be in [0, 1]")
    if algo.max_sampling_rounds < 1:
        raise ConfigError(f"algo.max_sampling_rounds={algo.max_sampling_rounds}: must be >= 1")
    if not 0 <= algo.overlong_buffer <= cfg.rollout.max_new_tokens:
        raise ConfigError(
            f"algo.overlong_buffer={algo.overlong_buffer}: must be in [0, rollout.max_new_tokens="
            f"{cfg.rollout.max_new_tokens}] (0 turns overlong shaping off)"
        )
    if algo.overlong_penalty < 0:
        raise ConfigError(f"algo.overlong_penalty={algo.overlong_penalty}: must be >= 0")


def validate_eval(cfg: Any) -> None:
    """Checks of an EvalRoot's eval fields, run by ``grpo eval`` before any model loads (ConfigError)."""
    ev = cfg.eval
    if ev.samples < 1:
        raise ConfigError(f"eval.samples={ev.samples}: must be >= 1")
    if ev.temperature <= 0:
        raise ConfigError(
            f"eval.temperature={ev.temperature}: must be > 0 (eval.greedy=true adds greedy decoding)"
        )
    if ev.problems is not None and ev.problems < 1:
        raise ConfigError(f"eval.problems={ev.problems}: must be >= 1 (null evaluates the whole split)")
    if ev.bootstrap < 1:
        raise ConfigError(f"eval.bootstrap={ev.bootstrap}: must be >= 1")
    if ev.k is not None and (not ev.k or any(k < 1 for k in ev.k)):
        raise ConfigError(f"eval.k={list(ev.k)}: needs one or more K >= 1")
    single = cfg.checkpoint or ev.checkpoint
    if single and ev.checkpoints:
        raise ConfigError(
            "checkpoint= and eval.checkpoints= both given; list every checkpoint in eval.checkpoints"
        )
    if ev.completions is not None:
        if single or ev.checkpoints:
            raise ConfigError(
                "eval.completions= scores a file without a model; drop checkpoint= / eval.checkpoints="
            )
        if not Path(ev.completions).is_file():
            raise ConfigError(f"eval.completions={ev.completions}: no such file")
        return  # k is checked against the completions per problem once the file is read
    if ev.k is not None and max(ev.k) > ev.samples:  # a K the user chose; the default is trimmed
        raise ConfigError(
            f"eval.k={list(ev.k)}: K={max(ev.k)} exceeds eval.samples={ev.samples} (need K <= n)"
        )
    for name in list(ev.checkpoints) or [single]:
        if name in (None, "base") or (Path(name) / MANIFEST).is_file():
            continue  # one with a manifest is checked file by file when eval starts (run.saved)
        checkpoint_kind(name)


def validate_export(cfg: Any) -> None:
    """Checks of an ExportRoot's keys, run by ``grpo export`` before any model loads (ConfigError).

    An ``out`` that holds anything is refused: an export never overwrites (nor mixes its files with)
    what is there. A checkpoint with a manifest is checked file by file when the export starts.
    """
    if not cfg.checkpoint:
        raise ConfigError(
            "checkpoint= is required: grpo export checkpoint=outputs/<run>/checkpoint-N out=DIR"
        )
    if not cfg.out:
        raise ConfigError(f"out= is required: grpo export checkpoint={cfg.checkpoint} out=DIR")
    if cfg.dtype not in EXPORT_DTYPES:
        raise ConfigError(f"dtype={cfg.dtype!r} is not allowed; choose one of: {', '.join(EXPORT_DTYPES)}")
    out = Path(cfg.out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(
            f"out={cfg.out}: exists and is not empty; name a new directory (nothing was written)"
        )
    if not (Path(cfg.checkpoint) / MANIFEST).is_file():
        checkpoint_kind(cfg.checkpoint)


def check_model_path(name_or_path: str) -> None:
    """A local path must exist; a hub id must be cached or the hub reachable. One-line error otherwise."""
    if name_or_path in EMBEDDED:
        return
    path = Path(name_or_path).expanduser()
    if path.exists():
        try:
            checkpoint_kind(path)
        except ConfigError:
            raise ConfigError(f"model.name_or_path={name_or_path}: directory has no config.json") from None
        return
    is_hub_id = name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~"))
    if not is_hub_id:
        raise ConfigError(f"model.name_or_path={name_or_path}: no such directory")
    # A hub id: fine if cached; otherwise only if the hub is allowed.
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name_or_path, "config.json")
    if isinstance(cached, str):
        return
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise ConfigError(
            f"model.name_or_path={name_or_path}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
            "download it first or point model.name_or_path at a local directory"
        )
    try:
        from huggingface_hub import HfApi

        HfApi().model_info(name_or_path, timeout=10)
    except Exception as exc:  # noqa: BLE001 - any failure means we cannot load it
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise ConfigError(
            f"model.name_or_path={name_or_path}: not cached and the hub cannot be reached ({reason}); "
            "download it on a connected machine or set model.name_or_path=/path/to/local/model"
        ) from None
