"""Configs as data: every group option composes, overrides land typed, bad values are one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from grpo_cli.cli import compose_config
from grpo_cli.commands.validate import validate
from grpo_cli.config import AlgoConfig, ConfigError, conf_dir

GROUPS = ["model", "lora", "algo", "data", "reward"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


@pytest.mark.parametrize("command", ["train", "sample", "eval"])
@pytest.mark.parametrize("group", GROUPS)
def test_every_group_option_composes(command, group):
    for option in _options(group):
        cfg, _ = compose_config(command, [f"{group}={option}"])
        assert getattr(cfg, group) is not None


def test_defaults_are_the_papers():
    cfg, _ = compose_config("train")
    assert isinstance(cfg.algo, AlgoConfig)
    assert (cfg.algo.group_size, cfg.algo.epsilon, cfg.algo.beta) == (8, 0.2, 0.04)
    assert cfg.model.name_or_path == "tiny" and cfg.data.name == "arithmetic"


def test_overrides_land_in_the_schema():
    cfg, _ = compose_config(
        "train",
        [
            "model=qwen",
            "reward=math",
            "algo.beta=0.0",
            "algo.group_size=16",
            "train.lr=1e-4",
            "rollout.top_k=50",
            "lora.r=8",
        ],
    )
    assert cfg.model.name_or_path == "Qwen/Qwen2.5-0.5B-Instruct" and cfg.model.chat_template is True
    assert cfg.algo.beta == 0.0 and cfg.algo.group_size == 16 and isinstance(cfg.algo.group_size, int)
    assert cfg.train.lr == 1e-4 and cfg.rollout.top_k == 50 and cfg.lora.r == 8


def test_algo_presets_differ_where_their_papers_do():
    dapo, _ = compose_config("train", ["algo=dapo"])
    dr, _ = compose_config("train", ["algo=dr_grpo"])
    gspo, _ = compose_config("train", ["algo=gspo"])
    assert (
        dapo.algo.aggregation == "token_mean"
        and dapo.algo.epsilon_high == 0.28
        and dapo.algo.dynamic_sampling
    )
    assert dr.algo.scale_rewards == "none" and dr.algo.aggregation == "seq_mean_token_sum_norm"
    assert gspo.algo.importance_level == "sequence"
    cispo, _ = compose_config("train", ["algo=cispo"])
    assert cispo.algo.objective == "cispo" and cispo.algo.beta == 0.0
    assert cispo.algo.aggregation == "token_mean" and cispo.algo.epsilon == 1.0  # no lower bound
    validate(cispo)  # epsilon = 1 is allowed: the weight's lower bound is 0


def test_the_new_algo_keys_default_to_off_and_land_typed():
    cfg, _ = compose_config("train")
    a = cfg.algo
    assert (a.advantage, a.objective, a.clip_ratio_c, a.delta) == ("group", "clip", None, None)
    assert (a.entropy_coef, a.top_entropy_quantile, a.mask_truncated) == (0.0, 1.0, False)
    cfg, _ = compose_config(
        "train",
        ["algo.advantage=rloo", "algo.clip_ratio_c=3", "algo.delta=4", "algo.entropy_coef=0.001",
         "algo.top_entropy_quantile=0.2", "algo.mask_truncated=true"],
    )  # fmt: skip
    validate(cfg)
    a = cfg.algo
    assert a.advantage == "rloo" and a.clip_ratio_c == 3.0 and isinstance(a.delta, float)
    assert a.entropy_coef == 0.001 and a.top_entropy_quantile == 0.2 and a.mask_truncated is True


@pytest.mark.parametrize(
    "override,needle",
    [
        ("algo.group_size=1", "algo.group_size"),
        ("algo.epsilon=1.5", "algo.epsilon"),
        ("algo.beta=-0.1", "algo.beta"),
        ("train.prompts_per_step=0", "train.prompts_per_step"),
        ("train.micro_batch_tokens=-1", "train.micro_batch_tokens"),
        ("algo.aggregation=mean", "seq_mean_token_mean"),
        ("algo.advantage=ppo", "algo.advantage"),
        ("algo.objective=ppo", "algo.objective"),
        ("algo.clip_ratio_c=0.9", "algo.clip_ratio_c"),
        ("algo.delta=1.1", "algo.delta"),  # not above 1 + epsilon_high = 1.2
        ("algo.entropy_coef=-0.01", "algo.entropy_coef"),
        ("algo.top_entropy_quantile=0", "algo.top_entropy_quantile"),
        ("algo.top_entropy_quantile=1.5", "algo.top_entropy_quantile"),
        ("model.name_or_path=/no/such/model", "no such directory"),
    ],
)
def test_validate_rejects_bad_values_with_the_key(override, needle):
    cfg, _ = compose_config("train", [override])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_cispo_refuses_the_clip_objectives_bounds():
    cfg, _ = compose_config("train", ["algo=cispo", "algo.clip_ratio_c=3"])
    with pytest.raises(ConfigError, match="algo.objective=cispo") as err:
        validate(cfg)
    assert "\n" not in str(err.value)


def test_uncached_hub_id_offline_says_how_to_use_local_weights(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg, _ = compose_config("train", ["model.name_or_path=nobody/not-a-model-xyz"])
    with pytest.raises(ConfigError, match="model.name_or_path=/path/to/local/model|local directory"):
        validate(cfg)


def test_readme_documents_every_data_group_with_no_repository_internal_paths():
    """A user has no ../shared (the repository's test data); each data group says where its data comes from."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "../shared" not in readme and "shared/data" not in readme
    section = readme.split("## Data: where each group's problems come from", 1)[1].split("\n## ", 1)[0]
    for option in _options("data"):
        assert f"\n| `{option}` |" in section, option
    assert "grpo-cli[datasets]" in section and "data.test_size" in section and "data.test_path" in section
    for option in _options("data"):
        assert "../shared" not in (conf_dir() / "data" / f"{option}.yaml").read_text(), option


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["train.prompts_per_step=4", "algo.steps_per_generation=3"], "algo.steps_per_generation=3"),
        (["algo.steps_per_generation=0"], "algo.steps_per_generation=0"),
        (["train.lr_schedule=step"], "choose one of: constant, linear, cosine"),
        (["train.min_lr_ratio=1.5"], "train.min_lr_ratio"),
        (["rollout.min_p=-0.1"], "rollout.min_p"),
        (["rollout.min_p=2"], "rollout.min_p"),
    ],
)
def test_mini_batches_schedule_and_min_p_are_checked_in_one_line(overrides, needle):
    cfg, _ = compose_config("train", overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_steps_per_generation_must_divide_each_ranks_groups(monkeypatch):
    """Under torchrun each rank splits its own share: 8 prompts on 4 ranks are 2 groups per rank."""
    ok, _ = compose_config("train", ["train.prompts_per_step=8", "algo.steps_per_generation=2"])
    monkeypatch.setenv("WORLD_SIZE", "4")
    validate(ok)
    cfg, _ = compose_config("train", ["train.prompts_per_step=8", "algo.steps_per_generation=4"])
    with pytest.raises(ConfigError, match="divide the 2 groups of a step per rank"):
        validate(cfg)
    monkeypatch.setenv("WORLD_SIZE", "1")
    validate(cfg)  # 8 groups in one process: 4 mini-batches of 2


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("data.num_train=5", "data.train_size"),
        ("data.size=5", "data.train_size"),
        ("data.num_test=5", "data.test_size"),
        ("data.level=1", "data.difficulty"),
        ("train.steps_per_generation=2", "algo.steps_per_generation"),
    ],
)
def test_a_renamed_key_is_one_line_naming_its_successor(capsys, old, new):
    from grpo_cli.cli import main

    assert main(["train", old]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"grpo train: error: {old.split('=')[0]} was renamed: use {new}"]
    assert main(["train", "-m", f"+{old}"]) == 2  # a sweep, which is not composed before Hydra starts
    assert f"use {new}" in capsys.readouterr().err


