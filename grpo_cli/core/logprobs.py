"""Per-token log-probs of the sampled tokens without materialising the [tokens x vocab] logits.

    log pi_theta(o_t | ...) = log softmax(h_t W^T / temperature)[o_t]

The naive path (``hidden @ W.T -> log_softmax -> gather``) holds several float32 [B*T, V]
tensors at once: at Qwen2.5 vocabularies (V = 151,936) 4,096 tokens are 2.5 GB each. Here the
rows are processed in chunks by a custom autograd Function: forward keeps the log-sum-exp per
row, backward recomputes each chunk's logits, so the extra memory is O(chunk_size x V): one
[chunk_size, V] buffer, reused for every chunk. The chunk's rows follow from the vocabulary
(``CHUNK_BYTES`` per buffer: 55 rows at V = 151,936, the whole batch at a few hundred tokens of
vocabulary), so the saving does not wait for the token count to outgrow a fixed chunk.

When the output embedding is frozen (LoRA, the default), the gradient w.r.t. the hidden states is
formed in forward from the logits already at hand and kept ([B*T, H], the size of `hidden`), so
backward does no recomputation and the whole thing costs the naive path's two matmuls. When it
is trained, backward starts from the last chunk, whose softmax forward left in the buffer, so
only the other chunks are recomputed.
``scripts/bench_logprobs.py`` measures memory and time against the naive path.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["CHUNK_BYTES", "default_chunk_size", "token_logprobs"]

# The [rows, V] buffer one chunk holds. Smaller saves little next to the [N, H] tensors around it;
# larger only raises the peak: a chunk of 32 MiB still multiplies tens of rows per read of the
# weight, enough to keep the matmuls compute-bound (scripts/bench_logprobs.py).
CHUNK_BYTES = 32 * 2**20


def default_chunk_size(vocab_size: int, dtype: torch.dtype = torch.float32) -> int:
    """Rows per chunk so one [rows, vocab_size] buffer in the compute dtype takes ``CHUNK_BYTES``."""
    itemsize = torch.empty((), dtype=_compute_dtype(dtype)).element_size()
    return max(1, CHUNK_BYTES // (vocab_size * itemsize))


def token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    return_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """log softmax(hidden @ weight.T / temperature) at `targets`, chunked over rows.

    Args:
        hidden: [B, T, H] last hidden states (float32, bfloat16 or float16; float64 for tests).
        weight: [V, H] output embedding (lm_head), same dtype as `hidden`.
        targets: [B, T] long, the next-token ids, each in [0, V) (replace padding by any valid id).
        temperature: the sampling temperature, so the log-probs are those of the sampler.
        chunk_size: rows of the flattened [B*T, H] per chunk; None: ``default_chunk_size(V)``
            (``CHUNK_BYTES`` per chunk). The extra memory is one float32 [chunk_size, V] buffer,
            a second one transiently for bf16 inputs or return_entropy, plus the weight gradient
            when it is trained.
        return_entropy: also return the entropy of each row's distribution (detached).

    Returns:
        logps [B, T] in float32 (float64 for float64 inputs), and entropy [B, T] if asked.
        Gradients flow to `hidden` and `weight` in their own dtypes.
    """
    if hidden.shape[:-1] != targets.shape or hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(
            f"shapes: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, targets {tuple(targets.shape)}"
        )
    if chunk_size is None:
        chunk_size = default_chunk_size(weight.shape[0], hidden.dtype)
    if chunk_size < 1 or temperature <= 0:
        raise ValueError(f"chunk_size={chunk_size} and temperature={temperature} must be positive")
    logps, entropy = _ChunkedLogprobs.apply(
        hidden, weight, targets, float(temperature), chunk_size, return_entropy
    )
    return (logps, entropy) if return_entropy else logps


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Log-sum-exp in at least float32: bf16's 8-bit mantissa cannot resolve log-probs near 0.
    return torch.promote_types(dtype, torch.float32)


def _logits_(buf: Tensor, h: Tensor, weight: Tensor, temperature: float) -> Tensor:
    """buf[:n] <- h @ W^T / temperature: [n, V] in the compute dtype, written over `buf`.

    Reusing one buffer matters on CPU: every fresh [n, V] allocation is new pages from the OS,
    and faulting 600 MB in costs about as much as the softmax over it.
    """
    out = buf[: h.shape[0]]
    if weight.dtype == out.dtype:
        torch.mm(h, weight.t(), out=out)
    else:  # bf16/fp16: the matmul runs in the input dtype (fp32 accumulation inside)
        out.copy_(h @ weight.t())
    return out.div_(temperature) if temperature != 1.0 else out


def _log_softmax_at_(z: Tensor, targets: Tensor, normalise: bool) -> tuple[Tensor, Tensor]:
    """(log p[targets], log-sum-exp) per row of the logits z [n, V], computed in place.

    z is left holding exp(z - max) per row, or the softmax itself when `normalise`.
    """
    picked = z.gather(1, targets[:, None]).squeeze(1)
    top = z.amax(dim=1)
    total = z.sub_(top[:, None]).exp_().sum(dim=1)  # shifted by the row max: exp cannot overflow
    if normalise:
        z.div_(total[:, None])
    lse = top + total.log()
    return picked - lse, lse


def _softmax_grad_(probs: Tensor, targets: Tensor, grad_out: Tensor, temperature: float) -> Tensor:
    """In place: softmax rows [n, V] -> d(g * logp[target]) / d(h W^T) = g (onehot - p) / temperature."""
    probs.mul_(-grad_out[:, None])
    probs.scatter_add_(1, targets[:, None], grad_out[:, None])
    return probs.div_(temperature) if temperature != 1.0 else probs


class _ChunkedLogprobs(torch.autograd.Function):
    """Forward keeps the log-sum-exp per row; backward recomputes the logits chunk by chunk.

    Two shortcuts, both exact: with a frozen weight the hidden-state gradient direction
    (onehot - p) W / temperature is formed in forward (no recomputation at all); with a trained
    weight the last chunk's softmax stays in the buffer and backward starts from it (one chunk
    fewer to recompute). The first backward takes that buffer over (a second one through the
    same graph, retain_graph=True, recomputes every chunk).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size, return_entropy):
        flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)  # [N, H], [N]
        n, dtype = flat_h.shape[0], _compute_dtype(hidden.dtype)
        logps, lse = flat_h.new_empty(n, dtype=dtype), flat_h.new_empty(n, dtype=dtype)
        entropy = flat_h.new_empty(n if return_entropy else 0, dtype=dtype)
        buf = flat_h.new_empty(min(chunk_size, n), weight.shape[0], dtype=dtype)  # [chunk, V]
        eager = ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]
        keep_last = ctx.needs_input_grad[1]
        grad_dir = torch.empty_like(flat_h) if eager else None  # d logp / d h per row
        for start in range(0, n, chunk_size):
            rows = slice(start, start + chunk_size)
            z = _logits_(buf, flat_h[rows], weight, temperature)
            normalise = return_entropy or eager or (keep_last and start + chunk_size >= n)
            logps[rows], lse[rows] = _log_softmax_at_(z, flat_t[rows], normalise)
            if return_entropy:
                entropy[rows] = -torch.special.xlogy(z, z).sum(dim=1)  # xlogy: 0 log 0 = 0
            if eager:
                ones = torch.ones_like(lse[rows])
                grad_dir[rows] = _softmax_grad_(z, flat_t[rows], ones, temperature).to(weight.dtype) @ weight
        ctx.save_for_backward(flat_h, weight, flat_t, lse, grad_dir)
        ctx.kept = buf if keep_last else None  # not saved: backward overwrites it
        ctx.shape, ctx.temperature, ctx.chunk_size = hidden.shape, temperature, chunk_size
        entropy = entropy.view(targets.shape) if return_entropy else entropy
        ctx.mark_non_differentiable(entropy)  # a metric: no gradient flows back through it
        return logps.view(targets.shape), entropy

    @staticmethod
    def backward(ctx, grad_logps, _grad_entropy):
        flat_h, weight, flat_t, lse, grad_dir = ctx.saved_tensors
        kept, ctx.kept = ctx.kept, None  # the last chunk's softmax, good for one backward only
        g = grad_logps.reshape(-1).to(lse.dtype)  # [N]
        if grad_dir is not None:  # frozen weight: d logp / d h was formed in forward
            return (g[:, None] * grad_dir).to(flat_h.dtype).view(ctx.shape), None, None, None, None, None
        need_h, need_w = ctx.needs_input_grad[:2]
        grad_h = torch.empty_like(flat_h) if need_h else None
        grad_w = None  # [V, H], summed over chunks in at least float32 (see _accumulate)
        n, chunk = flat_h.shape[0], ctx.chunk_size
        buf = kept if kept is not None else lse.new_empty(min(chunk, n), weight.shape[0])
        for start in reversed(range(0, n, chunk)):  # the last chunk first: its softmax may be in buf
            rows = slice(start, start + chunk)
            if kept is not None and start + chunk >= n:
                probs = buf[: n - start]
            else:
                probs = _logits_(buf, flat_h[rows], weight, ctx.temperature).sub_(lse[rows, None]).exp_()
            grad_logits = _softmax_grad_(probs, flat_t[rows], g[rows], ctx.temperature)  # [n_c, V]
            if need_h:
                grad_h[rows] = grad_logits.to(weight.dtype) @ weight
            if need_w:
                grad_w = _accumulate(grad_w, grad_logits, flat_h[rows])
        if need_w:  # no rows at all leaves nothing accumulated
            grad_w = torch.zeros_like(weight) if grad_w is None else grad_w.to(weight.dtype)
        grad_h = grad_h.view(ctx.shape) if need_h else None
        return grad_h, grad_w, None, None, None, None


def _accumulate(grad_w: Tensor | None, grad_logits: Tensor, h: Tensor) -> Tensor:
    """grad_w [V, H] + grad_logits.T [V, n] @ h [n, H], in place when the dtypes allow it.

    The sum over chunks stays in at least float32 so bf16 does not round every partial sum;
    the first chunk allocates it (no zero fill of a [V, H] tensor).
    """
    if grad_w is None:
        return (grad_logits.t().to(h.dtype) @ h).to(_compute_dtype(h.dtype))
    if grad_w.dtype == h.dtype:
        return grad_w.addmm_(grad_logits.t(), h)
    # bf16/fp16: the matmul runs in the input dtype (fp32 accumulation inside), summed in fp32
    return grad_w.add_(grad_logits.t().to(h.dtype) @ h)
