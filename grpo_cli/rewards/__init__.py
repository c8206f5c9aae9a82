"""Reward rules and their weighted sum.

A rule is any callable ``rule(completions: list[str], rows: list[dict]) -> list[float | None]``: one
score per completion, ``None`` meaning "cannot be judged" (e.g. a gold answer that does not parse).
The ``reward`` config group lists rules with weights::

    # conf/reward/math_format.yaml        grpo train reward=math_format
    rules:
      - name: math
        _target_: grpo_cli.rewards.math.MathReward
        weight: 1.0
        timeout: 5.0              # any other key is passed to the target
      - name: format
        _target_: grpo_cli.rewards.format.FormatReward
        weight: 0.2

``_target_`` is an import path. A class is instantiated with the extra keys; a function gets them
bound with ``functools.partial``; a function without extra keys is used as is. A custom rule needs
nothing else: ``_target_: mypkg.rewards.my_rule`` with ``mypkg`` importable. A rule may also have

- ``metrics() -> dict[str, float]``: counts for its last call, logged as ``reward/<name>/<key>``
  (MathReward: ``timeouts``, ``errors``; CodeReward: ``timeouts``, ``output_limits``, ``errors``);
- ``close()``: called by ``Rewarder.close()`` (worker processes, thread pools).

A rule's None scores are counted in ``reward/<name>/unjudged`` and warned about once per rule.
``reward_time`` is the seconds every rule took over the batch, ``reward_time/<name>`` one rule's (a
reward model's forward passes, a judge's requests): timings, summed over a step's scoring calls.

The total is ``sum_i weight_i * score_i``; it is None when a rule with a non-zero weight said None.
A rule that raises does not stop training: the error is logged (once per rule), its scores are 0
for that batch, and ``reward/<name>/errors`` counts the completions it failed on.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from math import isfinite, isnan  # not `import math`: the submodule .math would rebind that name here
from typing import Any

from grpo_cli.config import ConfigError
from grpo_cli.rewards.math import extract_answer

__all__ = [
    "RewardResult",
    "Rewarder",
    "Rule",
    "build_rewarder",
    "correct",
    "extract_answer",
    "resolve_target",
]

log = logging.getLogger("grpo_cli")

RuleFn = Callable[[list[str], list[dict]], list[Any]]


@dataclass
class Rule:
    """One weighted rule: ``fn`` is the resolved callable (an instance, a partial or a function)."""

    name: str
    weight: float
    fn: RuleFn


@dataclass
class RewardResult:
    """Rewards of N completions.

    total: [N] weighted sum, None where a weighted rule could not judge.
    per_rule: rule name -> [N] scores (0.0 where the rule raised).
    metrics: ``reward/<name>`` (mean over judged), ``reward/<name>/<count>``, ``reward/total``,
        ``reward/unjudged`` (completions whose total is None).
    counts: the keys of ``metrics`` that are counters: over several batches (ranks, sampling rounds)
        they add up; every other metric is a mean and is averaged.
    """

    total: list[float | None]
    per_rule: dict[str, list[float | None]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    counts: set[str] = field(default_factory=set)


def correct(per_rule: dict[str, list[float | None]]) -> list[bool]:
    """Which completions are *correct*: the first reward rule scores them 1.0 (for ``reward=math``, a
    right answer). The one definition behind training's ``accuracy``, held-out ``eval/accuracy`` and
    ``grpo eval``'s pass@k."""
    first = next(iter(per_rule.values()), [])
    return [s == 1.0 for s in first]


