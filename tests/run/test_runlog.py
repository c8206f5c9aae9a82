"""Run output: JSONL rows and their truncation on resume, TensorBoard and matplotlib as optional extras,
the live console panel, the curves PNG. (A tracker whose extra is missing: tests/test_trackers.py.)"""

from __future__ import annotations

import io
import json
import logging
import math
import sys

import pytest
from rich.console import Console

from grpo_cli.run import plots
from grpo_cli.run.runlog import LivePanel, RunLogger, read_metrics, truncate_rows


def _write_rows(path, steps, broken_tail: bool = False) -> None:
    text = "".join(json.dumps({"step": s, "reward": s / 10}) + "\n" for s in steps)
    path.write_text(text + ('{"step": 9, "rew' if broken_tail else ""))


def test_truncate_rows_drops_rows_after_the_checkpoint_and_a_line_cut_short(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write_rows(path, range(6), broken_tail=True)
    assert truncate_rows(path, keep_through=3) == 3
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3]
    assert truncate_rows(tmp_path / "missing.jsonl", 3) == 0


@pytest.mark.parametrize("resumed,kept", [(True, [0, 1, 2, 3]), (False, [])])
def test_a_resumed_run_keeps_rows_up_to_its_checkpoint_a_fresh_one_none(tmp_path, resumed, kept):
    _write_rows(tmp_path / "metrics.jsonl", range(6))
    _write_rows(tmp_path / "completions.jsonl", range(6))
    logger = RunLogger(tmp_path, total_steps=10, start_step=3, console="plain", resumed=resumed)
    logger.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == kept
    assert [json.loads(x)["step"] for x in (tmp_path / "completions.jsonl").read_text().splitlines()] == kept


def test_rows_completions_and_the_plain_console(tmp_path, capsys):
    logger = RunLogger(tmp_path, total_steps=5, console="rich")  # not a terminal: plain lines
    assert logger.panel is None
    logger.log(1, {"reward": 0.5, "loss": math.nan, "grad_norm": math.inf})
    logger.log_completions(
        [{"step": 1, "prompt": "p", "completion": "c", "reward": 1.0, "advantage": math.nan}]
    )
    logger.close()
    assert read_metrics(tmp_path) == [{"step": 1, "reward": 0.5, "loss": None, "grad_norm": 1e308}]
    assert json.loads((tmp_path / "completions.jsonl").read_text())["advantage"] is None
    assert "step 1/5  reward 0.5" in capsys.readouterr().err


def test_tensorboard_events_are_written_when_installed(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is an optional extra (grpo-cli[tensorboard])")
    logger = RunLogger(tmp_path, total_steps=2, console="plain", logger="tensorboard")
    logger.log(1, {"reward": 1.0, "loss": math.nan})
    logger.close()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_without_matplotlib_no_png_and_one_message(tmp_path, monkeypatch, caplog):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    logger = RunLogger(tmp_path, total_steps=2, console="plain")
    logger.log(1, {"reward": 1.0})
    with caplog.at_level(logging.WARNING, logger="grpo_cli"):
        assert logger.write_curves() is None
        assert logger.write_curves() is None
    logger.close()
    assert caplog.text.count("matplotlib is not installed") == 1
    assert not (tmp_path / "curves.png").exists()


def test_curves_have_every_panel_even_for_missing_metrics(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is an optional extra (grpo-cli[plots])")
    from PIL import Image

    rows = [{"step": 0, "eval/accuracy": 0.1}, {"step": 1, "reward": 0.5, "step_time": 1.0}]
    assert plots.write_curves(rows, tmp_path / "c.png", "run")
    with Image.open(tmp_path / "c.png") as img:
        assert img.text["Description"] == "panels: " + ", ".join(plots.PANELS)
    assert not list(tmp_path.glob(".*.tmp"))


def test_live_panel_shows_step_metrics_and_a_completion():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    handler = logging.StreamHandler(sys.stderr)
    logging.getLogger("grpo_cli").addHandler(handler)
    try:
        panel = LivePanel(console, total_steps=10, start_step=2)
        panel.update(3, {"reward": 0.75, "zero_std_frac": 0.25}, {"prompt": "Calculate 2+2", "completion": " 4",
                                                                 "reward": 1.0})  # fmt: skip
        panel.stop()
        assert handler.stream is sys.stderr  # log lines went through the live proxy, and back again
    finally:
        logging.getLogger("grpo_cli").removeHandler(handler)
    text = out.getvalue()
    for fragment in (
        "step 3/10",
        "ETA",
        "reward",
        "0.75",
        "zero-std groups",
        "Calculate 2+2",
        "sampled completion",
    ):
        assert fragment in text, fragment
