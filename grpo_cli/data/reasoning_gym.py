"""reasoning-gym's procedural tasks (~100 generators, each with its own verifier) as a data group.

    pip install 'grpo-cli[reasoning-gym]'
    grpo train data=reasoning_gym data.task=chain_sum data.task_config.max_terms=3
    grpo train data=reasoning_gym data.task='{chain_sum: 3, basic_arithmetic: 1}'   # weighted mix
    grpo train data=reasoning_gym data.task=chain_sum data.difficulty=2    # the task's curriculum, level 2

Rows: ``id`` (``<task>/<item seed>``), ``question`` and ``answer`` (the entry's own), ``metadata`` (the
entry's, whole), ``task``, ``task_config`` (the keyword arguments the task's dataset was built with:
what ``reward=reasoning_gym`` rebuilds it with to call its ``score_answer``) and ``entry`` (the entry
as reasoning-gym made it, the argument ``score_answer`` gets).

Splits. Every reasoning-gym generator draws entry ``i`` from ``Random(seed + i)``. The training split
is ``data.train_size`` entries from seed ``data.seed``; the held-out split is ``data.test_size`` entries
from seed ``data.seed + data.train_size``, so the two splits' item seeds never meet. A task with a small problem
space repeats itself under different seeds, so a held-out entry whose question is also a training
question is skipped and the next one drawn (at most ``10 x test_size`` draws; the info line gives the
counts). With several tasks, row ``i``'s task is drawn by weight from its own seeded stream and its
entry is that task's ``i``-th, as reasoning-gym's composite dataset does.

Keys: ``data.task`` (a name, a list of names with equal weights, or a mapping name -> weight),
``data.task_config`` (the task's config keys; with several tasks, a mapping task -> keys),
``data.difficulty`` (the curriculum: the task's difficulty attributes at that level, an int for all of them
or a mapping attribute -> level; ``data.task_config`` wins over it for the keys it names).
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import logging
import random
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from grpo_cli.config import ConfigError
from grpo_cli.data.split import test_size

log = logging.getLogger("grpo_cli")

EXTRA = "data=reasoning_gym needs the reasoning-gym extra: pip install 'grpo-cli[reasoning-gym]'"
_DRAWS_PER_ROW = 10  # held-out draws per wanted row before giving up on unseen questions
_announced: set[str] = set()


def check_installed() -> None:
    """ConfigError naming the extra when reasoning-gym is not installed (nothing is imported)."""
    try:
        found = importlib.util.find_spec("reasoning_gym") is not None
    except ValueError:  # in sys.modules as None: an import of it would fail
        found = False
    if not found:
        raise ConfigError(EXTRA)


def import_reasoning_gym() -> Any:
    """The ``reasoning_gym`` module; ConfigError naming the extra when it is not installed."""
    try:
        import reasoning_gym
    except ImportError:
        raise ConfigError(EXTRA) from None
    return reasoning_gym


def _plain(node: Any) -> Any:
    """OmegaConf containers -> dicts and lists; anything else unchanged."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def parse_tasks(task: Any) -> list[tuple[str, float]]:
    """``data.task`` as (name, weight) pairs: a name, a list of names (weight 1 each), or name -> weight."""
    task = _plain(task)
    if isinstance(task, str) and task:
        pairs = [(task, 1.0)]
    elif isinstance(task, list) and task and all(isinstance(t, str) for t in task):
        pairs = [(t, 1.0) for t in task]
    elif isinstance(task, Mapping) and task:
        pairs = [(str(k), v) for k, v in task.items()]
    else:
        raise ConfigError(
            f"data.task={task!r}: a task name, a list of names, or a mapping name -> weight "
            "(data.task=chain_sum, data.task='{chain_sum: 3, basic_arithmetic: 1}')"
        )
    for name, weight in pairs:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ConfigError(f"data.task: the weight of {name!r} is {weight!r}; weights must be > 0")
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names):
        raise ConfigError(f"data.task={task!r}: a task named twice")
    return [(n, float(w)) for n, w in pairs]


def _per_task(value: Any, names: list[str], key: str) -> dict[str, Any]:
    """``data.task_config`` / ``data.difficulty`` for each task: the value itself with one task; with
    several, a mapping task -> value (a scalar ``data.difficulty`` applies to all)."""
    value = _plain(value)
    if len(names) == 1:
        return {names[0]: value}
    if value is None or isinstance(value, int) or (isinstance(value, Mapping) and not value):
        return {n: value for n in names}
    if not isinstance(value, Mapping) or set(value) - set(names):
        extra = sorted(set(value) - set(names)) if isinstance(value, Mapping) else value
        raise ConfigError(
            f"data.{key}: with several tasks, a mapping task -> settings ({key}.<task>...); "
            f"not a task of data.task: {extra}"
        )
    return {n: value.get(n) for n in names}


def _check_task(rg: Any, name: str) -> None:
    known = rg.factory.DATASETS
    if name not in known or name == "composite":
        close = difflib.get_close_matches(name, sorted(known), n=3)
        hint = f"; did you mean: {', '.join(close)}" if close else ""
        raise ConfigError(
            f"data.task: {name!r} is not a reasoning-gym task{hint} (all {len(known)}: "
            "python -c 'import reasoning_gym; print(sorted(reasoning_gym.factory.DATASETS))')"
        )


