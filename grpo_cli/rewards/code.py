"""Code reward: 1.0 when the completion passes the row's unit tests in a sandbox, else 0.0.

    grpo train reward=code data=humaneval

Program (HumanEval layout): ``row["prompt"] + code + "\\n" + row["test"] + "\\ncheck(<entry_point>)"``,
where ``code`` is the last fenced ```python block of the completion, else the raw completion. A
completion that writes the whole ``def <entry_point>(`` follows the prompt instead of continuing it
(the prompt's stub then only contributes its imports and helpers). Rows without ``test`` and
``entry_point`` give None ("cannot be judged").

Sandbox: bubblewrap with a new pid, network, ipc and uts namespace (``--unshare-all``; the loopback
device is the sandbox's own, so nothing on the host's 127.0.0.1 is reachable), the root file system
read-only, a private size-capped ``/tmp`` as working directory, ``--die-with-parent`` and
``--new-session``, an environment cleared down to PATH/HOME/LANG. Inside, a launcher sets rlimits on
CPU seconds, address space, processes and file size before the program runs. Outside, a wall-clock
timeout kills the whole process group (and with it the sandbox's pid namespace), and output beyond
``max_output_bytes`` kills the run too.

RLIMIT_NPROC never binds uid 0 (the kernel exempts the root user, also inside a user namespace
that maps it). So as root the sandbox stays in the initial user namespace with only CAP_SETUID and
CAP_SETGID, and the launcher switches to ``nobody`` (65534) before the program runs; the
interpreter's directory is re-mounted past any directory ``nobody`` may not enter (a pyenv under
``/root``). As another user, bwrap's user namespace gets the rlimit set inside it, where the kernel
counts only the sandbox's own processes (Linux >= 5.14).

Grading: after ``check(...)`` returns, the launcher writes a random per-run nonce to a pipe that
only it knows the number of; the run passes only when exactly that nonce arrives. ``sys.exit(0)``
or ``os._exit(0)`` before the tests therefore scores 0, whatever the exit code. Not defended:
a program that digs the nonce out of the interpreter's memory, or tests defeated from within Python
(an object whose ``__eq__`` always returns True) - reward hacks to watch for in the samples.

Without bwrap (``sandbox="none"``, or ``"auto"`` with no ``bwrap`` on PATH) programs run as plain
subprocesses with the same rlimits and timeout, and a loud warning: no namespaces, so no network or
file-system isolation, and a child that leaves the process group lives on until its CPU limit.
Needs bubblewrap >= 0.7 (``--size``; ``apt-get install bubblewrap``).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

log = logging.getLogger("grpo_cli")

NOBODY = 65534  # uid and gid the program runs as when the reward runs as root
_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/tmp",
    "LANG": "C.UTF-8",
    "PYTHONDONTWRITEBYTECODE": "1",
}

# Runs inside the sandbox as `python -I -c`: argv = fd cpu_s mem_bytes nproc fsize_bytes uid; stdin =
# nonce line + program. Limits go on before the program exists; the nonce leaves only after it.
_LAUNCHER = r"""# grpo-cli sandbox launcher
import os, resource, sys, traceback
def _launch():
    fd, cpu, mem, nproc, fsize, uid = map(int, sys.argv[1:7])
    data = sys.stdin.buffer.read().decode("utf-8", "replace")
    nonce, _, src = data.partition("\n")
    for res, lim in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, mem),
                     (resource.RLIMIT_NPROC, nproc), (resource.RLIMIT_FSIZE, fsize)):
        resource.setrlimit(res, (lim, lim))
    if uid >= 0:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    try:
        exec(compile(src, "<program>", "exec"), {"__name__": "__main__"})
        sys.stdout.flush()
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    os.write(fd, nonce.encode())
    os._exit(0)
