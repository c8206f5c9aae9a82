"""The vLLM worker extension that receives the trainer's weights (``--worker-extension-cls``).

``grpo serve`` starts vLLM's own OpenAI server with this class mixed into every worker; the trainer
then drives it through the server's ``/collective_rpc`` (dev mode), which runs a method on every
worker and passes string arguments only, hence the JSON:

- ``grpo_join(spec)``: join the trainer's weight group (``engines.server.group``) as rank
  ``spec["rank"] + self.rank`` (the server's first rank plus the worker's tensor-parallel rank);
- ``grpo_receive(spec)``: receive ``spec["tensors"]`` (name, dtype, shape) by broadcast, in order,
  load them through the worker's ``reload_weights`` (the same path the colocated engine uses: on
  CPU it also repacks the oneDNN kernels) and answer what the model took (``load_checked``), which
  the trainer compares with what it sent. Each tensor is whole: vLLM's loaders shard it for tensor
  parallelism.

What the model took, not what arrived: the checksum is over the tensors the model's loader
consumed, and the answer names every parameter of the model the loader did not write (vLLM's
``load_weights`` returns the names it wrote). So a tensor the loader skips (a name it does not map)
fails the sync unless another tensor wrote the same parameter (a tied head). The parameters' values
after loading cannot be read back in general: on CPU vLLM repacks each linear layer for oneDNN and
drops the plain weight.

This module runs inside the server, which imports grpo_cli only for it: it imports nothing of vLLM
and nothing of the trainer.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import torch

from grpo_cli.engines.server import group as weight_group


class WeightReceiver:
    """Mixed into vLLM's worker class: ``self`` is the worker (``self.rank``, ``self.reload_weights``).

    One weight group at a time, owned by whoever formed it (``spec["owner"]``: a training run's
    directory, or a one-off client's id). A join from another owner is refused while the owner's
    store still answers (its trainer is alive); a join from the same owner (a resumed run) or after
    the owner is gone replaces the group. A receive that fails leaves the group, so a broken group
    never blocks the next join.
    """

    def grpo_join(self, spec: str) -> str:
        s = json.loads(spec)
        held = getattr(self, "_grpo_owner", None)
        if held and held["owner"] != s.get("owner") and _answers(held["host"], held["port"]):
            return json.dumps(
                {
                    "refused": f"serves the weights of another run ({held['owner']}), whose trainer is still "
                    "running: give this command servers of its own, or wait until that run ends"
                }
            )
        self._grpo_group, self._grpo_owner = None, None  # leave any earlier (broken or finished) group
        rank = int(s["rank"]) + int(getattr(self, "rank", 0))
        self._grpo_group = weight_group.join(
            s["host"], int(s["port"]), rank, int(s["size"]), float(s["timeout"])
        )
        self._grpo_owner = {"owner": s.get("owner"), "host": s["host"], "port": int(s["port"])}
        return json.dumps({"rank": rank})

    def grpo_receive(self, spec: str) -> str:
        s = json.loads(spec)
        if getattr(self, "_grpo_group", None) is None:
            raise RuntimeError("no weight group: the trainer must join (grpo_join) before a sync")
        try:
            weights: list[tuple[str, torch.Tensor]] = []
            for name, dtype, shape in s["tensors"]:
                buf = torch.empty(shape, dtype=getattr(torch, dtype))
                weight_group.broadcast(self._grpo_group, buf)
                weights.append((name, buf))
        except BaseException:
            self._grpo_group, self._grpo_owner = None, None  # a peer failed: leave the broken group
            raise
        return json.dumps({**load_checked(self, weights), "version": s["version"]})

    def grpo_leave(self, spec: str = "{}") -> str:
        s = json.loads(spec or "{}")
        held = getattr(self, "_grpo_owner", None)
        if held is None or s.get("owner") in (None, held["owner"]):
            self._grpo_group, self._grpo_owner = None, None
        return "{}"


def _answers(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """Whether the weight group's store (hosted by its trainer) still accepts connections."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def load_checked(worker: Any, weights: list[tuple[str, torch.Tensor]]) -> dict[str, Any]:
    """Load ``weights`` through ``worker.reload_weights`` and report what the model took.

    Returns ``tensors`` (how many the loader consumed), ``checksum`` (``group.checksum`` of those)
    and ``missing``: the model's parameters the loader did not write (None when the model's
    ``load_weights`` does not say what it wrote).
    """
    model = worker.model_runner.get_model()
    # vLLM's own reload names the parameters so (a LoRA-wrapped layer's base_layer is the weight).
    expected = {name.replace(".base_layer.", ".") for name, _ in model.named_parameters()}
    consumed: list[torch.Tensor] = []
    wrote: dict[str, Any] = {}

    def feed():
        for name, t in weights:
            consumed.append(t)
            yield name, t

    original = model.load_weights

    def recording(it):
        wrote["names"] = original(it)
        return wrote["names"]

    model.load_weights = recording  # an instance attribute over the class's method, removed below
    try:
        worker.reload_weights(weights_iterator=feed())
    finally:
        del model.load_weights
    names = wrote.get("names")
    missing = None if names is None else sorted(expected - {n.replace(".base_layer.", ".") for n in names})
    return {"tensors": len(consumed), "checksum": weight_group.checksum(consumed), "missing": missing}
