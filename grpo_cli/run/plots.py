"""Training curves as one PNG (``<run_dir>/curves.png``), drawn from the rows of ``metrics.jsonl``.

matplotlib is an optional extra (``pip install 'grpo-cli[plots]'``); without it ``write_curves``
returns False and the caller says so once. The figure is drawn with matplotlib's object API and the
Agg canvas, never ``pyplot``, so no global backend or figure state is touched.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Panel title -> the metrics drawn in it (those present in the rows), in order.
PANELS: dict[str, tuple[str, ...]] = {
    "reward": ("reward", "eval/reward"),
    "accuracy": ("accuracy", "eval/accuracy", "eval/accuracy_greedy"),
    "kl": ("kl",),
    "entropy": ("entropy",),
    "clip fraction": ("clip/low_frac", "clip/high_frac"),
    "completion length": ("completion_len",),
    "step time (s)": ("step_time",),
}


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [s for s, _ in points], [v for _, v in points]


def write_curves(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> bool:
    """Draw the ``PANELS`` against step into ``path`` (PNG); False when matplotlib is missing.

    The panel titles are also written into the PNG's ``Description`` text chunk, so a reader (or a
    test) can tell which panels the image holds. The file is replaced atomically.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    cols = -(-len(PANELS) // 2)  # two rows
    fig = Figure(figsize=(4 * cols, 6.5))
    FigureCanvasAgg(fig)
    grid = fig.subplots(2, cols, sharex=True).ravel()
    for ax in grid[len(PANELS) :]:  # an odd count leaves the last slot empty
        fig.delaxes(ax)
    axes = grid[: len(PANELS)]
    for ax, (name, keys) in zip(axes, PANELS.items()):
        ax.set_title(name)
        for key in keys:
            steps, values = _series(rows, key)
            if steps:
                # Evaluation rows are sparse: markers make a single point visible.
                ax.plot(
                    steps, values, label=key, marker="o" if key.startswith("eval/") else None, markersize=3
                )
        if len(ax.lines) > 1:
            ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    for i, ax in enumerate(axes):
        if i + cols >= len(axes):  # nothing below it: label its step axis
            ax.set_xlabel("step")
            ax.xaxis.set_tick_params(labelbottom=True)
    if title:
        fig.suptitle(title)
    # Fixed margins: matplotlib's layout engines would double the time to write the file.
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.08, top=0.9, wspace=0.22, hspace=0.25)
    out = Path(path)
    tmp = out.with_name(f".{out.name}.tmp")
    description = "panels: " + ", ".join(ax.get_title() for ax in axes)
    fig.savefig(
        tmp, format="png", dpi=90, metadata={"Title": "grpo-cli training curves", "Description": description}
    )
    os.replace(tmp, out)
    return True
