"""``grpo eval``: pass@1, unbiased pass@k, maj@k, mean reward per rule, with 95% intervals.

    grpo eval                                                     # the configured base model
    grpo eval checkpoint=outputs/<date>/<time>/checkpoint-200     # a LoRA adapter dir or a full model dir
    grpo eval 'eval.checkpoints=[base,outputs/run/checkpoint-100,outputs/run/checkpoint-200]'
    grpo eval eval.completions=samples.jsonl data=math500         # score completions made elsewhere
    grpo eval data=gsm8k data.path=../shared/data/gsm8k eval.limit=100 eval.samples=16 'eval.k=[1,4,16]'

For every checkpoint, ``eval.samples`` = n completions per problem are sampled at ``eval.temperature``,
plus one greedy completion per problem when ``eval.greedy=true``, by the held-out evaluation
``grpo train`` runs (``commands.heldout``): problem i samples from its own stream, seeded by ``seed``
and i, so every checkpoint sees the same streams, and a run's checkpoint evaluated with the run's
held-out settings (``eval.limit=<train.eval_problems> eval.samples=<train.eval_samples>``; ``seed``
is the run's) reports as ``pass@1`` the run's own ``eval/accuracy`` at that step, exactly. A
completion is *correct* when the first reward rule scores it 1.0.

Metrics (keys of ``metrics``; ``commands.eval_metrics`` computes them):

- ``pass@1``: mean correctness (per problem c/n, averaged over problems);
- ``pass@K`` for K in ``eval.k``: the unbiased estimator 1 - C(n-c, K) / C(n, K) (Chen et al. 2021);
- ``maj@K`` for K > 1 in ``eval.k``: majority vote over the answers of the first K completions.
  Answers are ``rewards.math.extract_answer``'s (plain numbers compared by value: ``1,000`` = ``1000.0``),
  for a code rule the extracted program text. Completions without an answer do not vote; with no votes
  the problem counts as wrong. **Tie rule: among the answers with the most votes, the one that
  appears first in sample order wins**; the vote is correct when the first completion giving that
  answer is correct;
- ``mean_reward`` (weighted total) and ``reward/<rule>`` per rule: means over judged completions;
- ``extracted``: fraction of completions with an answer; ``completion_len``: mean tokens (EOS
  included; absent for ``eval.completions``, where no tokenizer is loaded);
- ``greedy/<metric>``: the same for the greedy completion (n = 1);
- ``delta_pass@1``: pass@1 of this checkpoint minus the first one's (checkpoints after the first).

Intervals (``ci95``): percentile bootstrap over problems with ``eval.bootstrap`` resamples seeded by
``seed``, for every pass@K and maj@K (and greedy/pass@1); ``delta_pass@1``'s is paired (the same
resampled problems for both checkpoints).

Output: a table (checkpoints as rows; differences from the first row in green / red), and

    <eval.out, default <run_dir>/eval.json>:
    {"results": [{"checkpoint": "base", "n": 4,
                  "metrics": {"pass@1": 0.41, "pass@4": 0.78, "maj@4": 0.52, "mean_reward": 0.41,
                              "reward/math": 0.41, "extracted": 0.97, "completion_len": 4.2,
                              "greedy/pass@1": 0.47, ...},
                  "ci95": {"pass@1": [0.37, 0.45], "pass@4": [...], "maj@4": [...], ...}},
                 {"checkpoint": "outputs/run/checkpoint-200", ..., "metrics": {..., "delta_pass@1": 0.12},
                  "ci95": {..., "delta_pass@1": [0.09, 0.15]}}]}

    <same folder>/eval_completions.jsonl, one line per completion:
    {"checkpoint": str, "id": str, "sample": int, "greedy": bool, "completion": str, "answer": str | null,
     "reward": float | null, "correct": bool, "rewards": {rule: float | null}, "tokens": int | null,
     "token_ids": [int], "model_mask": [0 | 1]}

``completion`` is the model's own words (with ``env=``, its turns without the tool's text): what the
rules judged. ``token_ids`` are the ids after the prompt, ``model_mask`` 1 where the model sampled one.

``eval.completions=FILE`` scores completions produced by any other system without loading a model:
one JSON object per line, ``{"id": ..., "completion": ...}``, ``id`` being the data group's problem id
(arithmetic and GSM8K: the row index; MATH-500: ``unique_id``; HumanEval: ``task_id``). n is the number
of lines per id; ``eval.limit`` keeps the first N ids of the file.
"""

