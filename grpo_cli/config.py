"""Config schema: one dataclass per group, registered with Hydra so a wrong type fails at compose time.

The YAML files under ``conf/`` hold values only; every key they may set is a field here, with one
line of help. ``commands.validate`` checks ranges and paths before any model loads and raises
``ConfigError`` with a single line that names the key and what it accepts; the CLI turns that into
exit code 2.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class ConfigError(ValueError):
    """A bad config value; its message is one line naming the key and the allowed values."""


# The values of the keys whose options are implemented in one place each (the tables are checked
# against these names by ``commands.validate``).
ENGINES = ("hf", "vllm", "vllm-server")  # rollout.engine
ENGINE_IS_LEVELS = ("token", "sequence")  # algo.engine_is.level
ENGINE_IS_MODES = ("truncate", "mask", "reject")  # algo.engine_is.mode
STRATEGIES = ("ddp", "fsdp")  # train.strategy

DEFAULT_MICRO_BATCH_SIZE = 64  # train.micro_batch_size=null

# Keys a config or a command line may still name, and their successors: an old key is a one-line error
# that names the new one (``renamed``), never a silent alias.
RENAMED = {
    "data.num_train": "data.train_size",
    "data.size": "data.train_size",
    "data.num_test": "data.test_size",
    "data.level": "data.difficulty",
    "eval.limit": "eval.problems",
    "train.steps_per_generation": "algo.steps_per_generation",
    "rollout.server_timeout": "rollout.request_timeout",  # split: the weight sync's is sync_timeout
}
# What else a renamed key's line says: a key split in two names its other half too.
RENAMED_NOTES = {
    "rollout.server_timeout": "one generation request; the weight sync's limit is now rollout.sync_timeout",
}


def renamed(key: str | None) -> str | None:
    """The error line for a key that was renamed (``RENAMED``), or None for any other key."""
    if key in RENAMED:
        note = f" ({RENAMED_NOTES[key]})" if key in RENAMED_NOTES else ""
        return f"{key} was renamed: use {RENAMED[key]}{note}"
    return None


@dataclass
class ModelConfig:
    # "tiny" is the embedded model ("tiny-tools" its calculator variant, "tiny-rg" its reasoning-gym
    # chain_sum variant), built on first use under $GRPO_HOME; otherwise a hub id or a path.
    name_or_path: str = "tiny"
    # float32, bfloat16 (bf16 matmuls; log-softmax, loss and LoRA adapters stay float32; see
    # docs/configuration.md#bfloat16) or float16; auto: bfloat16 on CUDA, float32 on CPU.
    dtype: str = "auto"
    # auto: cuda if available, else cpu.
    device: str = "auto"
    # transformers attention implementation (sdpa, eager, flash_attention_2); null keeps the model's default.
    attn_implementation: str | None = "sdpa"
    # Wrap prompts in the tokenizer's chat template (instruct models).
    chat_template: bool = False
    # With chat_template: the system turn's text; null leaves the template's own default (Qwen2.5's).
    system_prompt: str | None = None
    # Trade compute for memory in the training forward pass.
    gradient_checkpointing: bool = False
    # Let transformers run the model's own code from its repository (architectures it does not ship).
    trust_remote_code: bool = False


@dataclass
class LoraConfig:
    # false: full fine-tuning (lora=none).
    enabled: bool = True
    # Rank of the adapter matrices.
    r: int = 16
    # Scale of the adapter's update: alpha / r (peft's lora_alpha).
    alpha: int = 32
    # Dropout on the adapter's input during training.
    dropout: float = 0.0
    # "all-linear" or a list of module names.
    target_modules: Any = "all-linear"


@dataclass
class EngineISConfig:
    # Importance weight w = pi_old / mu of each token's surrogate, for the engine/trainer mismatch and
    # (rollout.max_staleness >= 1) for samples drawn by older weights. null: off (w = 1).
    cap: float | None = None
    # token: w per token; sequence: one w per completion, exp of the summed log-ratio over its tokens.
    level: str = "token"
    # truncate: clip(w, low, cap) (TIS); mask: no loss where w is outside [low, cap] (MIS; IcePop); reject: see statistic.
    mode: str = "truncate"
    # Lower bound on w: with mode=mask a two-sided mask (IcePop, Ring-1T arXiv 2510.18855; TRL clip_min); null: none.
    low: float | None = None
    # mode=reject (level=sequence): a completion whose statistic of log pi_old/mu (sum, geo_mean, mean_k3;
    # verl's rollout_rs seq_sum_k1, seq_mean_k1, seq_mean_k3) is outside [low, cap] leaves the step's loss.
    statistic: str = "sum"


@dataclass
class AlgoConfig:
    """The loss family. Field names are the ones ``core.loss.policy_loss`` reads."""

    # G: completions sampled per prompt (DeepSeekMath: 64; the seed default 8).
    group_size: int = 8
    # epsilon: lower clip range of the ratio (PPO/GRPO 0.2).
    epsilon: float = 0.2
    # Upper clip range; null means epsilon (DAPO's clip-higher uses 0.28).
    epsilon_high: float | None = None
    # beta: weight of KL(pi_theta || pi_ref) (DeepSeekMath 0.04; 0 skips the reference pass).
    beta: float = 0.04
    # KL estimator: k1 (log-ratio), k2 (squared log-ratio / 2), k3 (DeepSeekMath, unbiased, >= 0).
    kl_estimator: str = "k3"
    # seq_mean_token_mean (GRPO), token_mean (DAPO), seq_mean_token_sum_norm (Dr. GRPO).
    aggregation: str = "seq_mean_token_mean"
    # token: one ratio per token; sequence: GSPO's length-normalised sequence ratio.
    importance_level: str = "token"
    # Advantage: group (GRPO), rloo (arXiv 2402.14740), opo (2505.23585), passk (2505.15201), reinforce_pp(_baseline) (2501.03262).
    advantage: str = "group"
    # k of algo.advantage=passk, 2 <= k <= group_size; null: group_size (verl grpo_passk, arXiv 2503.19595).
    passk_k: int | None = None
    # Advantage scale: group (std of the group), batch (std of the batch), none (Dr. GRPO).
    scale_rewards: str = "group"
    # Surrogate (arXiv): clip (PPO/GRPO), cispo 2506.13585, sapo 2511.20347, gpg 2504.02546, clip_cov / kl_cov 2505.22617, geo_mean (GMPO) 2507.20673.
    objective: str = "clip"
    # SAPO's gate temperature for A > 0 (arXiv 2511.20347: 1.0; verl tau_pos).
    tau_pos: float = 1.0
    # SAPO's gate temperature for A <= 0 (arXiv 2511.20347: 1.05; verl tau_neg).
    tau_neg: float = 1.05
    # Clip-Cov: fraction of the step's tokens cut out of the gradient (arXiv 2505.22617; verl 2e-4).
    clip_cov_ratio: float = 0.0002
    # Clip-Cov: candidates have clip_cov_lb < Cov(log pi, A) < clip_cov_ub; the lower bound (verl 1.0).
    clip_cov_lb: float = 1.0
    # Clip-Cov: the upper bound of the candidates' covariance window (verl 5.0).
    clip_cov_ub: float = 5.0
    # KL-Cov: fraction of the step's tokens, those of largest covariance, given the |log rho| penalty (verl 2e-4).
    kl_cov_ratio: float = 0.0002
    # KL-Cov: weight of that penalty (arXiv 2505.22617; verl ppo_kl_coef 0.1).
    ppo_kl_coef: float = 0.1
    # Dual-clip bound c > 1 on rho for A < 0 (Ye et al. arXiv 1912.09729; verl clip_ratio_c 3.0); null: off.
    clip_ratio_c: float | None = None
    # Two-sided clip: upper bound on rho for A < 0, > 1 + epsilon_high (INTELLECT-2 arXiv 2505.07291; TRL delta); null: off.
    delta: float | None = None
    # Entropy bonus: loss -= entropy_coef * entropy, aggregated like the policy term (verl entropy_coeff); 0: off.
    entropy_coef: float = 0.0
    # Policy gradient only on tokens at or above this top fraction of the step's entropies (arXiv 2506.01939: 0.2); 1: all.
    top_entropy_quantile: float = 1.0
    # Completions that hit the token budget without EOS get no loss and count in no denominator (TRL mask_truncated_completions).
    mask_truncated: bool = False
    # mu: policy updates per rollout batch (GRPO iterations); 1 keeps training on-policy.
    num_iterations: int = 1
    # k optimizer steps per pass over a rollout batch, each on 1/k of its groups (TRL's
    # steps_per_generation); must divide the step's groups (per rank). pi_old is the sampling policy
    # throughout; mu x k optimizer steps per batch (commands/update.py).
    steps_per_generation: int = 1
    # Dr. GRPO's constant divisor; null means rollout.max_new_tokens.
    max_completion_length: int | None = None
    # DAPO dynamic sampling: resample prompts until the batch holds informative groups.
    dynamic_sampling: bool = False
    # At most this many rollout rounds per step when dynamic_sampling is on.
    max_sampling_rounds: int = 3
    # DAPO overlong shaping: the last N tokens before rollout.max_new_tokens cost a linear penalty (0: off).
    overlong_buffer: int = 0
    # Penalty at rollout.max_new_tokens (DAPO: 1.0), reached linearly across the buffer.
    overlong_penalty: float = 1.0
    # The behaviour-policy correction: pi_old (the trainer's recomputed log-probs, the proximal policy)
    # over mu (the engine's, which sampled); see EngineISConfig and core/loss.py.
    engine_is: EngineISConfig = field(default_factory=EngineISConfig)


@dataclass
class RolloutConfig:
    # Completion length cap; conf/{train,sample,eval}.yaml set it to ${data.max_new_tokens}, the data
    # group's default (arithmetic 16, gsm8k 512, ...), which rollout.max_new_tokens=N overrides.
    max_new_tokens: int = 16
    # Sampling temperature of training rollouts and of the held-out evaluation's samples.
    temperature: float = 1.0
    # 1.0 disables nucleus sampling.
    top_p: float = 1.0
    # 0 disables top-k.
    top_k: int = 0
    # After temperature, drop tokens whose probability is below min_p x the most likely one's (vLLM's
    # order: min_p, then top-k, top-p); 0.0 disables. Both engines; docs/configuration.md#sampling.
    min_p: float = 0.0
    # Completions decoded together at most (a multiple of group_size keeps groups whole).
    batch_size: int = 256
    # Who samples: hf (the trainer's model, our prefix-shared loop) or vllm (colocated vLLM, weights
    # pushed once per step; `make install-vllm`) or vllm-server (servers of its own: `grpo serve`).
    engine: str = "hf"
    # vllm: longest prompt + completion; null: the run's longest prompt + max_new_tokens.
    max_model_len: int | None = None
    # vllm: KV cache bytes; null: what batch_size sequences of max_model_len tokens need.
    kv_cache_bytes: int | None = None
    # vllm on CUDA: free the engine's weights and KV cache between rollouts (enable_sleep_mode).
    sleep: bool = True
    # vllm-server: the servers' URLs (`grpo serve`), e.g. [http://10.0.0.2:8000]; groups are spread over them.
    servers: list[str] = field(default_factory=list)
    # vllm-server: seconds a server may take to answer one generation request (a group's completions).
    # A server that dies or hangs is found sooner, by health probes beside every call (docs/engines.md).
    request_timeout: float = 600.0
    # vllm-server: seconds each collective of the weight group (one tensor's broadcast, the group's
    # forming) and each sync call may take; a peer that fails ends the sync at once.
    sync_timeout: float = 60.0
    # Rollouts generated ahead while the policy trains: no trained sample was drawn by weights more than
    # this many optimizer steps old (0: strictly on-policy, generation and update alternate).
    max_staleness: int = 0


@dataclass
class DataConfig:
    # Source: arithmetic, gsm8k, math500, humaneval, jsonl (also .parquet files), reasoning_gym.
    name: str = "arithmetic"
    # Local file (jsonl / parquet); for gsm8k and math500, null falls back to the hub dataset.
    path: str | None = None
    # The test split's size. path is one file (jsonl, gsm8k, math500): rows held out of it, a count (>= 1)
    # or a fraction (< 1), drawn with a fixed seed; 0 uses every row for every split (data/split.py).
    # Generated sources (arithmetic, reasoning_gym): the held-out problems generated, a count >= 1.
    # null: 0.1 of a file, 500 generated problems.
    test_size: float | None = None
    # A held-out file for the test split (then path is read whole for training).
    test_path: str | None = None
    # Hub dataset id used when path is null.
    hub_id: str | None = None
    # The hub dataset's configuration name (gsm8k: "main").
    hub_config: str | None = None
    # The split grpo train trains on.
    train_split: str = "train"
    # The split the in-training held-out evaluation samples (grpo eval and sample name theirs).
    test_split: str = "test"
    # The row field holding the question (jsonl, parquet).
    question_field: str = "question"
    # The row field holding the reference answer.
    answer_field: str = "answer"
    # The row field holding a stable problem id; null: the row's index.
    id_field: str | None = None
    # Prompt text; {question} is replaced by the row's question.
    template: str = "{question}"
    # The default of rollout.max_new_tokens for this data: room for a typical solution.
    max_new_tokens: int = 256
    # Generated sources (arithmetic, reasoning_gym): the training problems generated (arithmetic: at most).
    train_size: int = 20000
    # Synthetic arithmetic only: operators per problem and the largest operand.
    max_operators: int = 2
    # Synthetic arithmetic only: the largest operand.
    max_operand: int = 9
    # reasoning_gym only (data/reasoning_gym.py, docs/data.md). The task: a name, a list of names (equal
    # weights) or a mapping name -> weight.
    task: Any = None
    # The generator's seed: training problems from item seeds seed .. seed+size-1, held-out ones after.
    seed: int = 0
    # The task's own config keys, passed through ({max_terms: 3}; with several tasks, task -> keys).
    task_config: Any = None
    # Curriculum: the task's difficulty attributes at this level (an int for all, or attribute -> level;
    # null: the task's defaults); task_config wins for the keys it names. Stages: docs/data.md.
    difficulty: Any = None


@dataclass
class EnvConfig:
    """Episodes: one turn (none), or turns in which the model calls a tool and reads its result."""

    # none (single turn), calc (a calculator for the embedded tiny model), python (a sandboxed
    # interpreter), openenv (an OpenEnv environment, in-process), or a user's environment class given as
    # env._target_=my_pkg.MyEnv (grpo_cli/envs/__init__.py has the protocol).
    name: str = "none"
    # A user's environment class, module.Class (then env.name is only its label).
    _target_: str | None = None
    # Model turns per episode at most (each tool result starts a new one).
    max_turns: int = 4
    # Tokens after the prompt, model and tool tokens together; null: rollout.max_new_tokens.
    max_episode_tokens: int | None = None
    # A tool result longer than this is cut, ending in a marker.
    max_tool_tokens: int = 64
    # Wall-clock seconds one tool call may take.
    timeout_s: float = 5.0
    # A failed call (malformed, raised, timed out): observe (the error goes back to the model) or end.
    on_error: str = "observe"
    # false: the model may not open a call (its call token is never sampled): the tool forbidden, to
    # measure what the tool adds.
    allow_calls: bool = True
    # env=openenv: the OpenEnv Environment class, module:Class (or module.Class), run in this process.
    openenv: str | None = None
    # env=openenv: keyword arguments that class is built with, one instance per episode.
    openenv_args: dict[str, Any] = field(default_factory=dict)
    # env=openenv: the Action field a model turn's text fills; null: the turn is a JSON object of the
    # action's fields.
    action_field: str | None = None
    # env=openenv: strings that end a model turn and send it to the environment, each one token of the
    # tokenizer; empty: the tokenizer's EOS (then only the environment, max_turns or the budget ends it).
    turn_stops: list[str] = field(default_factory=list)


@dataclass
class RewardConfig:
    # List of rules: {name, _target_, weight, ...kwargs}; see grpo_cli/rewards/__init__.py.
    rules: list[Any] = field(default_factory=list)


@dataclass
class TrainConfig:
    """The defaults are the embedded demo's: 300 steps of 16 x 8 completions visibly raise the tiny
    model's held-out accuracy in a few CPU minutes (the README has the numbers)."""

    # Steps to train: rollout batches, each of train.prompts_per_step groups (mu x k optimizer steps each).
    steps: int = 300
    # Prompts per step; each yields group_size completions.
    prompts_per_step: int = 16
    # AdamW learning rate (suits LoRA; full fine-tuning of larger models wants ~1e-6).
    lr: float = 3e-4
    # Linear warm-up over this many steps (from lr / (warmup_steps + 1)), then train.lr_schedule.
    warmup_steps: int = 10
    # AdamW's decoupled weight decay.
    weight_decay: float = 0.0
    # AdamW's beta1 (first-moment decay).
    adam_beta1: float = 0.9
    # AdamW's beta2 (second-moment decay; 0.99 as TRL and verl ship for RL).
    adam_beta2: float = 0.99
    # Gradients clipped to this global norm before each optimizer step.
    max_grad_norm: float = 1.0
    # Completions per forward/backward pass, padded to the widest (null: 64); gradients accumulate over the
    # step's batch. Set this or micro_batch_tokens, not both.
    micro_batch_size: int | None = None
    # > 0: micro-batches by a token budget instead of micro_batch_size (prompts once per group,
    # completions unpadded, packed side by side with attention kept inside each sequence). 0: off.
    micro_batch_tokens: int = 0
    # A checkpoint every N steps (0: only at the end and when stopped early).
    save_every: int = 0
    # Held-out evaluation at step 0, every eval_every steps and at the last step; 0: none at all.
    eval_every: int = 100
    # With eval_every=0: still evaluate at step 0 and the last step (before/after numbers only).
    eval_at_ends: bool = False
    # Held-out problems of the in-training evaluation (0: none); eval.problems is grpo eval's.
    eval_problems: int = 200
    # Sampled completions per held-out problem (its eval/accuracy); eval.samples is grpo eval's.
    eval_samples: int = 4
    # Newest checkpoints kept in the run dir (0 keeps all).
    keep_checkpoints: int = 2
    # null, "auto" (newest checkpoint in the run dir) or a checkpoint path.
    resume: str | None = None
    # Every N steps the step's completions go to completions.jsonl (0: never).
    log_completions_every: int = 10
    # Stop after this many consecutive steps with a non-finite loss or gradient.
    max_bad_steps: int = 5
    # Warn when the fraction of zero-variance groups stays above this.
    zero_std_warn: float = 0.9
    # Run trackers, a list (or one name): jsonl (metrics.jsonl, always written), tensorboard, wandb,
    # mlflow; each but jsonl is an optional extra (grpo_cli/run/trackers.py, docs/trackers.md).
    logger: Any = field(default_factory=lambda: ["jsonl"])
    # After warm-up: constant, or linear / cosine decay to lr * min_lr_ratio at train.steps (TRL's
    # lr_scheduler_type, verl's min_lr_ratio); the schedule counts steps (rollout batches).
    lr_schedule: str = "constant"
    # The decay's floor, a fraction of lr (linear / cosine only).
    min_lr_ratio: float = 0.0
    # Under torchrun with several ranks: ddp (each rank holds the model) or fsdp (full fine-tuning,
    # parameters, gradients and optimizer state sharded). A single process ignores it.
    strategy: str = "ddp"


