"""``grpo eval``: pass@1, unbiased pass@k, maj@k, mean reward per rule, with 95% intervals.

    grpo eval                                                     # the configured base model
    grpo eval checkpoint=outputs/<date>/<time>/checkpoint-200     # a LoRA adapter dir or a full model dir
    grpo eval 'eval.checkpoints=[base,outputs/run/checkpoint-100,outputs/run/checkpoint-200]'
    grpo eval eval.completions=samples.jsonl data=math500         # score completions made elsewhere
    grpo eval data=gsm8k data.path=../shared/data/gsm8k eval.problems=100 eval.samples=16 'eval.k=[1,4,16]'

For every checkpoint, ``eval.samples`` = n completions per problem are sampled at ``eval.temperature``,
plus one greedy completion per problem when ``eval.greedy=true``, by the held-out evaluation
``grpo train`` runs (``commands.heldout``): problem i samples from its own stream, seeded by ``seed``
and i, so every checkpoint sees the same streams, and a run's checkpoint evaluated with the run's
held-out settings (``eval.problems=<train.eval_problems> eval.samples=<train.eval_samples>``; ``seed``
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
    {"checkpoint": str, "id": str, "sample": int, "greedy": bool, "completion": str, "reference": str,
     "answer": str | null,
     "reward": float | null, "correct": bool, "rewards": {rule: float | null}, "tokens": int | null,
     "token_ids": [int], "model_mask": [0 | 1]}

``completion`` is the model's own words (with ``env=``, its turns without the tool's text): what the
rules judged; ``reference`` the row's, what they judged it against (``data.reference``: the gold
answer, for code the tested function's name); ``answer`` the completion's own, as maj@k reads it. ``token_ids`` are the ids after the prompt, ``model_mask`` 1 where the model sampled one.

``eval.completions=FILE`` scores completions produced by any other system without loading a model:
one JSON object per line, ``{"id": ..., "completion": ...}``, ``id`` being the data group's problem id
(arithmetic and GSM8K: the row index; MATH-500: ``unique_id``; HumanEval: ``task_id``). n is the number
of lines per id; ``eval.problems`` keeps the first N ids of the file.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console

from grpo_cli.commands.build import Run, build_run
from grpo_cli.commands.eval_metrics import (
    Summary,
    answer_fn,
    default_ks,
    paired_delta,
    score_records,
    summarize,
)
from grpo_cli.commands.eval_table import legend, results_tables, with_damaged
from grpo_cli.commands.heldout import held_out_rollout, held_out_seeds
from grpo_cli.commands.validate import validate_eval
from grpo_cli.config import ConfigError, EvalRoot, hydra_overrides
from grpo_cli.data import load_rows
from grpo_cli.engines import Decoding
from grpo_cli.models import check_adapter_base
from grpo_cli.rewards import build_rewarder
from grpo_cli.rollout.generate import rule_rows
from grpo_cli.rollout.record import token_record
from grpo_cli.run.progress import GenerationProgress
from grpo_cli.run.saved import inherit, whole_checkpoints
from grpo_cli.runtime.logs import setup_logging

log = logging.getLogger("grpo_cli")


def generate_records(r: Run, greedy: bool, progress: GenerationProgress, label: str) -> list[dict[str, Any]]:
    """The held-out evaluation's completions of the run's held-out rows (``eval.samples`` each, or one
    greedy) by the checkpoint loaded, scored, each with its ``token_ids`` and ``model_mask`` (and an
    episode's counters)."""
    cfg = r.cfg
    n = 1 if greedy else cfg.eval.samples
    decoding = Decoding.of(cfg.rollout, greedy=greedy, temperature=cfg.eval.temperature)
    seeds = held_out_seeds(cfg.seed, range(len(r.held_out)))
    ro = held_out_rollout(r.sampler, r.held_out, n, decoding, seeds, (progress, label))
    samples = [i % n for i in range(len(ro.texts))]
    rows, lengths = rule_rows(ro), ro.lengths.tolist()
    records = score_records(ro.texts, rows, r.rewarder, answer_fn(r.rewarder), lengths, samples, greedy)
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


def evaluate_checkpoint(r: Run, name: str, progress: GenerationProgress) -> tuple[list[dict], list[dict]]:
    """Sampled records (n per problem) and greedy records (1 per problem, or none) of the checkpoint
    the run has loaded (``name`` labels the progress bars)."""
    sampled = generate_records(r, False, progress, f"{name}: sampling")
    greedy = generate_records(r, True, progress, f"{name}: greedy") if r.cfg.eval.greedy else []
    return sampled, greedy


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


def _score_file(cfg: EvalRoot, rows: list[dict], rewarder: Any) -> tuple[list[dict], list[dict]]:
    """Records from ``eval.completions``; checks every K against the completions per problem."""
    ev = cfg.eval
    where = f"data={cfg.data.name} split={ev.split}"
    texts, picked = read_completions(ev.completions, rows, ev.problems, where)
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
    if ev.completions:
        asked = names = [ev.completions]
        damaged: dict[str, str] = {}
        rows = load_rows(cfg.data, ev.split)  # never empty (ConfigError)
        with build_rewarder(cfg.reward) as rewarder:
            sampled, greedy = _score_file(cfg, rows, rewarder)  # eval.problems: the file's ids
        results, summaries, all_records = _results(cfg, [(ev.completions, sampled, greedy)])
    else:
        asked = checkpoint_names(cfg)
        names, damaged = whole_checkpoints(asked)  # before anything of them is read
        inherit(cfg, names, hydra_overrides() if overrides is None else overrides)
        check_checkpoints(cfg, names)
        results, summaries, all_records = _results(cfg, _evaluated(cfg, names))
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


def _evaluated(cfg: EvalRoot, names: list[str]) -> list[tuple[str, list[dict], list[dict]]]:
    """(name, sampled, greedy) records of every checkpoint, in order, on one run: the rows, the
    episodes and the reward rules are built once; each checkpoint replaces the policy and its engine."""
    out = []
    with (
        build_run(cfg, names[0]) as r,
        GenerationProgress(Console(stderr=True), live=cfg.console == "rich") as progress,
    ):
        for i, name in enumerate(names):
            if i:
                r.load_checkpoint(name)
            out.append((name, *evaluate_checkpoint(r, name, progress)))
    return out


def _results(
    cfg: EvalRoot, evaluated: list[tuple[str, list[dict], list[dict]]]
) -> tuple[list[dict], list[Summary], list[dict]]:
    """The JSON entries and Summaries of the checkpoints, and every record labelled with its checkpoint."""
    ev = cfg.eval
    ks = list(ev.k) if ev.k is not None else None  # None: the default, trimmed to n below
    results, summaries, all_records = [], [], []
    for name, sampled, greedy in evaluated:
        if ks is None:
            ks = default_ks(min(Counter(str(r["id"]) for r in sampled).values()))
        entry, summary = result_entry(name, sampled, greedy, ks, cfg.seed, ev.bootstrap)
        results.append(entry)
        summaries.append(summary)
        all_records += [{"checkpoint": name, **r} for r in sampled + greedy]
    return results, summaries, all_records
