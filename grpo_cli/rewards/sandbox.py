"""Run an untrusted program with limits: the sandbox of the code reward (``rewards.code``).

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
"""

from __future__ import annotations

import logging
import os
import secrets
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

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


def closed_ancestor(path: str) -> tuple[str, str] | None:
    """(dir, child) for the first ancestor of ``path`` that others may not enter, e.g. (/root, /root/.pyenv)."""
    parts = path.strip("/").split("/")
    for i in range(len(parts) - 1):
        ancestor = "/" + "/".join(parts[:i])
        if not os.stat(ancestor).st_mode & 0o001:
            return ancestor, "/" + "/".join(parts[: i + 1])
    return None


def interpreter_dirs() -> list[str]:
    dirs = {sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable))}
    return sorted({os.path.realpath(d) for d in dirs})


def _reexpose_interpreter(as_root: bool) -> list[str]:
    """bwrap mounts that keep the interpreter visible: under the private /tmp, and past closed dirs."""
    tmpfs, binds = [], []
    for d in interpreter_dirs():
        if d == "/tmp" or d.startswith("/tmp/"):
            binds.append(d)
        elif as_root and (closed := closed_ancestor(d)):
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
