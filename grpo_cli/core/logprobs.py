"""Per-token log-probs of the sampled tokens without materialising the [tokens x vocab] logits.

    log pi_theta(o_t | ...) = log softmax(h_t W^T / temperature)[o_t]

The naive path (``hidden @ W.T -> log_softmax -> gather``) holds several float32 [B*T, V]
tensors at once: at Qwen2.5 vocabularies (V = 151,936) 4,096 tokens are 2.5 GB each. Here the
rows are processed in chunks by a custom autograd Function: forward keeps the log-sum-exp per
row, backward recomputes each chunk's logits, so the extra memory is O(chunk_size x V): one
[chunk_size, V] buffer, reused for every chunk.

The chunk's rows (``default_chunk_size``) are chosen for time as well as memory. Time asks for at
least ``ROW_FLOOR`` rows: each chunk's products read the whole [V, H] weight (and, trained, its
[V, H] gradient), and below the floor they do too little arithmetic per read to run at the
matmul's throughput. Small vocabularies take more rows while the buffer stays under
``SMALL_CHUNK_BYTES`` (a tiny model's whole step in one chunk). Memory caps the buffer at the
device's budget (``chunk_budget``): on CUDA a share of the free memory, on CPU ``CHUNK_BYTES``;
where the two disagree (a huge vocabulary, a nearly full GPU, an explicit small ``chunk_size``)
memory wins.

When the output embedding is frozen (LoRA, the default), the gradient w.r.t. the hidden states is
formed in forward from the logits already at hand and kept ([B*T, H], the size of `hidden`), so
backward does no recomputation and the whole thing costs the naive path's two matmuls. When it
is trained, backward starts from the last chunk, whose softmax forward left in the buffer, so
only the other chunks are recomputed. Its weight gradient sums dZ^T h over the rows of each
product; a chunk below the floor would make that sum short, so backward then works in tiles of
the floor's rows by a slice of the vocabulary, in the chunk's bytes (``_backward_tiles``).
``scripts/bench_logprobs.py`` measures memory and time against the naive path, and with
``--head-rows`` the head's products by row count (docs/performance.md).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["CHUNK_BYTES", "ROW_FLOOR", "chunk_budget", "default_chunk_size", "token_logprobs"]

# Rows per product from which the head's matmuls run at their throughput: fewer rows re-read the
# [V, H] weight (trained: read and write its gradient) for too little work. Set from
# `scripts/bench_logprobs.py --head-rows` (issue 23; figures in docs/performance.md).
ROW_FLOOR = 512
# A [rows, V] buffer this small is cheap whatever its rows: small vocabularies take more rows than
# the floor, up to this size, so a step of a few thousand tokens runs as one chunk.
SMALL_CHUNK_BYTES = 32 * 2**20
# The most one chunk's buffer takes on CPU: room for the floor's rows in float32 up to V = 262,144;
# beyond, it binds, still a small part of the naive path's three [N, V] tensors at 2,048 tokens.
CHUNK_BYTES = 512 * 2**20
# On CUDA, the share of free memory (PyTorch's unused cache included) one chunk's buffer may take:
# a chunk can hold up to three [rows, V] tensors at once (bf16 product, entropy).
CUDA_FREE_FRACTION = 1 / 8


def chunk_budget(device: torch.device | str | None = None) -> int:
    """Bytes one chunk's [rows, V] buffer may take on `device` (None: CPU).

    CUDA: ``CUDA_FREE_FRACTION`` of the memory free now, counting what PyTorch holds cached but
    unused; any other device: the fixed ``CHUNK_BYTES``.
    """
    device = torch.device("cpu" if device is None else device)
    if device.type != "cuda":
        return CHUNK_BYTES
    free, _total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(CUDA_FREE_FRACTION * (free + cached))


def default_chunk_size(
    vocab_size: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> int:
    """Rows per chunk: ``ROW_FLOOR``, more while cheap, never over ``chunk_budget(device)``.

    One [rows, vocab_size] buffer in the compute dtype (float32 for bf16/fp16 inputs). The floor is
    what the head's products need for throughput: with fewer rows each chunk re-reads the [V, H]
    weight for too little work. More rows buy little time and cost memory (on CUDA, memory the
    model's own backward still needs), so only a vocabulary small enough takes more, up to
    ``SMALL_CHUNK_BYTES``, and the device's budget is a ceiling, not a target. Where the budget
    cannot hold the floor's rows it wins (at least one row): running out of memory fails, a short
    chunk is only slower, and backward keeps the weight gradient's products at the floor's rows
    anyway (``_backward_tiles``).
    """
    row_bytes = vocab_size * torch.empty((), dtype=_compute_dtype(dtype)).element_size()
    wanted = max(ROW_FLOOR, SMALL_CHUNK_BYTES // row_bytes)
    return max(1, min(wanted, chunk_budget(device) // row_bytes))


def token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    return_entropy: bool = False,
    entropy_grad: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """log softmax(hidden @ weight.T / temperature) at `targets`, chunked over rows.

    Args:
        hidden: [B, T, H] last hidden states (float32, bfloat16 or float16; float64 for tests).
        weight: [V, H] output embedding (lm_head), same dtype as `hidden`.
        targets: [B, T] long, the next-token ids, each in [0, V) (replace padding by any valid id).
        temperature: the sampling temperature, so the log-probs are those of the sampler.
        chunk_size: rows of the flattened [B*T, H] per chunk; None:
            ``default_chunk_size(V, hidden.dtype, hidden.device)``. The extra memory is one
            float32 [chunk_size, V] buffer, a second one transiently for bf16 inputs or
            return_entropy, plus the weight gradient when it is trained.
        return_entropy: also return the entropy of each row's distribution at `temperature`.
        entropy_grad: the entropy carries its gradient (an entropy bonus in the loss); otherwise it
            is detached, a metric. With a frozen weight this forms a second [B*T, H] direction in
            forward (one more [chunk, V] x [V, H] product per chunk).

    Returns:
        logps [B, T] in float32 (float64 for float64 inputs), and entropy [B, T] if asked.
        Gradients flow to `hidden` and `weight` in their own dtypes.

    Seven arguments: the chunked head's tensors (hidden states, weight, targets) and its switches
    (temperature, chunk size, whether to return the entropy and give it a gradient).
    """
    if hidden.shape[:-1] != targets.shape or hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(
            f"shapes: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, targets {tuple(targets.shape)}"
        )
    if chunk_size is None:
        chunk_size = default_chunk_size(weight.shape[0], hidden.dtype, hidden.device)
    if chunk_size < 1 or temperature <= 0:
        raise ValueError(f"chunk_size={chunk_size} and temperature={temperature} must be positive")
    logps, entropy = _ChunkedLogprobs.apply(
        hidden, weight, targets, float(temperature), chunk_size, return_entropy or entropy_grad, entropy_grad
    )
    return (logps, entropy) if return_entropy or entropy_grad else logps


def _entropy_grad(p: Tensor, entropy: Tensor, grad_entropy: Tensor, temperature: float) -> Tensor:
    """d(g * H) / d(h W^T) for rows of probabilities p [n, w] (a slice of the vocabulary): with
    H = -sum_v p_v log p_v and z = h W^T / temperature, dH/dz_v = -p_v (log p_v + H)."""
    out = torch.special.xlogy(p, p).add_(p * entropy[:, None])  # xlogy: 0 log 0 = 0
    return out.mul_(-grad_entropy[:, None] / temperature)


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


def _softmax_grad_(
    probs: Tensor, targets: Tensor, grad_out: Tensor, temperature: float, offset: int = 0
) -> Tensor:
    """In place: softmax [n, w] -> d(g * logp[target]) / d(h W^T) = g (onehot - p) / temperature.

    `probs` holds the vocabulary's columns [offset, offset + w); a target outside them adds 0 to
    column 0 instead of being dropped by a mask, so the shapes do not depend on the data (no
    device sync).
    """
    probs.mul_(-grad_out[:, None])
    local = targets - offset  # [n] each target's column in this slice
    hit = (local >= 0) & (local < probs.shape[1])
    picked = torch.where(hit, grad_out, 0.0)
    probs.scatter_add_(1, local.clamp(0, probs.shape[1] - 1)[:, None], picked[:, None])
    return probs.div_(temperature) if temperature != 1.0 else probs


def _backward_tiles(n: int, vocab: int, chunk: int) -> tuple[int, int]:
    """(rows, vocabulary columns) of each tile backward works on, in at most a chunk's elements.

    Whole chunks when they reach ``ROW_FLOOR`` rows (or all n); otherwise the floor's rows by
    the slice of the vocabulary that fits, so that the weight gradient dZ^T h of each product
    still sums over the floor's rows rather than a chunk's few.
    """
    rows = min(ROW_FLOOR, n)
    if chunk >= rows:
        return chunk, vocab
    return rows, max(1, chunk * vocab // rows)


class _ChunkedLogprobs(torch.autograd.Function):
    """Forward keeps the log-sum-exp per row; backward recomputes the logits chunk by chunk.

    Two shortcuts, both exact: with a frozen weight the hidden-state gradient direction
    (onehot - p) W / temperature is formed in forward (no recomputation at all); with a trained
    weight, backward in whole chunks, the last chunk's softmax stays in the buffer and backward
    starts from it (one chunk fewer to recompute). The first backward takes that buffer over (a
    second one through the same graph, retain_graph=True, recomputes every chunk).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size, return_entropy, entropy_grad):
        flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)  # [N, H], [N]
        (n, vocab), dtype = (flat_h.shape[0], weight.shape[0]), _compute_dtype(hidden.dtype)
        logps, lse = flat_h.new_empty(n, dtype=dtype), flat_h.new_empty(n, dtype=dtype)
        entropy = flat_h.new_empty(n if return_entropy else 0, dtype=dtype)
        buf = flat_h.new_empty(min(chunk_size, n), vocab, dtype=dtype)  # [chunk, V]
        eager = ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]
        ctx.tiles = _backward_tiles(n, vocab, chunk_size)
        keep_last = ctx.needs_input_grad[1] and ctx.tiles[1] == vocab  # backward in whole chunks
        grad_dir = torch.empty_like(flat_h) if eager else None  # d logp / d h per row
        ent_dir = torch.empty_like(flat_h) if eager and entropy_grad else None  # d H / d h per row
        for start in range(0, n, chunk_size):
            rows = slice(start, start + chunk_size)
            z = _logits_(buf, flat_h[rows], weight, temperature)
            normalise = return_entropy or eager or (keep_last and start + chunk_size >= n)
            logps[rows], lse[rows] = _log_softmax_at_(z, flat_t[rows], normalise)
            if return_entropy:
                entropy[rows] = -torch.special.xlogy(z, z).sum(dim=1)  # xlogy: 0 log 0 = 0
            if ent_dir is not None:  # before z is overwritten by the log-prob's gradient below
                ones = torch.ones_like(lse[rows])
                ent_dir[rows] = _entropy_grad(z, entropy[rows], ones, temperature).to(weight.dtype) @ weight
            if eager:
                ones = torch.ones_like(lse[rows])
                grad_dir[rows] = _softmax_grad_(z, flat_t[rows], ones, temperature).to(weight.dtype) @ weight
        ctx.save_for_backward(
            flat_h, weight, flat_t, lse, grad_dir, ent_dir, entropy if entropy_grad else None
        )
        ctx.kept = buf if keep_last else None  # not saved: backward overwrites it
        ctx.shape, ctx.temperature = hidden.shape, temperature
        entropy = entropy.view(targets.shape) if return_entropy else entropy
        if not entropy_grad:
            ctx.mark_non_differentiable(entropy)  # a metric: no gradient flows back through it
        return logps.view(targets.shape), entropy

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy):
        flat_h, weight, flat_t, lse, grad_dir, ent_dir, entropy = ctx.saved_tensors
        kept, ctx.kept = ctx.kept, None  # the last chunk's softmax, good for one backward only
        g = grad_logps.reshape(-1).to(lse.dtype)  # [N]
        g_ent = None if entropy is None or grad_entropy is None else grad_entropy.reshape(-1).to(lse.dtype)
        none = (None,) * 5
        if grad_dir is not None:  # frozen weight: d logp / d h (and d H / d h) were formed in forward
            grad_h = g[:, None] * grad_dir
            if g_ent is not None:
                grad_h += g_ent[:, None] * ent_dir
            return (grad_h.to(flat_h.dtype).view(ctx.shape), None, *none)
        need_h, need_w = ctx.needs_input_grad[:2]
        ent = None if g_ent is None else (entropy, g_ent)
        grad_h, grad_w = _tiled_grads(
            flat_h, weight, flat_t, lse, g, ctx.temperature, ctx.tiles, kept, need_h, ent
        )
        grad_h = grad_h.to(flat_h.dtype).view(ctx.shape) if need_h else None
        grad_w = grad_w.to(weight.dtype) if need_w else None
        return (grad_h, grad_w, *none)


