"""Run trackers beside ``metrics.jsonl``: TensorBoard, Weights & Biases, MLflow (``train.logger``).

    grpo train train.logger=[jsonl,wandb,mlflow]      # jsonl is always written, listed or not
    grpo train train.logger=tensorboard               # one tracker: a plain value works too

Each tracker is an optional extra (``pip install 'grpo-cli[wandb]'``, ``[mlflow]``, ``[tensorboard]``,
or ``make install-trackers`` for all three); ``check`` turns a selected tracker whose package is missing
into one ConfigError line before any model loads. Only rank 0 builds trackers (``RunLogger``).

Every tracker has the same small interface: it starts (or, for a resumed run, continues) in its
constructor, ``log(step, metrics)`` records a step's numbers, ``log_completions(step, records)`` the
step's sampled completions, ``finish(status)`` closes it. ``trackers.json`` in the run dir keeps the
W&B and MLflow run ids, so ``train.resume`` continues the same tracker runs.

- tensorboard: event files in ``<run_dir>/tb`` (a resumed run purges the steps after its checkpoint).
- wandb: files in ``<run_dir>/wandb``. ``WANDB_MODE`` decides online/offline when set; otherwise the
  run is offline when there is no API key (``WANDB_API_KEY`` or a ``wandb login`` entry in ~/.netrc)
  or the W&B host (``WANDB_BASE_URL``, default api.wandb.ai) does not answer within 3 s, and we say so
  with the ``wandb sync`` command that uploads it later. ``WANDB_PROJECT`` (default ``grpo-cli``),
  ``WANDB_ENTITY`` and ``WANDB_NAME`` are honoured. Config = the resolved config. Completions go to one
  table, ``completions``, logged in W&B's INCREMENTAL mode: each logging step adds its rows and the
  table keeps every earlier step's (TRL replaces its table each time, trl#2045).
- mlflow: ``MLFLOW_TRACKING_URI`` when set, else a SQLite store ``<run_dir>/mlflow.db`` with artifacts
  in ``<run_dir>/mlartifacts`` (MLflow 3 refuses plain ``./mlruns`` file stores unless
  ``MLFLOW_ALLOW_FILE_STORE=true``). Experiment: ``MLFLOW_EXPERIMENT_NAME`` or ``grpo-cli``. Params =
  the resolved config flattened to dotted keys (values longer than MLflow's 6000-character limit are
  cut, ending in ``...``); the whole config is the artifact ``config.yaml``; completions are artifacts
  ``completions/step-<step>.jsonl``. MLflow accepts metric names of letters, digits and ``_-. :/``:
  ``@`` becomes ``_at_`` (``pass@1`` -> ``pass_at_1``), any other character ``_`` (``mlflow_name``).

A run resumed from a checkpoint logs its steps from the checkpoint's on; steps a killed run had
logged after that checkpoint are logged again (with the same values on CPU, where resume is exact):
W&B keeps the first value of a step, MLflow's history holds both.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import socket
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from grpo_cli.config import ConfigError, leaves

log = logging.getLogger("grpo_cli")

# train.logger option -> (the modules it needs, the extra that installs them).
EXTRAS = {
    "tensorboard": (("tensorboard",), "tensorboard"),
    "wandb": (("wandb",), "wandb"),
    "mlflow": (("mlflow", "sqlalchemy", "alembic"), "mlflow"),  # the last two: the local SQLite store
}
NAMES = ("jsonl", *EXTRAS)
IDS_FILE = "trackers.json"
PROJECT = "grpo-cli"  # W&B project and MLflow experiment unless WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME


def selected(value: Any) -> list[str]:
    """``train.logger`` as a list (a plain string is a one-element list), jsonl first and always there."""
    names = [value] if isinstance(value, str) else list(value or [])
    return ["jsonl", *dict.fromkeys(n for n in names if n != "jsonl")]


def check(value: Any) -> list[str]:
    """The selected trackers; ConfigError (one line) for an unknown one or one whose extra is missing."""
    names = selected(value)
    for name in names:
        if name not in NAMES:
            raise ConfigError(f"train.logger: {name!r} is not a logger; choose from: {', '.join(NAMES)}")
    for name in names[1:]:
        modules, extra = EXTRAS[name]
        missing = [m for m in modules if not _installed(m)]
        if missing:
            raise ConfigError(
                f"train.logger={name}: {missing[0]} is not installed; pip install 'grpo-cli[{extra}]' "
                "(or make install-trackers)"
            )
    return names


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules (tests) raises ValueError
        return False


class Tracker(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def log_completions(self, step: int, records: list[dict[str, Any]]) -> None: ...

    def finish(self, status: str = "finished") -> None:
        """``status``: finished, killed (a signal stopped the run) or failed (an error)."""
        ...


class TrackerUnreachable(RuntimeError):
    """A tracker's server did not answer a short probe at start."""


