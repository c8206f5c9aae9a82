"""core.logprobs.token_logprobs against the naive full-logits path."""

from __future__ import annotations

import pytest
import torch

from grpo_cli.core import logprobs
from grpo_cli.core.logprobs import default_chunk_size, token_logprobs


def _naive(hidden, weight, targets, temperature=1.0):
    """log_softmax over the full [B, T, V] logits, and the entropy of each row."""
    log_probs = torch.log_softmax(hidden @ weight.T / temperature, dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return log_probs.gather(-1, targets[..., None]).squeeze(-1), entropy


def _inputs(B=3, T=7, H=16, V=50, dtype=torch.float64, device="cpu"):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, H, generator=gen, dtype=torch.float64) * 2
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64) / H**0.5
    targets = torch.randint(0, V, (B, T), generator=gen)
    return hidden.to(device, dtype), weight.to(device, dtype), targets.to(device)


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 21, 1024])  # B*T = 21: 4 and 5 do not divide it
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("train_weight", [True, False])  # full fine-tuning / frozen lm_head (LoRA)
def test_values_and_gradients_match_naive_float64(chunk_size, temperature, train_weight):
    hidden, weight, targets = _inputs()
    ours_h, ours_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_(train_weight)
    naive_h, naive_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_(train_weight)
    logps, entropy = token_logprobs(ours_h, ours_w, targets, temperature, chunk_size, return_entropy=True)
    expected, expected_entropy = _naive(naive_h, naive_w, targets, temperature)
    assert logps.dtype == torch.float64 and logps.shape == targets.shape
    torch.testing.assert_close(logps, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(entropy, expected_entropy.detach(), rtol=0, atol=1e-12)
    assert not entropy.requires_grad
    upstream = torch.randn_like(expected)  # a non-uniform upstream gradient, as from the loss
    (logps * upstream).sum().backward()
    (expected * upstream).sum().backward()
    torch.testing.assert_close(ours_h.grad, naive_h.grad, rtol=0, atol=1e-12)
    if train_weight:
        torch.testing.assert_close(ours_w.grad, naive_w.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 4, 21, 1024])  # 1 and 4: backward in vocabulary slices
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("train_weight", [True, False])
def test_entropy_gradient_matches_naive_float64(chunk_size, temperature, train_weight):
    """entropy_grad=True: d(u . logp + v . H) w.r.t. hidden (and the trained weight) equals autograd
    through the full [B, T, V] softmax, to 1e-12 in float64 (an entropy bonus in the loss)."""
    hidden, weight, targets = _inputs()
    ours_h, ours_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_(train_weight)
    naive_h, naive_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_(train_weight)
    logps, entropy = token_logprobs(ours_h, ours_w, targets, temperature, chunk_size, entropy_grad=True)
    expected, expected_entropy = _naive(naive_h, naive_w, targets, temperature)
    assert entropy.requires_grad
    torch.testing.assert_close(entropy, expected_entropy, rtol=0, atol=1e-12)
    gen = torch.Generator().manual_seed(3)
    u = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    v = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    ((logps * u).sum() + (entropy * v).sum()).backward()
    ((expected * u).sum() + (expected_entropy * v).sum()).backward()
    torch.testing.assert_close(ours_h.grad, naive_h.grad, rtol=0, atol=1e-12)
    if train_weight:
        torch.testing.assert_close(ours_w.grad, naive_w.grad, rtol=0, atol=1e-12)
    # the entropy term is not a rounding error next to the log-prob's: without it the gradient differs
    only_logp = torch.autograd.grad((_naive(naive_h, naive_w, targets, temperature)[0] * u).sum(), naive_h)[0]
    assert (only_logp - naive_h.grad).abs().max() > 1e-3


def test_default_chunk_size_follows_the_vocabulary():
    # Qwen2.5's vocabulary: the floor's rows (311 MB of float32, inside the CPU budget), bf16 inputs
    # too (softmax in float32); in float64 the floor's rows would pass the budget, which wins;
    # the tiny model's 273 tokens: every row of a step in one chunk (SMALL_CHUNK_BYTES of logits).
    assert default_chunk_size(151_936) == default_chunk_size(151_936, torch.bfloat16) == logprobs.ROW_FLOOR
    assert (
        default_chunk_size(151_936, torch.float64)
        == logprobs.CHUNK_BYTES // (151_936 * 8)
        < logprobs.ROW_FLOOR
    )
    assert default_chunk_size(273) == logprobs.SMALL_CHUNK_BYTES // (273 * 4) > 30_000
    assert default_chunk_size(10**9) == 1


