"""Evaluate a checkpoint the way it was trained: the settings that shape its completions come from the
run's saved ``config.yaml`` (written into every checkpoint) unless the command line sets them.

    grpo eval checkpoint=outputs/run/checkpoint-200 data=gsm8k data.path=../shared/data/gsm8k
        # -> rollout.max_new_tokens, model.chat_template, model.system_prompt of the run,
        #    and its data.template when the run trained on the same data source
    grpo eval checkpoint=outputs/run/checkpoint-200 rollout.max_new_tokens=1024   # this one overridden

A model trained to answer inside a chat template, in up to N tokens, is judged unfairly without the
template or with a shorter budget; the defaults of ``grpo eval`` (the data group's) need not match.

``whole_checkpoints`` first checks each checkpoint against its manifest (``run.manifest``), before
anything of it is read: one damaged checkpoint is a one-line error; in a list, the others are evaluated.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from grpo_cli.config import ConfigError, get_key, override_key, set_key
from grpo_cli.run import manifest

log = logging.getLogger("grpo_cli")

# Keys taken from the checkpoint's run; data.template only when the data source is the same.
INHERITED = ("rollout.max_new_tokens", "model.chat_template", "model.system_prompt", "data.template", "seed")


def saved_config(checkpoint: str) -> dict[str, Any] | None:
    """The run config saved in a checkpoint directory, or None when it has none (made elsewhere)."""
    path = Path(checkpoint) / "config.yaml"
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def inherit(cfg: Any, checkpoints: Sequence[str], overrides: Sequence[str]) -> dict[str, Any]:
    """Set ``INHERITED`` keys of ``cfg`` (an EvalRoot) from the first checkpoint that saved its config.

    Keys in ``overrides`` keep their command-line value. Returns what was taken, ``{key: value}``; a
    later checkpoint whose run used other values is named in a warning (all are evaluated alike).
    """
    given = {override_key(o) for o in overrides} - {None}
    saved = [(name, saved_config(name)) for name in checkpoints if name != "base"]
    saved = [(name, conf) for name, conf in saved if conf is not None]
    if not saved:
        return {}
    source, conf = saved[0]
    taken: dict[str, Any] = {}
    for key in INHERITED:
        if key in given:
            continue
        if key == "data.template" and get_key(conf, "data.name") != cfg.data.name:
            continue
        try:
            value = get_key(conf, key)
        except (KeyError, AttributeError):
            continue  # a run saved before the key existed
        if value != get_key(cfg, key):
            set_key(cfg, key, value)
            taken[key] = value
    if taken:
        shown = " ".join(f"{k}={v!r}" for k, v in taken.items())
        log.info("as %s was trained: %s (set them on the command line to change)", source, shown)
    for name, other in saved[1:]:
        differ = [k for k in INHERITED if k not in given and _safeget_key(other, k) != _safeget_key(conf, k)]
        if differ:
            log.warning(
                "%s was trained with other %s than %s; all use %s's", name, ", ".join(differ), source, source
            )
    return taken


def _safeget_key(conf: dict[str, Any], key: str) -> Any:
    try:
        return get_key(conf, key)
    except (KeyError, AttributeError):
        return None


def whole_checkpoints(names: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The checkpoint directories among ``names`` that are whole, and ``{name: what is wrong}`` for the others.

    ``base`` and names that are not directories pass unchecked (their loading says what is wrong). A
    damaged one is a ConfigError when it is the only one, or when every one is damaged; otherwise one
    warning line each. Checkpoints without a manifest are named in one line: they cannot be verified.
    """
    whole, damaged = [], {}
    for name in names:
        verdict = manifest.verify(name) if name != "base" and Path(name).expanduser().is_dir() else None
        if verdict is not None and not verdict.whole:
            damaged[name] = f"not a whole checkpoint: {verdict.damage}"
            continue
        if verdict is not None and not verdict.verified:
            log.warning(verdict.unverified_line())
        whole.append(name)
    if damaged and not whole:
        raise ConfigError("; ".join(f"{name}: {why}" for name, why in damaged.items()))
    for name, why in damaged.items():
        log.warning("%s: %s; evaluating the others", name, why)
    return whole, damaged