_launch()
"""

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


@dataclass(frozen=True)
class Limits:
    """Per-program limits: wall/CPU seconds, address space and /tmp in MiB, processes, output bytes."""

    timeout: float = 10.0
    memory_mb: int = 1024
    max_procs: int = 64
    max_output_bytes: int = 1_000_000

    def launcher_args(self, uid: int) -> list[str]:
        cpu = int(self.timeout) + 1
        return [
            str(cpu),
            str(self.memory_mb * 2**20),
            str(self.max_procs),
            str(self.max_output_bytes),
            str(uid),
        ]


@dataclass
class RunResult:
    """Outcome of one program: ``status`` is passed, failed, timeout, output_limit or error."""

    status: str
    output: bytes = b""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _closed_ancestor(path: str) -> tuple[str, str] | None:
    """(dir, child) for the first ancestor of ``path`` that others may not enter, e.g. (/root, /root/.pyenv)."""
    parts = path.strip("/").split("/")
    for i in range(len(parts) - 1):
        ancestor = "/" + "/".join(parts[:i])
        if not os.stat(ancestor).st_mode & 0o001:
            return ancestor, "/" + "/".join(parts[: i + 1])
    return None


def _interpreter_dirs() -> list[str]:
    dirs = {sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable))}
    return sorted({os.path.realpath(d) for d in dirs})


def _reexpose_interpreter(as_root: bool) -> list[str]:
    """bwrap mounts that keep the interpreter visible: under the private /tmp, and past closed dirs."""
    tmpfs, binds = [], []
    for d in _interpreter_dirs():
        if d == "/tmp" or d.startswith("/tmp/"):
            binds.append(d)
        elif as_root and (closed := _closed_ancestor(d)):
            # An empty tmpfs (mode 755) over /root, then the one subtree the interpreter needs.
            tmpfs.append(closed[0])
            binds.append(closed[1])
    args = [a for d in sorted(set(tmpfs)) for a in ("--tmpfs", d)]
    return args + [a for d in sorted(set(binds)) for a in ("--ro-bind", d, d)]


def bwrap_prefix(tmp_mb: int) -> list[str]:
    """The bwrap command line up to the sandboxed command."""
    as_root = os.geteuid() == 0
    argv = ["bwrap", "--die-with-parent", "--new-session"]
    if as_root:
        argv += [
            "--unshare-ipc",
            "--unshare-pid",
            "--unshare-net",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--cap-drop",
            "ALL",
            "--cap-add",
            "CAP_SETUID",
            "--cap-add",
            "CAP_SETGID",
        ]
    else:
        argv += ["--unshare-all"]
    argv += ["--ro-bind", "/", "/", "--perms", "1777", "--size", str(tmp_mb * 2**20), "--tmpfs", "/tmp"]
    argv += _reexpose_interpreter(as_root)
    return argv + ["--proc", "/proc", "--dev", "/dev", "--chdir", "/tmp"]


def _drain(proc: subprocess.Popen, nonce_fd: int, deadline: float, cap: int) -> tuple[str, bytes, bytes]:
    """Read output and nonce until both close or the process exits: (status, output, nonce bytes)."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, "out")
    sel.register(nonce_fd, selectors.EVENT_READ, "nonce")
    out, token = bytearray(), bytearray()
    try:
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout", bytes(out), bytes(token)
            # A finished program whose stray children still hold the pipes must not wait out the clock.
            events = sel.select(min(left, 0.2))
            if not events and proc.poll() is not None:
                break
            for key, _ in events:
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fileobj)
                elif key.data == "out":
                    out += chunk
                    if len(out) > cap:
                        return "output_limit", bytes(out[:cap]), bytes(token)
                else:
                    token += chunk[:256]
        return "done", bytes(out), bytes(token)
    finally:
        sel.close()


def _kill_group(proc: subprocess.Popen) -> None:
    # The group holds bwrap (whose exit takes the sandbox's pid namespace along) or, without
    # bwrap, the program and the children that did not leave it.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def run_program(program: str, limits: Limits, prefix: list[str], uid: int, cwd: str = "/tmp") -> RunResult:
    """Run one program with ``prefix`` (bwrap argv, or [] for a plain subprocess) under ``limits``."""
    nonce = secrets.token_hex(16)
    nonce_r, nonce_w = os.pipe()
    argv = [*prefix, sys.executable, "-I", "-c", _LAUNCHER, str(nonce_w), *limits.launcher_args(uid)]
    deadline = time.monotonic() + limits.timeout
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            pass_fds=(nonce_w,),
            start_new_session=True,
            env=_ENV,
            cwd=cwd,
        )
    except OSError as exc:
        os.close(nonce_r)
        return RunResult("error", str(exc).encode())
    finally:
        os.close(nonce_w)
    try:
        try:
            proc.stdin.write(nonce.encode() + b"\n" + program.encode("utf-8", "replace"))
            proc.stdin.close()
        except OSError:  # the launcher died before reading (a broken sandbox): seen below as a failure
            pass
        status, out, token = _drain(proc, nonce_r, deadline, limits.max_output_bytes)
        if status == "done":
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                status = "timeout"
    finally:
        _kill_group(proc)
        os.close(nonce_r)
    if status == "done":
        status = "passed" if token == nonce.encode() else "failed"
    return RunResult(status, out)


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
            reachable = not any(_closed_ancestor(d) for d in _interpreter_dirs())
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