from __future__ import annotations

import gc
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console

from grpo_cli.commands.eval_metrics import (
    Summary,
    answer_fn,
    default_ks,
    paired_delta,
    score_records,
    summarize,
)
from grpo_cli.commands.eval_table import legend, results_tables, with_damaged
from grpo_cli.commands.heldout import held_out_rollout
from grpo_cli.commands.validate import validate_eval
from grpo_cli.config import ConfigError, EvalRoot
from grpo_cli.data import load_rows
from grpo_cli.engines import Decoding, Engine, build_engine
from grpo_cli.envs.episode import EpisodeSpec, episode_spec, extra_tokens
from grpo_cli.models import Policy, check_adapter_base, load_policy
from grpo_cli.rewards import build_rewarder
from grpo_cli.rollout.generate import PromptFormat, longest_prompt, rule_rows
from grpo_cli.rollout.record import token_record
from grpo_cli.run.progress import GenerationProgress
from grpo_cli.run.saved import inherit, whole_checkpoints
from grpo_cli.runtime.logs import setup_logging

log = logging.getLogger("grpo_cli")


def generate_records(
    engine: Engine,
    policy: Policy,
    rows: list[dict],
    cfg: EvalRoot,
    rewarder: Any,
    greedy: bool,
    progress: GenerationProgress,
    label: str,
    spec: EpisodeSpec,
) -> list[dict[str, Any]]:
    """The held-out evaluation's completions of ``rows`` (``eval.samples`` each, or one greedy), scored,
    each with its ``token_ids`` and ``model_mask`` (and an episode's counters)."""
    n = 1 if greedy else cfg.eval.samples
    decoding = Decoding.of(cfg.rollout, greedy=greedy, temperature=cfg.eval.temperature)
    fmt = PromptFormat.of(cfg.data, cfg.model)
    args = (engine, policy, rows, fmt, cfg.rollout, n, decoding, cfg.seed, progress, label)
    ro = held_out_rollout(*args, spec=spec)
    samples = [i % n for i in range(len(ro.texts))]
    rows, lengths = rule_rows(ro), ro.lengths.tolist()
    records = score_records(ro.texts, rows, rewarder, answer_fn(rewarder), lengths, samples, greedy)
    for i, rec in enumerate(records):  # an episode's counters beside its scores (tool metrics)
        rec.update({k: v[i] for k, v in ro.episode_stats.items()})
        rec.update(token_record(ro, i))
    return records


def read_completions(
    path: str, rows: list[dict], limit: int | None, where: str
) -> tuple[list[str], list[dict]]:
    """Texts [N] and their rows [N] from a ``{"id", "completion"}`` JSONL file; ConfigError on a bad line.

    ``limit`` keeps the first ``limit`` distinct ids of the file; ``where`` names the data in errors.
    """
    by_id = {str(r["id"]): r for r in rows}
    texts, picked, kept = [], [], set()
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"eval.completions={path} line {lineno}: not JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or "id" not in obj or not isinstance(obj.get("completion"), str):
                raise ConfigError(
                    f'eval.completions={path} line {lineno}: expected {{"id": ..., "completion": "<text>"}}'
                )
            pid = str(obj["id"])
            if pid not in by_id:
                raise ConfigError(
                    f"eval.completions={path} line {lineno}: id {pid!r} is not a problem of {where}"
                )
            if pid not in kept and limit is not None and len(kept) >= limit:
                continue
            kept.add(pid)
            texts.append(obj["completion"])
            picked.append(by_id[pid])
    if not texts:
        raise ConfigError(f"eval.completions={path}: holds no completions")
    return texts, picked