@dataclass
class SampleConfig:
    # Prompts to sample G completions for.
    prompts: int = 2
    # Which split to draw prompts from.
    split: str = "test"
    # The records' path; null: <run_dir>/samples.jsonl.
    out: str | None = None


@dataclass
class EvalConfig:
    # One checkpoint (LoRA adapter dir or full model dir); the root key checkpoint= is the short form.
    checkpoint: str | None = None
    # Several side by side, in order ("base" = the configured model); deltas are against the first.
    checkpoints: list[str] = field(default_factory=list)
    # Data split to evaluate on.
    split: str = "test"
    # Only the first N problems of the split (null: all); train.eval_problems is grpo train's.
    problems: int | None = None
    # n: completions sampled per problem.
    samples: int = 4
    # Sampling temperature of those n completions.
    temperature: float = 1.0
    # Also decode one greedy completion per problem (metrics greedy/pass@1, greedy/mean_reward, ...).
    greedy: bool = True
    # K of pass@K and maj@K; each must be <= samples. null: [1, 4], less the K above the samples per problem.
    k: list[int] | None = None
    # Bootstrap resamples (over problems, seeded by seed) for the 95% intervals.
    bootstrap: int = 1000
    # JSONL of {"id": problem id, "completion": text} to score without loading a model.
    completions: str | None = None
    # JSON results path; null: <run_dir>/eval.json (per-completion records: eval_completions.jsonl beside it).
    out: str | None = None


