"""Progress of generation that takes a while: completions done of the total, tokens/s, elapsed, ETA.

Every held-out evaluation in ``grpo train`` and every generation of ``grpo eval`` / ``grpo sample``
runs under a ``GenerationProgress``: a rich bar on a terminal (inside ``grpo train``'s live panel when
one is showing: rich nests a second live display into the first on the same console), and one log
line per task when it ends, on every console, so a log file records the pace too. ``rollout.generate``
reports after each chunk of ``rollout.batch_size`` completions through the callback ``task`` returns.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("grpo_cli")

# Above this many tokens (an upper bound: completions x max_new_tokens) a held-out evaluation is
# "long" and its cost is announced before it starts.
LONG_GENERATION_TOKENS = 100_000


def _columns() -> list[Any]:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class TokensPerSecond(ProgressColumn):
        def render(self, task: Any) -> Text:
            elapsed = task.elapsed or 0.0
            rate = task.fields.get("tokens", 0) / elapsed if elapsed > 0 else 0.0
            return Text(f"{rate:,.0f} tokens/s", style="progress.data.speed")

    return [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("completions"),
        TokensPerSecond(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]


class GenerationProgress:
    """Bars for generation tasks on ``console`` (None: no bar), plus one log line per finished task.

    ``live``: draw the bar (``console=rich`` on a terminal); otherwise only the log lines appear.
    Use as a context manager around the tasks; ``task(label, total)`` gives ``generate``'s callback.
    """

    def __init__(self, console: Any | None = None, live: bool = True):
        self.console, self.live = console, live and console is not None
        self._progress: Any = None
        self._depth = 0

    def __enter__(self) -> GenerationProgress:
        self._depth += 1
        if self.live and self._progress is None:
            from rich.errors import LiveError
            from rich.progress import Progress

            progress = Progress(*_columns(), console=self.console, transient=True)
            try:
                progress.start()
                self._progress = progress
            except LiveError:  # an older rich without nested live displays: log lines only
                self.live = False
        return self

    def __exit__(self, *exc: Any) -> None:
        self._depth -= 1
        if self._depth == 0 and self._progress is not None:
            self._progress.stop()
            self._progress = None

    @contextmanager
    def task(self, label: str, total: int) -> Iterator[Callable[[int, int], None]]:
        """A task of ``total`` completions; yields ``advance(completions, tokens)`` and logs the pace at the end."""
        counts = [0, 0]
        start = time.perf_counter()
        with self:
            task_id = (
                None if self._progress is None else self._progress.add_task(label, total=total, tokens=0)
            )

            def advance(completions: int, tokens: int) -> None:
                counts[0] += completions
                counts[1] += tokens
                if task_id is not None:
                    self._progress.update(task_id, completed=counts[0], tokens=counts[1])

            try:
                yield advance
            finally:
                if task_id is not None:
                    self._progress.remove_task(task_id)
        seconds = time.perf_counter() - start
        log.info(
            "%s: %d completions, %d tokens in %.1f s (%.0f tokens/s)",
            label,
            counts[0],
            counts[1],
            seconds,
            counts[1] / seconds if seconds > 0 else 0.0,
        )


def cost_line(what: str, problems: int, samples: int, greedy: bool, max_new_tokens: int, times: int) -> str:
    """One line saying how much generation ``what`` asks for: completions, the token bound, how often."""
    per_problem = f"{samples} samples + 1 greedy" if greedy else f"{samples} samples"
    completions = problems * (samples + int(greedy))
    bound = completions * max_new_tokens
    often = f", {times} times in this run" if times > 1 else ""
    return (
        f"{what}: {problems} problems x ({per_problem}) = {completions:,} completions of up to "
        f"{max_new_tokens} tokens (<= {bound:,} tokens){often}"
    )
