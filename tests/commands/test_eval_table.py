"""The `grpo eval` table (issue 14): short checkpoint labels, and no cell wraps at 80 columns."""

from __future__ import annotations

import io

from rich.console import Console

from grpo_cli.commands.eval_table import legend, results_tables, short_labels

RUN = "/home/user/projects/grpo/outputs/2026-11-29"


def entry(name: str, i: int) -> dict:
    """A checkpoint's eval.json entry with every metric `grpo eval` writes for eval.k=[1,4,16]."""
    metrics = {
        "pass@1": 0.2 + 0.05 * i, "pass@4": 0.5, "pass@16": 0.8, "maj@4": 0.3, "maj@16": 0.35,
        "mean_reward": 0.2 + 0.05 * i, "reward/math": 0.2 + 0.05 * i, "extracted": 0.97,
        "completion_len": 12.5 + i, "greedy/pass@1": 0.3, "greedy/mean_reward": 0.3,
    }  # fmt: skip
    ci95 = {"pass@1": [0.18, 0.22 + 0.05 * i], "greedy/pass@1": [0.28, 0.32]}
    if i:
        metrics["delta_pass@1"] = 0.05 * i
        ci95["delta_pass@1"] = [-0.01 + 0.03 * i, 0.02 + 0.05 * i]
    return {"checkpoint": name, "n": 16, "metrics": metrics, "ci95": ci95}


def render(results: list[dict], width: int = 80) -> list[list[str]]:
    """Each table's rendered lines."""
    console = Console(file=io.StringIO(), width=width, color_system=None)
    out = []
    for table in results_tables(results, "grpo eval: 500 problems x 16 samples", console):
        with console.capture() as capture:
            console.print(table)
        out.append(capture.get().rstrip("\n").splitlines())
    return out


def test_labels_are_the_shortest_distinct_path_tails():
    names = [
        "base",
        f"{RUN}/12-00-00/checkpoint-100",
        f"{RUN}/12-00-00/checkpoint-300",
        f"{RUN}/13-30-00/checkpoint-300",
    ]
    assert short_labels(names) == [
        "base",
        "checkpoint-100",
        "12-00-00/checkpoint-300",
        "13-30-00/checkpoint-300",
    ]
    assert short_labels(["samples.jsonl"]) == ["samples.jsonl"]
    assert short_labels(["a/x", "a/x"]) == ["a/x", "a/x"]  # the same path twice: nothing tells them apart


def test_no_cell_wraps_at_80_columns_and_paths_stay_in_the_legend():
    for count in (1, 2, 3, 6):
        names = ["base"] + [f"{RUN}/12-00-00/checkpoint-{100 * i}" for i in range(1, count)]
        results = [entry(name, i) for i, name in enumerate(names)]
        tables = render(results)
        shown = 0
        for lines in tables:
            assert all(len(line) <= 80 for line in lines), "\n".join(lines)
            # title, top border, header, header rule, one line per row, bottom border: nothing wrapped
            # n, 11 metrics less 2 redundant (reward/math, greedy/mean_reward), 2 CI rows, delta and its CI
            rows = 1 + 9 + 2 + (2 if count > 1 else 0)
            assert len(lines) == 4 + rows + 1, "\n".join(lines)
            shown += lines[2].count("checkpoint-") + lines[2].count("base")
        assert shown == count  # every checkpoint in some table
        assert len(tables) == (1 if count <= 3 else 2)
        table = "\n".join(tables[0])
        assert RUN not in table and "pass@16" in table and "reward/math" not in table  # redundant rule row
        if count > 1:
            assert "checkpoint-100" in table and "0.250 (+0.050)" in table and "[+0.020, +0.070]" in table
    assert legend(results)[0] == f"checkpoint-100: {RUN}/12-00-00/checkpoint-100"
    assert all(not line.startswith("base") for line in legend(results))
