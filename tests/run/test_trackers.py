"""Run trackers (``train.logger``): W&B offline and MLflow beside metrics.jsonl, read back with each
library's own reader; resumed runs continue the same tracker runs; a missing extra is one error line.

Nothing here reaches a network: W&B runs with WANDB_MODE=offline and every W&B directory in a temp
dir; MLflow writes its default SQLite store in the run dir (MLFLOW_TRACKING_URI unset) with its
telemetry off (MLFLOW_DISABLE_TELEMETRY, DO_NOT_TRACK).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from grpo_cli.cli import compose_config, main
from grpo_cli.commands.validate import validate
from grpo_cli.config import ConfigError
from grpo_cli.run import runlog as logging_mod
from grpo_cli.run import trackers
from grpo_cli.run.guards import RunStopped
from grpo_cli.run.runlog import RunLogger, read_metrics

TINY = [
    "train.prompts_per_step=2", "algo.group_size=4", "rollout.max_new_tokens=8", "train.eval_problems=4",
    "train.eval_samples=2", "train.eval_every=0", "train.eval_at_ends=true", "train.log_completions_every=2", "console=plain",
    "train.logger=[jsonl,wandb,mlflow]",
]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _offline_trackers(tmp_path_factory):
    """Offline W&B with its config, cache and data dirs in a temp dir; MLflow's default local store."""
    home = tmp_path_factory.mktemp("tracker-home")
    with pytest.MonkeyPatch.context() as mp:
        for key in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_PROJECT", "WANDB_NAME", "WANDB_ENTITY",
                    "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):  # fmt: skip
            mp.delenv(key, raising=False)
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("WANDB_ERROR_REPORTING", "false")
        for key in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
            mp.setenv(key, str(home / key.lower()))
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.setenv("DO_NOT_TRACK", "1")
        yield


# ---------------------------------------------------------------------------- config and names


def test_logger_takes_a_list_or_one_name_and_jsonl_is_always_on():
    assert trackers.selected("tensorboard") == ["jsonl", "tensorboard"]
    assert trackers.selected(["wandb", "jsonl", "wandb", "mlflow"]) == ["jsonl", "wandb", "mlflow"]
    cfg, _ = compose_config("train", ["train.logger=tensorboard"])
    assert cfg.train.logger == "tensorboard"
    cfg, _ = compose_config("train", [])
    assert cfg.train.logger == ["jsonl"]
    with pytest.raises(
        ConfigError, match="'neptune' is not a logger; choose from: jsonl, tensorboard, wandb"
    ):
        validate(compose_config("train", ["train.logger=[jsonl,neptune]"])[0])


@pytest.mark.parametrize("name", ["wandb", "mlflow", "tensorboard"])
def test_a_tracker_whose_extra_is_missing_is_one_line_exit_2(name, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, name, None)  # the import fails as if the extra were not installed
    with pytest.raises(ConfigError, match=rf"pip install 'grpo-cli\[{name}\]'"):
        validate(compose_config("train", [f"train.logger=[jsonl,{name}]"])[0])
    assert main(["train", f"train.logger=[jsonl,{name}]", "model.name_or_path=/nonexistent"]) == 2
    err = capsys.readouterr().err.strip()
    # The logger is checked before the model path, so the missing extra is what the user is told.
    assert err.count("\n") == 0 and f"train.logger={name}: {name} is not installed" in err, err


def test_mlflow_metric_names_are_mapped_to_what_mlflow_accepts():
    assert trackers.mlflow_name("eval/pass@1") == "eval/pass_at_1"
    assert trackers.mlflow_name("clip/high_frac") == "clip/high_frac"
    assert trackers.mlflow_name("reward/math (x)+y") == "reward/math _x__y"


def test_wandb_goes_offline_without_a_key_or_a_reachable_host(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))  # no stored login
    assert trackers.wandb_mode()[0] == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setattr(trackers, "_reachable", lambda url, timeout=3.0: False)
    assert trackers.wandb_mode() == ("offline", "https://api.wandb.ai cannot be reached")
    monkeypatch.setattr(trackers, "_reachable", lambda url, timeout=3.0: True)
    assert trackers.wandb_mode()[0] == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert trackers.wandb_mode() == ("offline", "WANDB_MODE")


