"""Fault injection on the generation servers: two `grpo serve` servers of the tiny model, one training
run at rollout.max_staleness=1, and N faults at random moments (SIGKILL or SIGSTOP to one server's
process group, during a generation or during the weight sync). After each the trainer must exit
within seconds with exit 75 and one error line (no traceback); only that server is started again,
the run is resumed with train.resume=auto, and at the end every step's metrics must equal an
uninterrupted run's.

    python scripts/faults_servers.py                 # N=10 faults, ~15-20 min on 2 cores
    python scripts/faults_servers.py --faults 1 --steps 5     # about the slow test's size (~3 min)

Prints one row per fault: the signal, the phase, the step it hit, the seconds from the fault to the
trainer's exit (goal <= 30), the exit code, whether the error was one line without a traceback,
whether the steps logged so far equal the uninterrupted run's, and the cores the surviving server
keeps busy in the 3 s after the trainer's exit (against the idle servers' figure printed first: a
thread spinning in a broken group would show as ~1); then the verdict over the whole run.

The moments are found with a launcher that wraps the trainer's engine (this script's, not the
package's): it marks each generation's and each sync's start in a file, and holds the broadcast for
--hold seconds halfway through its tensors, so a fault can land while the servers are inside the
sync. The hold changes timings only, never a token.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without install

from grpo_cli.run.runlog import is_timing  # noqa: E402

LAUNCHER = """
import os, sys, time
from grpo_cli.engines import server as srv
from grpo_cli.engines.server import group as weight_group

MARKS = os.environ["GRPO_FAULT_MARKS"]
HOLD = float(os.environ.get("GRPO_FAULT_HOLD", "0.5"))


def mark(what):
    with open(MARKS, "a") as f:
        f.write(f"{what} {time.time()}\\n")


generate = srv.ServerEngine.generate


def marked_generate(self, *args, **kwargs):
    mark("gen")
    return generate(self, *args, **kwargs)


def held_broadcast(self, weights):
    mark("sync")
    for i, (_, t) in enumerate(weights):
        if i == len(weights) // 2:
            time.sleep(HOLD)  # the servers are inside grpo_receive, half the tensors received
        weight_group.broadcast(self.group, t)


srv.ServerEngine.generate = marked_generate
srv.ServerEngine._broadcast = held_broadcast
from grpo_cli.cli import main

sys.exit(main(sys.argv[1:]))
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--faults", type=int, default=10)
    p.add_argument(
        "--steps", type=int, default=24, help="train.steps of the run the faults hit (>= 2 x faults + 2)"
    )
    p.add_argument("--seed", type=int, default=0, help="the faults' moments")
    p.add_argument("--hold", type=float, default=0.5, help="seconds the broadcast is held halfway")
    p.add_argument(
        "--work", type=Path, default=None, help="a directory for the runs and logs (default: temp)"
    )
    return p.parse_args(argv)


