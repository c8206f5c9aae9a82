"""Any local table of problems: ``.jsonl``, ``.json``, ``.parquet`` (``.gz`` for the JSON ones).

    grpo train data=jsonl data.path=problems.jsonl data.question_field=prompt data.answer_field=target

``data.path`` is a file (used for every split) or a directory holding ``<split>.jsonl`` (or
``.json``, ``.parquet``). Rows take ``question`` and ``answer`` from ``data.question_field`` and
``data.answer_field`` (answers become strings), ``id`` from ``data.id_field`` or the row's index,
and keep every other field for the reward rules. A malformed line or a row without the fields is
skipped with a warning naming it; Parquet needs ``pyarrow``.

The readers here are shared by the GSM8K and MATH-500 loaders.
"""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from grpo_cli.config import ConfigError

log = logging.getLogger("grpo_cli")


class _BadLine(str):
    """A line that is not JSON: still counted in the row index, so later ids do not shift."""


SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
_SHOW = 5  # malformed rows named one by one before the summary

RowFn = Callable[[int, dict], dict]  # (index in the file, record) -> row; raises to skip the record


class SkipLog:
    """Counts the malformed rows of one source; names the first few, then sums up."""

    def __init__(self, source: str):
        self.source, self.count = source, 0

    def skip(self, where: str, reason: str) -> None:
        self.count += 1
        if self.count <= _SHOW:
            log.warning("%s: skipping %s: %s", self.source, where, reason)

    def summary(self) -> None:
        if self.count:
            log.warning("%s: skipped %d malformed row(s)", self.source, self.count)


def resolve_file(path: str | Path, split: str, key: str = "data.path") -> Path:
    """``path`` itself when it is a file, else ``<path>/<split><suffix>``. ConfigError when missing."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        for suffix in SUFFIXES:
            if (p / f"{split}{suffix}").is_file():
                return p / f"{split}{suffix}"
        found = sorted(f.name for f in p.iterdir() if f.name.endswith(SUFFIXES))
        raise ConfigError(
            f"{key}={path}: no {split}.jsonl (or .json, .parquet) in it; found: {', '.join(found) or 'none'}"
        )
    raise ConfigError(f"{key}={path}: no such file or directory")


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _jsonl_records(path: Path, skips: SkipLog) -> Iterator[tuple[str, Any]]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"line {lineno}", json.loads(line)
            except json.JSONDecodeError as exc:
                yield f"line {lineno}", _BadLine(f"bad JSON ({exc.msg})")


def _json_records(path: Path, skips: SkipLog) -> Iterator[tuple[str, Any]]:
    with _open_text(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON lines under a .json name (common on the hub)
            yield from _jsonl_records(path, skips)
            return
        raise ConfigError(f"data.path={path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, list):
        raise ConfigError(f"data.path={path}: expected a JSON list of objects, got {type(data).__name__}")
    for i, record in enumerate(data):
        yield f"item {i}", record


def _parquet_records(path: Path, skips: SkipLog) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"data.path={path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
    for i, record in enumerate(pq.read_table(path).to_pylist()):
        yield f"row {i}", record


def read_records(path: Path, skips: SkipLog) -> Iterator[tuple[int, str, dict]]:
    """(index, location, record) for each JSON object in ``path``; bad lines and non-objects are skipped.

    ``index`` is the record's position in the file (blank lines aside), bad ones included, so an id
    derived from it does not move when an earlier line is broken; ``location`` names it in warnings.
    """
    name = path.name
    reader: Callable[[Path, SkipLog], Iterator[tuple[str, Any]]]
    if name.endswith((".jsonl", ".jsonl.gz")):
        reader = _jsonl_records
    elif name.endswith((".json", ".json.gz")):
        reader = _json_records
    elif name.endswith(".parquet"):
        reader = _parquet_records
    else:
        raise ConfigError(f"data.path={path}: unknown format; use one of {', '.join(SUFFIXES)}")
    for index, (where, record) in enumerate(reader(path, skips)):
        if isinstance(record, _BadLine):
            skips.skip(where, record)
        elif not isinstance(record, dict):
            skips.skip(where, f"expected an object, got {type(record).__name__}")
        else:
            yield index, where, record


def map_records(items: Iterable[tuple[int, str, dict]], skips: SkipLog, to_row: RowFn) -> list[dict]:
    """``to_row(index, record)`` over ``items``; a KeyError/ValueError/TypeError there skips (and counts) the row."""
    rows = []
    for index, where, record in items:
        try:
            rows.append(to_row(index, record))
        except KeyError as exc:
            skips.skip(where, f"missing field {exc}")
        except (ValueError, TypeError) as exc:
            skips.skip(where, str(exc))
    skips.summary()
    return rows


def load_table(path: Path, source: str, to_row: RowFn) -> list[dict]:
    """Rows of the local file ``path``, mapped by ``to_row(index, record)``."""
    skips = SkipLog(f"{source} {path}")
    return map_records(read_records(path, skips), skips, to_row)


def load_hub(source: str, hub_id: str, config: str | None, split: str, to_row: RowFn) -> list[dict]:
    """Rows of a Hugging Face dataset via ``datasets.load_dataset``; ConfigError (one line) when unavailable."""
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            f"data={source}: data.path is not set and the `datasets` library is not installed; pass "
            f"data.path=/path/to/{source} (a .jsonl file or a directory with {split}.jsonl) or pip install 'grpo-cli[datasets]'"
        ) from None
    try:
        table = datasets.load_dataset(hub_id, config, split=split)
    except Exception as exc:  # noqa: BLE001 - offline, unknown split, no access: one line either way
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise ConfigError(
            f"data={source}: cannot load {hub_id} split {split!r} from the hub ({reason}); "
            f"pass data.path=/path/to/{source}"
        ) from None
    skips = SkipLog(f"data={source} {hub_id}")
    return map_records(((i, f"row {i}", dict(r)) for i, r in enumerate(table)), skips, to_row)


def _text(value: Any, field: str) -> str:
    if value is None:
        raise KeyError(field)
    return (
        value
        if isinstance(value, str)
        else json.dumps(value)
        if isinstance(value, (list, dict))
        else str(value)
    )


def load(cfg: Any, split: str) -> list[dict]:
    """Rows of ``split`` from ``cfg.path`` with the configured field names."""
    if not cfg.path:
        raise ConfigError(
            "data=jsonl needs data.path=/path/to/file.jsonl (or .json, .parquet, or a directory)"
        )
    path = resolve_file(cfg.path, split)
    qf, af, idf = cfg.question_field, cfg.answer_field, cfg.id_field

    def to_row(index: int, record: dict) -> dict:
        row = dict(record)
        row["question"] = _text(record.get(qf), qf)
        row["answer"] = _text(record.get(af), af)
        row["id"] = str(record[idf]) if idf else str(index)
        return row

    rows = load_table(path, "data=jsonl", to_row)
    if not rows:
        raise ConfigError(
            f"data.path={path}: no row has both data.question_field={qf!r} and data.answer_field={af!r}"
            f"{_fields_seen(path)}"
        )
    return rows


def _fields_seen(path: Path) -> str:
    for _, _, record in read_records(path, SkipLog(str(path))):
        return f" (the first row has: {', '.join(sorted(record))})"
    return ""
