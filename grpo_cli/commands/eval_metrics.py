"""``grpo eval``'s records (one per completion: its answer, vote key, rewards) and the metrics over them:
pure Python and numpy, no model, no torch.

- ``pass_at_k(n, c, k)``: the unbiased estimator of Chen et al. 2021 (arXiv 2107.03374, eq. 1),
  ``1 - C(n - c, k) / C(n, k)``: the probability that at least one of k completions drawn without
  replacement from the n made is correct, given that c of them are.
- ``maj_at_k(answers, correct, k)``: majority vote over the answers of the first k completions
  (self-consistency, Wang et al. 2022; DeepSeekMath's maj@K). Answers that could not be extracted
  (None) do not vote. Tie rule: among the answers with the most votes, the one that appears first in
  the sample order wins. The vote is correct when the first completion giving the winning answer is
  correct (for ``reward=math`` all completions with the same answer score the same). No votes at
  all counts as incorrect.
- ``bootstrap_ci`` / ``paired_bootstrap_ci``: percentile bootstrap over problems (Efron & Tibshirani
  1993), seeded; the paired version resamples the same problems for both checkpoints, so the
  interval of the difference is not widened by the spread of problem difficulty.
- ``summarize(records, ks, ...)``: per-completion records -> the metrics dict of one checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from grpo_cli.data import reference
from grpo_cli.rewards import correct
from grpo_cli.rewards.code import CodeReward, code_reward, extract_code
from grpo_cli.rewards.math import as_number, extract_answer

log = logging.getLogger("grpo_cli")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``c`` correct out of ``n`` completions (1 <= k <= n).

    C(n-c, k) / C(n, k) = prod_{i<k} (n-c-i) / (n-i): a running product of k factors in [0, 1], so
    nothing overflows (C(1000, 500) ~ 1e299 does not fit in float64, the ratio does) and the relative
    error stays within ~k ulp.
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:  # every size-k subset holds a correct completion
        return 1.0
    all_wrong = 1.0
    for i in range(k):
        all_wrong *= (n - c - i) / (n - i)
    return 1.0 - all_wrong


def majority_index(answers: Sequence[str | None]) -> int | None:
    """Index of the first completion that gives the majority answer; None when nothing voted.

    Ties go to the answer whose first occurrence comes earliest (a stable, documented choice).
    """
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, answer in enumerate(answers):
        if answer is None:
            continue
        counts[answer] = counts.get(answer, 0) + 1
        first.setdefault(answer, i)
    if not counts:
        return None
    # max() keeps the first maximum it meets; dicts iterate in first-occurrence order.
    winner = max(counts, key=counts.__getitem__)
    return first[winner]


def maj_at_k(answers: Sequence[str | None], correct: Sequence[bool], k: int) -> float:
    """1.0 when the majority vote over the first ``k`` answers is correct, else 0.0 (see module doc)."""
    if len(answers) != len(correct):
        raise ValueError(f"{len(answers)} answers but {len(correct)} correctness flags")
    if not 1 <= k <= len(answers):
        raise ValueError(f"need 1 <= k <= {len(answers)}, got k={k}")
    idx = majority_index(answers[:k])
    return float(idx is not None and bool(correct[idx]))


def bootstrap_ci(
    values: Sequence[float], seed: int = 0, n_boot: int = 1000, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (one per problem), resampling problems.

    values: [P]. Returns (lo, hi) at ``level``; a single problem gives (v, v).
    """
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError("bootstrap_ci needs a non-empty 1-D sequence")
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    # Chunks of resamples keep the index matrix at ~1M entries whatever the number of problems.
    chunk = max(1, 1_000_000 // arr.size)
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, arr.size, size=(stop - start, arr.size))  # [b, P]
        means[start:stop] = arr[idx].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


def paired_bootstrap_ci(
    a: Sequence[float], b: Sequence[float], seed: int = 0, n_boot: int = 1000, level: float = 0.95
) -> tuple[float, float]:
    """Interval of mean(b) - mean(a) for two checkpoints scored on the same problems (a[i], b[i]: problem i).

    Resampling problem indices once for both is the same as bootstrapping the per-problem
    differences b[i] - a[i].
    """
    if len(a) != len(b):
        raise ValueError(f"paired values need the same problems: {len(a)} vs {len(b)}")
    diff = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    return bootstrap_ci(diff, seed=seed, n_boot=n_boot, level=level)


@dataclass
class Summary:
    """Metrics of one checkpoint.

    n: completions per problem (the smallest count when problems differ).
    metrics: metric name -> value (see ``summarize``).
    ci95: metric name -> [lo, hi].
    per_problem: metric name -> {problem id: value}, the inputs of the bootstrap (pass@K, maj@K).
    """

    n: int
    metrics: dict[str, float]
    ci95: dict[str, list[float]] = field(default_factory=dict)
    per_problem: dict[str, dict[str, float]] = field(default_factory=dict)


