"""Code reward: 1.0 when the completion passes the row's unit tests in a sandbox, else 0.0.

    grpo train reward=code data=humaneval

Program (HumanEval layout): ``row["prompt"] + code + "\\n" + row["test"] + "\\ncheck(<entry_point>)"``,
where ``code`` is the last fenced ```python block of the completion, else the raw completion. A
completion that writes the whole ``def <entry_point>(`` follows the prompt instead of continuing it
(the prompt's stub then only contributes its imports and helpers). Rows without ``test`` and
``entry_point`` give None ("cannot be judged").

Sandbox and grading: ``rewards.sandbox``.

Without bwrap (``sandbox="none"``, or ``"auto"`` with no ``bwrap`` on PATH) programs run as plain
subprocesses with the same rlimits and timeout, and a loud warning: no namespaces, so no network or
file-system isolation, and a child that leaves the process group lives on until its CPU limit.
Needs bubblewrap >= 0.7 (``--size``; ``apt-get install bubblewrap``).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

from grpo_cli.rewards.sandbox import (
    NOBODY,
    Limits,
    RunResult,
    bwrap_prefix,
    closed_ancestor,
    interpreter_dirs,
    run_program,
)

log = logging.getLogger("grpo_cli")


_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def extract_code(completion: str) -> str:
    """The last fenced ```python (or bare ```) block, an unclosed one included; else the raw text."""
    blocks = [b for b in _FENCE.findall(completion) if b.strip()]
    return blocks[-1] if blocks else completion


@lru_cache(maxsize=1024)
def _compiles(source: str) -> bool:
    try:
        compile(source, "<prompt>", "exec")
    except (SyntaxError, ValueError):
        return False
    return True


def build_program(completion: str, row: dict) -> str | None:
    """The test program for one completion (HumanEval layout), or None when the row has no tests."""
    if not all(row.get(k) for k in ("test", "entry_point")):
        return None
    prompt, entry = row.get("prompt", ""), row["entry_point"]
    code = extract_code(completion)
    if re.search(rf"^def\s+{re.escape(entry)}\s*\(", code, re.MULTILINE):
        # A full function: keep the prompt's imports and helpers when the prompt stands on its own.
        body = (prompt + "\n" + code) if prompt and _compiles(prompt) else code
    else:
        body = prompt + code
    return f"{body}\n\n{row['test']}\n\ncheck({entry})\n"


_WARNED_NO_BWRAP = False


class CodeReward:
    """Reward rule: 1.0 when the program built from a completion passes its row's tests, else 0.0.

    Args:
        timeout: wall-clock seconds per program (CPU limit: the same, rounded up, plus one).
        memory_mb: address-space limit of the program in MiB (also the size of its private /tmp).
        max_procs: processes and threads the program may have (RLIMIT_NPROC).
        max_output_bytes: stdout + stderr kept, and file size limit; more output fails the run.
        workers: programs run at once (threads, each waiting on one sandbox process).
        sandbox: "auto" (bwrap when installed, else a warned plain subprocess), "bwrap" or "none".
    """

    def __init__(
        self,
        timeout: float = 10.0,
        memory_mb: int = 1024,
        max_procs: int = 64,
        max_output_bytes: int = 1_000_000,
        workers: int = 2,
        sandbox: str = "auto",
    ):
        if sandbox not in ("auto", "bwrap", "none"):
            raise ValueError(f"sandbox={sandbox!r}: choose auto, bwrap or none")
        self.limits = Limits(timeout, memory_mb, max_procs, max_output_bytes)
        self.workers, self.sandbox = max(1, workers), sandbox
        self._pool: ThreadPoolExecutor | None = None
        self._prefix: list[str] | None = None
        self._uid = -1
        self._last: dict[str, float] = {}

    def __call__(self, completions: list[str], rows: list[dict]) -> list[float | None]:
        """Scores [N]: 1.0 pass, 0.0 fail (timeouts and limits included), None for rows without tests."""
        self._setup()
        programs = [build_program(c, r) for c, r in zip(completions, rows)]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="code-reward")
        results = list(self._pool.map(lambda p: None if p is None else self.run(p), programs))
        statuses = [r.status for r in results if r is not None]
        self._last = {
            k: float(statuses.count(s))
            for k, s in (("timeouts", "timeout"), ("output_limits", "output_limit"), ("errors", "error"))
        }
        return [None if r is None else float(r.passed) for r in results]

    def run(self, program: str) -> RunResult:
        """Run one program in the sandbox (blocking)."""
        self._setup()
        if self._prefix:
            return run_program(program, self.limits, self._prefix, self._uid)
        with tempfile.TemporaryDirectory(prefix="grpo-code-") as cwd:  # no private /tmp without bwrap
            os.chmod(cwd, 0o1777)
            return run_program(program, self.limits, [], self._uid, cwd=cwd)

    def metrics(self) -> dict[str, float]:
        """Counts of the last call: ``timeouts``, ``output_limits``, ``errors`` (sandbox failed to start)."""
        return dict(self._last)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _setup(self) -> None:
        """Pick the sandbox once and check that a trivial program passes in it."""
        if self._prefix is not None:
            return
        use_bwrap = self.sandbox == "bwrap" or (self.sandbox == "auto" and shutil.which("bwrap"))
        if self.sandbox == "bwrap" and not shutil.which("bwrap"):
            raise RuntimeError("sandbox=bwrap but bwrap is not on PATH (apt-get install bubblewrap)")
        as_root = os.geteuid() == 0
        if use_bwrap:
            prefix, self._uid = bwrap_prefix(tmp_mb=self.limits.memory_mb), (NOBODY if as_root else -1)
        else:
            prefix = []
            # Dropping to nobody needs an interpreter nobody can reach; otherwise stay (and say so).
            reachable = not any(closed_ancestor(d) for d in interpreter_dirs())
            self._uid = NOBODY if as_root and reachable else -1
            _warn_no_bwrap(as_root and not reachable)
        probe = run_program(
            "def check(f):\n    assert f() == 1\n\ncheck(lambda: 1)\n",
            self.limits,
            prefix,
            self._uid,
            cwd="/tmp" if use_bwrap else tempfile.gettempdir(),
        )
        if not probe.passed:
            tail = probe.output.decode("utf-8", "replace").strip()[-500:]
            raise RuntimeError(
                f"code sandbox self-test failed ({probe.status}): {tail or 'no output'}; "
                "if bwrap cannot run here, the rule's `sandbox: none` runs code unsandboxed"
            )
        self._prefix = prefix


def _warn_no_bwrap(as_root: bool) -> None:
    global _WARNED_NO_BWRAP
    if _WARNED_NO_BWRAP:
        return
    _WARNED_NO_BWRAP = True
    extra = (
        " and as root (the interpreter is not reachable by nobody): no process limit either"
        if as_root
        else ""
    )
    bar = "!" * 80
    log.warning(
        "%s\nbwrap (bubblewrap) not found: code rewards run UNSANDBOXED, as plain subprocesses with rlimits "
        "only - no network or file-system isolation%s. Install it: apt-get install bubblewrap\n%s",
        bar,
        extra,
        bar,
    )


_DEFAULT: CodeReward | None = None


def code_reward(completions: list[str], rows: list[dict]) -> list[float | None]:
    """``CodeReward()`` with its defaults, as a plain function (for ``_target_`` users)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = CodeReward()
    return _DEFAULT(completions, rows)
