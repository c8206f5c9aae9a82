"""Run output: metrics, sampled completions, TensorBoard events, curves, and the console.

Files in the run directory:
- ``metrics.jsonl``: one row per step, ``step`` plus one key per metric (NaN written as null);
- ``completions.jsonl``: every ``train.log_completions_every`` steps, one row per completion of the
  step's batch: step, prompt, completion, length (tokens), reward, per-rule rewards, advantage;
- ``tb/``, ``wandb/``, ``mlflow.db`` + ``mlartifacts/``, ``trackers.json``: the run trackers that
  ``train.logger`` selects besides JSONL (``run.trackers``);
- ``curves.png``: reward, accuracy, KL, entropy, clip fraction, completion length and step time against step
  (``run.plots``; needs matplotlib).

On resume the rows after the checkpoint's step are dropped first, so a resumed run never holds a
step twice. The console is a rich live panel (progress with ETA, the latest metrics, one sampled
completion) with ``console=rich`` on a terminal, else one plain line per step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from grpo_cli.run import plots
from grpo_cli.run.trackers import open_trackers
from grpo_cli.runtime.logs import console_handlers

log = logging.getLogger("grpo_cli")

# What the plain console line shows of each step, in order: metric name -> short label.
CONSOLE_KEYS = {
    "reward": "reward",
    "accuracy": "acc",
    "kl": "kl",
    "entropy": "ent",
    "loss": "loss",
    "completion_len": "len",
    "step_time": "s/step",
    "eval/accuracy": "eval acc",
    "eval/accuracy_greedy": "eval greedy",
}
# The live panel shows these too: the signs of a run that learns nothing or is going wrong.
PANEL_KEYS = {
    **CONSOLE_KEYS,
    "zero_std_frac": "zero-std groups",
    "sampling_rounds": "sampling rounds",
    "clip/high_frac": "clip high",
    "clip/low_frac": "clip low",
    "grad_norm": "grad norm",
    "lr": "lr",
    "bad_steps": "bad steps",
    "tokens_per_s": "tokens/s",
}


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else (1e308 if value > 0 else -1e308)
    return value


def format_metrics(metrics: dict[str, float], keys: dict[str, str] = CONSOLE_KEYS) -> str:
    return "  ".join(f"{label} {metrics[k]:.3g}" for k, label in keys.items() if _is_number(metrics.get(k)))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _row_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # a line cut short by a kill: dropped with the rows after the checkpoint


def truncate_rows(path: str | Path, keep_through: int) -> int:
    """Drop rows of a JSONL file whose ``step`` is after ``keep_through``; returns how many were dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if _row_step(line) <= keep_through]
    if len(kept) < len(lines):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return len(lines) - len(kept)


def is_timing(key: str) -> bool:
    """A metric that measures the machine, not the run: seconds (``step_time``, ``gen_time``,
    ``reward_time/<rule>``, ...) and rates (``tokens_per_s``). Two runs equal to the bit differ in
    exactly these, so comparisons of runs (resume, ranks, engines) leave them out."""
    head = key.split("/")[0]
    return head.endswith("_time") or head.endswith("_per_s")


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class LivePanel:
    """The rich console view: step and ETA, a table of the latest metrics, one sampled completion."""

    def __init__(self, console: Console, total_steps: int, start_step: int):
        self.progress = Progress(
            TextColumn("step {task.completed}/{task.total}"),
            BarColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
        )
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step)
        self.step, self.metrics, self.example = start_step, {}, None
        out, err = sys.stdout, sys.stderr
        self.live = Live(self._render(), console=console, refresh_per_second=4)
        self.live.start()
        # Log lines go through the proxies Live put in place of sys.stdout / sys.stderr, so they print
        # above the panel instead of through it.
        proxies = {id(out): sys.stdout, id(err): sys.stderr}
        self._handlers = [
            h for lg in (log, logging.getLogger()) for h in console_handlers(lg) if id(h.stream) in proxies
        ]
        self._streams = [h.setStream(proxies[id(h.stream)]) for h in self._handlers]

    def update(self, step: int, metrics: dict[str, float], example: dict[str, Any] | None) -> None:
        self.progress.update(self.task, completed=step)
        self.step, self.metrics = step, {**self.metrics, **metrics}
        self.example = example or self.example
        self.live.update(self._render())

    def _render(self) -> Group:
        table = Table.grid(padding=(0, 3))
        cells = [
            f"[dim]{label}[/] {self.metrics[k]:.4g}"
            for k, label in PANEL_KEYS.items()
            if _is_number(self.metrics.get(k))
        ]
        for i in range(0, len(cells), 4):
            table.add_row(*cells[i : i + 4])
        parts: list[Any] = [self.progress, Panel(table, title=f"step {self.step}", title_align="left")]
        if self.example:
            ex = self.example
            body = Text(ex["prompt"][-300:], style="dim") + Text(ex["completion"][-500:])
            reward = "unjudged" if ex["reward"] is None else f"{ex['reward']:.3g}"
            parts.append(Panel(body, title=f"a sampled completion (reward {reward})", title_align="left"))
        return Group(*parts)

    def stop(self) -> None:
        self.live.stop()
        for handler, stream in zip(self._handlers, self._streams):
            if stream is not None:
                handler.setStream(stream)