@dataclass
class _Common:
    model: ModelConfig = MISSING
    lora: LoraConfig = MISSING
    algo: AlgoConfig = MISSING
    data: DataConfig = MISSING
    reward: RewardConfig = MISSING
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    # The run's seed: weights' initialisation, prompt order, every sampling stream (runtime/rng.py).
    seed: int = 0
    # console output: rich (live panel) or plain (one line per step).
    console: str = "rich"


@dataclass
class TrainRoot(_Common):
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class SampleRoot(_Common):
    sample: SampleConfig = field(default_factory=SampleConfig)


@dataclass
class EvalRoot(_Common):
    eval: EvalConfig = field(default_factory=EvalConfig)
    # grpo eval checkpoint=PATH: a LoRA adapter dir or a full model dir (same as eval.checkpoint).
    checkpoint: str | None = None


EXPORT_DTYPES = ("float32", "bfloat16", "float16", "auto")


@dataclass
class ExportRoot(_Common):
    # grpo export checkpoint=PATH out=DIR: the checkpoint to export (a LoRA adapter dir or a full model dir).
    checkpoint: str | None = None
    # grpo export out=DIR: the plain transformers model directory to write; must not exist, or be empty.
    out: str | None = None
    # grpo export dtype=: the weights in out as float32, bfloat16, float16, or auto (the base model's own).
    dtype: str = "auto"


