"""model=tiny-rg: the misconception class, the warm-up labels' rates, and a small build that reloads
with a tokenizer that round-trips the task's prompts."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

import pytest

from grpo_cli.data import build_prompt
from grpo_cli.models.tiny import TinySpec
from grpo_cli.models.tiny_rg import TEMPLATE, RGSpec, is_hard, misconception, noisy_target


def row(expression: str, answer: int) -> dict:
    return {"answer": str(answer), "metadata": {"expression": expression}}


def test_the_misconception_applies_the_minus_to_the_rest():
    assert misconception("4 - 3 + 2") == -1  # 4 - (3 + 2); right: 3
    assert misconception("4 - 3 - 2") == 3  # 4 - (3 - 2); right: -1
    assert misconception("4 + 3 - 2") is None and misconception("4 - 3") is None
    assert is_hard(row("4 - 3 + 2", 3)) and not is_hard(row("4 - 3 + 0", 1))  # c = 0: no difference


def test_warm_up_labels_are_drawn_at_the_configured_rates():
    spec, rng = RGSpec(), random.Random(0)
    hard = Counter(noisy_target(row("4 - 3 + 2", 3), rng, spec) for _ in range(4000))
    assert abs(hard["-1"] / 4000 - spec.p_mistake_hard) < 0.03
    assert abs(hard["3"] / 4000 - spec.p_right_hard) < 0.03
    easy = Counter(noisy_target(row("4 + 3 - 2", 5), rng, spec) for _ in range(4000))
    assert abs(easy["5"] / 4000 - spec.p_right_easy) < 0.03


def test_a_small_build_reloads_and_round_trips_the_prompts(tmp_path, monkeypatch):
    pytest.importorskip("reasoning_gym")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo_cli.data import reasoning_gym
    from grpo_cli.models.tiny_rg import data_config, ensure_tiny_rg

    monkeypatch.setenv("GRPO_HOME", str(tmp_path))
    small = replace(
        TinySpec(), steps=2, batch_size=4, hidden_size=32, intermediate_size=64, num_hidden_layers=1
    )
    path = ensure_tiny_rg(RGSpec(base=small, size=100), quiet=True)
    assert path.parent == tmp_path and path.name.startswith("tiny-rg-v1-s0-")
    tok = AutoTokenizer.from_pretrained(path)
    AutoModelForCausalLM.from_pretrained(path)
    for r in reasoning_gym.load(data_config(100), "test")[:20]:
        prompt = build_prompt(r, TEMPLATE)
        ids = tok(prompt)["input_ids"]
        assert tok.decode(ids) == prompt and len(ids) < 30  # the fixed words are single tokens
