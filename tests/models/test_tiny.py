"""The embedded model's tokenizer and build: exact round trips after reloading, deterministic builds."""

from __future__ import annotations

from dataclasses import replace

import torch
from helpers import is_timing
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo_cli.models import tiny
from grpo_cli.models.tiny import TEMPLATE, TinySpec, build, make_tokenizer, noisy_answer


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


SMALL = {"steps": 3, "batch_size": 8, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}


def test_build_leaves_the_global_rngs_as_it_found_them(tmp_path):
    import random

    import numpy as np

    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    build(replace(TinySpec(), **SMALL), tmp_path / "m", quiet=True)
    assert random.random() == random.Random(7).random()
    assert np.random.rand() == np.random.RandomState(7).rand()
    assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(7)))


REWARD = '''
import zlib

def noisy(completions, rows):
    """0, 1/3, 2/3 or 1 by a checksum of the text: rewards vary within a group, so every step updates."""
    return [(zlib.crc32(c.encode()) % 4) / 3 for c in completions]
'''


def test_first_run_on_a_machine_equals_every_later_one(tmp_path, monkeypatch):
    """`grpo train` against an empty $GRPO_HOME (it builds the tiny model in-process, after seeding) and
    against the filled one: the same metrics.jsonl, timings aside."""

    from grpo_cli.cli import compose_config
    from grpo_cli.commands import train
    from grpo_cli.commands.validate import validate
    from grpo_cli.run.runlog import read_metrics

    (tmp_path / "grpo_first_run_rewards.py").write_text(REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("GRPO_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(tiny, "default_spec", lambda: replace(TinySpec(), **SMALL))
    overrides = [
        "reward.rules=[{name:noisy,_target_:grpo_first_run_rewards.noisy,weight:1.0}]",
        "train.steps=3", "train.prompts_per_step=2", "algo.group_size=4", "rollout.max_new_tokens=4",
        "train.eval_every=0", "train.eval_at_ends=true", "train.eval_problems=4", "train.eval_samples=2", "train.lr=1e-2",
        "console=plain",
    ]  # fmt: skip
    runs = []
    for name in ("first", "second"):
        cfg, _ = compose_config("train", overrides)
        validate(cfg)
        train.run(cfg, str(tmp_path / name))
        runs.append([{k: v for k, v in r.items() if not is_timing(k)} for r in read_metrics(tmp_path / name)])
    assert tiny.tiny_path().parent == tmp_path / "home" and (tiny.tiny_path() / "config.json").is_file()
    assert len(runs[0]) == 4 and runs[0] == runs[1]  # step 0 (held-out) and 3 steps
    assert len({r["loss"] for r in runs[0][1:]}) > 1  # the steps did update: the runs could have differed


def test_the_tool_variant_has_the_markers_as_tokens_and_learns_calls_not_results():
    """model=tiny-tools: each marker is one token; a call example trains on the call and the copied
    answer, never on the calculator's result span; the default model keeps its cache name."""
    import random

    from grpo_cli.models.tiny import MARKERS, TinySpec, _encoder, _example, make_tokenizer

    tok = make_tokenizer(tools=True)
    assert all(len(tok(m, add_special_tokens=False)["input_ids"]) == 1 for m in MARKERS)
    assert len(make_tokenizer()) == len(tok) - len(MARKERS)
    ids, labels = _example(
        _encoder(tok), tok, "2 + 3 * 4", random.Random(0), TinySpec(tools=True, p_tool=1.0)
    )
    learned = tok.decode([i for i, y in zip(ids, labels) if y != -100])
    assert learned == "<calc>2 + 3 * 4</calc>14" + tok.eos_token
    assert tok.decode(ids).endswith("<result>14</result>14" + tok.eos_token)
    assert TinySpec().key() != TinySpec(tools=True).key() and TinySpec().key().startswith("tiny-v")
    assert TinySpec(p_tool=0.9).key() == TinySpec().key()  # tool fields do not name the default model
