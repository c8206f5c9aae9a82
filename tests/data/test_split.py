"""One data file (issue 14): a seeded, disjoint held-out slice, an explicit test file, or, asked for by
name, every row for both splits."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest

from grpo_cli.cli import compose_config
from grpo_cli.commands.validate import validate
from grpo_cli.config import ConfigError
from grpo_cli.data import load_rows


def problems(path: Path, n: int, gsm8k: bool = False) -> Path:
    answer = (lambda i: f"work\n#### {i}") if gsm8k else str
    path.write_text("".join(json.dumps({"question": f"q{i}", "answer": answer(i)}) + "\n" for i in range(n)))
    return path


def sides(cfg) -> tuple[list[str], list[str]]:
    train = [r["id"] for r in load_rows(cfg.data, cfg.data.train_split)]
    test = [r["id"] for r in load_rows(cfg.data, cfg.data.test_split)]
    return train, test


@pytest.mark.parametrize("group", ["jsonl", "gsm8k"])
def test_one_file_gives_disjoint_sides_that_cover_it(group, tmp_path, caplog):
    path = problems(tmp_path / "problems.jsonl", 50, gsm8k=group == "gsm8k")
    cfg, _ = compose_config("train", [f"data={group}", f"data.path={path}"])
    with caplog.at_level(logging.INFO, logger="grpo_cli"):
        train, test = sides(cfg)
        assert sides(cfg) == (train, test)  # the same rows every time
    assert not set(train) & set(test)
    assert sorted(train + test, key=int) == [str(i) for i in range(50)]
    assert len(test) == 5  # the default data.test_size=0.1
    assert train == sorted(train, key=int) and test == sorted(test, key=int)  # file order on each side
    assert test != [str(i) for i in range(45, 50)] and test != [str(i) for i in range(5)]  # drawn, not cut
    lines = [r.getMessage() for r in caplog.records if "is one file" in r.getMessage()]
    assert lines == [
        f"data.path={path} is one file: 45 rows for training, 5 held out (data.test_size=0.1; "
        "data.test_path= names a held-out file, data.test_size=0 uses every row for both)"
    ]
    # The run's seed does not move the held-out rows (train and a later eval must agree).
    assert sides(compose_config("train", [f"data={group}", f"data.path={path}", "seed=3"])[0]) == (
        train,
        test,
    )
    assert sides(compose_config("eval", [f"data={group}", f"data.path={path}"])[0])[1] == test


def test_a_count_an_explicit_test_file_or_every_row_by_name(tmp_path):
    path = problems(tmp_path / "problems.jsonl", 20)
    cfg, _ = compose_config("train", ["data=jsonl", f"data.path={path}", "data.test_size=7"])
    train, test = sides(cfg)
    assert len(test) == 7 and len(train) == 13 and not set(train) & set(test)
    other = problems(tmp_path / "held_out.jsonl", 3)
    cfg, _ = compose_config("train", ["data=jsonl", f"data.path={path}", f"data.test_path={other}"])
    validate(cfg)
    train, test = sides(cfg)
    assert len(train) == 20 and [r["question"] for r in load_rows(cfg.data, "test")] == ["q0", "q1", "q2"]
    cfg, _ = compose_config("train", ["data=jsonl", f"data.path={path}", "data.test_size=0"])
    assert sides(cfg) == ([str(i) for i in range(20)], [str(i) for i in range(20)])
    # A directory of split files is used as it is.
    (tmp_path / "dir").mkdir()
    problems(tmp_path / "dir" / "train.jsonl", 4), problems(tmp_path / "dir" / "test.jsonl", 2)
    cfg, _ = compose_config("train", ["data=jsonl", f"data.path={tmp_path / 'dir'}"])
    assert sides(cfg) == (["0", "1", "2", "3"], ["0", "1"])


def test_bad_test_sizes_are_one_line_errors(tmp_path):
    path = problems(tmp_path / "problems.jsonl", 4)
    cfg, _ = compose_config("train", ["data=jsonl", f"data.path={path}"])
    for value, message in [(2.5, "a count of rows"), (-0.1, "a count of rows")]:
        with pytest.raises(ConfigError, match=message):
            validate(replace(cfg, data=replace(cfg.data, test_size=value)))
    with pytest.raises(ConfigError, match="holds out 4 of the 4 rows .* leaving none to train on"):
        load_rows(replace(cfg.data, test_size=4), "train")
    with pytest.raises(ConfigError, match="data.test_path=/no/such.jsonl: no such file"):
        validate(replace(cfg, data=replace(cfg.data, test_path="/no/such.jsonl")))
