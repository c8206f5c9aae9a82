"""Decoding's linear layers on oneDNN, packed or not: the same products as F.linear, the same tokens."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from helpers import encode_prompts
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo_cli.engines import Decoding
from grpo_cli.engines.hf import onednn
from grpo_cli.engines.hf.decode import prompt_generators, sample_group

pytestmark = pytest.mark.skipif(onednn._kernel() is None, reason="this torch build has no oneDNN linear op")


@pytest.fixture(scope="module")
def model_and_tok(random_model_dir):
    tok = AutoTokenizer.from_pretrained(random_model_dir)
    tok.padding_side = "left"
    return AutoModelForCausalLM.from_pretrained(random_model_dir).eval(), tok


@pytest.fixture
def counted(monkeypatch):
    """Route every model through oneDNN (no size floor) and count the kernel's calls."""
    calls = []
    inner = onednn._kernel()
    for dtype in onednn.DTYPES:
        onednn.supported(dtype)  # probed (and cached) on the real kernel, outside the count
    monkeypatch.setattr(onednn, "MIN_HEAD_ELEMENTS", 0)
    monkeypatch.setattr(onednn, "_kernel", lambda: lambda *a: calls.append(a[0].shape) or inner(*a))
    return calls


def test_linear_matches_a_float64_reference(counted):
    gen = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(48, 300)
    torch.nn.init.normal_(layer.weight, generator=gen)
    x = torch.randn(2, 3, 48, generator=gen)  # [B, S, H], as a decoder passes it
    reference = x.double() @ layer.weight.double().T + layer.bias.double()
    model = torch.nn.Module()
    model.get_output_embeddings = lambda: layer
    with torch.inference_mode(), onednn.fast_linears(model):
        out = layer(x)
    assert counted == [x.shape] and out.shape == (2, 3, 300) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-5)
    with torch.enable_grad(), onednn.fast_linears(model):  # autograd on: F.linear itself
        assert layer(x).requires_grad and len(counted) == 1


def test_not_used_for_small_heads_or_other_dtypes(model_and_tok):
    model, _ = model_and_tok
    assert isinstance(onednn.fast_linears(model), contextlib.nullcontext)  # below MIN_HEAD_ELEMENTS
    fp16 = torch.nn.Linear(4, onednn.MIN_HEAD_ELEMENTS // 4 + 1, bias=False, dtype=torch.float16)
    holder = torch.nn.Module()
    holder.get_output_embeddings = lambda: fp16
    assert isinstance(onednn.fast_linears(holder), contextlib.nullcontext)


def test_a_dtype_this_cpu_cannot_run_keeps_the_default_kernels(monkeypatch):
    """oneDNN's bf16 linear raises on an AVX2-only CPU: there the model decodes with the default
    kernels instead of failing (a kernel that raises stands in for such a CPU)."""

    def raising(*args):
        raise RuntimeError(
            "bf16 path needs the cpu support avx_ne_convert or avx512bw, avx512vl and avx512dq"
        )

    monkeypatch.setattr(onednn, "_kernel", lambda: raising)
    onednn.supported.cache_clear()
    try:
        head = torch.nn.Linear(4, onednn.MIN_HEAD_ELEMENTS // 4 + 1, bias=False, dtype=torch.bfloat16)
        holder = torch.nn.Module()
        holder.get_output_embeddings = lambda: head
        assert not onednn.supported(torch.bfloat16)
        assert isinstance(onednn.fast_linears(holder), contextlib.nullcontext)
    finally:
        onednn.supported.cache_clear()


@pytest.mark.skipif(onednn._packer() is None, reason="this torch build has no oneDNN weight reorder")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_packed_weights_match_a_float64_reference_and_follow_in_place_updates(
    counted, monkeypatch, dtype, tol
):
    """Packed: the product of the weight as it is now, within the dtype's rounding (bf16 keeps 8
    bits: 2e-2 relative to outputs of ~|7|), at row counts other than the packing hint."""
    if not onednn.supported(dtype):
        pytest.skip(f"this CPU has no oneDNN {dtype} linear (bf16 needs AVX-512 or AVX-NE-CONVERT)")
    monkeypatch.setattr(onednn, "MIN_PACK_ELEMENTS", 0)
    gen = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(48, 300, dtype=dtype)
    model = torch.nn.Module()
    model.get_output_embeddings = lambda: layer
    with torch.inference_mode(), onednn.fast_linears(model, rows=4, steps=onednn.PACK_MIN_STEPS) as mode:
        for rows in (4, 1, 7):
            x = torch.randn(rows, 1, 48, generator=gen).to(dtype)
            reference = x.double() @ layer.weight.double().T + layer.bias.double()
            torch.testing.assert_close(
                layer(x).double(), reference, rtol=tol, atol=tol * reference.abs().max()
            )
            if rows == 1:  # an optimizer step in place between two decoding passes
                packed = mode.packed[id(layer.weight)][2]
                layer.weight.mul_(-2.0)
        assert mode.packed[id(layer.weight)][2] is not packed  # repacked after the change
    assert len(counted) == 3


def test_short_calls_do_not_pack(monkeypatch):
    monkeypatch.setattr(onednn, "MIN_HEAD_ELEMENTS", 0)
    model = torch.nn.Module()
    model.get_output_embeddings = lambda: torch.nn.Linear(4, 4)
    assert onednn.fast_linears(model, 8, onednn.PACK_MIN_STEPS - 1).packer is None
    assert onednn.fast_linears(model, 8, onednn.PACK_MIN_STEPS).packer is onednn._packer()


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("seeded", [False, True])
def test_sample_group_gives_the_same_tokens(model_and_tok, counted, monkeypatch, seeded, packed):
    """Greedy and sampled tokens with the linears on oneDNN (packed or not) equal those on the default kernel."""
    if packed:
        monkeypatch.setattr(onednn, "MIN_PACK_ELEMENTS", 0)
        monkeypatch.setattr(onednn, "PACK_MIN_STEPS", 0)
    model, tok = model_and_tok
    ids, mask = encode_prompts(tok, ["Calculate 1 + 2\nAnswer: ", "x"], False, torch.device("cpu"))
    runs = {}
    for route in ("onednn", "default"):
        if route == "default":
            monkeypatch.setattr(onednn, "MIN_HEAD_ELEMENTS", 2**62)
        torch.manual_seed(3)
        gens = prompt_generators([1, 2], ids.device) if seeded else None
        greedy = sample_group(model, ids, mask, 1, 10, eos_id=-1, pad_id=0, decoding=Decoding(greedy=True))[0]
        sampled = sample_group(
            model, ids, mask, 3, 10, -1, 0, decoding=Decoding(temperature=0.8), generators=gens
        )
        runs[route] = (greedy, *sampled)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert len(counted) == 2 * 10 * n_linear  # every linear of every pass of both calls went to oneDNN
    (g1, s1, m1), (g2, s2, m2) = runs["onednn"], runs["default"]
    assert torch.equal(g1, g2) and torch.equal(s1, s2) and torch.equal(m1, m2)
    assert F.linear is torch.nn.functional.linear  # nothing patched behind the mode's back