@pytest.mark.parametrize("budget", [1_000, 2**20, 64 * 2**20, 512 * 2**20, 8 * 2**30])
@pytest.mark.parametrize("vocab", [50, 273, 32_000, 151_936, 262_144, 10**9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_default_chunk_size_honours_its_floor_and_the_budget(monkeypatch, budget, vocab, dtype):
    monkeypatch.setattr(logprobs, "CHUNK_BYTES", budget)
    rows = default_chunk_size(vocab, dtype)
    row_bytes = vocab * (8 if dtype == torch.float64 else 4)  # the compute dtype: at least float32
    assert rows >= 1
    assert rows * row_bytes <= budget or rows == 1  # the budget caps the buffer (one row at least)
    assert rows >= min(logprobs.ROW_FLOOR, budget // row_bytes)  # the floor, where the budget allows it
    if rows > logprobs.ROW_FLOOR:  # more rows than the floor only while the buffer is cheap
        assert rows * row_bytes <= logprobs.SMALL_CHUNK_BYTES


def test_cuda_budget_is_a_share_of_free_memory(monkeypatch):
    # No GPU needed: the driver's figures are faked. PyTorch's unused cache counts as free.
    gib = 2**30
    free = {"now": 8 * gib}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["now"], 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 3 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2 * gib)
    assert logprobs.chunk_budget("cuda") == int(logprobs.CUDA_FREE_FRACTION * 9 * gib)
    assert logprobs.chunk_budget("cpu") == logprobs.chunk_budget() == logprobs.CHUNK_BYTES
    assert default_chunk_size(151_936, device="cuda") == logprobs.ROW_FLOOR  # plenty free: the floor
    free["now"] = 0  # a nearly full GPU: the budget (1 GiB of cache / 8) wins over the floor
    assert default_chunk_size(151_936, device="cuda") == int(gib * logprobs.CUDA_FREE_FRACTION) // (
        151_936 * 4
    )


def test_default_chunk_size_asks_the_inputs_device(monkeypatch):
    asked = []
    monkeypatch.setattr(logprobs, "chunk_budget", lambda device=None: asked.append(device) or 10**9)
    hidden, weight, targets = _inputs()
    token_logprobs(hidden, weight, targets)
    assert asked == [hidden.device]


@pytest.mark.parametrize("train_weight", [True, False])
def test_default_chunks_match_naive_float64(monkeypatch, train_weight):
    # A budget of 5 float64 rows of V = 50: the 21 rows run as 5 chunks, the last one short.
    monkeypatch.setattr(logprobs, "CHUNK_BYTES", 5 * 50 * 8)
    hidden, weight, targets = _inputs()
    assert default_chunk_size(50, torch.float64) == 5
    ours_h, ours_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_(train_weight)
    naive_h, naive_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_(train_weight)
    upstream = torch.randn(targets.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    calls = []
    inner = logprobs._logits_
    monkeypatch.setattr(logprobs, "_logits_", lambda buf, h, *a: calls.append(len(h)) or inner(buf, h, *a))
    logps = token_logprobs(ours_h, ours_w, targets)
    assert calls == [5, 5, 5, 5, 1]  # one [chunk, V] buffer per chunk of rows in forward
    (logps * upstream).sum().backward()
    expected = _naive(naive_h, naive_w, targets)[0]
    (expected * upstream).sum().backward()
    torch.testing.assert_close(token_logprobs(hidden, weight, targets), expected.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(ours_h.grad, naive_h.grad, rtol=0, atol=1e-12)
    if train_weight:
        torch.testing.assert_close(ours_w.grad, naive_w.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("train_weight", [True, False])
def test_gradcheck(train_weight):
    hidden, weight, targets = _inputs(B=2, T=3, H=4, V=9)
    hidden.requires_grad_()
    weight.requires_grad_(train_weight)

    def fn(h, w):
        return token_logprobs(h, w, targets, temperature=0.8, chunk_size=4)

    assert torch.autograd.gradcheck(fn, (hidden, weight))


def test_bfloat16_within_bf16_tolerance():
    hidden, weight, targets = _inputs(B=4, T=16, H=64, V=300, dtype=torch.bfloat16)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logps, entropy = token_logprobs(h, w, targets, chunk_size=24, return_entropy=True)
    assert logps.dtype == torch.float32 and entropy.dtype == torch.float32
    # The reference: the same bf16 values, computed in float64.
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    expected, expected_entropy = _naive(h64, w64, targets)
    # bf16 keeps 8 mantissa bits: logits of size ~|z| are off by ~|z| * 2^-8 before the float32 log-sum-exp
    torch.testing.assert_close(logps.double(), expected, rtol=0, atol=0.05)
    torch.testing.assert_close(entropy.double(), expected_entropy, rtol=0, atol=0.05)
    upstream = torch.randn(targets.shape, dtype=torch.float64)
    (logps * upstream.float()).sum().backward()
    (expected * upstream).sum().backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    for ours, ref in [(h.grad, h64.grad), (w.grad, w64.grad)]:
        assert (ours.double() - ref).abs().max() <= 0.03 * ref.abs().max()


def test_no_grad_call_saves_nothing():
    hidden, weight, targets = _inputs()
    with torch.no_grad():
        logps = token_logprobs(hidden.requires_grad_(), weight, targets)
    assert logps.grad_fn is None


def test_rejects_mismatched_shapes():
    hidden, weight, targets = _inputs()
    with pytest.raises(ValueError, match="shapes"):
        token_logprobs(hidden, weight, targets[:, :-1])
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs(hidden, weight, targets, chunk_size=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_naive(dtype):
    hidden, weight, targets = _inputs(B=4, T=33, H=64, V=1000, dtype=dtype, device="cuda")
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logps, entropy = token_logprobs(h, w, targets, temperature=0.9, chunk_size=50, return_entropy=True)
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    expected, expected_entropy = _naive(h64, w64, targets, 0.9)
    atol = 1e-4 if dtype == torch.float32 else 0.05  # TF32/bf16 matmuls on the GPU
    torch.testing.assert_close(logps.double(), expected, rtol=0, atol=atol)
    torch.testing.assert_close(entropy.double(), expected_entropy.detach(), rtol=0, atol=atol)
    logps.sum().backward()
    expected.sum().backward()
    for ours, ref in [(h.grad, h64.grad), (w.grad, w64.grad)]:
        assert (ours.double() - ref).abs().max() <= 0.03 * ref.abs().max()


def test_second_backward_through_the_same_graph_recomputes():
    # The first backward reuses the last chunk's softmax from forward; a retained graph must not.
    hidden, weight, targets = _inputs()
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    logps = token_logprobs(h, w, targets, chunk_size=5)
    first = torch.autograd.grad(logps.sum(), (h, w), retain_graph=True)
    second = torch.autograd.grad(logps.sum(), (h, w))
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 3, 5, 8, 13, 21, 100])  # B*T = 21 rows
@pytest.mark.parametrize("need_hidden_grad", [True, False])
def test_trained_head_below_the_floor_matches_naive_float64(monkeypatch, chunk_size, need_hidden_grad):
    # A floor of 8 rows: chunks of fewer rows go back as tiles of 8 rows (8, 8, 5) by a slice of
    # the vocabulary in the chunk's elements, so every weight-gradient product sums over 8 rows.
    monkeypatch.setattr(logprobs, "ROW_FLOOR", 8)
    hidden, weight, targets = _inputs()
    ours_h, ours_w = hidden.clone().requires_grad_(need_hidden_grad), weight.clone().requires_grad_()
    naive_h, naive_w = hidden.clone().requires_grad_(need_hidden_grad), weight.clone().requires_grad_()
    logps = token_logprobs(ours_h, ours_w, targets, 0.7, chunk_size)
    tiles = []
    inner = logprobs._logits_
    monkeypatch.setattr(
        logprobs, "_logits_", lambda buf, h, w, t: tiles.append((len(h), len(w))) or inner(buf, h, w, t)
    )
    upstream = torch.randn(targets.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (logps * upstream).sum().backward()
    expected = _naive(naive_h, naive_w, targets, 0.7)[0]
    (expected * upstream).sum().backward()
    torch.testing.assert_close(logps, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(ours_w.grad, naive_w.grad, rtol=0, atol=1e-12)
    if need_hidden_grad:
        torch.testing.assert_close(ours_h.grad, naive_h.grad, rtol=0, atol=1e-12)
    assert all(
        rows * cols <= min(chunk_size, 21) * 50 for rows, cols in tiles
    )  # no more than a chunk's memory
    if chunk_size < 8:
        assert {rows for rows, _ in tiles} == {8, 5}  # 21 rows: 8, 8 and the last 5
        assert sum(cols for rows, cols in tiles if rows == 5) == 50  # the slices cover the vocabulary
    else:  # whole chunks; the last one's softmax was kept from forward
        assert all(cols == 50 for _, cols in tiles) and len(tiles) == -(-21 // chunk_size) - 1