def test_mlflow_params_are_cut_to_its_limit_and_a_resumed_run_keeps_the_first_value(tmp_path):
    pytest.importorskip("mlflow", reason="the mlflow extra (make install-trackers)")
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    config = {"train": {"steps": 3, "note": "x" * (MAX_PARAM_VAL_LENGTH + 10)}}
    first = trackers.MlflowTracker(tmp_path, config, None, "t", 0)
    first.finish()
    again = trackers.MlflowTracker(tmp_path, {"train": {**config["train"], "steps": 5}}, first.ids, "t", 3)
    again.log(4, {"eval/pass@1": 0.25})
    again.finish()
    run = again.client.get_run(first.run_id)
    assert again.run_id == first.run_id and run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "3" and run.data.tags["resumed_at_3.train.steps"] == "5"
    note = run.data.params["train.note"]
    assert len(note) == MAX_PARAM_VAL_LENGTH and note.endswith("...")
    assert [(m.step, m.value) for m in again.client.get_metric_history(first.run_id, "eval/pass_at_1")] == [
        (4, 0.25)
    ]


class _Recorder:
    def __init__(self, fail_on_step: int | None = None):
        self.calls, self.fail_on_step = [], fail_on_step

    def log(self, step, metrics):
        if step == self.fail_on_step:
            raise RuntimeError("server went away")
        self.calls.append(("log", step))

    def log_completions(self, step, records):
        self.calls.append(("completions", step, len(records)))

    def finish(self, status="finished"):
        self.calls.append(("finish", status))


@pytest.mark.parametrize("raised,status", [(None, "finished"), (RunStopped(143), "killed"), (RuntimeError("x"), "failed")])  # fmt: skip
def test_trackers_hear_every_step_and_how_the_run_ended_and_a_failing_one_is_dropped(
    raised, status, tmp_path, monkeypatch, caplog
):
    good, bad = _Recorder(), _Recorder(fail_on_step=2)
    monkeypatch.setattr(logging_mod, "open_trackers", lambda *a: [good, bad])
    logger = RunLogger(tmp_path, total_steps=3, console="plain", logger=["jsonl", "wandb"])
    with caplog.at_level("ERROR", logger="grpo_cli"):
        for step in (1, 2, 3):
            logger.log(step, {"reward": 0.5})
        logger.log_completions([{"step": 3, "prompt": "p", "completion": "c"}])
    try:
        try:
            if raised is not None:
                raise raised
        finally:
            logger.close()  # as train's ``finally`` calls it, while ``raised`` is on its way out
    except (RunStopped, RuntimeError):
        pass
    assert good.calls == [("log", 1), ("log", 2), ("log", 3), ("completions", 3, 1), ("finish", status)]
    assert bad.calls == [("log", 1)] and caplog.text.count("server went away") == 1
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


def test_a_tracker_that_cannot_start_is_said_and_the_others_start(tmp_path, monkeypatch, caplog):
    pytest.importorskip("tensorboard", reason="the tensorboard extra (make install-trackers)")

    def refuse(*args):
        raise ConnectionError("no route to host\nmore detail")

    monkeypatch.setattr(trackers, "WandbTracker", refuse)
    with caplog.at_level("ERROR", logger="grpo_cli"):
        started = trackers.open_trackers(["wandb", "tensorboard"], tmp_path, {}, None, "t")
    assert [type(t).__name__ for t in started] == ["TensorBoardTracker"]
    assert "train.logger=wandb could not start (ConnectionError: no route to host)" in caplog.text
    started[0].finish()


# ---------------------------------------------------------------------------- a resumed tiny run


def _wandb_records(wandb_file: Path) -> list[dict]:
    """The records of a .wandb transaction log, read by wandb's own reader (``wandb leet inspect``)."""
    out = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(wandb_file)],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@pytest.fixture(scope="module")
def resumed_run(tiny_model_path, tmp_path_factory) -> Path:
    """2 steps, then ``train.resume=auto`` to 4: W&B (offline) and MLflow beside metrics.jsonl."""
    pytest.importorskip("wandb", reason="the wandb extra (make install-trackers)")
    pytest.importorskip("mlflow", reason="the mlflow extra (make install-trackers)")
    from grpo_cli.commands.train import run

    run_dir = tmp_path_factory.mktemp("tracked")
    for extra in (["train.steps=2", "train.save_every=2"], ["train.steps=4", "train.resume=auto"]):
        cfg, _ = compose_config("train", [*TINY, *extra])
        validate(cfg)
        run(cfg, str(run_dir))
    return run_dir


