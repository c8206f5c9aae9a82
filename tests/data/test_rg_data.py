"""data=reasoning_gym: rows from several tasks, disjoint train/held-out seeds, the task's config and
curriculum passed through, one-line errors, and the line naming the extra when it is missing."""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import replace

import pytest

from grpo_cli.cli import compose_config, main
from grpo_cli.config import ConfigError, DataConfig
from grpo_cli.data import load_rows
from grpo_cli.data import reasoning_gym as rg_data


def data(**kw) -> DataConfig:
    base = DataConfig(name="reasoning_gym", task="chain_sum", train_size=300, test_size=50, seed=7)
    return replace(base, **kw)


@pytest.fixture
def rg():
    return pytest.importorskip("reasoning_gym")


def test_rows_from_two_tasks_by_weight_with_their_metadata(rg):
    cfg = data(task={"chain_sum": 3, "basic_arithmetic": 1}, train_size=400)
    rows = load_rows(cfg, "train")
    counts = Counter(r["task"] for r in rows)
    assert set(counts) == {"chain_sum", "basic_arithmetic"}
    assert 0.65 < counts["chain_sum"] / len(rows) < 0.85  # weight 3 of 4
    assert len({r["id"] for r in rows}) == len(rows)
    for row in rows[:40]:
        # The entry as reasoning-gym itself makes it: the task's dataset at the row's item seed.
        i = int(row["id"].split("/")[1]) - cfg.seed
        own = rg.create_dataset(row["task"], seed=cfg.seed, size=cfg.train_size)[i]
        assert row["question"] == own["question"] and row["answer"] == str(own["answer"])
        assert row["metadata"] == own["metadata"] and row["metadata"]["source_dataset"] == row["task"]
        assert row["entry"] == own


def test_train_and_held_out_come_from_disjoint_seeds(rg):
    cfg = data()
    train, test = load_rows(cfg, "train"), load_rows(cfg, "test")
    assert len(train) == cfg.train_size and len(test) == cfg.test_size
    item_seed = lambda r: int(r["id"].split("/")[1])  # noqa: E731
    assert {item_seed(r) for r in train} == set(range(cfg.seed, cfg.seed + cfg.train_size))
    assert min(item_seed(r) for r in test) >= cfg.seed + cfg.train_size
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    # Independently: the held-out entries are the task's own from seed data.seed + data.train_size.
    ds = rg.create_dataset("chain_sum", seed=cfg.seed + cfg.train_size, size=10 * cfg.test_size)
    for row in test[:20]:
        assert row["entry"] == ds[item_seed(row) - cfg.seed - cfg.train_size]
    # Another data.seed: other problems.
    other = load_rows(data(seed=cfg.seed + 100_000), "train")
    assert [r["question"] for r in other[:20]] != [r["question"] for r in train[:20]]


def test_a_small_problem_space_skips_repeated_questions(rg):
    # 2 one-digit terms: 200 problems; 300 training draws see most of them.
    cfg = data(task_config={"min_terms": 2, "max_terms": 2, "max_digits": 1}, test_size=40)
    train, test = load_rows(cfg, "train"), load_rows(cfg, "test")
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    assert 0 < len(test) <= 40


def test_task_config_and_level_reach_the_task(rg):
    rows = load_rows(data(task_config={"min_terms": 4, "max_terms": 4}), "train")
    assert {r["metadata"]["num_terms"] for r in rows} == {4}
    assert rows[0]["task_config"]["max_terms"] == 4
    # The curriculum: chain_sum's attributes at level 0 are 2 terms and 1 digit (reasoning-gym's own).
    from reasoning_gym.factory import create_curriculum

    expected = create_curriculum("chain_sum").generate_configuration()
    rows = load_rows(data(difficulty=0), "train")
    assert {r["metadata"]["num_terms"] for r in rows} == set(
        range(expected.min_terms, expected.max_terms + 1)
    )
    assert {r["metadata"]["num_digits"] for r in rows} == {1}
    higher = load_rows(data(difficulty=3), "train")
    assert max(r["metadata"]["num_terms"] for r in higher) > max(r["metadata"]["num_terms"] for r in rows)
    # task_config wins over the level for the keys it names.
    mixed = load_rows(data(difficulty=3, task_config={"max_digits": 1}), "train")
    assert {r["metadata"]["num_digits"] for r in mixed} == {1}


@pytest.mark.parametrize(
    "kw,needle",
    [
        ({"task": "chain_summ"}, "did you mean: chain_sum"),
        ({"task_config": {"max_termz": 3}}, "its keys:"),
        ({"task_config": {"seed": 3}}, "data.seed"),
        ({"task_config": {"min_terms": 5, "max_terms": 2}}, "max_terms must be >= min_terms"),
        ({"task": {"chain_sum": 0}}, "weights must be > 0"),
        ({"task": ["chain_sum", "gcd"], "task_config": {"max_terms": 3}}, "several tasks"),
        ({"difficulty": {"num_termz": 1}}, "curriculum attributes"),
        ({"train_size": 0}, "must be >= 1"),
    ],
)
def test_bad_settings_are_one_line(rg, kw, needle):
    with pytest.raises(ConfigError, match=None) as err:
        load_rows(data(**kw), "train")
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_the_group_composes_with_its_reward(rg):
    cfg, _ = compose_config(
        "train", ["data=reasoning_gym", "data.task=gcd", "data.task_config={max_num: 20}"]
    )
    assert cfg.data.name == "reasoning_gym" and cfg.data.task_config == {"max_num": 20}
    assert [r["name"] for r in cfg.reward.rules] == ["reasoning_gym"]
    assert cfg.rollout.max_new_tokens == cfg.data.max_new_tokens


def test_missing_extra_is_one_line_naming_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # `import reasoning_gym` now fails
    with pytest.raises(ConfigError) as err:
        load_rows(data(), "train")
    assert str(err.value) == rg_data.EXTRA and "pip install 'grpo-cli[reasoning-gym]'" in rg_data.EXTRA
    assert main(["sample", "data=reasoning_gym", "data.task=chain_sum"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == [f"grpo sample: error: {rg_data.EXTRA}"]