def test_a_renamed_key_in_a_yaml_file_names_its_successor():
    """A user's own YAML (or an old saved config) that sets an old key fails at composition; the
    line names the new key (``describe_error``), not Hydra's 'not in struct'."""
    from grpo_cli.cli import describe_error

    with pytest.raises(Exception) as info:
        compose_config("eval", ["eval.limit=3"])
    assert describe_error(info.value) == "eval.limit was renamed: use eval.problems"


def test_mu_and_k_sit_side_by_side_and_the_budget_replaces_the_count():
    cfg, _ = compose_config("train", ["algo.num_iterations=2", "algo.steps_per_generation=2"])
    assert (cfg.algo.num_iterations, cfg.algo.steps_per_generation) == (2, 2)
    validate(cfg)
    cfg, _ = compose_config("train", ["train.micro_batch_tokens=4096"])
    validate(cfg)  # micro_batch_size left null: the budget alone
    cfg, _ = compose_config("train", ["train.micro_batch_tokens=4096", "train.micro_batch_size=8"])
    with pytest.raises(ConfigError, match="replaces train.micro_batch_size=8: set one of them"):
        validate(cfg)


def test_one_test_size_for_files_and_generated_sources():
    cfg, _ = compose_config("train", ["data.test_size=0.2"])  # arithmetic generates its problems
    with pytest.raises(ConfigError, match="data=arithmetic generates its held-out problems: a count >= 1"):
        validate(cfg)
    from grpo_cli.data import load_rows

    cfg, _ = compose_config("train", ["data.test_size=7", "data.train_size=30"])
    assert len(load_rows(cfg.data, "test")) == 7 and len(load_rows(cfg.data, "train")) == 30


def test_resuming_a_run_saved_before_a_rename_compares_by_the_new_name():
    from grpo_cli.run.checkpoint import config_changes

    old = "data:\n  num_train: 100\n"
    assert config_changes(old, "data:\n  train_size: 100\n") == []
    assert config_changes(old, "data:\n  train_size: 50\n") == ["data.train_size: 100 -> 50"]