class RunLogger:
    """Writes the run's metric rows, completions and curves, feeds the run trackers; drives the console.

    ``start_step``: the checkpoint step a resumed run continues from (rows after it are dropped);
    a fresh run (``resumed=False``) starts both JSONL files empty. ``logger``: ``train.logger`` (a name
    or a list of names, ``run.trackers``); ``config_yaml``: the resolved config the trackers record.
    A tracker that fails mid-run is said once and dropped; the JSONL files go on.
    """

    def __init__(
        self,
        run_dir: str | Path,
        total_steps: int,
        start_step: int = 0,
        console: str = "rich",
        logger: str | list[str] = "jsonl",
        resumed: bool = False,
        config_yaml: str = "",
    ):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self.completions_path = self.run_dir / "completions.jsonl"
        for path in (self.path, self.completions_path):
            truncate_rows(path, start_step if resumed else -1)
        self.console = Console(stderr=True)
        self.total = total_steps
        self.title = f"{self.run_dir.parent.name}/{self.run_dir.name}"
        self._said: set[str] = set()
        self.panel = None
        if console == "rich" and self.console.is_terminal:
            self.panel = LivePanel(self.console, total_steps, start_step)
        self.trackers = open_trackers(
            logger,
            self.run_dir,
            yaml.safe_load(config_yaml) or {},
            start_step if resumed else None,
            self.title,
        )

    def log(self, step: int, metrics: dict[str, float], example: dict[str, Any] | None = None) -> None:
        """Append the step's row; ``example`` (prompt, completion, reward) is shown in the live panel."""
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self._each_tracker("log", step, metrics)
        if self.panel is not None:
            self.panel.update(step, metrics, example)
        else:
            self.console.print(
                f"step {step}/{self.total}  {format_metrics(metrics)}", highlight=False, soft_wrap=True
            )

    def log_completions(self, records: list[dict[str, Any]]) -> None:
        """Append one row per completion to ``completions.jsonl`` (and give them to the trackers)."""
        with self.completions_path.open("a") as f:
            for rec in records:
                f.write(json.dumps({k: _clean(v) for k, v in rec.items()}) + "\n")
        if records:
            self._each_tracker("log_completions", records[0]["step"], records)

    def _each_tracker(self, method: str, *args: Any) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as exc:  # noqa: BLE001 - a tracker never stops training
                self.trackers.remove(tracker)
                log.error("%s failed (%s: %s); it logs no more in this run", type(tracker).__name__,
                          type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")  # fmt: skip

    def write_curves(self) -> Path | None:
        """Redraw ``curves.png`` from ``metrics.jsonl``; without matplotlib say so once and return None."""
        out = self.run_dir / "curves.png"
        if not self.path.exists() or not plots.write_curves(read_metrics(self.run_dir), out, self.title):
            if not plots.matplotlib_available():
                self.warn_once(
                    "matplotlib is not installed: no curves.png is written (pip install 'grpo-cli[plots]')"
                )
            return None
        return out

    def warn_once(self, message: str) -> None:
        if message not in self._said:
            self._said.add(message)
            log.warning(message)

    def print(self, text: str) -> None:
        if text:
            self.console.print(text, highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self.panel is not None:
            self.panel.stop()
            self.panel = None
        # Called from train's ``finally``: an exception on its way out says how the run ended.
        exc = sys.exc_info()[1]
        if exc is None:
            status = "finished"
        elif isinstance(exc, KeyboardInterrupt) or getattr(exc, "code", None) in (130, 143):
            status = "killed"  # Ctrl-C / SIGTERM (checkpoint.EXIT_CODES)
        else:
            status = "failed"
        self._each_tracker("finish", status)
        self.trackers = []


class SilentLogger:
    """The RunLogger of ranks other than 0: they write nothing and show nothing."""

    def log(self, step: int, metrics: dict[str, float], example: dict[str, Any] | None = None) -> None:
        pass

    def log_completions(self, records: list[dict[str, Any]]) -> None:
        pass

    def write_curves(self) -> None:
        return None

    def print(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass
