"""Checks of the algo group (the loss family) that types alone cannot express, run by
``commands.validate`` before any model loads: the clip bounds and weights, each objective's and
estimator's parameters, and the engine-mismatch correction. Each raises ``ConfigError`` with one line
naming the key and what it accepts.
"""

from __future__ import annotations

from typing import Any

from grpo_cli.config import ConfigError
from grpo_cli.core.advantages import BATCH_ESTIMATORS
from grpo_cli.core.objectives import TOKEN_LEVEL_OBJECTIVES

__all__ = ["validate_algo", "validate_engine_is"]


def validate_algo(algo: Any) -> None:
    """The algo keys' ranges and combinations (not engine_is: ``validate_engine_is``)."""
    _validate_loss(algo)
    _validate_objective(algo)
    _validate_advantage(algo)


def _validate_loss(algo: Any) -> None:
    """The loss keys' ranges: clip bounds, KL and entropy weights, the entropy quantile."""
    if not 0 < algo.epsilon <= 1:
        raise ConfigError(f"algo.epsilon={algo.epsilon}: must be in (0, 1] (1: no lower bound on the ratio)")
    if algo.epsilon_high is not None and not algo.epsilon_high > 0:
        raise ConfigError(f"algo.epsilon_high={algo.epsilon_high}: must be > 0 (or null for epsilon)")
    if algo.beta < 0:
        raise ConfigError(f"algo.beta={algo.beta}: must be >= 0")
    high = 1 + (algo.epsilon if algo.epsilon_high is None else algo.epsilon_high)
    if algo.clip_ratio_c is not None and not algo.clip_ratio_c > 1:
        raise ConfigError(
            f"algo.clip_ratio_c={algo.clip_ratio_c}: must be > 1 (dual-clip, e.g. 3.0; or null for off)"
        )
    if algo.delta is not None and not algo.delta > high:
        raise ConfigError(
            f"algo.delta={algo.delta}: must be > 1 + epsilon_high = {high:g} (e.g. 4.0; or null for off)"
        )
    if algo.objective != "clip" and (algo.clip_ratio_c is not None or algo.delta is not None):
        raise ConfigError(
            f"algo.clip_ratio_c / algo.delta bound the clip objective; algo.objective={algo.objective} "
            "has no such bound: set them to null"
        )
    if not algo.entropy_coef >= 0:
        raise ConfigError(f"algo.entropy_coef={algo.entropy_coef}: must be >= 0 (0: no entropy bonus)")
    if not 0 < algo.top_entropy_quantile <= 1:
        raise ConfigError(
            f"algo.top_entropy_quantile={algo.top_entropy_quantile}: must be in (0, 1] (1: every token)"
        )


def _validate_objective(algo: Any) -> None:
    """The parameters of the issue-44 objectives (SAPO, Clip-Cov, KL-Cov, GMPO) and the level they need."""
    for key in ("tau_pos", "tau_neg"):
        if not getattr(algo, key) > 0:
            raise ConfigError(
                f"algo.{key}={getattr(algo, key)}: must be > 0 (SAPO's gate temperature, e.g. 1.0)"
            )
    for key in ("clip_cov_ratio", "kl_cov_ratio"):
        if not 0 < getattr(algo, key) <= 1:
            raise ConfigError(
                f"algo.{key}={getattr(algo, key)}: must be in (0, 1] (a fraction of the step's tokens)"
            )
    if not algo.clip_cov_lb < algo.clip_cov_ub:
        raise ConfigError(
            f"algo.clip_cov_lb={algo.clip_cov_lb} must be below algo.clip_cov_ub={algo.clip_cov_ub} (verl: 1 and 5)"
        )
    if not algo.ppo_kl_coef >= 0:
        raise ConfigError(f"algo.ppo_kl_coef={algo.ppo_kl_coef}: must be >= 0 (KL-Cov's penalty weight)")
    if algo.objective in TOKEN_LEVEL_OBJECTIVES and algo.importance_level != "token":
        raise ConfigError(
            f"algo.objective={algo.objective} works on token ratios: set algo.importance_level=token "
            f"(got {algo.importance_level})"
        )


def _validate_advantage(algo: Any) -> None:
    """algo.passk_k against the group, and the REINFORCE++ estimators' own whitening."""
    if algo.passk_k is not None:
        if algo.advantage != "passk":
            raise ConfigError(
                f"algo.passk_k={algo.passk_k} is read by algo.advantage=passk only (got {algo.advantage}); "
                "set it to null"
            )
        if not 2 <= algo.passk_k <= algo.group_size:
            raise ConfigError(
                f"algo.passk_k={algo.passk_k}: must be in [2, algo.group_size={algo.group_size}] "
                "(k of pass@k among the group's completions)"
            )
    if algo.advantage in BATCH_ESTIMATORS and algo.scale_rewards != "group":
        raise ConfigError(
            f"algo.advantage={algo.advantage} whitens by the batch's token-weighted std itself; "
            f"algo.scale_rewards={algo.scale_rewards} does not apply: leave it at its default (group)"
        )


def validate_engine_is(eis: Any, objective: str = "clip") -> None:
    """algo.engine_is: the bounds [low, cap], what mode=reject and its statistic need, and the level
    ``objective`` allows."""
    if eis.cap is not None and objective == "geo_mean" and eis.level == "token" and eis.mode != "reject":
        # GMPO's surrogate is one number per completion: a weight per token would scale it by the mean
        # weight, and a token masked to 0 would still get its gradient through the sequence's ratio.
        raise ConfigError(
            "algo.objective=geo_mean has one ratio per completion: set algo.engine_is.level=sequence "
            "(one weight per completion) or turn the correction off (algo.engine_is.cap=null)"
        )
    if eis.cap is not None and not eis.cap > 0:
        raise ConfigError(f"algo.engine_is.cap={eis.cap}: must be > 0 (or null for off)")
    if eis.low is not None:
        if eis.cap is None:
            raise ConfigError(
                f"algo.engine_is.low={eis.low} needs algo.engine_is.cap (null turns the correction off)"
            )
        if not 0 < eis.low < min(1.0, eis.cap):
            raise ConfigError(
                f"algo.engine_is.low={eis.low}: must be in (0, min(1, cap={eis.cap:g})) (a lower bound on pi_old/mu)"
            )
    if eis.mode == "reject" and eis.level != "sequence":
        raise ConfigError(
            "algo.engine_is.mode=reject drops whole completions: set algo.engine_is.level=sequence "
            "(for tokens use mode=mask, with low for two sides)"
        )
    if eis.statistic != "sum" and eis.mode != "reject":
        raise ConfigError(
            f"algo.engine_is.statistic={eis.statistic} is read by mode=reject only (got mode={eis.mode})"
        )
    if eis.statistic == "mean_k3" and eis.low is not None:
        raise ConfigError("algo.engine_is.statistic=mean_k3 is a divergence (>= 0): it takes no low bound")