class Servers:
    """Two `grpo serve` servers on free local ports, each in a session of its own (a signal to its
    process group reaches its engine process too)."""

    def __init__(self, work: Path, count: int = 2):
        self.work, self.ports, self.procs = work, [_free_port() for _ in range(count)], [None] * count
        for i in range(count):
            self.start(i, wait=False)
        for i in range(count):
            self.wait_up(i)

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.ports]

    def start(self, i: int, wait: bool = True) -> None:
        cmd = [sys.executable, "-m", "grpo_cli", "serve", "--model", "tiny", "--port", str(self.ports[i])]
        log = (self.work / f"server-{i}.log").open("a")
        self.procs[i] = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
        )
        if wait:
            self.wait_up(i)

    def wait_up(self, i: int, timeout_s: float = 600) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.procs[i].poll() is not None:
                raise SystemExit(f"server {i} exited; its log: {self.work / f'server-{i}.log'}")
            try:
                urllib.request.urlopen(f"{self.urls[i]}/health", timeout=2)
                return
            except OSError:
                time.sleep(1)
        raise SystemExit(f"server {i} did not come up within {timeout_s:g} s")

    def cpu_s(self, i: int) -> float:
        """CPU seconds used so far by server ``i``'s process group (its API server and engine)."""
        tick, total = os.sysconf("SC_CLK_TCK"), 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == self.procs[i].pid:  # pgid: the session's leader is the server
                total += int(fields[11]) + int(fields[12])
        return total / tick

    def cpu_rate(self, i: int, seconds: float = 3.0) -> float:
        """Cores server ``i`` keeps busy over ``seconds`` (a thread spinning in a broken group shows as ~1)."""
        c0 = self.cpu_s(i)
        time.sleep(seconds)
        return (self.cpu_s(i) - c0) / seconds

    def signal(self, i: int, sig: int) -> None:
        os.killpg(self.procs[i].pid, sig)

    def kill(self, i: int) -> None:
        try:
            os.killpg(self.procs[i].pid, signal.SIGKILL)  # a stopped process dies too
        except ProcessLookupError:
            pass
        self.procs[i].wait(60)

    def close(self) -> None:
        for i, proc in enumerate(self.procs):
            if proc is not None and proc.poll() is None:
                self.kill(i)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(urls: list[str], steps: int, run_dir: Path) -> list[str]:
    return [
        "train", "rollout.engine=vllm-server", "rollout.servers=[" + ",".join(urls) + "]", "lora=none",
        "rollout.max_staleness=1", "algo.engine_is.cap=2.0", f"train.steps={steps}", "train.save_every=1",
        "train.prompts_per_step=4", "algo.group_size=4", "rollout.max_new_tokens=6", "train.lr=1e-2",
        "train.eval_every=0", "train.eval_at_ends=false", "console=plain", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip


def rows(run_dir: Path) -> dict[int, dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            if "step" in r and "loss" in r:
                out[r["step"]] = {k: v for k, v in r.items() if not is_timing(k)}
    return out


def _env(work: Path, hold: float) -> dict[str, str]:
    return {
        **os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "GRPO_FAULT_MARKS": str(work / "marks"),
        "GRPO_FAULT_HOLD": str(hold), "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }  # fmt: skip


def _marks(work: Path) -> list[tuple[str, float]]:
    path = work / "marks"
    if not path.exists():
        return []
    return [(w, float(t)) for w, t in (ln.split() for ln in path.read_text().splitlines() if ln.strip())]


def one_fault(
    servers: Servers, args: list[str], work: Path, hold: float, sig: int, phase: str, rng: random.Random
):
    """Start (or resume) the run, fault one server at a moment of ``phase`` past the next step, and
    wait for the trainer's exit; the row of the table, or None when the run finished first."""
    run_dir = Path(args[-1].split("=", 1)[1])
    before = max(rows(run_dir), default=0)
    (work / "marks").unlink(missing_ok=True)
    out = (work / "trainer.log").open("w")
    launcher = work / "launch.py"
    proc = subprocess.Popen(
        [sys.executable, str(launcher), *args, "train.resume=auto"], stdout=out, stderr=subprocess.STDOUT,
        env=_env(work, hold), cwd=work,
    )  # fmt: skip
    target = rng.randint(
        before + 1, before + 2
    )  # a step this attempt logs, then the next moment of the phase
    while max(rows(run_dir), default=0) < target and proc.poll() is None:
        time.sleep(0.02)
    if proc.poll() is not None:
        return None
    seen = len([m for m in _marks(work) if m[0] == phase])
    while len([m for m in _marks(work) if m[0] == phase]) <= seen and proc.poll() is None:
        time.sleep(0.005)
    if proc.poll() is not None:
        return None
    time.sleep(rng.uniform(0.05, hold * 0.8) if phase == "sync" else rng.uniform(0.0, 0.15))
    victim = rng.randrange(len(servers.procs))
    t_fault = time.monotonic()
    servers.signal(victim, sig)
    try:
        code = proc.wait(300)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    took = time.monotonic() - t_fault
    out.close()
    text = (work / "trainer.log").read_text()
    errors = [ln for ln in text.splitlines() if "generation server failed" in ln]
    one_line = len(errors) == 1 and "Traceback" not in text and servers.urls[victim] in errors[0]
    step = max(rows(run_dir), default=0)
    survivor = 1 - victim if len(servers.procs) == 2 else (victim + 1) % len(servers.procs)
    busy = servers.cpu_rate(survivor)
    servers.kill(victim)
    t0 = time.monotonic()
    servers.start(victim)
    return {
        "signal": signal.Signals(sig).name, "phase": phase, "server": victim, "step": step + 1,
        "exit_s": took, "code": code, "one_line": one_line, "restart_s": time.monotonic() - t0, "survivor_cpu": busy,
        "resume_cmd": "train.resume=auto" in text, "error": errors[0][-160:] if errors else text[-400:],
    }  # fmt: skip


def run_faults(faults: int, steps: int, seed: int, hold: float, work: Path, plan: list | None = None) -> dict:
    """The whole experiment; returns the reference rows, the faulted run's rows and the table.
    ``plan``: the (signal, phase) of each fault; by default SIGKILL/SIGSTOP x gen/sync in turn, shuffled."""
    (work / "launch.py").write_text(LAUNCHER)
    servers = Servers(work)
    try:
        ref_dir = work / "straight"
        code = subprocess.run(
            [sys.executable, str(work / "launch.py"), *train_args(servers.urls, steps, ref_dir)],
            env=_env(work, hold), cwd=work, capture_output=True, text=True,
        )  # fmt: skip
        if code.returncode:
            raise SystemExit(f"the uninterrupted run failed:\n{code.stdout[-2000:]}\n{code.stderr[-2000:]}")
        ref = rows(ref_dir)
        print(
            f"idle servers' cores (3 s, after the uninterrupted run): {servers.cpu_rate(0):.2f}", flush=True
        )
        print(HEADER, flush=True)
        run_dir = work / "faulted"
        args = train_args(servers.urls, steps, run_dir)
        rng = random.Random(seed)
        if plan is None:
            kinds = itertools.cycle(itertools.product([signal.SIGKILL, signal.SIGSTOP], ["gen", "sync"]))
            plan = list(itertools.islice(kinds, faults))
            rng.shuffle(plan)
        table = []
        for sig, phase in plan:
            row = one_fault(servers, args, work, hold, sig, phase, rng)
            if row is None:
                break
            got = rows(run_dir)
            row["equal_so_far"] = all(got[s] == ref.get(s) for s in got)
            table.append(row)
            print(_format(row), flush=True)
        final = subprocess.run(
            [sys.executable, str(work / "launch.py"), *args, "train.resume=auto"], env=_env(work, hold), cwd=work,
            capture_output=True, text=True,
        )  # fmt: skip
        got = rows(run_dir)
        return {"ref": ref, "got": got, "table": table, "final_code": final.returncode}
    finally:
        servers.close()


HEADER = (
    f"{'signal':<8} {'phase':<6} {'step':>4} {'exit s':>7} {'code':>4} {'1 line':>6} {'resume':>6} {'equal':>5} "
    f"{'survivor cores':>14} {'restart s':>9}"
)


def _format(r: dict) -> str:
    return (
        f"{r['signal']:<8} {r['phase']:<6} {r['step']:>4} {r['exit_s']:>7.1f} {r['code']:>4} "
        f"{'yes' if r['one_line'] else 'NO':>6} {'yes' if r['resume_cmd'] else 'NO':>6} "
        f"{'yes' if r['equal_so_far'] else 'NO':>5} {r['survivor_cpu']:>14.2f} {r['restart_s']:>9.0f}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?"
    )
    print(f"CPU: {cpu}; cores {os.cpu_count()}; load {open('/proc/loadavg').read().split()[0]}")
    work = args.work or Path(tempfile.mkdtemp(prefix="faults-servers-"))
    work.mkdir(parents=True, exist_ok=True)
    result = run_faults(args.faults, args.steps, args.seed, args.hold, work)
    table, ref, got = result["table"], result["ref"], result["got"]
    ok = (
        len(table) == args.faults
        and all(r["code"] == 75 and r["one_line"] and r["resume_cmd"] and r["equal_so_far"] for r in table)
        and result["final_code"] == 0
        and got == ref
    )
    worst = max((r["exit_s"] for r in table), default=float("nan"))
    print(
        f"\n{len(table)} faults; slowest exit {worst:.1f} s (goal <= 30); the finished run's {len(got)} steps "
        f"{'equal' if got == ref else 'DIFFER from'} the uninterrupted run's; {'PASS' if ok else 'FAIL'}"
    )
    print(f"load at end {open('/proc/loadavg').read().split()[0]}; logs in {work}")
    for r in table:
        if not r["one_line"]:
            print(f"  {r['signal']} {r['phase']}: {r['error']}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
