"""The ``vllm-server`` engine: generation on vLLM servers of their own (other cores, GPUs or nodes).

    grpo serve --port 8000                                   # one server (vLLM's own, see grpo serve -h)
    grpo train rollout.engine=vllm-server rollout.servers='[http://127.0.0.1:8000]'

Token ids in and out: each request's prompt goes to ``/v1/completions`` as ids (the later turns of an
episode too), the sampled ids and their log-probs come back (``return_token_ids``); nothing is
re-tokenised. Requests are spread over the servers in order (request i to server i mod S); each is
one HTTP call of n completions with the request's seed, so the same seeds give the same tokens
whichever server samples them.

Weights (``sync``): the trainer and every server worker form one gloo group (``group``); the trainer
posts ``grpo_receive`` to each server's ``/collective_rpc`` (our worker extension, ``receiver``) and
broadcasts each tensor, whole (FSDP ranks gather theirs; LoRA merged, as for colocated vLLM:
``engines.weights``). Each worker answers the checksum of what its model's loader took and the
parameters it left unwritten (``receiver.load_checked``): the checksum must equal the trainer's and
none may be left, and then the server's ``/update_weight_version`` sets the version ``/weight_info``
reports; anything else raises ``SyncFailed``: a sync is never silently empty. The prefix cache is
reset after each sync.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from grpo_cli.engines.protocol import Completion, Decoding, Progress, Request, vllm_seed
from grpo_cli.engines.server import group as weight_group
from grpo_cli.engines.server.http import (
    Server,
    ServerError,
    daemon_call,
    free_port,
    local_address,
    reachable,
    wait,
)
from grpo_cli.engines.weights import policy_weights
from grpo_cli.runtime import distributed

log = logging.getLogger("grpo_cli")


__all__ = ["ServerEngine", "ServerError", "ServersTaken", "SyncFailed", "reachable"]


class SyncFailed(ServerError):
    """A weight sync that did not reach a server, or reached it with other bytes than were sent."""


class ServersTaken(SyncFailed):
    """A server refused to join: another live run owns its weight group. Nothing failed, so the
    message says what to do instead of "start it again" (``cli``)."""


class ServerEngine:
    name = "vllm-server"

    def __init__(
        self, policy: Any, urls: Sequence[str], timeout_s: float, sync_timeout_s: float, owner: str = ""
    ):
        """``timeout_s``: one generation request's limit (``rollout.request_timeout``);
        ``sync_timeout_s``: the weight group's collectives and the sync calls' (``rollout.sync_timeout``);
        ``owner``: who the servers' weight group belongs to (a training run's directory; empty: a
        one-off client, refused by servers that a live run owns)."""
        self.policy = policy
        self.servers = [Server(u, timeout_s) for u in urls]
        self.sync_timeout_s = sync_timeout_s
        self.owner = owner or f"client-{uuid.uuid4().hex[:12]}"
        self.version = 0  # the weight version the servers serve (0: what they loaded from disk)
        self.group: Any = None
        models = [s.call("/v1/models", None, sync_timeout_s)["data"][0] for s in self.servers]
        self.model_ids = [m["id"] for m in models]
        self.max_model_len = min(int(m.get("max_model_len") or 0) for m in models)

    # ------------------------------------------------------------------ sampling

    def generate(
        self, requests: Sequence[Request], decoding: Decoding, progress: Progress | None = None
    ) -> list[list[Completion]]:
        """requests[i].n completions of each request; all requests in flight at once (the servers batch them)."""
        bodies = [self._body(i, req, decoding) for i, req in enumerate(requests)]
        workers = max(1, min(len(bodies), 64))
        pool = ThreadPoolExecutor(workers, thread_name_prefix="grpo-gen")
        try:
            futures = [
                pool.submit(self.servers[i % len(self.servers)].call, "/v1/completions", body)
                for i, body in enumerate(bodies)
            ]
            wait(futures, self.servers, "generation")  # a dead or hung server ends it in seconds
            answers = [f.result() for f in futures]
        finally:
            pool.shutdown(wait=False, cancel_futures=True)  # after a failure the calls were aborted
        done = [
            _completions(a, req.n, self.servers[i % len(self.servers)].url)
            for i, (a, req) in enumerate(zip(answers, requests))
        ]
        if progress is not None:
            progress(sum(len(g) for g in done), sum(len(c.token_ids) for g in done for c in g))
        return done

    def _body(self, i: int, req: Request, decoding: Decoding) -> dict[str, Any]:
        limit = self.max_model_len
        if limit and len(req.prompt_ids) + req.max_tokens > limit:
            raise ValueError(
                f"a prompt of {len(req.prompt_ids)} tokens + {req.max_tokens} new tokens exceeds the "
                f"servers' max_model_len={limit}; start them with a larger --max-model-len"
            )
        greedy = decoding.greedy
        return {
            "model": self.model_ids[i % len(self.servers)],
            "prompt": list(req.prompt_ids),
            "n": req.n,
            "max_tokens": req.max_tokens,
            "temperature": 0.0 if greedy else decoding.temperature,
            "top_k": 0 if greedy else decoding.top_k,
            "top_p": 1.0 if greedy else decoding.top_p,
            "min_p": 0.0 if greedy else decoding.min_p,
            "stop_token_ids": list(req.stop_token_ids),
            "seed": vllm_seed(req.seed),
            "logprobs": 0,
            "return_token_ids": True,
            "skip_special_tokens": False,
            "logit_bias": {str(t): -100.0 for t in decoding.banned_ids} or None,  # vLLM's floor
        }

    def score(self, sequences: Sequence[Sequence[int]], starts: Sequence[int]) -> list[list[float]]:
        """Each server's log-probs (temperature 1) of tokens ``starts[i]:`` of ``sequences[i]``, each
        given the tokens before it: [servers][sequences][tokens]. The probe that shows what the
        servers' weights are (tests, ``scripts/bench_async.py``)."""
        out = []
        for s, model in zip(self.servers, self.model_ids):
            per_server = []
            for seq, start in zip(sequences, starts):
                body = {
                    "model": model,
                    "prompt": list(seq),
                    "max_tokens": 1,
                    "temperature": 1.0,
                    "prompt_logprobs": 0,
                    "return_token_ids": True,
                }
                rows = s.call("/v1/completions", body)["choices"][0]["prompt_logprobs"]
                per_server.append([float(rows[j][str(seq[j])]["logprob"]) for j in range(start, len(seq))])
            out.append(per_server)
        return out

    # ------------------------------------------------------------------ weights

    def sync(self) -> None:
        """Broadcast the policy's current weights to every server worker and check they arrived."""
        main = distributed.world().is_main
        weights = []
        for n, t in policy_weights(self.policy.model):  # every rank walks it: FSDP gathers are collectives
            if main:  # only the rank that sends holds a host copy
                weights.append((n, t.contiguous().cpu()))
        if main:
            self._push(weights)
        distributed.barrier()  # no rank samples before the servers hold the new weights

    def _push(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        if self.group is None:
            self.group = self._join()
        version = self.version + 1
        tensors = [[n, str(t.dtype).removeprefix("torch."), list(t.shape)] for n, t in weights]
        spec = {"tensors": tensors, "version": version}
        answers = self._together("the weight sync", "grpo_receive", spec, lambda: self._broadcast(weights))
        sent = weight_group.checksum([t for _, t in weights])
        for server, workers in zip(self.servers, answers):
            check_loaded(server.url, workers, len(weights), sent, version)
        self._on_each("the weight sync", lambda server: self._publish(server, version))
        self.version = version

    def _publish(self, server: Server, version: int) -> None:
        t = self.sync_timeout_s
        server.call("/reset_prefix_cache", {}, t)  # no KV block computed with the old weights is reused
        server.call("/update_weight_version", {"new_version": str(version)}, t)
        served = server.call("/weight_info", None, t).get("weight_version")
        if served != str(version):
            raise SyncFailed(f"{server.url} serves weight version {served!r} after a sync to {version}")

    def _on_each(self, what: str, fn: Any) -> list[Any]:
        """``fn(server)`` for every server at once, probing them meanwhile (``http.wait``)."""
        pool = ThreadPoolExecutor(len(self.servers), thread_name_prefix="grpo-call")
        try:
            futures = [pool.submit(fn, s) for s in self.servers]
            wait(futures, self.servers, what)
            return [f.result() for f in futures]
        except ServerError as exc:
            self.group = None
            raise SyncFailed(str(exc) if what in str(exc) else f"{what} failed: {exc}") from None
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _broadcast(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        for _, t in weights:
            weight_group.broadcast(self.group, t)

    def _together(self, what: str, method: str, spec: Any, local: Any) -> list[Any]:
        """Post ``method`` to every server and run ``local`` (the trainer's side of the collective)
        beside it, probing the servers meanwhile (``http.wait``); each server's answers. Any failure
        is a ``SyncFailed`` naming the server when one can be named, within seconds: the calls in
        flight are aborted and the trainer's side is left on its daemon thread (the process exits
        after a fault; the survivors' receive ends when its sockets close, and they leave the group)."""
        pool = ThreadPoolExecutor(len(self.servers), thread_name_prefix="grpo-sync")
        futures = [pool.submit(s.rpc, method, spec, self.sync_timeout_s) for s in self.servers]
        mine = daemon_call(local)
        try:
            wait([mine, *futures], self.servers, what)
            return [f.result() for f in futures]
        except ServerError as exc:
            self.group = None  # never used again: a later run forms a new one
            raise SyncFailed(str(exc) if what in str(exc) else f"{what} failed: {exc}") from None
        except RuntimeError as exc:  # the collective itself timed out, every server still answering
            self.group = None
            raise SyncFailed(f"{what} failed: {' '.join(str(exc).split())[:200]}") from None
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _join(self) -> Any:
        """Form the weight group: the trainer rank 0, then each server's workers in order."""
        sizes = self._on_each(
            "the weight group's forming",
            lambda s: int(
                s.call("/get_world_size?include_dp=false", None, self.sync_timeout_s)["world_size"]
            ),
        )
        host, port = local_address(self.servers[0]), free_port()
        size = 1 + sum(sizes)
        firsts = [1 + sum(sizes[:i]) for i in range(len(sizes))]
        spec = {"host": host, "port": port, "size": size, "timeout": self.sync_timeout_s, "owner": self.owner}
        pool = ThreadPoolExecutor(len(self.servers), thread_name_prefix="grpo-join")
        futures = [pool.submit(self._join_one, s, {**spec, "rank": r}) for s, r in zip(self.servers, firsts)]
        mine = daemon_call(weight_group.join, host, port, 0, size, self.sync_timeout_s)
        try:
            wait([*futures, mine], self.servers, "the weight group's forming")
        except ServersTaken:
            raise
        except ServerError as exc:
            raise SyncFailed(f"the weight group could not form: {exc}") from None
        except RuntimeError as exc:  # the store or the group timed out: a server could not reach us
            raise SyncFailed(
                f"the weight group could not form within rollout.sync_timeout={self.sync_timeout_s:g} s "
                f"at {host}:{port} ({' '.join(str(exc).split())[:160]}): can every server reach this "
                "machine at that address?"
            ) from None
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        log.info("weight group formed: the trainer and %d server worker(s) at %s:%d", size - 1, host, port)
        return mine.result()

    def _join_one(self, server: Server, spec: dict[str, Any]) -> None:
        """One server's ``grpo_join``; a refusal (another live run owns it) raises at once, so the
        trainer does not wait for a group that cannot form."""
        answers = server.rpc("grpo_join", spec, self.sync_timeout_s)
        refused = next((w["refused"] for w in answers if w.get("refused")), None)
        if refused:
            raise ServersTaken(f"{server.url} {refused}")

    def pause(self) -> None:
        """Nothing to free: the servers' memory is their own."""

    def close(self) -> None:
        """The servers keep running (a later run joins them again): each leaves the trainer's group,
        so another client may join at once (best effort: after a fault the process is exiting)."""
        if self.group is not None:
            for s in self.servers:
                try:
                    s.rpc("grpo_leave", {"owner": self.owner}, min(self.sync_timeout_s, 10.0))
                except ServerError:
                    pass
        self.group = None


def check_loaded(url: str, workers: list[dict[str, Any]], n: int, sent: float, version: int) -> None:
    """SyncFailed unless every worker's model took all ``n`` tensors sent, with the sender's
    checksum ``sent``, and its loader wrote every parameter (``receiver.load_checked``)."""
    for w in workers:
        if not w:
            raise SyncFailed(f"{url}: a worker answered nothing to the weight sync to version {version}")
        if w.get("tensors") != n or not math.isclose(w.get("checksum", math.nan), sent, rel_tol=1e-9):
            raise SyncFailed(
                f"{url}: the weight sync to version {version} loaded other bytes than were sent "
                f"({w.get('tensors')} of {n} tensors, checksum {w.get('checksum')} vs {sent})"
            )
        if w.get("missing"):
            names = ", ".join(w["missing"][:3]) + (" ..." if len(w["missing"]) > 3 else "")
            raise SyncFailed(
                f"{url}: the weight sync to version {version} left {len(w['missing'])} parameter(s) of "
                f"the served model unwritten ({names}): the trainer's model is not the one served"
            )


def _completions(answer: dict[str, Any], n: int, url: str) -> list[Completion]:
    """A ``/v1/completions`` answer as n Completions. A completion without a log-prob for each of its
    tokens is an error naming the server, never zeros (with ``algo.engine_is`` zeros would make
    every weight w = pi_old / mu silently pi_old)."""
    choices = sorted(answer["choices"], key=lambda c: c["index"])
    if len(choices) != n:
        raise ServerError(f"{url} answered {len(choices)} completions where {n} were asked")
    out = []
    for c in choices:
        ids = list(c["token_ids"])
        logps = (c.get("logprobs") or {}).get("token_logprobs") or []
        if len(logps) != len(ids) or any(x is None for x in logps):
            raise ServerError(
                f"{url} answered a completion of {len(ids)} tokens with {len(logps)} log-probs (the "
                "request asks for logprobs=0; is it vLLM's OpenAI server as `grpo serve` starts it?)"
            )
        out.append(Completion(token_ids=ids, logprobs=[float(x) for x in logps]))
    return out
