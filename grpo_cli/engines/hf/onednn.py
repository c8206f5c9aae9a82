"""Decoding on CPU: linear layers through oneDNN, the large weights in its packed layout.

A decode step multiplies a few rows (one per sequence) by every weight matrix of the model: at
Qwen2.5-0.5B's shapes the [151,936 x 896] output head alone is 545 MB of float32 (272 MB of
bfloat16) per step, so the step is bound by how fast the matrix-product kernel gets through the
weights. Two changes to what ``F.linear`` does there, each measured (docs/performance.md):

- float32: the MKL ``sgemm`` that ``F.linear`` calls on torch's x86 CPU wheels is two to three
  times slower at these few rows than oneDNN's kernel on the same dense weights;
- float32 and bfloat16: oneDNN on a weight reordered once into its blocked layout
  (``_reorder_linear_weight``) is faster again than on the plain [out, in] matrix, ~2x on the
  bfloat16 head. The packed copy lives only while the context is open (one decoding call), so it
  adds to memory while sampling (one more copy of the packed weights), never to the update's peak;
  it is rebuilt whenever the weight changed in place (its version counter), so a full fine-tune's
  optimizer steps and a pushed checkpoint are picked up. Packing costs about one pass over the
  weights, repaid after a few decode steps: only calls of at least ``PACK_MIN_STEPS`` steps pack.

Inside ``fast_linears(model)`` every ``F.linear`` on float32 or bfloat16 CPU tensors, run without
autograd, goes to oneDNN; everything else is untouched. The results equal MKL's up to float
rounding (the two sum in different orders), so sampled tokens can differ from ``generate``'s only
where two candidates tie to within the dtype's rounding.

Only worth it where weights dominate: below ``MIN_HEAD_ELEMENTS`` in the output embedding (the
embedded tiny model) the per-call cost of intercepting ``F.linear`` outweighs the kernel's gain.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# Output embeddings smaller than this (elements) decode with the default kernels.
MIN_HEAD_ELEMENTS = 2**22
# Weights smaller than this (elements) are used as they are: packing a LoRA adapter or a small
# projection buys nothing measurable.
MIN_PACK_ELEMENTS = 2**20
# Decoding calls shorter than this (tokens) do not pack: a pass over the weights to reorder them
# costs about as much as a few steps gain.
PACK_MIN_STEPS = 16
DTYPES = (torch.float32, torch.bfloat16)


def _kernel() -> Any | None:
    """oneDNN's fused linear op, or None where this torch build lacks it."""
    if not torch.backends.mkldnn.is_available():
        return None
    return getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)


def _packer() -> Any | None:
    """oneDNN's weight reorder for ``_linear_pointwise``, or None where this torch build lacks it."""
    return getattr(getattr(torch.ops, "mkldnn", None), "_reorder_linear_weight", None)


@functools.cache
def supported(dtype: torch.dtype) -> bool:
    """Whether this CPU runs the kernel (and the reorder) in ``dtype``: oneDNN's bfloat16 path needs
    AVX-512 (bw, vl, dq) or AVX-NE-CONVERT, and raises on an AVX2-only CPU. Probed once on a small
    product, since torch reports the CPU's capability but not oneDNN's per-dtype requirements."""
    kernel, packer = _kernel(), _packer()
    if kernel is None or dtype not in DTYPES:
        return False
    w, x = torch.ones(16, 16, dtype=dtype), torch.ones(2, 16, dtype=dtype)
    try:
        with torch.no_grad():
            kernel(x, w, None, "none", [], "")
            if packer is not None:
                kernel(x, packer(w, 2), None, "none", [], "")
    except RuntimeError:
        return False
    return True


class _OneDNNLinear(TorchFunctionMode):
    def __init__(self, kernel: Any, packer: Any | None, rows: int):
        super().__init__()
        self.kernel, self.packer, self.rows = kernel, packer, rows
        self.packed: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}  # id -> (weight, version, packed)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, w = args[0], args[1]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if _eligible(x, w, b):
                return self.kernel(x.contiguous(), self._weight(w), b, "none", [], "")
        return func(*args, **kwargs)

    def _weight(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` in oneDNN's packed layout (packed on first use, again after an in-place change)."""
        if self.packer is None or w.numel() < MIN_PACK_ELEMENTS:
            return w
        hit = self.packed.get(id(w))
        if hit is None or hit[0] is not w or hit[1] != w._version:
            hit = (w, w._version, self.packer(w, self.rows))  # the mode is off inside its own handler
            self.packed[id(w)] = hit
        return hit[2]


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # not a DTensor or another tensor subclass


def _eligible(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> bool:
    tensors = (x, w) if b is None else (x, w, b)
    return (
        not torch.is_grad_enabled()  # the oneDNN op has no backward
        and supported(w.dtype)
        and all(type(t) in _PLAIN and t.dtype == w.dtype and t.device.type == "cpu" for t in tensors)
        and w.dim() == 2
        and w.is_contiguous()
        and (b is None or b.is_contiguous())
    )


def fast_linears(model: Any, rows: int = 1, steps: int = 0) -> contextlib.AbstractContextManager:
    """A context in which ``model``'s float32 / bfloat16 CPU linear layers run on oneDNN (module doc).

    ``rows``: the decode batch, oneDNN's hint for the packed layout; ``steps``: the forward passes
    the context will see, which decides whether packing pays (``PACK_MIN_STEPS``). A no-op context
    when the model is not float32 or bfloat16 on CPU, its output embedding is small, or this torch
    build has no oneDNN linear op, or this CPU cannot run it in the model's dtype (``supported``).
    """
    kernel = _kernel()
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    weight = getattr(head, "weight", None)
    if (
        kernel is None
        or not isinstance(weight, torch.Tensor)
        or weight.device.type != "cpu"
        or not supported(weight.dtype)
        or weight.numel() < MIN_HEAD_ELEMENTS
    ):
        return contextlib.nullcontext()
    return _OneDNNLinear(kernel, _packer() if steps >= PACK_MIN_STEPS else None, max(1, rows))