def open_trackers(
    names: Any, run_dir: Path, config: dict[str, Any], resume_step: int | None, title: str
) -> list[Tracker]:
    """Start the selected trackers (jsonl aside); ``resume_step``: the checkpoint step, None when fresh."""
    ids_path = run_dir / IDS_FILE
    ids = json.loads(ids_path.read_text()) if resume_step is not None and ids_path.is_file() else {}
    out: list[Tracker] = []
    for name in selected(names)[1:]:
        try:
            if name == "tensorboard":
                out.append(TensorBoardTracker(run_dir / "tb", resume_step or 0))
            elif name == "wandb":
                out.append(WandbTracker(run_dir, config, ids.get("wandb"), title))
                ids["wandb"] = out[-1].run_id
            elif name == "mlflow":
                out.append(MlflowTracker(run_dir, config, ids.get("mlflow"), title, resume_step or 0))
                ids["mlflow"] = out[-1].ids
        except TrackerUnreachable as exc:
            log.warning("train.logger=%s: %s; this run goes on without it", name, exc)
        except Exception as exc:  # noqa: BLE001 - the model is loaded by now: train without it, loudly
            first = str(exc).splitlines()[0] if str(exc) else ""
            log.error("train.logger=%s could not start (%s: %s); this run goes on without it",
                      name, type(exc).__name__, first)  # fmt: skip
    if ids:
        ids_path.write_text(json.dumps(ids, indent=1) + "\n")
    return out


def numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """The metrics that are numbers (not None, not bools), as floats."""
    return {
        k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def _plain(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def completion_columns(records: list[dict[str, Any]]) -> list[str]:
    """Table columns: the scalar fields of a completion record, then one ``rewards/<rule>`` per rule."""
    scalar = [k for k in records[0] if k != "rewards"]
    return [*scalar, *(f"rewards/{r}" for r in records[0].get("rewards", {}))]


def completion_row(rec: dict[str, Any], columns: list[str]) -> list[Any]:
    rules = rec.get("rewards", {})
    return [_plain(rules.get(c[8:]) if c.startswith("rewards/") else rec.get(c)) for c in columns]


class TensorBoardTracker:
    """Event files; ``purge_step`` makes TensorBoard drop the events a resumed run writes again."""

    def __init__(self, log_dir: Path, resume_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=resume_step + 1 if resume_step else None)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in numbers(metrics).items():
            if math.isfinite(v):
                self.writer.add_scalar(k, v, step)

    def log_completions(self, step: int, records: list[dict[str, Any]]) -> None:
        pass  # completions.jsonl holds them; TensorBoard's text plugin is no place to browse them

    def finish(self, status: str = "finished") -> None:
        self.writer.close()


def wandb_mode() -> tuple[str, str]:
    """(mode, why): WANDB_MODE when set; offline without an API key or without a reachable W&B host."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"], "WANDB_MODE"
    if not _wandb_api_key():
        return "offline", "no W&B API key (WANDB_API_KEY or `wandb login`)"
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    if not _reachable(host):
        return "offline", f"{host} cannot be reached"
    return "online", ""


def _wandb_api_key() -> bool:
    import netrc

    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or ""
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _reachable(url: str, timeout: float = 3.0) -> bool:
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


class WandbTracker:
    """One W&B run per training run; ``run_id`` given: continue that run (``resume="allow"``)."""

    def __init__(self, run_dir: Path, config: dict[str, Any], run_id: str | None, title: str):
        import wandb

        mode, why = wandb_mode()
        self.run = wandb.init(
            dir=str(run_dir),
            project=os.environ.get("WANDB_PROJECT") or PROJECT,
            name=os.environ.get("WANDB_NAME") or title,
            id=run_id,
            resume="allow" if run_id else None,
            mode=mode,
            config=None if run_id else config,
            # console=off: W&B must not wrap stdout/stderr under the rich live panel.
            settings=wandb.Settings(console="off"),
        )
        if run_id:  # a resumed run may change train.steps and the other resume-free keys
            self.run.config.update(config, allow_val_change=True)
        self.run_id = self.run.id
        self.table = None
        if mode == "offline":
            log.info(
                "W&B run %s is offline (%s): files in %s/wandb; upload with: wandb sync %s/wandb",
                self.run_id, why, run_dir, run_dir,
            )  # fmt: skip

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(numbers(metrics), step=step)

    def log_completions(self, step: int, records: list[dict[str, Any]]) -> None:
        import wandb

        if not records:
            return
        if self.table is None:
            # INCREMENTAL: each log adds this step's rows and the table keeps the earlier ones.
            self.table = wandb.Table(columns=completion_columns(records), log_mode="INCREMENTAL")
        for rec in records:
            self.table.add_data(*completion_row(rec, self.table.columns))
        self.run.log({"completions": self.table}, step=step)

    def finish(self, status: str = "finished") -> None:
        self.run.finish(exit_code={"finished": 0, "killed": 130}.get(status, 1))


_MLFLOW_BAD = re.compile(r"[^A-Za-z0-9_\-. :/]")


def mlflow_name(name: str) -> str:
    """A metric name MLflow accepts: ``@`` -> ``_at_``, other characters outside ``[A-Za-z0-9_-. :/]`` -> ``_``."""
    return _MLFLOW_BAD.sub("_", name.replace("@", "_at_"))


def flatten(node: Any) -> dict[str, str]:
    """Dotted keys -> string values (lists and their dicts as JSON), for MLflow params."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in leaves(node).items()}


class MlflowTracker:
    """One MLflow run per training run; ``ids`` given (run id and tracking URI): continue that run."""

    def __init__(self, run_dir: Path, config: dict[str, Any], ids: dict | None, title: str, resume_step: int):
        from mlflow.tracking import MlflowClient

        for name in ("mlflow", "alembic"):  # their per-store setup chatter ("Creating initial tables")
            logging.getLogger(name).setLevel(logging.WARNING)
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run_dir.resolve()}/mlflow.db"
        if urlparse(uri).scheme in ("http", "https") and not _reachable(uri):
            # MLflow's client would retry with backoff for minutes before its first call fails.
            raise TrackerUnreachable(f"the MLflow tracking server {uri} does not answer (3 s probe)")
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = self._existing(ids, uri)
        if self.run_id:
            self.client.update_run(self.run_id, status="RUNNING")
            self._log_params(config, resume_step)
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or PROJECT
            local = (
                None
                if os.environ.get("MLFLOW_TRACKING_URI")
                else (run_dir.resolve() / "mlartifacts").as_uri()
            )
            exp = self.client.get_experiment_by_name(name)
            exp_id = (
                exp.experiment_id if exp else self.client.create_experiment(name, artifact_location=local)
            )
            run = self.client.create_run(exp_id, run_name=title, tags={"grpo.run_dir": str(run_dir)})
            self.run_id = run.info.run_id
            self._log_params(config, 0)
            self.client.log_dict(self.run_id, config, "config.yaml")
        self.ids = {"run_id": self.run_id, "tracking_uri": uri}

    def _existing(self, ids: dict | None, uri: str) -> str | None:
        if not ids:
            return None
        try:
            return self.client.get_run(ids["run_id"]).info.run_id
        except Exception:  # noqa: BLE001 - any lookup failure: a new run, said once
            log.warning(
                "MLflow run %s is not in %s (it was logged to %s): starting a new MLflow run",
                ids.get("run_id"), uri, ids.get("tracking_uri"),
            )  # fmt: skip
            return None

    def _log_params(self, config: dict[str, Any], resume_step: int) -> None:
        """Params once per key (MLflow refuses to change one): a resumed run adds only new keys, and
        records a changed value as the tag ``resumed_at_<step>.<key>``."""
        from mlflow.entities import Param, RunTag
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        old = self.client.get_run(self.run_id).data.params
        params, tags = [], []
        for k, v in flatten(config).items():
            v = v if len(v) <= MAX_PARAM_VAL_LENGTH else v[: MAX_PARAM_VAL_LENGTH - 3] + "..."
            if k not in old:
                params.append(Param(k, v))
            elif old[k] != v:
                tags.append(RunTag(f"resumed_at_{resume_step}.{k}", v))
        entries = [*params, *tags]
        for i in range(0, len(entries), MAX_PARAMS_TAGS_PER_BATCH):
            part = entries[i : i + MAX_PARAMS_TAGS_PER_BATCH]
            self.client.log_batch(
                self.run_id,
                params=[e for e in part if isinstance(e, Param)],
                tags=[e for e in part if isinstance(e, RunTag)],
            )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(mlflow_name(k), v, now, step) for k, v in numbers(metrics).items()]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_completions(self, step: int, records: list[dict[str, Any]]) -> None:
        text = "".join(json.dumps({k: _plain(v) for k, v in rec.items()}) + "\n" for rec in records)
        self.client.log_text(self.run_id, text, f"completions/step-{step:06d}.jsonl")

    def finish(self, status: str = "finished") -> None:
        self.client.set_terminated(self.run_id, status=status.upper())
