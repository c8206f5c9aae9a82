"""Decoding on CPU: float32 linear layers through oneDNN instead of the BLAS behind ``F.linear``.

A decode step multiplies a few rows (one per sequence) by every weight matrix of the model: at
Qwen2.5-0.5B's shapes the [151,936 x 896] output head alone is 545 MB of float32 per step, so the
step is bound by how fast the matrix-product kernel streams weights. For these few-row products
the MKL ``sgemm`` that ``F.linear`` calls on torch's x86 CPU wheels is two to three times slower
than oneDNN's kernel (measured on the project's AMD EPYC machine: 545 MB head, batch 8, 2 threads,
``scripts/bench_decode.py``); oneDNN reads the same dense weights in place, no copy or repacking.
Inside ``fast_linears(model)`` every ``F.linear`` on float32 CPU tensors, run without autograd, goes to
oneDNN; everything else is untouched. The results equal MKL's up to float rounding (the two sum in
different orders), so sampled tokens can differ from ``generate``'s only where two candidates tie
to within ~1e-6.

Only worth it where weights dominate: below ``MIN_HEAD_ELEMENTS`` in the output embedding (the
embedded tiny model) the per-call cost of intercepting ``F.linear`` outweighs the kernel's gain.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# Output embeddings smaller than this (elements) decode with the default kernels.
MIN_HEAD_ELEMENTS = 2**22


def _kernel() -> Any | None:
    """oneDNN's fused linear op, or None where this torch build lacks it."""
    if not torch.backends.mkldnn.is_available():
        return None
    return getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)


class _OneDNNLinear(TorchFunctionMode):
    def __init__(self, kernel: Any):
        super().__init__()
        self.kernel = kernel

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, w = args[0], args[1]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if _eligible(x, w, b):
                return self.kernel(x.contiguous(), w, b, "none", [], "")
        return func(*args, **kwargs)


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # not a DTensor or another tensor subclass


def _eligible(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> bool:
    tensors = (x, w) if b is None else (x, w, b)
    return (
        not torch.is_grad_enabled()  # the oneDNN op has no backward
        and all(type(t) in _PLAIN and t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
        and w.dim() == 2
        and w.is_contiguous()
        and (b is None or b.is_contiguous())
    )


def fast_linears(model: Any) -> contextlib.AbstractContextManager:
    """A context in which ``model``'s float32 CPU linear layers run on oneDNN (see the module doc).

    A no-op context when the model is not float32 on CPU, its output embedding is small, or this
    torch build has no oneDNN linear op.
    """
    kernel = _kernel()
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    weight = getattr(head, "weight", None)
    if (
        kernel is None
        or not isinstance(weight, torch.Tensor)
        or weight.device.type != "cpu"
        or weight.dtype != torch.float32
        or weight.numel() < MIN_HEAD_ELEMENTS
    ):
        return contextlib.nullcontext()
    return _OneDNNLinear(kernel)
