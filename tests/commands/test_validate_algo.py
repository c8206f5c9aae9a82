"""commands.validate_algo: the issue-44 options' bad values and conflicting presets are one line naming
the key, before any model loads (``validate`` runs on the composed config alone)."""

from __future__ import annotations

import pytest

from grpo_cli.cli import compose_config
from grpo_cli.commands.validate import validate
from grpo_cli.config import ConfigError


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["algo=sapo", "algo.tau_neg=0"], "algo.tau_neg=0"),
        (["algo=sapo", "algo.tau_pos=-1"], "algo.tau_pos=-1"),
        (["algo.objective=clip_cov", "algo.clip_cov_ratio=0"], "algo.clip_cov_ratio=0"),
        (["algo.objective=clip_cov", "algo.clip_cov_lb=5", "algo.clip_cov_ub=1"], "algo.clip_cov_lb=5"),
        (["algo.objective=kl_cov", "algo.kl_cov_ratio=1.5"], "algo.kl_cov_ratio=1.5"),
        (["algo.objective=kl_cov", "algo.ppo_kl_coef=-0.1"], "algo.ppo_kl_coef=-0.1"),
        # a preset with a conflicting key: GMPO's per-token log-space clip has no sequence ratio
        (["algo=gmpo", "algo.importance_level=sequence"], "algo.objective=geo_mean"),
        (["algo=sapo", "algo.clip_ratio_c=3"], "algo.objective=sapo"),
        (["algo.advantage=passk", "algo.passk_k=9"], "algo.passk_k=9"),  # above G = 8
        (["algo.advantage=passk", "algo.passk_k=1"], "algo.passk_k=1"),
        (["algo.passk_k=4"], "algo.advantage=passk only"),
        (["algo.advantage=reinforce_pp", "algo.scale_rewards=none"], "algo.advantage=reinforce_pp"),
        (["algo.advantage=tis"], "algo.advantage"),
        (["algo.engine_is.cap=2", "algo.engine_is.low=-0.5"], "algo.engine_is.low=-0.5"),  # a negative bound
        (["algo.engine_is.cap=2", "algo.engine_is.low=1.5"], "algo.engine_is.low=1.5"),
        (["algo.engine_is.low=0.5"], "needs algo.engine_is.cap"),
        (["algo.engine_is.cap=2", "algo.engine_is.mode=reject"], "level=sequence"),
        (["algo.engine_is.cap=2", "algo.engine_is.statistic=geo_mean"], "mode=reject only"),
        (
            [
                "algo.engine_is.cap=2",
                "algo.engine_is.mode=reject",
                "algo.engine_is.level=sequence",
                "algo.engine_is.statistic=mean_k3",
                "algo.engine_is.low=0.5",
            ],
            "mean_k3",
        ),  # fmt: skip
        (["algo.engine_is.cap=2", "algo.engine_is.statistic=median"], "algo.engine_is.statistic"),
        (["algo=gmpo", "algo.engine_is.cap=2", "algo.engine_is.mode=mask"], "algo.engine_is.level=sequence"),
    ],
)
def test_bad_values_are_one_line_naming_the_key(overrides, needle):
    cfg, _ = compose_config("train", overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["algo=sapo"],
        ["algo=gmpo"],
        ["algo.objective=gpg"],
        ["algo.objective=clip_cov"],
        ["algo.objective=kl_cov"],
        ["algo.advantage=opo"],
        ["algo.advantage=passk", "algo.passk_k=4"],
        ["algo.advantage=reinforce_pp"],
        ["algo.advantage=reinforce_pp_baseline"],
        ["algo.engine_is.cap=2", "algo.engine_is.low=0.5", "algo.engine_is.mode=mask"],
        ["algo=gmpo", "algo.engine_is.cap=2", "algo.engine_is.level=sequence"],
        [
            "algo.engine_is.cap=2",
            "algo.engine_is.mode=reject",
            "algo.engine_is.level=sequence",
            "algo.engine_is.statistic=geo_mean",
            "algo.engine_is.low=0.5",
        ],  # fmt: skip
    ],
)
def test_each_option_as_documented_is_accepted(overrides):
    cfg, _ = compose_config("train", overrides)
    validate(cfg)  # raises on a refusal


def test_presets_set_their_papers_values():
    sapo, _ = compose_config("train", ["algo=sapo"])
    assert (sapo.algo.objective, sapo.algo.tau_pos, sapo.algo.tau_neg, sapo.algo.beta) == (
        "sapo",
        1.0,
        1.05,
        0.0,
    )
    gmpo, _ = compose_config("train", ["algo=gmpo"])
    assert (gmpo.algo.objective, gmpo.algo.epsilon, gmpo.algo.epsilon_high) == ("geo_mean", 0.4, 0.4)