def register() -> None:
    """Register the schemas with Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainRoot)
    cs.store(name="sample_schema", node=SampleRoot)
    cs.store(name="eval_schema", node=EvalRoot)
    cs.store(name="export_schema", node=ExportRoot)


def conf_dir() -> Path:
    """The conf/ tree: inside the installed package, else beside it in a source checkout."""
    here = Path(__file__).resolve().parent
    for cand in (here / "conf", here.parent / "conf"):
        if (cand / "train.yaml").is_file():
            return cand
    raise ConfigError(f"conf/ not found next to {here}; reinstall grpo-cli")


def grpo_home() -> Path:
    return Path(os.environ.get("GRPO_HOME", Path.home() / ".cache" / "grpo-cli"))


def get_key(node: Any, dotted: str) -> Any:
    """The value at a dotted key (``"algo.engine_is.cap"``) of a config object or a plain dict tree;
    KeyError or AttributeError when a part is missing."""
    for part in dotted.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def set_key(node: Any, dotted: str, value: Any) -> None:
    """Set a dotted key of a config object."""
    *parents, leaf = dotted.split(".")
    setattr(get_key(node, ".".join(parents)) if parents else node, leaf, value)


def override_key(override: str) -> str | None:
    """The dotted key a command-line override sets (``key=v``, ``+key=v``, ``++key=v``, ``~key``);
    None for a word that sets no key (a flag)."""
    if override.startswith("-"):
        return None
    if "=" not in override and not override.startswith("~"):
        return None
    return override.split("=", 1)[0].lstrip("+~")


def hydra_overrides() -> list[str]:
    """The overrides Hydra parsed for this job ([] outside a Hydra run, e.g. in tests)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config container as dotted keys -> leaf values (``{"algo": {"beta": 0.04}}`` ->
    ``{"algo.beta": 0.04}``); lists are leaves."""
    if not isinstance(node, dict):
        return {prefix[:-1]: node}
    out: dict[str, Any] = {}
    for k, v in node.items():
        out.update(leaves(v, f"{prefix}{k}."))
    return out
