"""The vLLM worker extension that receives the trainer's weights (``--worker-extension-cls``).

``grpo serve`` starts vLLM's own OpenAI server with this class mixed into every worker; the trainer
then drives it through the server's ``/collective_rpc`` (dev mode), which runs a method on every
worker and passes string arguments only, hence the JSON:

- ``grpo_join(spec)``: join the trainer's weight group (``engines.server.group``) as rank
  ``spec["rank"] + self.rank`` (the server's first rank plus the worker's tensor-parallel rank);
- ``grpo_receive(spec)``: receive ``spec["tensors"]`` (name, dtype, shape) by broadcast, in order,
  load them through the worker's ``reload_weights`` (the same path the colocated engine uses: on
  CPU it also repacks the oneDNN kernels) and answer the received bytes' checksum, which the trainer
  compares with its own. Each tensor is whole: vLLM's loaders shard it for tensor parallelism.

This module runs inside the server, which imports grpo_cli only for it: it imports nothing of vLLM
and nothing of the trainer.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from grpo_cli.engines.server import group as weight_group


class WeightReceiver:
    """Mixed into vLLM's worker class: ``self`` is the worker (``self.rank``, ``self.reload_weights``)."""

    def grpo_join(self, spec: str) -> str:
        s = json.loads(spec)
        rank = int(s["rank"]) + int(getattr(self, "rank", 0))
        self._grpo_group = weight_group.join(
            s["host"], int(s["port"]), rank, int(s["size"]), float(s["timeout"])
        )
        return json.dumps({"rank": rank})

    def grpo_receive(self, spec: str) -> str:
        s = json.loads(spec)
        weights: list[tuple[str, torch.Tensor]] = []
        for name, dtype, shape in s["tensors"]:
            buf = torch.empty(shape, dtype=getattr(torch, dtype))
            weight_group.broadcast(self._grpo_group, buf)
            weights.append((name, buf))
        total = weight_group.checksum([t for _, t in weights])
        self.reload_weights(weights_iterator=iter(weights))
        return json.dumps({"tensors": len(weights), "checksum": total, "version": s["version"]})

    def grpo_leave(self, spec: str = "{}") -> str:
        group: Any = getattr(self, "_grpo_group", None)
        if group is not None:
            self._grpo_group = None
        return "{}"
