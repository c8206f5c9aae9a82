"""The embedded model's tokenizer and build: exact round trips after reloading, deterministic builds."""

from __future__ import annotations

from dataclasses import replace

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo_cli.tiny import TEMPLATE, TinySpec, build, make_tokenizer, noisy_answer


def test_tokenizer_round_trips_after_reload(tmp_path):
    # transformers 5 chooses the tokenizer class from the model type: what comes back must behave
    # exactly like what was saved, spaces and newlines included.
    make_tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    for text in ["Calculate 2 + 2 * 6\nAnswer: 14", "  two  spaces\n\n\ttab é ∑ -7", TEMPLATE]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    assert tok.convert_ids_to_tokens(tok("Calculate")["input_ids"]) == ["Calculate"]
    assert tok.eos_token_id == tok.pad_token_id == 0


def test_noisy_answers_are_right_at_the_configured_rate():
    import random

    rng = random.Random(0)
    draws = [noisy_answer("2 + 2 * 6", rng, 0.5) for _ in range(4000)]
    right = sum(d == "14" for d in draws) / len(draws)
    assert 0.46 < right < 0.54
    assert "24" in draws  # the left-to-right mistake is among the distractors


def test_build_is_deterministic(tmp_path):
    spec = replace(
        TinySpec(), steps=3, batch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1
    )
    build(spec, tmp_path / "a", quiet=True)
    build(spec, tmp_path / "b", quiet=True)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b").state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "tiny_spec.json").is_file()
