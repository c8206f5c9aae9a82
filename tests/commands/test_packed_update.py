"""``train.micro_batch_tokens``: the update on packed micro-batches equals the padded one in float64,
loss, gradients and every logged statistic, for each aggregation, mu 1 and 2, full fine-tuning with
a reference copy and LoRA, and episodes whose masks mark tool tokens (the float64 model and rollout
of ``test_update``)."""

from __future__ import annotations

import pytest
import torch
from test_update import REWARDS, TOL, RecordingSGD, _cfg, _policy, _rollout

from grpo_cli.commands import passes
from grpo_cli.commands.passes import MicroBatching
from grpo_cli.commands.update import prepare, schedule, update
from grpo_cli.config import TrainConfig
from grpo_cli.models import Policy


def _lora_policy() -> Policy:
    from peft import LoraConfig, get_peft_model

    base = _policy().model
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    )
    torch.manual_seed(3)
    with torch.no_grad():  # B = 0 at init would leave the adapter's product, and its A gradients, at 0
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return Policy(model=model, tokenizer=None, device=torch.device("cpu"), is_lora=True)


def _with_tool_tokens(rollout):
    """Episodes: tokens 2 and 3 of every completion long enough came from a tool (no loss, no KL)."""
    model_mask = rollout.completion_mask.clone()
    model_mask[:, 2:4] = 0
    rollout.model_mask = model_mask * rollout.completion_mask
    return rollout


def _run(micro: MicroBatching, aggregation: str, mu: int, lora: bool, episodes: bool):
    policy = _lora_policy() if lora else _policy(ref=True)
    rollout = _rollout(REWARDS)
    if episodes:
        rollout = _with_tool_tokens(rollout)
    algo = {"max_completion_length": 6}
    cfg = _cfg(micro.size, 0.04, mu, aggregation, algo, micro_batch_tokens=micro.tokens)
    cfg.algo.epsilon = 0.02  # a narrow clip: mu = 2's second pass clips on both sides
    inputs = prepare(policy, rollout, cfg.algo, micro, cfg.rollout.temperature)
    opt = RecordingSGD([p for p in policy.model.parameters() if p.requires_grad], lr=0.5)
    stats = update(policy, opt, schedule(opt, 0), inputs, cfg.algo, cfg.train, cfg.rollout.temperature)
    return inputs, opt.seen, stats


@pytest.mark.parametrize("episodes", [False, True], ids=["env_none", "episodes"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("mu", [1, 2])
@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_packed_micro_batches_equal_the_padded_update(aggregation, mu, lora, episodes):
    _, want_grads, want = _run(MicroBatching(3), aggregation, mu, lora, episodes)
    assert sum(float(g.abs().sum()) for g in want_grads[0]) > 1e-3  # a gradient worth comparing
    # a budget that splits the step into several rows (some splitting groups), and one row for all
    for tokens in (24, 10_000):
        inputs, grads, stats = _run(MicroBatching(3, tokens), aggregation, mu, lora, episodes)
        rows = MicroBatching(3, tokens).plan(inputs.rollout)
        assert len(rows) == 1 if tokens > 1000 else len(rows) > 2
        assert len(grads) == len(want_grads) == mu
        for step_got, step_want in zip(grads, want_grads):
            for got, w in zip(step_got, step_want):
                assert torch.allclose(got, w, rtol=0, atol=TOL), tokens
        assert stats.keys() == want.keys()
        for key, value in want.items():
            assert stats[key] == pytest.approx(value, abs=1e-9), (tokens, key)


def test_packed_passes_go_through_the_packed_forward(monkeypatch):
    """With a budget every pass (reference, pi_old, policy) packs: the padded forward is never called."""
    calls = []
    real = passes.packed_completion_logprobs

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(passes, "packed_completion_logprobs", counting)
    monkeypatch.setattr(passes, "grouped_completion_logprobs", None)  # any padded call fails
    inputs, _, _ = _run(MicroBatching(3, 24), "token_mean", 2, False, False)
    rows = len(MicroBatching(3, 24).plan(inputs.rollout))
    assert rows > 2 and len(calls) == 4 * rows  # reference, pi_old, and the two iterations' policy passes


def test_a_budget_row_holds_at_most_its_tokens():
    rollout = _rollout(REWARDS)
    G = rollout.group_size
    for budget in (12, 24, 40):
        for rows in MicroBatching(1, budget).plan(rollout):
            lengths = rollout.completion_mask[rows].sum()
            prompts = rollout.prompt_mask[torch.unique(rows // G) * G].sum()
            assert int(lengths + prompts) <= budget or rows.numel() == 1


def test_ranks_agree_on_one_count_of_packed_micro_batches(monkeypatch):
    """Every rank makes the most micro-batches any rank needs (FSDP gathers weights in each forward),
    but never more than the fewest completions a rank holds (none may be empty)."""
    from grpo_cli.runtime import distributed

    rollout = _rollout(REWARDS)
    alone = len(MicroBatching(1, 24).plan(rollout))
    monkeypatch.setattr(distributed, "world", lambda: distributed.World(0, 2))
    monkeypatch.setattr(distributed, "all_min", lambda x: x)
    monkeypatch.setattr(distributed, "all_max", lambda x: x + 2)  # another rank needs 2 more
    plan = MicroBatching(1, 24).plan(rollout)
    assert len(plan) == alone + 2 and all(p.numel() for p in plan)
    assert sorted(torch.cat(plan).tolist()) == list(range(len(REWARDS)))
    monkeypatch.setattr(distributed, "all_max", lambda x: x + 100)
    assert len(MicroBatching(1, 24).plan(rollout)) == len(REWARDS)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packing_with_gradient_checkpointing_is_refused_in_one_line_before_the_model_loads(attn):
    """The sdpa/eager packed rows read each prompt's key/value cache, which checkpointing drops:
    ``validate`` (which runs before any model loads) refuses the pair, naming both keys."""
    from grpo_cli.cli import compose_config
    from grpo_cli.commands.validate import validate
    from grpo_cli.config import ConfigError

    cfg, _ = compose_config(
        "train",
        [
            "train.micro_batch_tokens=256",
            "model.gradient_checkpointing=true",
            f"model.attn_implementation={attn}",
        ],
    )
    with pytest.raises(
        ConfigError, match="model.gradient_checkpointing=true needs model.attn_implementation"
    ) as err:
        validate(cfg)
    assert "train.micro_batch_tokens=256" in str(err.value) and "\n" not in str(err.value)
    for ok in (["train.micro_batch_tokens=0"], ["model.gradient_checkpointing=false"]):
        cfg, _ = compose_config(
            "train", ["train.micro_batch_tokens=256", "model.gradient_checkpointing=true", *ok]
        )
        validate(cfg)


@pytest.mark.parametrize("attn,each", [("flash_attention_2", True), ("sdpa", False), ("eager", False)])
def test_the_plan_charges_a_prompt_per_completion_where_the_layout_copies_it(attn, each):
    from types import SimpleNamespace

    model = SimpleNamespace(config=SimpleNamespace(_attn_implementation=attn))
    assert MicroBatching.of_train(TrainConfig(micro_batch_tokens=256), model).prompt_each is each
    assert MicroBatching.of_train(TrainConfig(micro_batch_size=4), model).prompt_each is False
