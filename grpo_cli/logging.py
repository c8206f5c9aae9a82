"""Run output: ``metrics.jsonl`` (one row per step: ``step`` plus one key per metric), the console.

The console is a rich progress line with the latest metrics (``console=rich``) or one plain line
per logged step (``console=plain``, for log files and CI).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

log = logging.getLogger("grpo_cli")

# What the console shows of each step, in order: metric name -> short label.
CONSOLE_KEYS = {"reward": "reward", "accuracy": "acc", "kl": "kl", "loss": "loss", "completion_len": "len",
                "step_time": "s/step"}


def setup_logging(level: int = logging.INFO) -> None:
    """Our log lines on stderr; transformers' per-load progress bars and chatter kept quiet."""
    import warnings

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # peft still calls this deprecated transformers property; nothing for a user to act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        log.addHandler(handler)
    log.setLevel(level)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else (1e308 if value > 0 else -1e308)
    return value


def format_metrics(metrics: dict[str, float], keys: dict[str, str] = CONSOLE_KEYS) -> str:
    return "  ".join(f"{label} {metrics[k]:.3g}" for k, label in keys.items() if k in metrics)


class RunLogger:
    """Appends metric rows to ``<run_dir>/metrics.jsonl`` and shows progress on the console."""

    def __init__(self, run_dir: str | Path, total_steps: int, start_step: int = 0, console: str = "rich"):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.console = Console(stderr=True)
        self.plain = console == "plain" or not self.console.is_terminal
        self.total = total_steps
        self.progress: Progress | None = None
        self.start = time.monotonic()
        if not self.plain:
            self.progress = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                                     TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.description}"),
                                     console=self.console, transient=False)
            self.task = self.progress.add_task("", total=total_steps, completed=start_step)
            self.progress.start()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.progress is not None:
            self.progress.update(self.task, completed=step, description=format_metrics(metrics))
        else:
            self.console.print(f"step {step}/{self.total}  {format_metrics(metrics)}", highlight=False,
                               soft_wrap=True)

    def print(self, text: str) -> None:
        self.console.print(text, highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