# ------------------------------------------------------------------------------------------------
# Checkpoints -> results


def checkpoint_names(cfg: EvalRoot) -> list[str]:
    """The checkpoints to evaluate, in order; "base" is the configured model."""
    return list(cfg.eval.checkpoints) or [cfg.checkpoint or cfg.eval.checkpoint or "base"]


def check_checkpoints(cfg: EvalRoot, names: list[str]) -> None:
    """Every adapter must have been trained on the configured model: checked before any weights load."""
    for name in names:
        if name != "base":
            check_adapter_base(name, cfg.model.name_or_path)


def evaluate_checkpoint(
    name: str,
    cfg: EvalRoot,
    rows: list[dict],
    rewarder: Any,
    progress: GenerationProgress,
    spec: EpisodeSpec | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], EpisodeSpec]:
    """Sampled records (n per row) and greedy records (1 per row, or none) of one checkpoint, and the
    episodes' spec: ``spec`` when given (the command's one environment, built with the first
    checkpoint: every checkpoint shares the base model's tokenizer), else a new one the caller closes."""
    policy = load_policy(
        cfg.model, cfg.lora, beta=0.0, checkpoint=None if name == "base" else name, trainable=False
    )
    created, spec = spec is None, spec or episode_spec(cfg.env, policy, cfg.rollout)
    try:
        longest = longest_prompt(policy.tokenizer, rows, PromptFormat.of(cfg.data, cfg.model))
        longest += extra_tokens(cfg.env, cfg.rollout)  # an episode's budget beyond max_new_tokens
        engine = build_engine(policy, cfg.rollout, cfg.model, cfg.seed, longest)  # vllm: one for all, pushed
        try:
            args = (engine, policy, rows, cfg, rewarder)
            sampled = generate_records(*args, False, progress, f"{name}: sampling", spec)
            greedy = []
            if cfg.eval.greedy:
                greedy = generate_records(*args, True, progress, f"{name}: greedy", spec)
        finally:
            engine.close()
            del policy, engine
            gc.collect()
    except BaseException:
        if created:  # the caller never got it
            spec.close()
        raise
    return sampled, greedy, spec


def result_entry(
    name: str, sampled: list[dict], greedy: list[dict], ks: list[int], seed: int, n_boot: int
) -> tuple[dict[str, Any], Summary]:
    """The JSON entry of one checkpoint and its Summary (kept for the paired deltas)."""
    summary = summarize(sampled, ks, seed=seed, n_boot=n_boot)
    metrics, ci95 = dict(summary.metrics), dict(summary.ci95)
    if greedy:
        g = summarize(greedy, [1], seed=seed, n_boot=n_boot)
        metrics.update({f"greedy/{k}": v for k, v in g.metrics.items()})
        ci95["greedy/pass@1"] = g.ci95["pass@1"]
    return {"checkpoint": name, "n": summary.n, "metrics": metrics, "ci95": ci95}, summary


def add_deltas(results: list[dict[str, Any]], summaries: list[Summary], seed: int, n_boot: int) -> None:
    """``delta_pass@1`` and its paired interval for every checkpoint after the first (in place)."""
    for entry, summary in zip(results[1:], summaries[1:]):
        delta, (lo, hi) = paired_delta(summaries[0], summary, "pass@1", seed=seed, n_boot=n_boot)
        entry["metrics"]["delta_pass@1"] = delta
        entry["ci95"]["delta_pass@1"] = [lo, hi]


# ------------------------------------------------------------------------------------------------
# Output


def write_outputs(results: list[dict[str, Any]], records: list[dict[str, Any]], out: Path) -> Path:
    """eval.json at ``out`` and the per-completion JSONL beside it; returns the JSONL path."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"results": results}, indent=2) + "\n")
    jsonl = out.with_name(f"{out.stem}_completions.jsonl")
    with open(jsonl, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps({k: v for k, v in rec.items() if k != "vote"}) + "\n")
    return jsonl


# ------------------------------------------------------------------------------------------------
# Driver


def _command_line() -> list[str]:
    """The overrides Hydra parsed for this run ([] outside a Hydra run, e.g. in tests)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _score_file(cfg: EvalRoot, rows: list[dict], rewarder: Any) -> tuple[list[dict], list[dict]]:
    """Records from ``eval.completions``; checks every K against the completions per problem."""
    ev = cfg.eval
    where = f"data={cfg.data.name} split={ev.split}"
    texts, picked = read_completions(ev.completions, rows, ev.limit, where)
    counts: dict[str, int] = {}
    samples = []
    for row in picked:
        samples.append(counts.get(row["id"], 0))
        counts[row["id"]] = samples[-1] + 1
    fewest = min(counts, key=counts.__getitem__)
    if ev.k is not None and max(ev.k) > counts[fewest]:
        raise ConfigError(
            f"eval.k={list(ev.k)}: K={max(ev.k)} exceeds the {counts[fewest]} completions of id {fewest!r} "
            f"in {ev.completions}"
        )
    return score_records(texts, picked, rewarder, answer_fn(rewarder), samples=samples), []


def run(cfg: EvalRoot, run_dir: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Evaluate every checkpoint (or score ``eval.completions``); print the table, write JSON and JSONL.

    ``overrides``: the command line's (default: Hydra's); settings it leaves alone are taken from
    the checkpoint's saved run config (``saved_settings``).
    """
    setup_logging()
    validate_eval(cfg)
    ev = cfg.eval
    names = [ev.completions] if ev.completions else checkpoint_names(cfg)
    asked, damaged = names, {}
    if not ev.completions:
        names, damaged = whole_checkpoints(names)  # before anything of them is read
        inherit(cfg, names, _command_line() if overrides is None else overrides)
        check_checkpoints(cfg, names)
    rows = load_rows(cfg.data, ev.split)  # never empty (ConfigError)
    rewarder = build_rewarder(cfg.reward)
    results, summaries, all_records = [], [], []
    ks = list(ev.k) if ev.k is not None else None  # None: the default, trimmed to n below
    spec = None  # the command's one environment, closed when the command ends or fails
    try:
        with GenerationProgress(Console(stderr=True), live=cfg.console == "rich") as progress:
            for name in names:
                if ev.completions:  # eval.limit applies to the file's ids, not to the split's rows
                    sampled, greedy = _score_file(cfg, rows, rewarder)
                else:
                    sampled, greedy, spec = evaluate_checkpoint(
                        name, cfg, rows[: ev.limit], rewarder, progress, spec
                    )
                if ks is None:
                    ks = default_ks(min(Counter(str(r["id"]) for r in sampled).values()))
                entry, summary = result_entry(name, sampled, greedy, ks, cfg.seed, ev.bootstrap)
                results.append(entry)
                summaries.append(summary)
                all_records += [{"checkpoint": name, **r} for r in sampled + greedy]
    finally:
        rewarder.close()
        if spec is not None:
            spec.close()
    add_deltas(results, summaries, cfg.seed, ev.bootstrap)
    problems = len({r["id"] for r in all_records})
    console = Console()
    title = f"grpo eval: {problems} problems x {results[0]['n']} samples"
    results = with_damaged(results, asked, damaged)  # a row for each damaged checkpoint, in order
    for table in results_tables(results, title, console):
        console.print(table)
    for line in legend(results):  # the table's short labels; eval.json keeps the whole paths
        console.print(line, highlight=False, soft_wrap=True)
    out = Path(ev.out) if ev.out else Path(run_dir) / "eval.json"
    jsonl = write_outputs(results, all_records, out)
    log.info("results: %s; completions: %s", out, jsonl)
    return {"results": results}