class Rewarder:
    """Scores completions with every rule and sums them with their weights."""

    def __init__(self, rules: list[Rule]):
        self.rules = rules
        self._failed: set[str] = set()
        self._warned_unjudged: set[str] = set()

    def __call__(self, completions: list[str], rows: list[dict]) -> RewardResult:
        """Rewards of ``completions`` [N] against their dataset ``rows`` [N]."""
        if len(completions) != len(rows):
            raise ValueError(f"{len(completions)} completions but {len(rows)} rows")
        per_rule: dict[str, list[float | None]] = {}
        metrics: dict[str, float] = {}
        counts = {"reward/unjudged", "reward_time"}
        metrics["reward_time"] = 0.0
        for rule in self.rules:
            t0 = time.perf_counter()
            scores, extra = self._score(rule, completions, rows)
            seconds = time.perf_counter() - t0
            metrics["reward_time"] += seconds
            metrics[f"reward_time/{rule.name}"] = seconds
            counts.add(f"reward_time/{rule.name}")
            per_rule[rule.name] = scores
            judged = [s for s in scores if s is not None]
            if judged:
                metrics[f"reward/{rule.name}"] = sum(judged) / len(judged)
            metrics.update({f"reward/{rule.name}/{k}": float(v) for k, v in extra.items()})
            counts.update(f"reward/{rule.name}/{k}" for k in extra)
            metrics[f"reward/{rule.name}/unjudged"] = float(len(scores) - len(judged))
            counts.add(f"reward/{rule.name}/unjudged")
            if len(judged) < len(scores):
                self._warn_unjudged(rule.name, len(scores) - len(judged), len(scores))
        total = self._total(per_rule, len(completions))
        judged_total = [t for t in total if t is not None]
        if judged_total:
            metrics["reward/total"] = sum(judged_total) / len(judged_total)
        metrics["reward/unjudged"] = float(len(total) - len(judged_total))
        return RewardResult(total, per_rule, metrics, counts)

    def _score(self, rule: Rule, completions: list[str], rows: list[dict]) -> tuple[list, dict[str, float]]:
        """One rule's scores and counters; a rule that raises or misbehaves scores 0 and is counted."""
        try:
            raw = list(rule.fn(completions, rows))
            if len(raw) != len(completions):
                raise ValueError(f"returned {len(raw)} scores for {len(completions)} completions")
            scores = [_as_score(s) for s in raw]
        except Exception as exc:  # noqa: BLE001 - contained: one bad rule must not end a training run
            if rule.name not in self._failed:
                self._failed.add(rule.name)
                log.error(
                    "reward rule %r raised %s: %s; its scores are 0 for this batch (counted in "
                    "reward/%s/errors; logged once)",
                    rule.name,
                    type(exc).__name__,
                    exc,
                    rule.name,
                    exc_info=True,
                )
            return [0.0] * len(completions), {"errors": float(len(completions))}
        extra = {"errors": 0.0}
        metrics_fn = getattr(rule.fn, "metrics", None)
        if callable(metrics_fn):
            extra.update(metrics_fn())
        return scores, extra

    def _warn_unjudged(self, name: str, count: int, total: int) -> None:
        # None is "cannot be judged" (a row without a gold answer, or without tests): never a silent 0,
        # but one line per rule is enough; the counts go on in reward/<name>/unjudged.
        if name in self._warned_unjudged:
            return
        self._warned_unjudged.add(name)
        log.warning(
            "reward rule %r could not judge %d of %d completions (rows without what it checks against, "
            "e.g. no gold answer for math, no tests for code); they get no reward and are counted in "
            "reward/%s/unjudged (warned once). Is reward= the right rule for this data?",
            name,
            count,
            total,
            name,
        )

    def _total(self, per_rule: dict[str, list[float | None]], n: int) -> list[float | None]:
        total: list[float | None] = []
        for i in range(n):
            parts = [(rule.weight, per_rule[rule.name][i]) for rule in self.rules if rule.weight != 0]
            if any(score is None for _, score in parts):
                total.append(None)
            else:
                total.append(sum(w * s for w, s in parts))
        return total

    def close(self) -> None:
        """Stop the rules' worker processes and thread pools."""
        for rule in self.rules:
            close = getattr(rule.fn, "close", None)
            if callable(close):
                close()

    def __enter__(self) -> Rewarder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _as_score(value: Any) -> float | None:
    if value is None:
        return None
    score = float(value)
    if isnan(score):
        return None
    return score