@pytest.mark.slow
def test_wandb_offline_run_holds_every_step_and_the_resumed_run_continues_it(resumed_run):
    rows = {r["step"]: r for r in read_metrics(resumed_run)}
    assert sorted(rows) == [0, 1, 2, 3, 4]
    run_id = json.loads((resumed_run / "trackers.json").read_text())["wandb"]
    files = sorted((resumed_run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [f.name for f in files] == [f"run-{run_id}.wandb"] * 2  # one per session, the same run id
    sessions = [_wandb_records(f) for f in files]
    history = [[r["history"]["item"] for r in s if r["type"] == "history"] for s in sessions]
    assert [[h["_step"] for h in part] for part in history] == [[0, 1, 2], [3, 4]]  # steps continue
    for item in history[0] + history[1]:
        row = rows[item["_step"]]
        numeric = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        assert numeric and all(_same(float(item[k]), v) for k, v in numeric.items()), item["_step"]
    first_run, second_run = (next(r["run"] for r in s if r["type"] == "run") for s in sessions)
    assert second_run["run_id"] == run_id and second_run["resume"] is True
    assert first_run["config"]["update"]["train"]["steps"] == 2  # the resolved config
    updates = [r["config"]["update"] for r in sessions[1] if r["type"] == "config"]
    assert [u["train"]["steps"] for u in updates if "train" in u] == [4]

    # The completions table: one increment per logging step, each holding that step's rows.
    logged = [json.loads(x) for x in (resumed_run / "completions.jsonl").read_text().splitlines()]
    for wandb_file, part, step in zip(files, history, (2, 4)):
        table = next(h for h in part if "completions.path" in h)
        assert table["_step"] == step and table["completions.log_mode"] == "INCREMENTAL"
        data = json.loads((wandb_file.parent / "files" / table["completions.path"]).read_text())
        got = [dict(zip(data["columns"], r)) for r in data["data"]]
        want = [r for r in logged if r["step"] == step]
        assert [(g["step"], g["completion"], g["advantage"]) for g in got] == [
            (w["step"], w["completion"], w["advantage"]) for w in want
        ]


@pytest.mark.slow
def test_mlflow_run_holds_every_step_and_the_resumed_run_continues_it(resumed_run):
    from mlflow.tracking import MlflowClient

    ids = json.loads((resumed_run / "trackers.json").read_text())["mlflow"]
    assert ids["tracking_uri"] == f"sqlite:///{resumed_run.resolve()}/mlflow.db"
    client = MlflowClient(ids["tracking_uri"])
    exp = client.get_experiment_by_name("grpo-cli")
    assert [r.info.run_id for r in client.search_runs([exp.experiment_id])] == [ids["run_id"]]
    run = client.get_run(ids["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "2" and run.data.tags["resumed_at_2.train.steps"] == "4"
    assert (
        run.data.params["algo.group_size"] == "4"
        and json.loads(run.data.params["train.logger"])[1] == "wandb"
    )
    rows = read_metrics(resumed_run)
    keys = {k for r in rows for k, v in r.items() if k != "step" and isinstance(v, (int, float))}
    assert {"reward", "loss", "kl", "eval/accuracy"} <= keys
    for key in keys:
        history = {
            m.step: m.value for m in client.get_metric_history(ids["run_id"], trackers.mlflow_name(key))
        }
        want = {r["step"]: float(r[key]) for r in rows if isinstance(r.get(key), (int, float))}
        assert history.keys() == want.keys() and all(_same(history[s], want[s]) for s in want), key
    arts = [a.path for a in client.list_artifacts(ids["run_id"], "completions")]
    assert arts == ["completions/step-000002.jsonl", "completions/step-000004.jsonl"]


def test_an_mlflow_server_that_refuses_connections_is_one_warning_in_seconds(tmp_path, monkeypatch, caplog):
    """A tracking URI nothing listens on: found by the start-up probe, not after MLflow's minutes of
    retries; one warning naming the URI, and the run's other trackers go on."""
    import socket
    import time

    pytest.importorskip("mlflow", reason="the mlflow extra (make install-trackers)")
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens on it
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    start = time.monotonic()
    with caplog.at_level("WARNING", logger="grpo_cli"):
        out = trackers.open_trackers(["jsonl", "mlflow"], tmp_path, {}, None, "t")
    assert out == [] and time.monotonic() - start < 10
    lines = [r for r in caplog.records if "mlflow" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelname == "WARNING" and uri in lines[0].getMessage()
    assert "goes on without it" in lines[0].getMessage()