def group_by_problem(records: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Records grouped by ``id``, problems in first-appearance order, samples in record order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        groups.setdefault(str(rec["id"]), []).append(rec)
    return groups


def _mean(values: Sequence[float | None]) -> float | None:
    judged = [float(v) for v in values if v is not None]
    return sum(judged) / len(judged) if judged else None


DEFAULT_K = (1, 4)


def default_ks(n: int) -> list[int]:
    """The K of pass@K / maj@K when ``eval.k`` is not set: ``DEFAULT_K`` less those above ``n``,
    the completions per problem (one info line when some are dropped)."""
    ks = [k for k in DEFAULT_K if k <= n]
    if len(ks) < len(DEFAULT_K):
        log.info(
            "eval.k: the default %s trimmed to %s (n=%d completions per problem); set eval.k= to choose",
            list(DEFAULT_K),
            ks,
            n,
        )
    return ks


def summarize(
    records: Sequence[dict[str, Any]], ks: Sequence[int], seed: int = 0, n_boot: int = 1000
) -> Summary:
    """The metrics of one checkpoint from its per-completion records.

    Each record: ``id`` (problem), ``correct`` (bool), ``vote`` (majority-vote key or None),
    ``answer`` (extracted answer or None), ``reward`` (total or None when not judged), ``rewards``
    (rule -> score or None), ``tokens`` (completion length or None when unknown).

    Metrics: ``pass@1`` (mean correctness, averaged per problem), ``pass@K`` for K in ``ks``,
    ``maj@K`` for K > 1 in ``ks``, ``mean_reward`` and ``reward/<rule>`` (means over judged
    completions), ``extracted`` (fraction with an answer), ``unjudged`` (fraction whose reward is None;
    only when some are), ``completion_len`` (mean tokens; only when every record has it),
    ``episode/<key>`` for the episode counters records of ``env=`` runs carry (tool calls, ...).
    ci95 holds an interval for every pass@K and maj@K.
    """
    groups = group_by_problem(records)
    if not groups:
        raise ValueError("no records to summarize")
    n = min(len(g) for g in groups.values())
    ks = sorted(set(ks) | {1})
    if ks[-1] > n:
        raise ValueError(f"k={ks[-1]} exceeds the {n} completions of some problem")
    correct = {pid: [bool(r["correct"]) for r in g] for pid, g in groups.items()}
    per_problem: dict[str, dict[str, float]] = {}
    for k in ks:
        per_problem[f"pass@{k}"] = {pid: pass_at_k(len(c), sum(c), k) for pid, c in correct.items()}
    for k in ks[1:]:  # maj@1 would only be the first sample's correctness
        per_problem[f"maj@{k}"] = {
            pid: maj_at_k([r["vote"] for r in g], correct[pid], k) for pid, g in groups.items()
        }
    metrics = {name: float(np.mean(list(vals.values()))) for name, vals in per_problem.items()}
    metrics.update(_reward_metrics(records))
    ci95 = {name: list(bootstrap_ci(list(vals.values()), seed, n_boot)) for name, vals in per_problem.items()}
    return Summary(n=n, metrics=metrics, ci95=ci95, per_problem=per_problem)


EPISODE_KEYS = ("tool_calls", "tool_errors", "turns", "truncated")


def _reward_metrics(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """mean_reward, reward/<rule>, extracted and completion_len over all completions."""
    out: dict[str, float] = {}
    mean_reward = _mean([r["reward"] for r in records])
    if mean_reward is not None:
        out["mean_reward"] = mean_reward
    rules = list(dict.fromkeys(rule for r in records for rule in r.get("rewards", {})))
    for rule in rules:
        value = _mean([r["rewards"].get(rule) for r in records])
        if value is not None:
            out[f"reward/{rule}"] = value
    out["extracted"] = sum(r["answer"] is not None for r in records) / len(records)
    unjudged = sum(r["reward"] is None for r in records)
    if unjudged:  # the rule could not judge them (no gold answer, no tests): never counted as a silent 0
        out["unjudged"] = unjudged / len(records)
    tokens = [r.get("tokens") for r in records]
    if all(t is not None for t in tokens):
        out["completion_len"] = sum(tokens) / len(tokens)
    for key in EPISODE_KEYS:  # episodes with a tool (env=): calls, errors, turns per completion
        if all(key in r for r in records):
            out[f"episode/{key}"] = sum(r[key] for r in records) / len(records)
    return out


def paired_delta(
    first: Summary, other: Summary, name: str, seed: int = 0, n_boot: int = 1000
) -> tuple[float, tuple[float, float]]:
    """mean(other) - mean(first) of per-problem metric ``name`` and its paired 95% interval.

    Both summaries must cover the same problem ids (they were scored on the same rows).
    """
    a, b = first.per_problem[name], other.per_problem[name]
    if set(a) != set(b):
        raise ValueError(f"{name}: the two checkpoints were scored on different problems")
    ids = list(a)
    xs, ys = [a[i] for i in ids], [b[i] for i in ids]
    return float(np.mean(ys) - np.mean(xs)), paired_bootstrap_ci(xs, ys, seed=seed, n_boot=n_boot)


AnswerFn = Callable[[str], tuple[str | None, str | None]]  # completion -> (answer shown, vote key)


def answer_fn(rewarder: Any) -> AnswerFn:
    """How to read a completion's answer for maj@k and ``extracted``, chosen by the first reward rule.

    A code rule: the program ``rewards.code.extract_code`` runs (the vote is over identical programs).
    A rule with an ``answer_of(text)`` method (reasoning_gym): its answer, voting by identical strings.
    Anything else: ``rewards.math.extract_answer``, with plain numbers voting by value.
    """
    first = rewarder.rules[0].fn
    own = getattr(first, "answer_of", None)  # a rule that says how it reads answers (reasoning_gym)
    if callable(own):

        def own_answer(text: str) -> tuple[str | None, str | None]:
            answer = own(text)
            return answer, answer

        return own_answer
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

    Seven arguments: the completions and their rows, the rules and their answer extractor, and three
    optional per-completion columns (lengths, sample indices, greedy) that ``eval.completions`` files
    lack.
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
                "reference": reference(rows[i]),  # the row's; "answer" is the completion's own
                "answer": answer,
                "vote": vote,
                "reward": result.total[i],
                "correct": right[i],
                "rewards": {rule: scores[i] for rule, scores in result.per_rule.items()},
                "tokens": tokens[i] if tokens else None,
            }
        )
    return records
