"""Held-out evaluation shared by ``grpo train`` (every ``train.eval_every`` steps) and ``grpo eval``.

Correctness has one definition, ``rewards.correct`` (the first reward rule scores 1.0), used here,
by ``Rollout.accuracy`` and by ``grpo eval``'s records (``score_records``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from grpo_cli import distributed
from grpo_cli.data import build_prompt
from grpo_cli.models import Policy
from grpo_cli.progress import GenerationProgress
from grpo_cli.rewards import correct
from grpo_cli.rollout import Rollout, generate, score
from grpo_cli.sampling import HELD_OUT_STREAM, draw_seed

AnswerFn = Callable[[str], tuple[str | None, str | None]]  # completion -> (answer shown, vote key)


def held_out_metrics(
    policy: Policy,
    rows: list[dict],
    cfg: Any,
    rewarder: Any,
    samples: int | None = None,
    temperature: float | None = None,
    greedy: bool = True,
    progress: GenerationProgress | None = None,
) -> dict[str, float]:
    """Sampled and greedy accuracy and mean reward on ``rows`` (for ``grpo train``).

    Returns ``eval/accuracy``, ``eval/reward`` and, with ``greedy``, ``eval/accuracy_greedy``.
    Problem i samples from its own stream (``draw_seed(seed, i, HELD_OUT_STREAM)``), so the numbers
    touch no global RNG (the training streams go on as without evaluation) and do not depend on the
    number of processes: with W ranks each evaluates an equal share (the last ones padded with repeats
    that are not counted; under FSDP every rank must run the same passes) and the counts are summed.
    ``progress``: where the bar and the pace line go (None: log lines only).
    """
    if not rows:
        return {}
    n = samples or getattr(getattr(cfg, "train", None), "eval_samples", 4)
    rollout_cfg = replace(cfg.rollout, temperature=temperature or cfg.rollout.temperature)
    world = distributed.world()
    per_rank = -(-len(rows) // world.size)
    mine = list(range(world.rank * per_rank, min((world.rank + 1) * per_rank, len(rows))))
    counted = len(mine)
    mine += [mine[-1] if mine else 0] * (per_rank - counted)
    picked = [rows[i] for i in mine]
    prompts = [build_prompt(r, cfg.data.template) for r in picked]
    seeds = [draw_seed(cfg.seed, i, HELD_OUT_STREAM) for i in mine]
    progress = progress or GenerationProgress()

    def sampled(per_problem: int, label: str, **kw: Any) -> Rollout:
        with progress.task(label, len(picked) * per_problem) as advance:
            ro = generate(
                policy,
                picked,
                prompts,
                per_problem,
                rollout_cfg,
                cfg.model.chat_template,
                system_prompt=cfg.model.system_prompt,
                progress=advance,
                **kw,
            )
        return score(ro, rewarder)

    sums = _counts(sampled(n, "held-out: sampling", seeds=seeds), counted * n)
    if greedy:
        sums += _counts(sampled(1, "held-out: greedy", greedy=True), counted)
    total = distributed.all_sum(torch.tensor(sums, dtype=torch.float64)).tolist()
    out = {"eval/accuracy": total[0] / total[1], "eval/reward": _ratio(total[2], total[3])}
    if greedy:
        out["eval/accuracy_greedy"] = total[4] / total[5]
    return out


def held_out_due(step: int, tr: Any) -> bool:
    """Whether ``grpo train`` runs the held-out evaluation after ``step`` (0: before the first step).

    ``train.eval_every=0`` means none at all unless ``train.eval_at_ends`` asks for the first and last;
    ``train.eval_problems=0`` means none.
    """
    if tr.eval_problems == 0:
        return False
    if step in (0, tr.steps):
        return tr.eval_every > 0 or tr.eval_at_ends
    return tr.eval_every > 0 and step % tr.eval_every == 0


def _counts(rollout: Rollout, k: int) -> list[float]:
    """Over the first k completions: [correct, k, sum of judged rewards, judged]."""
    right = sum(correct(rollout.per_rule)[:k])
    rewards = rollout.rewards[:k]
    judged = ~torch.isnan(rewards)
    return [float(right), float(k), float(rewards[judged].sum()), float(judged.sum())]


def _ratio(num: float, den: float) -> float:
    return num / den if den else float("nan")


def answer_fn(rewarder: Any) -> AnswerFn:
    """How to read a completion's answer for maj@k and ``extracted``, chosen by the first reward rule.

    A code rule: the program ``rewards.code.extract_code`` runs (the vote is over identical programs).
    Anything else: ``rewards.math.extract_answer``, with plain numbers voting by value.
    """
    from grpo_cli.rewards.code import CodeReward, code_reward, extract_code
    from grpo_cli.rewards.math import as_number, extract_answer

    first = rewarder.rules[0].fn
    if isinstance(first, CodeReward) or first is code_reward:

        def code_answer(text: str) -> tuple[str | None, str | None]:
            program = extract_code(text).strip()
            return (program, program) if program else (None, None)

        return code_answer
    fallback = getattr(first, "fallback_last_number", True)

    def math_answer(text: str) -> tuple[str | None, str | None]:
        answer = extract_answer(text, fallback)
        if answer is None:
            return None, None
        number = as_number(answer)  # "1,000", "1000" and "1000.0" cast one vote; (+ 0) folds -0 into 0
        return answer, (answer.strip() if number is None else str((number + 0).normalize()))

    return math_answer


def score_records(
    texts: list[str],
    rows: list[dict],
    rewarder: Any,
    answer_of: AnswerFn,
    tokens: list[int] | None = None,
    samples: list[int] | None = None,
    greedy: bool = False,
) -> list[dict[str, Any]]:
    """Score completions [N] against their rows [N]; one record per completion (``grpo eval``'s JSONL).

    ``vote`` is kept in memory for maj@k and dropped from the JSONL.
    """
    result = rewarder(texts, rows)
    right = correct(result.per_rule)
    records = []
    for i, text in enumerate(texts):
        answer, vote = answer_of(text)
        records.append(
            {
                "id": str(rows[i]["id"]),
                "sample": samples[i] if samples else 0,
                "greedy": greedy,
                "completion": text,
                "answer": answer,
                "vote": vote,
                "reward": result.total[i],
                "correct": right[i],
                "rewards": {rule: scores[i] for rule, scores in result.per_rule.items()},
                "tokens": tokens[i] if tokens else None,
            }
        )
    return records