def _tiled_grads(flat_h, weight, flat_t, lse, g, temperature, tiles, kept, need_h, ent=None):
    """grad_h [N, H] (if `need_h`) and grad_w [V, H], a [rows, width] tile of the logits at a time.

    `ent`: (entropy [N], its upstream gradient [N]) when the entropy carries a gradient, else None.

    Each tile is recomputed from `lse`, or for the last rows taken from `kept`. The weight is
    trained here (a frozen one took forward's eager path). Both sums are in the compute dtype, at
    least float32, so bf16 does not round every partial sum; the first tile to reach a block of
    either gradient writes it (no zero fill of a [V, H] tensor).
    """
    (n, hdim), vocab, (rows, width) = flat_h.shape, weight.shape[0], tiles
    grad_h = lse.new_empty(n, hdim) if need_h else None
    grad_w = lse.new_empty(vocab, hdim) if n else lse.new_zeros(vocab, hdim)  # no rows: nothing summed
    buf = kept if kept is not None else lse.new_empty(min(rows, n) * min(width, vocab))
    for start in reversed(range(0, n, rows)):  # the last rows first: their softmax may be in buf
        block, last = slice(start, start + rows), start + rows >= n
        h = flat_h[block]
        for v0 in range(0, vocab, width):
            w = weight[v0 : v0 + width]
            tile = buf.view(-1)[: h.shape[0] * w.shape[0]].view(h.shape[0], w.shape[0])
            if kept is None or not last:
                tile = _logits_(tile, h, w, temperature).sub_(lse[block, None]).exp_()
            extra = None if ent is None else _entropy_grad(tile, ent[0][block], ent[1][block], temperature)
            grad_logits = _softmax_grad_(tile, flat_t[block], g[block], temperature, v0)  # [rows, w]
            if extra is not None:
                grad_logits += extra
            if need_h:
                _add_product_(grad_h[block], grad_logits, w, first=v0 == 0)
            _add_product_(grad_w[v0 : v0 + width], grad_logits.t(), h, first=last)
    return grad_h, grad_w


def _add_product_(out: Tensor, a: Tensor, b: Tensor, first: bool) -> Tensor:
    """out <- a @ b (`first`) or out += a @ b, in place; the product runs in b's dtype.

    bf16/fp16 `b`: the matmul in the input dtype (fp32 accumulation inside), summed into the
    float32 `out`.
    """
    if a.dtype != b.dtype:
        product = a.to(b.dtype) @ b
        return out.copy_(product) if first else out.add_(product)
    return torch.mm(a, b, out=out) if first else out.addmm_(a, b)
