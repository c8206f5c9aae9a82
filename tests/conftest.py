"""Shared fixtures: CPU only, offline, seeded; the embedded tiny model built once per machine."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path:
    """``../shared/data`` beside the checkout (or $GRPO_SHARED_DATA)."""
    return Path(os.environ.get("GRPO_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    """The embedded tiny model, built on first use (cached under $GRPO_HOME, like for users)."""
    from grpo_cli.models.tiny import ensure_tiny

    return ensure_tiny(quiet=True)


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer Qwen2 with the project's tokenizer: fast, for plumbing tests."""
    from dataclasses import replace

    from grpo_cli.models.tiny import TinySpec, make_model, make_tokenizer

    path = tmp_path_factory.mktemp("random-qwen2")
    spec = replace(
        TinySpec(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    tokenizer = make_tokenizer()
    make_model(spec, len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def standin_dir(tmp_path_factory) -> Path:
    """A 2-layer Qwen2.5-0.5B-Instruct stand-in (real widths, 151,936-token vocabulary, ChatML,
    byte-level BPE with the real special-token ids), built once per session by scripts/make_standin.py's
    builder: ~330 MB of bfloat16 weights under tmp, 35-55 s on a loaded 2-core machine. Merges are
    learned on a slice of GSM8K (generated text where ../shared/data is absent) to keep it short."""
    from grpo_cli.models.standin import build_standin

    out = tmp_path_factory.mktemp("standin") / "qwen2.5-0.5b-2l"
    return build_standin(out, layers=2, data_dir=shared_data_dir(), bpe_vocab=4000, corpus_limit=2000)


def start_servers(
    models: list[str], log_dir: Path, timeout_s: float = 300.0, vllm_args: tuple[str, ...] = ()
) -> tuple[list[str], list]:
    """``grpo serve`` (the way docs/engines.md starts them) for each model, on free local ports, with
    vLLM's own ``vllm_args`` after ``--``; their URLs once each answers /health, and the processes.
    Fails with the log's tail if one dies."""
    import socket
    import subprocess
    import sys
    import time

    from grpo_cli.engines.server.http import reachable
    from grpo_cli.models import resolve_path

    procs, urls = [], []
    for i, model in enumerate(models):
        # An embedded model is built here, first, so its build (minutes on a fresh machine for the
        # tool variant) does not count against the server's start-up deadline.
        model = resolve_path(model)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log = open(log_dir / f"server-{i}.log", "w")  # noqa: SIM115 - closed with the process
        cmd = [sys.executable, "-m", "grpo_cli", "serve", "--model", model, "--port", str(port)]
        import torch

        extra = list(vllm_args)
        if torch.cuda.is_available():  # several servers (and the tests) share one GPU
            extra += ["--gpu-memory-utilization", "0.15"]
        if extra:
            cmd += ["--", *extra]
        # A session of its own: stopping a server stops its engine process too (a killed API server
        # alone leaves vLLM's EngineCore running, orphaned).
        procs.append(
            (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True), log)
        )
        urls.append(f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + timeout_s
    for (proc, log), url in zip(procs, urls):
        while reachable(url, 2.0):
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_servers(procs)
                tail = Path(log.name).read_text()[-2000:]
                pytest.fail(f"grpo serve at {url} did not come up:\n{tail}")
            time.sleep(2)
    return urls, procs


def stop_servers(procs: list, sig: int | None = None) -> None:
    """SIGTERM (or ``sig``) to each server's process group; SIGKILL to one still up after 30 s."""
    import os
    import signal

    for proc, _ in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig or signal.SIGTERM)
    for proc, log in procs:
        try:
            proc.wait(30)
        except Exception:  # noqa: BLE001 - a server that ignores SIGTERM is killed
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        log.close()


@pytest.fixture(scope="session")
def tiny_servers(tmp_path_factory, tiny_model_path):
    """Two vLLM servers of the tiny model (vLLM's CPU build), for the session; skipped without vLLM."""
    from grpo_cli import engines

    if not engines.vllm_available():
        pytest.skip("vLLM not installed (make install-vllm)")
    urls, procs = start_servers(["tiny", "tiny"], tmp_path_factory.mktemp("servers"))
    yield urls
    stop_servers(procs)


@pytest.fixture(scope="session")
def tools_server(tmp_path_factory):
    """One vLLM server of the calculator variant (model=tiny-tools), for the session."""
    from grpo_cli import engines

    if not engines.vllm_available():
        pytest.skip("vLLM not installed (make install-vllm)")
    urls, procs = start_servers(["tiny-tools"], tmp_path_factory.mktemp("tools-server"))
    yield urls
    stop_servers(procs)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's training runs: on a shared 2-core machine, OpenMP threads
    waiting on each other make the tiny models many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def rule_module(directory: Path, name: str, source: str):
    """A test's reward rules as module ``name`` in ``directory``, importable here (and by subprocesses
    given ``directory`` on PYTHONPATH) until the block ends."""
    import sys

    (directory / f"{name}.py").write_text(source)
    sys.path.insert(0, str(directory))
    try:
        yield directory
    finally:
        sys.path.remove(str(directory))
        sys.modules.pop(name, None)