def resolve_target(path: str, where: str, key: str = "_target_") -> Any:
    """The object at import path ``pkg.mod.obj`` (or ``pkg.mod.Class.attr``); ConfigError naming
    ``where.key`` (``env._target_`` and ``env.openenv`` load their classes here too)."""
    at = f"{where}.{key}"
    parts = path.split(".") if isinstance(path, str) else []
    if len(parts) < 2 or not all(p.isidentifier() for p in parts):
        raise ConfigError(f"{at}={path!r}: expected an import path like mypkg.rewards.my_rule")
    for split in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:split])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # This prefix is not a module: try a shorter one. (Whole names only: a module `mathx` whose own
            # import of a missing `math...` fails is broken, not absent.)
            if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
                continue
            raise ConfigError(f"{at}={path}: importing {module_name} failed: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - the module itself is broken: say so in one line
            raise ConfigError(
                f"{at}={path}: importing {module_name} failed: {type(exc).__name__}: {exc}"
            ) from None
        for attr in parts[split:]:
            if not hasattr(obj, attr):
                raise ConfigError(f"{at}={path}: {module_name} has no attribute {attr!r}")
            obj = getattr(obj, attr)
        return obj
    raise ConfigError(f"{at}={path}: no module {parts[0]!r} (is it installed / on PYTHONPATH?)")


def _instantiate(target: Any, kwargs: dict[str, Any], where: str) -> RuleFn:
    """A class -> instance(**kwargs); a function -> partial(fn, **kwargs), or fn itself without kwargs."""
    if not callable(target):
        raise ConfigError(f"{where}._target_: {target!r} is not callable")
    if inspect.isclass(target):
        try:
            instance = target(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"{where}: cannot build {target.__name__}: {exc}") from None
        if not callable(instance):
            raise ConfigError(f"{where}: {target.__name__} instances are not callable (define __call__)")
        return instance
    if not kwargs:
        return target
    try:
        inspect.signature(target).bind_partial(**kwargs)
    except TypeError as exc:
        raise ConfigError(
            f"{where}: {getattr(target, '__name__', target)} does not take {sorted(kwargs)}: {exc}"
        ) from None
    except ValueError:  # builtins without a signature: let the call find out
        pass
    return functools.partial(target, **kwargs)


def _as_plain(node: Any) -> Any:
    """OmegaConf containers -> dicts and lists (interpolations resolved); anything else unchanged."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return node
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def build_rule(spec: Any, where: str) -> Rule:
    """One ``{name, _target_, weight, **kwargs}`` entry -> Rule. Raises ConfigError naming ``where``."""
    spec = _as_plain(spec)
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: expected a mapping with name, _target_ and weight, got {spec!r}")
    spec = dict(spec)
    for key in ("name", "_target_"):
        if key not in spec or spec[key] in (None, ""):
            raise ConfigError(
                f"{where}: missing key {key!r} (each rule needs name and _target_; weight defaults to 1.0)"
            )
    name, target = str(spec.pop("name")), spec.pop("_target_")
    weight = spec.pop("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not isfinite(weight):
        raise ConfigError(f"{where}.weight={weight!r}: must be a finite number")
    return Rule(name, float(weight), _instantiate(resolve_target(target, where), spec, where))


def build_rewarder(reward_cfg: Any) -> Rewarder:
    """The Rewarder for a RewardConfig (or anything with ``.rules``, or the list of rules itself)."""
    rules_cfg = _as_plain(getattr(reward_cfg, "rules", reward_cfg))
    if rules_cfg is None or not isinstance(rules_cfg, (list, tuple)) or not rules_cfg:
        raise ConfigError("reward.rules: needs at least one rule {name, _target_, weight}, e.g. reward=math")
    rules = [build_rule(spec, f"reward.rules[{i}]") for i, spec in enumerate(rules_cfg)]
    names = [r.name for r in rules]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"reward.rules: rule names must be unique; repeated: {', '.join(duplicates)}")
    return Rewarder(rules)
