"""A dead or hung generation server is found in seconds, not after the request timeout; servers keep
one weight group per trainer. Stand-ins for the servers (a local HTTP server, a socket that never
answers, a fake worker): no vLLM needed."""

from __future__ import annotations

import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from grpo_cli.engines.server import http as http_mod
from grpo_cli.engines.server import receiver as receiver_mod
from grpo_cli.engines.server.http import Server, ServerError, wait


class Healthy(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        self._answer({})

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        self.server.release.wait(30)  # a long generation, until the test lets it go
        self._answer({"ok": True})

    def _answer(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def healthy():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Healthy)
    httpd.release = threading.Event()
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd
    httpd.release.set()
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def hung():
    """A server stopped with SIGSTOP, as the network sees it: connections are accepted (the kernel's
    backlog) and never answered."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    yield f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()


@pytest.fixture
def fast_probes(monkeypatch):
    monkeypatch.setattr(http_mod, "PROBE_EVERY_S", 0.05)
    monkeypatch.setattr(
        http_mod, "PROBE_TIMEOUT_S", 1.0
    )  # a loaded machine still answers a live server's probe


def _dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # closed again: connections are refused


def test_a_hung_server_ends_the_wait_naming_it_and_no_call_stays_blocked(healthy, hung, fast_probes):
    """Both calls have a 600 s timeout; the hung server fails two probes and the wait raises with
    its URL, and both calls in flight are aborted (they end now, not in 600 s)."""
    good = Server(f"http://127.0.0.1:{healthy.server_address[1]}", 600)
    bad = Server(hung, 600)
    pool = ThreadPoolExecutor(2)
    calls = [pool.submit(good.call, "/v1/completions", {}), pool.submit(bad.call, "/v1/completions", {})]
    with pytest.raises(ServerError, match=f"{hung} stopped answering during generation"):
        wait(calls, [good, bad], "generation")
    for f in calls:
        assert isinstance(f.exception(timeout=10), ServerError)  # aborted: released well before 600 s
    pool.shutdown(wait=True)
    with pytest.raises(ServerError, match="not called"):  # an aborted engine is not used again
        good.call("/health")


def test_a_killed_server_is_an_error_at_once_and_the_others_calls_are_aborted(healthy, fast_probes):
    good = Server(f"http://127.0.0.1:{healthy.server_address[1]}", 600)
    dead = Server(_dead_url(), 600)
    pool = ThreadPoolExecutor(2)
    calls = [pool.submit(good.call, "/v1/completions", {}), pool.submit(dead.call, "/v1/completions", {})]
    with pytest.raises(ServerError, match=f"{dead.url}.* not reachable"):  # its call's refusal, or a probe's
        wait(calls, [good, dead], "generation")
    assert isinstance(calls[0].exception(timeout=10), ServerError)
    pool.shutdown(wait=True)


def test_an_abort_while_a_call_connects_still_ends_that_call(healthy, monkeypatch):
    """The abort lands after the call registered its connection but before the socket exists (nothing
    to shut yet): the call must see it once connected, not block in the read for its 600 s."""
    good = Server(f"http://127.0.0.1:{healthy.server_address[1]}", 600)
    connect = http_mod.http.client.HTTPConnection.connect

    def abort_then_connect(conn):
        good.abort("a peer failed")
        connect(conn)

    monkeypatch.setattr(http_mod.http.client.HTTPConnection, "connect", abort_then_connect)
    pool = ThreadPoolExecutor(1)
    call = pool.submit(good.call, "/v1/completions", {})
    with pytest.raises(ServerError, match="abandoned: a peer failed"):
        call.result(timeout=10)
    pool.shutdown(wait=True)


def test_a_failed_collective_is_blamed_on_the_server_that_no_longer_answers(healthy, fast_probes):
    good = Server(f"http://127.0.0.1:{healthy.server_address[1]}", 600)
    dead = Server(_dead_url(), 600)

    def broadcast():
        raise RuntimeError("Connection reset by peer")

    pool = ThreadPoolExecutor(1)
    with pytest.raises(ServerError, match=f"{dead.url} failed during the weight sync") as err:
        wait([pool.submit(broadcast)], [good, dead], "the weight sync")
    assert isinstance(err.value.__cause__, RuntimeError)
    pool.shutdown(wait=True)


def test_the_wait_returns_when_every_call_answers(healthy, fast_probes):
    good = Server(f"http://127.0.0.1:{healthy.server_address[1]}", 600)
    healthy.release.set()
    pool = ThreadPoolExecutor(2)
    calls = [pool.submit(good.call, "/v1/completions", {}) for _ in range(2)]
    wait(calls, [good], "generation")
    assert [f.result() for f in calls] == [{"ok": True}] * 2
    pool.shutdown(wait=True)


# ---------------------------------------------------------------------------- one weight group per trainer


class FakeWorker(receiver_mod.WeightReceiver):
    rank = 0


@pytest.fixture
def joins(monkeypatch):
    made = []

    def fake_join(host, port, rank, size, timeout):
        made.append((host, port, rank))
        return SimpleNamespace(port=port)

    monkeypatch.setattr(receiver_mod.weight_group, "join", fake_join)
    return made


def _join(worker, owner: str, port: int) -> dict:
    spec = {"host": "127.0.0.1", "port": port, "rank": 1, "size": 2, "timeout": 5, "owner": owner}
    return json.loads(worker.grpo_join(json.dumps(spec)))


def test_a_second_client_is_refused_while_the_owning_trainer_lives(joins):
    """The owner's store answers: another owner's join is refused in one line and the group kept;
    the same owner (a resumed run) replaces it; once the owner's store is gone anyone may join."""
    store = socket.socket()
    store.bind(("127.0.0.1", 0))
    store.listen(8)
    port = store.getsockname()[1]
    worker = FakeWorker()
    assert _join(worker, "/runs/a", port) == {"rank": 1}
    refused = _join(worker, "client-eval", port + 1)["refused"]
    assert "another run (/runs/a)" in refused and "\n" not in refused
    assert worker._grpo_group.port == port and len(joins) == 1
    assert _join(worker, "/runs/a", port + 2) == {"rank": 1}  # the run resumed: its new group
    store.close()
    worker._grpo_owner["port"] = port  # the owner's store is gone now
    assert _join(worker, "client-eval", port + 3) == {"rank": 1}
    assert worker._grpo_owner["owner"] == "client-eval"


def test_a_receive_that_fails_leaves_the_group_so_the_next_join_is_free(joins, monkeypatch):
    worker = FakeWorker()
    _join(worker, "/runs/a", 1)

    def broken(group, tensor):
        raise RuntimeError("Connection closed by peer")

    monkeypatch.setattr(receiver_mod.weight_group, "broadcast", broken)
    spec = {"tensors": [["w", "float32", [2]]], "version": 1}
    with pytest.raises(RuntimeError, match="closed by peer"):
        worker.grpo_receive(json.dumps(spec))
    assert worker._grpo_group is None and worker._grpo_owner is None
    with pytest.raises(RuntimeError, match="must join"):
        worker.grpo_receive(json.dumps(spec))
    assert _join(worker, "client-eval", 2) == {"rank": 1}


# ---------------------------------------------------------------------------- keys and messages


def test_the_old_timeout_key_names_the_two_new_ones_in_one_line(capsys):
    """``rollout.server_timeout`` is a renamed key (``config.RENAMED``): refused before anything runs,
    the line naming its successor and the other half of the split."""
    from grpo_cli.cli import main

    assert main(["train", "rollout.server_timeout=20"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("grpo train: error: rollout.server_timeout was renamed")
    assert "use rollout.request_timeout" in err[0] and "rollout.sync_timeout" in err[0]


def eval_failing_with(exc: Exception, monkeypatch, capsys, tmp_path) -> tuple[int, list[str]]:
    """``grpo eval`` whose run raises ``exc``: its exit code and the lines it printed on stderr."""
    import grpo_cli.commands.eval as eval_cmd
    from grpo_cli.cli import main

    def run(cfg, out):
        raise exc

    monkeypatch.setattr(eval_cmd, "run", run)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(["eval"])
    return stop.value.code, capsys.readouterr().err.strip().splitlines()


def test_a_server_failure_before_the_run_starts_is_one_line_and_exit_75(monkeypatch, capsys, tmp_path):
    failure = ServerError("http://10.0.0.2:8000/collective_rpc answered 500: boom")
    code, err = eval_failing_with(failure, monkeypatch, capsys, tmp_path)
    assert code == 75
    assert len(err) == 1 and "http://10.0.0.2:8000" in err[0] and "Traceback" not in err[0]


class RefusingServer:
    url = "http://10.0.0.3:8000"

    def call(self, path, body=None, timeout_s=None):
        return {"world_size": 1}

    def rpc(self, method, spec, timeout_s=None):
        return [{"refused": "serves the weights of another run (/runs/a), whose trainer is still running"}]

    def probe(self):
        return None

    def abort(self, why=""):
        pass


def test_a_refused_join_ends_the_forming_at_once_naming_the_server(monkeypatch):
    """The trainer's own side of the group would wait for the refusing server until the timeout;
    the refusal ends the join now, in one line naming the server and the run that owns it."""
    from grpo_cli.engines import server as server_mod

    never = threading.Event()
    monkeypatch.setattr(server_mod.weight_group, "join", lambda *a: never.wait(600))
    monkeypatch.setattr(server_mod, "local_address", lambda s: "127.0.0.1")
    engine = object.__new__(server_mod.ServerEngine)
    engine.servers, engine.sync_timeout_s, engine.owner = [RefusingServer()], 600.0, "client-x"
    with pytest.raises(
        server_mod.SyncFailed, match=r"http://10\.0\.0\.3:8000 serves the weights of another run"
    ) as err:
        engine._join()
    assert "\n" not in str(err.value) and isinstance(err.value, server_mod.ServersTaken)
    never.set()


def test_a_refused_client_is_told_what_to_do_not_to_restart_the_server(monkeypatch, capsys, tmp_path):
    """``grpo eval`` against a live run's servers: one line saying what to do, exit 75, and not the
    "start it again" of a failed server (nothing failed)."""
    from grpo_cli.engines.server import ServersTaken

    taken = ServersTaken(f"{RefusingServer.url} serves the weights of another run (/runs/a): use others")
    code, err = eval_failing_with(taken, monkeypatch, capsys, tmp_path)
    assert code == 75
    assert err == [
        f"grpo eval: error: {RefusingServer.url} serves the weights of another run (/runs/a): use others"
    ]