def level_config(rg: Any, name: str, level: Any) -> dict[str, Any]:
    """The config keys the task's curriculum sets at ``level`` (an int for every attribute, past an
    attribute's last level its last; or a mapping attribute -> level); {} for ``level=None``."""
    if level is None:
        return {}
    from reasoning_gym.factory import create_curriculum, has_curriculum

    if not has_curriculum(name):
        raise ConfigError(f"data.difficulty={level!r}: reasoning-gym has no curriculum for {name!r}")
    curriculum = create_curriculum(name)
    attrs = curriculum.attributes
    levels = level if isinstance(level, Mapping) else dict.fromkeys(attrs, level)
    for attr, lvl in levels.items():
        if attr not in attrs:
            raise ConfigError(f"data.difficulty.{attr}: {name}'s curriculum attributes are {sorted(attrs)}")
        if isinstance(lvl, bool) or not isinstance(lvl, int) or lvl < 0:
            raise ConfigError(f"data.difficulty: {name}.{attr} level {lvl!r}: must be an int >= 0")
        curriculum.set_attr_level(attr, min(lvl, len(attrs[attr].levels) - 1))
    config = curriculum.generate_configuration()
    fields = []
    for attr in attrs.values():
        fields += [
            getattr(attr, f)
            for f in ("lower_field_name", "upper_field_name", "field_name")
            if hasattr(attr, f)
        ]
    return {f: getattr(config, f) for f in fields}


def make_dataset(task: str, kwargs: dict[str, Any]) -> Any:
    """``reasoning_gym.create_dataset(task, **kwargs)``; a bad key or value is a ConfigError."""
    rg = import_reasoning_gym()
    try:
        return rg.create_dataset(task, **kwargs)
    except TypeError as exc:  # an unknown keyword: list the task's own keys
        config_cls = rg.factory.DATASETS[task][1]
        keys = sorted(k for k in config_cls.__dataclass_fields__ if k not in ("seed", "size"))
        raise ConfigError(f"data.task_config for {task}: {exc}; its keys: {', '.join(keys)}") from None
    except (AssertionError, ValueError) as exc:  # the config's own validate()
        raise ConfigError(f"data.task_config for {task}: {exc or 'rejected by its validate()'}") from None


def _task_kwargs(cfg: Any) -> list[tuple[str, float, dict[str, Any]]]:
    """(name, weight, config keys without seed/size) per task of ``data.task``."""
    rg = import_reasoning_gym()
    pairs = parse_tasks(cfg.task)
    names = [n for n, _ in pairs]
    for name in names:
        _check_task(rg, name)
    configs, levels = (
        _per_task(cfg.task_config, names, "task_config"),
        _per_task(cfg.difficulty, names, "difficulty"),
    )
    out = []
    for name, weight in pairs:
        own = configs[name] or {}
        if not isinstance(own, Mapping):
            raise ConfigError(f"data.task_config for {name}: a mapping of its config keys, got {own!r}")
        for key, ours in (("seed", "data.seed"), ("size", "data.train_size")):
            if key in own:
                raise ConfigError(f"data.task_config.{key}: set {ours} instead (it seeds both splits)")
        out.append((name, weight, {**level_config(rg, name, levels[name]), **own}))
    return out


def _rows(spec: str, seed: int, count: int, skip: frozenset[str], draws: int) -> list[dict[str, Any]]:
    """Up to ``count`` rows from seed ``seed``, skipping questions in ``skip``, at most ``draws`` draws."""
    tasks = json.loads(spec)
    datasets = [make_dataset(name, {**kw, "seed": seed, "size": max(draws, 1)}) for name, _, kw in tasks]
    weights = [w for _, w, _ in tasks]
    rows: list[dict[str, Any]] = []
    for i in range(draws):
        if len(rows) == count:
            break
        # The task's pick has its own stream: the entry itself is Random(seed + i) inside the task.
        t = random.Random(f"task-{seed}-{i}").choices(range(len(tasks)), weights)[0] if len(tasks) > 1 else 0
        entry = datasets[t][i]
        if entry["question"] in skip:
            continue
        name, _, kw = tasks[t]
        answer = entry.get("answer")
        rows.append(
            {
                "id": f"{name}/{seed + i}",  # the item seed: unique across tasks and splits
                "question": entry["question"],
                "answer": "" if answer is None else str(answer),
                "metadata": entry.get("metadata", {}),
                "task": name,
                "task_config": {**kw, "seed": seed, "size": max(draws, 1)},
                "entry": entry,
            }
        )
    return rows


@lru_cache(maxsize=8)
def _train(spec: str, seed: int, size: int) -> tuple[dict[str, Any], ...]:
    return tuple(_rows(spec, seed, size, frozenset(), size))


def load(cfg: Any, split: str) -> list[dict[str, Any]]:
    """Rows of ``split``: ``data.train_split`` (``data.train_size`` entries) or the held-out one (see the
    module)."""
    size, held_out = cfg.train_size, int(test_size(cfg))
    if size < 1 or held_out < 1:
        raise ConfigError(f"data.train_size={size}, data.test_size={held_out}: both must be >= 1")
    spec = json.dumps(_task_kwargs(cfg), sort_keys=True)
    train = _train(spec, cfg.seed, size)
    if split == cfg.train_split:
        return [dict(r) for r in train]
    seen = frozenset(r["question"] for r in train)
    rows = _rows(spec, cfg.seed + size, held_out, seen, _DRAWS_PER_ROW * held_out)
    if not rows:
        raise ConfigError(
            f"data.task={_plain(cfg.task)!r}: every held-out draw repeats a training question (the task's "
            "problem space is too small for data.train_size; lower it or widen data.task_config)"
        )
    if spec not in _announced:
        _announced.add(spec)
        log.info(
            "data=reasoning_gym: %d training problems (%d distinct), %d held out (unseen in training; "
            "%s); tasks %s",
            len(train),
            len(seen),
            len(rows),
            "as asked" if len(rows) == held_out else f"{held_out} asked, the task ran out",
            ", ".join(f"{n} x{w:g}" for n, w, _ in json.loads(spec)),
        )
    return rows
