"""Checks in worker processes with a hard wall-clock timeout each: how a reward rule contains a scorer
that hangs or crashes (math-verify's sympy, a reasoning-gym task's own ``score_answer``).

    pool = CheckPool(workers=2, timeout=5.0, check=verify_answer, prepare=_import_math_verify)
    pool.run([("1/2", "0.5"), ...])   # [("ok", 1.0), ("timeout", 0.0), ("error", 0.0), ...]

A check that runs past its timeout scores 0 and its worker is killed and replaced; a worker that crashes
(segfault, out of memory under ``memory_mb``) scores 0 too; an exception inside ``check`` comes back as
("error", 0.0). The caller counts each status. Workers are spawned, not forked: a fork would copy a
CUDA context and the trainer's threads.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import wait as wait_conns
from typing import Any

log = logging.getLogger("grpo_cli")

Check = Callable[..., Any]  # task tuple -> score (float or None)


def _worker_main(conn: Any, memory_mb: int, check: Check, prepare: Callable[[], None] | None) -> None:
    """Worker loop: ``prepare()`` once, then receive a task tuple, send ("ok", check(*task)) or
    ("error", message)."""
    import resource

    if memory_mb > 0:  # sympy can blow up on a pathological expression; fail it, not the machine
        limit = memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    if prepare is not None:
        prepare()  # the slow imports, before "ready": start-up never counts against a check's clock

    conn.send(("ready", None))
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        try:
            conn.send(("ok", check(*task)))
        except Exception as exc:  # noqa: BLE001 - reported to the parent and counted as an error
            conn.send(("error", f"{type(exc).__name__}: {exc}"[:200]))


class _Worker:
    """One spawned process and its pipe; ``task`` is the index it is checking, or None."""

    def __init__(self, ctx: Any, memory_mb: int, check: Check, prepare: Callable[[], None] | None):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, memory_mb, check, prepare), daemon=True)
        self.proc.start()
        child.close()
        self.ready = False
        self.task: int | None = None
        self.deadline = 0.0

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


class CheckPool:
    """``workers`` spawned processes running ``check(*task)``, one check per worker at a time.

    Args:
        check: a module-level function (spawned workers import it by name), task tuple -> score.
        prepare: run once in each worker before it takes checks (imports, logging levels).
        name: what the checks are, for errors and logs ("math-verify", "reasoning-gym").

    A check's clock starts when an idle, started worker receives it, so queueing and worker start-up
    (importing sympy takes a second or two) never count against it. A worker past its deadline is
    killed and replaced; the other workers keep going. Started lazily, reused across calls.
    """

    def __init__(
        self,
        workers: int,
        timeout: float,
        memory_mb: int = 4096,
        startup_timeout: float = 120.0,
        *,
        check: Check,
        prepare: Callable[[], None] | None = None,
        name: str = "check",
    ):
        self.workers, self.timeout = max(1, workers), timeout
        self.memory_mb, self.startup_timeout = memory_mb, startup_timeout
        self.check, self.prepare, self.name = check, prepare, name
        self._ctx = mp.get_context("spawn")  # fork would copy a CUDA context and the trainer's threads
        self._pool: list[_Worker] = []

    def run(self, tasks: list[tuple]) -> list[tuple[str, float | None]]:
        """One (status, score) per task: ("ok", check(*task)), ("timeout", 0.0), ("error", 0.0)."""
        results: list[Any] = [None] * len(tasks)
        queue = deque(range(len(tasks)))
        try:
            while len(self._pool) < self.workers:
                self._pool.append(self._start())
            while queue or any(w.task is not None for w in self._pool):
                self._dispatch(queue, tasks, results)
                self._collect(results)
                self._expire(results)
        except BaseException:
            self.close()  # a worker still busy with this call's check must not answer the next call
            raise
        return results

    def close(self) -> None:
        for worker in self._pool:
            worker.kill()
        self._pool = []

    def _start(self) -> _Worker:
        worker = _Worker(self._ctx, self.memory_mb, self.check, self.prepare)
        worker.deadline = time.monotonic() + self.startup_timeout
        return worker

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._pool[self._pool.index(worker)] = self._start()

    def _dispatch(self, queue: deque, tasks: list[tuple], results: list[Any]) -> None:
        for worker in list(self._pool):
            if worker.ready and worker.task is None and queue:
                idx = queue.popleft()
                try:
                    worker.conn.send(tasks[idx])
                except OSError:  # died while idle: score this one as a crash, start a fresh worker
                    results[idx] = ("error", 0.0)
                    self._replace(worker)
                    continue
                worker.task, worker.deadline = idx, time.monotonic() + self.timeout

    def _collect(self, results: list[Any]) -> None:
        waiting = [w for w in self._pool if not w.ready or w.task is not None]
        if not waiting:
            return
        pause = max(0.0, min(w.deadline for w in waiting) - time.monotonic())
        for conn in wait_conns([w.conn for w in waiting], timeout=pause):
            worker = next(w for w in waiting if w.conn is conn)
            try:
                kind, value = conn.recv()
            except (EOFError, OSError):
                if not worker.ready:
                    raise RuntimeError(
                        f"{self.name} worker exited on start (exit code {worker.proc.exitcode})"
                    ) from None
                results[worker.task] = ("error", 0.0)  # crashed mid-check (segfault, out of memory)
                self._replace(worker)
                continue
            if kind == "ready":
                worker.ready = True
            else:
                results[worker.task] = (kind, value if kind == "ok" else 0.0)
                if kind == "error":
                    log.debug("%s error: %s", self.name, value)
                worker.task = None

    def _expire(self, results: list[Any]) -> None:
        now = time.monotonic()
        for worker in list(self._pool):
            if now < worker.deadline:
                continue
            if not worker.ready:
                raise RuntimeError(f"{self.name} worker did not start within {self.startup_timeout:.0f} s")
            if worker.task is not None:
                results[worker.task] = ("timeout", 0.0)
                self._replace(worker)
