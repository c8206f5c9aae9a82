"""The ``grpo eval`` table: one column per checkpoint, one row per headline metric, within the terminal.

    metric            base   checkpoint-100   checkpoint-300
    n                    4                4                4
    pass@1           0.236   0.262 (+0.026)   0.281 (+0.045)
      95% CI    [0.22, ..]   ...
    ...

Checkpoints are labelled by the shortest tail of their path that tells them apart (``checkpoint-300``,
or ``12-00-00/checkpoint-300`` when two runs are compared), with a legend of the full paths below;
eval.json keeps the paths whole. Checkpoints side by side are columns, so the table's width grows with
their number, not with the number of metrics; when they do not fit the console they continue in
another table, each of which fits, so no cell ever wraps. A checkpoint that was not evaluated because
it is damaged (``run.saved.whole_checkpoints``) keeps its column: ``damaged`` in the ``n`` row, ``-``
below, and what is wrong in the legend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def short_labels(names: list[str]) -> list[str]:
    """The shortest path tails (1 component or more) that are unique among ``names``; "base" stays."""
    parts = [Path(n).parts or (n,) for n in names]
    depth = [1] * len(names)
    while True:
        labels = ["/".join(p[-d:]) for p, d in zip(parts, depth)]
        clashes = [i for i, lab in enumerate(labels) if labels.count(lab) > 1 and depth[i] < len(parts[i])]
        if not clashes:
            return labels
        for i in clashes:
            depth[i] += 1


def table_rows(results: list[dict[str, Any]]) -> list[str]:
    """The headline metrics (eval.json holds them all): of the greedy ones only greedy/pass@1, and a
    ``reward/<rule>`` row only where it differs from ``mean_reward`` (one rule of weight 1 repeats it)."""
    names = list(dict.fromkeys(k for r in results for k in r["metrics"]))

    def redundant(name: str) -> bool:
        if name.startswith("greedy/"):
            return name != "greedy/pass@1"
        if name.startswith("reward/"):
            return all(r["metrics"].get(name) == r["metrics"].get("mean_reward") for r in results)
        return False

    return [n for n in names if not redundant(n)]


def _color(ci: list[float] | None) -> str:
    """An interval of a difference: green above 0, red below, yellow when it holds 0."""
    return "yellow" if not ci else "green" if ci[0] > 0 else "red" if ci[1] < 0 else "yellow"


def _value(name: str, value: float, first: float | None, ci: list[float] | None) -> str:
    """A metric's value and, after the first checkpoint, its difference from the first (coloured)."""
    if name == "delta_pass@1":
        return f"[{_color(ci)}]{value:+.3f}[/{_color(ci)}]"
    is_length = name.endswith("completion_len")
    text = f"{value:.1f}" if is_length else f"{value:.3f}"
    if first is not None and value != first:
        # Longer or shorter completions are neither better nor worse: no colour for lengths.
        color = "white" if is_length else "green" if value > first else "red"
        text += f" [{color}]({value - first:+.3f})[/{color}]"
    return text


def _interval(name: str, ci: list[float]) -> str:
    if name != "delta_pass@1":
        return f"[{ci[0]:.3f}, {ci[1]:.3f}]"
    return f"[{_color(ci)}][{ci[0]:+.3f}, {ci[1]:+.3f}][/{_color(ci)}]"  # "[+" / "[-" is no markup tag


def with_damaged(
    results: list[dict[str, Any]], names: list[str], damaged: dict[str, str]
) -> list[dict[str, Any]]:
    """``results`` with an entry for each damaged checkpoint, in the order of ``names``.

    A damaged entry: ``{"checkpoint": name, "damaged": "<what is wrong>", "n": 0, "metrics": {}, "ci95": {}}``.
    """
    evaluated = iter(results)
    return [
        {"checkpoint": n, "damaged": damaged[n], "n": 0, "metrics": {}, "ci95": {}}
        if n in damaged
        else next(evaluated)
        for n in names
    ]


def _body(results: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """(row label, one cell per checkpoint) for every row of the table."""
    lead = next(i for i, r in enumerate(results) if "damaged" not in r)  # differences are from it
    first = results[lead]["metrics"]
    rows = [("n", ["damaged" if "damaged" in r else str(r["n"]) for r in results])]
    for name in table_rows(results):
        cells = [
            _value(name, r["metrics"][name], first.get(name) if i > lead else None, r["ci95"].get(name))
            if name in r["metrics"]
            else "-"
            for i, r in enumerate(results)
        ]
        rows.append((name, cells))
        if name.endswith("pass@1") and any(name in r["ci95"] for r in results):
            rows.append(
                ("  95% CI", [_interval(name, r["ci95"][name]) if name in r["ci95"] else "" for r in results])
            )
    return rows


def results_tables(results: list[dict[str, Any]], title: str, console: Any) -> list[Any]:
    """rich Tables of ``results``, as many as it takes for every one to fit ``console``'s width."""
    from rich.measure import Measurement
    from rich.table import Table

    labels = short_labels([r["checkpoint"] for r in results])
    body = _body(results)

    def build(columns: list[int], caption: str) -> Table:
        table = Table(title=caption, min_width=min(len(caption), console.width))  # the title on one line
        table.add_column("metric", no_wrap=True)
        for i in columns:
            table.add_column(labels[i], justify="right", no_wrap=True)
        for label, cells in body:
            table.add_row(label, *(cells[i] for i in columns))
        return table

    def width(table: Table) -> int:
        # The natural width: measured against the console's own width it would be clamped to that.
        return Measurement.get(console, console.options.update_width(10_000), table).maximum

    tables, chunk = [], [0]
    for i in range(1, len(results)):
        if width(build([*chunk, i], title)) <= console.width:
            chunk.append(i)
        else:
            tables.append(build(chunk, title if not tables else f"{title} (continued)"))
            chunk = [i]
    tables.append(build(chunk, title if not tables else f"{title} (continued)"))
    return tables


def legend(results: list[dict[str, Any]]) -> list[str]:
    """``label: full path`` for every checkpoint whose label is shorter than its path; what is wrong
    with each damaged one."""
    names = [r["checkpoint"] for r in results]
    lines = [f"{label}: {name}" for label, name in zip(short_labels(names), names) if label != name]
    return lines + [
        f"{label}: {r['damaged']}" for label, r in zip(short_labels(names), results) if "damaged" in r
    ]
