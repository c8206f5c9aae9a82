"""scripts/faults_servers.py at a small size: one server stopped (SIGSTOP) halfway through a weight
sync of a run on two servers. The trainer exits 75 within seconds with one line, only that server is
started again, and the resumed run's every step equals the uninterrupted run's. ~3 minutes; needs vLLM."""

from __future__ import annotations

import importlib.util
import signal
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "faults_servers.py"


@pytest.mark.slow
def test_a_server_stopped_mid_sync_is_found_in_seconds_and_the_resumed_run_is_exact(tmp_path):
    from grpo_cli import engines

    if not engines.vllm_available():
        pytest.skip("vLLM not installed (make install-vllm)")
    spec = importlib.util.spec_from_file_location("faults_servers", SCRIPT)
    faults = importlib.util.module_from_spec(spec)
    sys.modules["faults_servers"] = faults
    spec.loader.exec_module(faults)
    result = faults.run_faults(1, 5, seed=0, hold=0.5, work=tmp_path, plan=[(signal.SIGSTOP, "sync")])
    (row,) = result["table"]
    assert row["code"] == 75 and row["one_line"] and row["resume_cmd"], row
    assert row["exit_s"] < 30, row  # not the 600 s request timeout, nor the 60 s collective one
    assert row["equal_so_far"]
    assert result["final_code"] == 0
    assert sorted(result["got"]) == sorted(result["ref"]) == list(range(1, 6))
    for step, want in result["ref"].items():
        assert result["got"][step] == want, step
