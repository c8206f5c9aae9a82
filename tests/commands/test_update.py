"""The GRPO update on a hand-built rollout, against a float64 reference written from the formula.

The model is a 2-layer, 16-dim Qwen2 built here in float64 (no tokenizer, no download), so the
micro-batched, prompt-sharing forward/backward of ``update`` can be held to 1e-10 against one plain
full-sequence forward, log_softmax and gather, with the loss written out term by term. The bf16
test at the end is the exception: the embedded tiny model in bf16 against itself in fp32.
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from helpers import float64_qwen2, on_two_gloo_ranks
from transformers import Qwen2ForCausalLM

from grpo_cli.commands.passes import micro_batches
from grpo_cli.commands.update import (
    advantages_for,
    fusable,
    low_precision_warning,
    make_optimizer,
    prepare,
    schedule,
    update,
)
from grpo_cli.config import AlgoConfig, RolloutConfig, TrainConfig
from grpo_cli.core.loss import aggregation_units, policy_loss
from grpo_cli.models import Policy
from grpo_cli.rollout.record import Rollout
from grpo_cli.runtime import distributed

VOCAB, G = 37, 4
# Three groups of G = 4; the third completion of group 1 (row 6) is unjudged (NaN).
REWARDS = [1.0, 0.0, 0.0, 1.0, 0.5, 1.0, math.nan, 0.0, 0.0, 0.25, 1.0, 1.0]
N = len(REWARDS)
TEMPERATURE = 0.7
TOL = 1e-10


# ---------------------------------------------------------------------------- builders


def _model(seed: int = 0) -> Qwen2ForCausalLM:
    return float64_qwen2(VOCAB, seed)


def _policy(ref: bool = False) -> Policy:
    model = _model()
    ref_model = None
    if ref:  # pi_ref: the same weights moved a little, frozen (full fine-tuning with beta > 0)
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in ref_model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return Policy(model=model, tokenizer=None, device=torch.device("cpu"), ref_model=ref_model)


def _rollout(rewards: list[float] = REWARDS, seed: int = 0) -> Rollout:
    """N = 3 * G completions; prompts of 3, 5 and 2 tokens left-padded to 5, completions of 1..6 tokens."""
    gen = torch.Generator().manual_seed(seed)
    P, L, T = len(rewards) // G, 5, 6
    prompt_lens = [3, 5, 2, 4][:P]
    p_ids = torch.randint(2, VOCAB, (P, L), generator=gen)
    p_mask = torch.zeros(P, L, dtype=torch.long)
    for i, n in enumerate(prompt_lens):
        p_mask[i, L - n :] = 1
    p_ids = torch.where(p_mask.bool(), p_ids, 0)
    lengths = torch.randint(1, T + 1, (len(rewards),), generator=gen)
    lengths[0], lengths[1] = T, 1  # the extremes, for sure
    c_mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    c_ids = torch.randint(2, VOCAB, (len(rewards), T), generator=gen)
    c_ids = torch.where(c_mask.bool(), c_ids, 0)  # pad after the end
    truncated = lengths == T  # the ones that used the whole budget count as cut off (no EOS)
    return Rollout(
        prompt_ids=p_ids.repeat_interleave(G, 0),
        prompt_mask=p_mask.repeat_interleave(G, 0),
        completion_ids=c_ids,
        completion_mask=c_mask,
        texts=[""] * len(rewards),
        rows=[{}] * len(rewards),
        group_size=G,
        rewards=torch.tensor(rewards, dtype=torch.float32),
        truncated=truncated,
    )


def _cfg(
    micro: int = N,
    beta: float = 0.0,
    mu: int = 1,
    aggregation: str = "seq_mean_token_mean",
    algo: dict | None = None,
    **train,
):
    return SimpleNamespace(
        algo=AlgoConfig(group_size=G, beta=beta, num_iterations=mu, aggregation=aggregation, **(algo or {})),
        train=TrainConfig(micro_batch_size=micro, max_grad_norm=1e9, warmup_steps=0, **train),
        rollout=RolloutConfig(temperature=TEMPERATURE),
    )


def _prepare(policy, rollout, cfg):
    return prepare(policy, rollout, cfg.algo, cfg.train.micro_batch_size, cfg.rollout.temperature)


def _update(policy, opt, sched, inputs, cfg):
    return update(policy, opt, sched, inputs, cfg.algo, cfg.train, cfg.rollout.temperature)


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of the gradients it was asked to apply (one list per step)."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.seen: list[list[torch.Tensor]] = []

    def step(self, closure=None):
        self.seen.append([p.grad.clone() for g in self.param_groups for p in g["params"]])
        return super().step(closure)


def _plain_logps(model, rollout: Rollout) -> torch.Tensor:
    """Reference log-probs [N, T]: one forward over prompt + completion, logits / temperature,
    log_softmax, gather (position ids skip the left padding)."""
    ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], 1)
    mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], 1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits  # [N, L + T, V]
    L = rollout.prompt_ids.size(1)
    lp = torch.log_softmax(logits[:, L - 1 : -1] / TEMPERATURE, -1)  # position t predicts t + 1
    return lp.gather(-1, rollout.completion_ids[..., None]).squeeze(-1)


def _reference_loss(logps, ref_logps, adv, mask, beta, aggregation):
    """-J(theta) for mu = 1, written from the formula (no clipping can bite: rho = 1 in value).

    rho_{i,t} = exp(logp_{i,t} - stopgrad(logp_{i,t})) = 1, and d rho = d logp, so

        loss = sum_{i,t in mask} w_{i,t} * ( -rho_{i,t} A_i + beta * k3_{i,t} ),
        k3_{i,t} = exp(ref - logp) - (ref - logp) - 1,
        w_{i,t}  = 1 / (N |o_i|)            seq_mean_token_mean (N counts unjudged rows too)
                 = 1 / sum_i |o_i|          token_mean           (|o_i| = 0 for an unjudged row)

    In value: loss = -sum_i A_i * sum_t w_{i,t} + beta * sum w k3.
    """
    m = mask.double()
    if aggregation == "seq_mean_token_mean":
        w = m / (mask.size(0) * m.sum(1, keepdim=True).clamp(min=1))
    else:
        w = m / m.sum()
    rho = torch.exp(logps - logps.detach())
    per_token = -rho * adv.double()[:, None]
    if beta > 0:
        log_r = ref_logps - logps
        per_token = per_token + beta * (torch.exp(log_r) - log_r - 1)
    return (w * per_token).sum()


# ---------------------------------------------------------------------------- advantages_for


def test_unjudged_rewards_take_their_groups_judged_mean():
    rewards = [1.0, math.nan, 0.0, 1.0] + [math.nan] * 4  # group 2 has no judged reward at all
    adv, judged = advantages_for(_rollout(rewards), G, "group")
    assert judged.tolist() == [True, False, True, True] + [False] * 4
    # group 1: filled [1, 2/3, 0, 1], mean 2/3, centred [1/3, 0, -2/3, 1/3];
    # unbiased std = sqrt((1/9 + 0 + 4/9 + 1/9) / 3) = sqrt(2/9)
    std = math.sqrt(2 / 9) + 1e-4
    expected = [1 / 3 / std, 0.0, -2 / 3 / std, 1 / 3 / std]
    assert adv[:4].tolist() == pytest.approx(expected, abs=1e-6)
    # group 2: nothing judged, filled with 0 (not NaN): zero advantages
    assert adv[4:].tolist() == [0.0] * 4


def test_batch_scaling_divides_by_the_std_of_every_filled_reward():
    rewards = [1.0, 0.0, math.nan, 0.0, 1.0, 1.0, 1.0, 0.0]
    adv, _ = advantages_for(_rollout(rewards), G, "batch")
    # filled: [1, 0, 1/3, 0 | 1, 1, 1, 0]; group means 1/3 and 3/4
    filled = [1, 0, 1 / 3, 0, 1, 1, 1, 0]
    means = [1 / 3] * 4 + [3 / 4] * 4
    mu = sum(filled) / 8
    batch_std = math.sqrt(sum((r - mu) ** 2 for r in filled) / 7)  # unbiased, over all 8
    expected = [(r - m) / (batch_std + 1e-4) for r, m in zip(filled, means)]
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)
    # ...which is not what the group scale gives (group 2's std differs from the batch's)
    assert not torch.allclose(adv, advantages_for(_rollout(rewards), G, "group")[0])


def test_batch_scaling_over_ranks_uses_every_ranks_rewards_and_returns_this_ranks_share(monkeypatch):
    mine = [1.0, 0.0, 0.0, 0.0]
    other = [1.0, 1.0, 1.0, 0.0]  # rank 0's filled rewards
    monkeypatch.setattr(distributed, "world", lambda: distributed.World(rank=1, size=2))
    monkeypatch.setattr(distributed, "gather_objects", lambda x: [torch.tensor(other), x])
    adv, _ = advantages_for(_rollout(mine), G, "batch")
    everything = other + mine
    mu = sum(everything) / 8
    batch_std = math.sqrt(sum((r - mu) ** 2 for r in everything) / 7)
    expected = [(r - 1 / 4) / (batch_std + 1e-4) for r in mine]  # this rank's group mean is 1/4
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------------------------- micro_batches, schedule


@pytest.mark.parametrize(
    "n,size,expected",
    [(7, 3, [(0, 3), (3, 6), (6, 7)]), (6, 6, [(0, 6)]), (4, 10, [(0, 4)]), (3, 1, [(0, 1), (1, 2), (2, 3)]),
     (0, 4, [])],
)  # fmt: skip
def test_micro_batches_are_consecutive_slices_of_at_most_size(n, size, expected):
    assert [(s.start, s.stop) for s in micro_batches(n, size)] == expected


def test_schedule_warms_up_linearly_then_holds():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = schedule(opt, warmup_steps=3)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()  # no gradient: moves nothing, keeps torch's step-order check quiet
        sched.step()
    # factor min(1, (s + 1) / (3 + 1)) at scheduler step s = 0..5
    assert lrs == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1], abs=1e-15)


def test_no_warmup_is_the_constant_learning_rate():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = schedule(opt, warmup_steps=0)
    lrs = []
    for _ in range(3):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()  # no gradient: moves nothing, keeps torch's step-order check quiet
        sched.step()
    assert lrs == [0.1, 0.1, 0.1]


def test_make_optimizer_trains_only_the_trainable_parameters_with_the_configured_adamw():
    policy = _policy()
    policy.model.model.embed_tokens.weight.requires_grad_(False)
    tr = TrainConfig(lr=0.02, adam_beta1=0.8, adam_beta2=0.95, weight_decay=0.1, warmup_steps=4)
    opt, sched = make_optimizer(policy, tr)
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(policy.model.model.embed_tokens.weight) not in trained
    assert trained == {id(p) for p in policy.model.parameters() if p.requires_grad}
    group = opt.param_groups[0]
    assert isinstance(opt, torch.optim.AdamW) and group["betas"] == (0.8, 0.95)
    assert group["weight_decay"] == 0.1
    assert group["lr"] == pytest.approx(0.02 / 5)  # first warm-up step: 1 / (4 + 1) of lr


def test_the_optimizer_is_fused_on_plain_parameters_and_matches_a_float64_adamw():
    """make_optimizer fuses AdamW over plain CPU parameters, and three of its steps equal AdamW's
    formula written out here (decoupled weight decay, bias-corrected moments), the test model being
    float64: to 1e-10."""
    policy = _policy()
    tr = TrainConfig(lr=0.01, adam_beta1=0.8, adam_beta2=0.95, weight_decay=0.1, warmup_steps=0)
    opt, _ = make_optimizer(policy, tr)
    assert opt.param_groups[0]["fused"] is True
    p = next(q for q in policy.model.parameters() if q.requires_grad)
    gen = torch.Generator().manual_seed(0)
    w = p.detach().clone()
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    for t in range(1, 4):
        for q in policy.model.parameters():
            q.grad = torch.randn(q.shape, generator=gen, dtype=q.dtype) if q.requires_grad else None
        g = p.grad.clone()
        opt.step()
        w = w * (1 - 0.01 * 0.1)
        m, v = 0.8 * m + 0.2 * g, 0.95 * v + 0.05 * g * g
        w = w - 0.01 * (m / (1 - 0.8**t)) / ((v / (1 - 0.95**t)).sqrt() + 1e-8)
    torch.testing.assert_close(p.detach(), w, rtol=1e-10, atol=1e-10)


def test_fusable_takes_plain_floating_parameters_on_cpu_or_cuda_only():
    class Sharded(torch.nn.Parameter):  # what FSDP's DTensor parameters look like to the check
        pass

    plain = torch.nn.Parameter(torch.zeros(3))
    assert fusable([plain])
    assert not fusable([plain, Sharded(torch.zeros(3))])
    assert not fusable([])


# ---------------------------------------------------------------------------- prepare


@pytest.mark.parametrize("beta,mu", [(0.0, 1), (0.04, 1), (0.0, 2), (0.04, 3)])
def test_prepare_makes_reference_and_old_logprobs_only_when_needed(beta, mu):
    policy, rollout = _policy(ref=beta > 0), _rollout()
    inputs = _prepare(policy, rollout, _cfg(micro=3, beta=beta, mu=mu))
    mask = rollout.completion_mask.bool()
    # the unjudged row (6) is out of the loss; every other row keeps its completion tokens
    assert not inputs.loss_mask[6].any()
    assert torch.equal(inputs.loss_mask[torch.arange(N) != 6], mask[torch.arange(N) != 6])
    assert (inputs.ref_logps is not None) == (beta > 0)
    assert (inputs.old_logps is not None) == (mu > 1)
    with torch.no_grad():
        if beta > 0:
            want = _plain_logps(policy.ref_model, rollout)
            assert torch.allclose(inputs.ref_logps[mask], want[mask], rtol=0, atol=TOL)
            assert not inputs.ref_logps.requires_grad
            # pi_ref is not pi_theta: the reference pass did not run the policy
            assert not torch.allclose(inputs.ref_logps[mask], _plain_logps(policy.model, rollout)[mask])
        if mu > 1:
            want = _plain_logps(policy.model, rollout)
            assert torch.allclose(inputs.old_logps[mask], want[mask], rtol=0, atol=TOL)
            assert not inputs.old_logps.requires_grad


# ---------------------------------------------------------------------------- update


def _grads_and_stats(micro, beta, aggregation, algo=None):
    policy, rollout = _policy(ref=beta > 0), _rollout()
    cfg = _cfg(micro=micro, beta=beta, aggregation=aggregation, algo=algo)
    inputs = _prepare(policy, rollout, cfg)
    opt = RecordingSGD(policy.model.parameters(), lr=0.0)  # lr 0: record the gradients, move nothing
    stats = _update(policy, opt, schedule(opt, 0), inputs, cfg)
    assert len(opt.seen) == 1  # mu = 1: one optimizer step
    return policy, rollout, inputs, opt.seen[0], stats


@pytest.mark.parametrize("aggregation", ["seq_mean_token_mean", "token_mean"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_micro_batched_loss_and_gradients_equal_the_full_batch_reference(beta, aggregation):
    """Micro-batches of 1, 3 (which split groups of 4) and N give the loss and gradient of one plain
    full-batch forward with the loss written from the formula, to 1e-10 in float64."""
    # the reference: the policy's weights, one full forward, the formula, autograd
    policy, rollout = _policy(ref=beta > 0), _rollout()
    inputs = _prepare(policy, rollout, _cfg(beta=beta, aggregation=aggregation))
    logps = _plain_logps(policy.model, rollout)
    ref_logps = None if beta == 0 else _plain_logps(policy.ref_model, rollout).detach()
    want_loss = _reference_loss(logps, ref_logps, inputs.advantages, inputs.loss_mask, beta, aggregation)
    want_loss.backward()
    want_grads = [p.grad.clone() for p in policy.model.parameters()]
    assert sum(float(g.abs().sum()) for g in want_grads) > 1e-3  # a gradient worth comparing

    for micro in (1, 3, N):
        _, _, _, grads, stats = _grads_and_stats(micro, beta, aggregation)
        assert stats["loss"] == pytest.approx(want_loss.item(), abs=TOL), micro
        assert len(grads) == len(want_grads)
        for got, want in zip(grads, want_grads):
            assert torch.allclose(got, want, rtol=0, atol=TOL), micro
        assert stats["skipped"] == 0.0
        assert stats["grad_norm"] == pytest.approx(
            torch.linalg.vector_norm(torch.stack([g.norm() for g in want_grads])).item(), rel=1e-9
        )


def test_on_policy_loss_value_is_minus_the_mean_advantage_plus_beta_kl():
    # rho = 1: the seq_mean_token_mean loss is -(1/N) sum_{i judged} A_i + beta * (1/N) sum_i mean_t k3.
    # Every group's judged advantages sum to 0 (the unjudged row took the group mean, so its A is 0):
    # with beta = 0 the loss is 0, with beta > 0 it is the KL term alone, and that is > 0.
    _, _, inputs, _, stats0 = _grads_and_stats(N, 0.0, "seq_mean_token_mean")
    assert inputs.advantages[6].item() == pytest.approx(0.0, abs=1e-7)
    assert inputs.advantages.view(-1, G).sum(1).abs().max().item() < 1e-5
    assert stats0["loss"] == pytest.approx(0.0, abs=1e-6) and stats0["kl"] == 0.0
    policy, rollout, inputs, _, stats = _grads_and_stats(3, 0.04, "seq_mean_token_mean")
    with torch.no_grad():
        lp, ref = _plain_logps(policy.model, rollout), _plain_logps(policy.ref_model, rollout)
    m = inputs.loss_mask.double()
    k3 = torch.exp(ref - lp) - (ref - lp) - 1
    minus_mean_adv = -(inputs.advantages.double() * (m.sum(1) > 0)).sum() / N
    kl_term = 0.04 * ((k3 * m).sum(1) / m.sum(1).clamp(min=1)).sum() / N
    assert stats["loss"] == pytest.approx((minus_mean_adv + kl_term).item(), abs=1e-9)
    assert kl_term.item() > 1e-5


def test_sgd_step_moves_the_weights_by_minus_lr_times_the_gradient():
    policy, rollout = _policy(), _rollout()
    cfg = _cfg(micro=5)
    before = [p.detach().clone() for p in policy.model.parameters()]
    inputs = _prepare(policy, rollout, cfg)
    opt = RecordingSGD(policy.model.parameters(), lr=0.5)
    stats = _update(policy, opt, schedule(opt, 0), inputs, cfg)
    for p, b, g in zip(policy.model.parameters(), before, opt.seen[0]):
        assert torch.allclose(p.detach(), b - 0.5 * g, rtol=0, atol=1e-14)
    assert stats["lr"] == 0.5
    assert all(p.grad is None for p in policy.model.parameters())  # cleared after the step


def test_mu_iterations_take_mu_optimizer_steps_and_the_ratio_moves_off_one():
    policy, rollout = _policy(), _rollout()
    cfg = _cfg(micro=5, mu=3)
    inputs = _prepare(policy, rollout, cfg)
    opt = RecordingSGD(policy.model.parameters(), lr=0.5)
    stats = _update(policy, opt, schedule(opt, 0), inputs, cfg)
    assert len(opt.seen) == 3
    # the statistics are the last iteration's: after two steps pi_theta != pi_old
    assert stats["ratio/max"] > 1.0 + 1e-6 and stats["ratio/min"] < 1.0 - 1e-6


# update steps the schedule even when it skips the optimizer step, which torch warns about
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_a_non_finite_loss_is_not_applied():
    policy, rollout = _policy(), _rollout()
    cfg = _cfg(micro=5, lr=0.1)
    inputs = _prepare(policy, rollout, cfg)
    inputs.advantages[0] = math.nan  # row 0 is judged and has tokens: the loss is NaN
    before = [p.detach().clone() for p in policy.model.parameters()]
    opt, sched = make_optimizer(policy, cfg.train)
    stats = _update(policy, opt, sched, inputs, cfg)
    assert stats["skipped"] == 1.0
    assert not math.isfinite(stats["loss"])
    assert all(torch.equal(p, b) for p, b in zip(policy.model.parameters(), before))
    assert not opt.state  # AdamW never stepped: no moments were made from NaN gradients
    assert all(p.grad is None for p in policy.model.parameters())
    # the next, finite update is applied as usual
    inputs.advantages[0] = 0.5
    stats = _update(policy, opt, sched, inputs, cfg)
    assert stats["skipped"] == 0.0
    assert not all(torch.equal(p, b) for p, b in zip(policy.model.parameters(), before))


def test_engine_logprob_diff_is_the_mean_gap_over_completion_tokens():
    policy, rollout = _policy(), _rollout()
    with torch.no_grad():
        rollout.engine_logps = _plain_logps(policy.model, rollout) - 0.01  # engine 0.01 below the trainer
    cfg = _cfg(micro=5)
    inputs = _prepare(policy, rollout, cfg)
    opt = RecordingSGD(policy.model.parameters(), lr=0.0)
    stats = _update(policy, opt, schedule(opt, 0), inputs, cfg)
    assert stats["rollout/logprob_diff"] == pytest.approx(0.01, abs=1e-10)
    # without engine log-probs (hf sampled) there is no such statistic
    rollout.engine_logps = None
    assert "rollout/logprob_diff" not in _update(
        policy, opt, schedule(opt, 0), _prepare(policy, rollout, cfg), cfg
    )


# ---------------------------------------------------------------------------- issue 30 options


def _plain_logps_entropy(model, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs and entropies [N, T] from one full forward and the full softmax."""
    ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], 1)
    mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], 1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    L = rollout.prompt_ids.size(1)
    lp = torch.log_softmax(logits[:, L - 1 : -1] / TEMPERATURE, -1)
    entropy = -(lp.exp() * lp).sum(-1)
    return lp.gather(-1, rollout.completion_ids[..., None]).squeeze(-1), entropy


def _options_reference(model, rollout: Rollout, inputs, algo, units: float):
    """``policy_loss`` once over ``inputs`` (the rows of ``rollout``) on the full-softmax forward, its
    gradients taken from cleared grads and cleared again after: (loss, grads, entropy [N, T])."""
    model.zero_grad(set_to_none=True)
    logps, entropy = _plain_logps_entropy(model, rollout)
    loss, _ = policy_loss(
        logps,
        None,
        None,
        inputs.advantages,
        inputs.loss_mask,
        algo,
        units,
        entropy=entropy,
        pg_mask=inputs.pg_mask,
    )
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return loss, grads, entropy.detach()


OPTION_SETS = {
    "entropy_bonus": {"entropy_coef": 0.05},
    "top_entropy": {"top_entropy_quantile": 0.4},
    "mask_truncated": {"mask_truncated": True},
    "rloo_cispo": {"advantage": "rloo", "objective": "cispo", "epsilon": 1.0},
    "all": {"entropy_coef": 0.05, "top_entropy_quantile": 0.4, "mask_truncated": True, "advantage": "rloo"},
}


@pytest.mark.parametrize("aggregation", ["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"])
@pytest.mark.parametrize("options", list(OPTION_SETS))
def test_new_options_micro_batched_equal_the_full_batch_reference(options, aggregation):
    """Micro-batches of 1, 3 and N with each issue-30 option give the loss and gradient of one plain
    full-sequence forward (full softmax for the entropy) put through ``policy_loss`` once over the
    whole batch, to 1e-10: the entropy quantile is one threshold per step, truncated rows are in no
    denominator, the entropy bonus's gradient flows through the chunked head."""
    algo = {**OPTION_SETS[options], "max_completion_length": 6}
    policy, rollout = _policy(), _rollout()
    cfg = _cfg(aggregation=aggregation, algo=algo)
    inputs = _prepare(policy, rollout, cfg)
    units = aggregation_units(inputs.loss_mask, aggregation, rows=inputs.counted)
    want_loss, want_grads, entropy = _options_reference(policy.model, rollout, inputs, cfg.algo, units)
    for micro in (1, 3, N):
        _, _, _, grads, stats = _grads_and_stats(micro, 0.0, aggregation, algo)
        assert stats["loss"] == pytest.approx(want_loss.item(), abs=TOL), micro
        for got, want in zip(grads, want_grads):
            assert torch.allclose(got, want, rtol=0, atol=TOL), micro
        with torch.no_grad():  # the logged entropy: mean over the loss's tokens
            m = inputs.loss_mask
            assert stats["entropy"] == pytest.approx((entropy[m].sum() / m.sum()).item(), abs=1e-10)


def test_mask_truncated_removes_truncated_rows_from_the_loss_and_every_denominator():
    rollout = _rollout()
    assert 0 < int(rollout.truncated.sum()) < N  # the builder cuts some rows (those at the budget)
    inputs = _prepare(_policy(), rollout, _cfg(algo={"mask_truncated": True}))
    trunc = rollout.truncated
    assert not inputs.loss_mask[trunc].any()
    assert torch.equal(inputs.counted, ~trunc)
    keep = ~trunc & (torch.arange(N) != 6)
    assert torch.equal(inputs.loss_mask[keep], rollout.completion_mask[keep].bool())
    # advantages still come from the whole group (TRL does the same): off, they are identical
    plain = _prepare(_policy(), rollout, _cfg())
    assert torch.equal(plain.advantages, inputs.advantages) and plain.counted is None
    assert aggregation_units(inputs.loss_mask, "seq_mean_token_mean", rows=inputs.counted) == N - int(
        trunc.sum()
    )
    rollout.truncated = None
    with pytest.raises(ValueError, match="truncated"):
        _prepare(_policy(), rollout, _cfg(algo={"mask_truncated": True}))


def test_top_entropy_tokens_are_the_same_for_any_micro_batch_size_and_their_quantile():
    policy, rollout = _policy(), _rollout()
    masks = [
        _prepare(policy, rollout, _cfg(micro=m, algo={"top_entropy_quantile": 0.3})).pg_mask
        for m in (1, 3, N)
    ]
    assert all(torch.equal(masks[0], m) for m in masks[1:])
    inputs = _prepare(policy, rollout, _cfg(algo={"top_entropy_quantile": 0.3}))
    with torch.no_grad():
        _, entropy = _plain_logps_entropy(policy.model, rollout)
    values = entropy[inputs.loss_mask]
    threshold = torch.quantile(values, 0.7)
    assert torch.equal(
        inputs.pg_mask, inputs.loss_mask & (entropy >= threshold - 1e-5 * max(1.0, threshold.item()))
    )
    # the G completions of a group share their first token's context: one entropy, in or out together
    first = inputs.pg_mask[:, 0].view(-1, G) | ~inputs.loss_mask[:, 0].view(-1, G)
    assert (first.all(1) | ~(inputs.pg_mask[:, 0].view(-1, G)).any(1)).all()
    kept = int(inputs.pg_mask.sum())
    assert abs(kept - 0.3 * values.numel()) <= 1 and inputs.old_logps is None  # mu = 1: pi_old is pi_theta
    assert _prepare(policy, rollout, _cfg()).pg_mask is None  # 1.0: no pass, every token


# ---------------------------------------------------------------------------- statistics that add up

# Four groups (two per rank in the two-rank test); the unjudged row keeps a hole in the loss mask.
REWARDS_4 = [*REWARDS, 1.0, 0.0, 0.5, 0.0]


# The issue-30 options together: an entropy bonus, the top half of the entropies, truncated rows out.
NEW_OPTIONS = {"entropy_coef": 0.01, "top_entropy_quantile": 0.5, "mask_truncated": True, "advantage": "rloo"}


def _step_stats(
    micro: int, rewards: list[float], rows: list[int] | None = None, algo: dict | None = None
) -> dict[str, float]:
    """The statistics ``update`` logs after mu = 2 iterations (SGD, lr 0.5: the second iteration's
    ratios are off 1 and clip), beta 0.04 (a KL), over the rows ``rows`` of the rollout (default all)."""
    policy, rollout = _policy(ref=True), _rollout(rewards)
    if rows is not None:
        rollout = rollout.select(rows)
    if distributed.world().enabled:
        policy.wrapper = distributed.wrap(policy.model, "ddp")
    cfg = _cfg(micro=micro, beta=0.04, mu=2, algo=algo)
    cfg.algo.epsilon = 0.02  # a narrow clip, so that both clip fractions are non-zero
    opt = RecordingSGD(policy.model.parameters(), lr=0.5)
    return _update(policy, opt, schedule(opt, 0), _prepare(policy, rollout, cfg), cfg)


@pytest.mark.parametrize("algo", [None, NEW_OPTIONS], ids=["default", "issue30"])
def test_every_logged_statistic_is_the_same_for_any_micro_batch_size(algo):
    """Micro-batches of 1, 3 (splitting groups) and N give the same statistics in float64: loss/policy
    sums (averaging it logged a third of its value with 3 micro-batches), kl, entropy and the clip
    fractions are token-weighted, ratio/min and ratio/max are extrema, tokens is the step's count."""
    whole = _step_stats(N, REWARDS, algo=algo)
    assert whole["clip/low_frac"] > 0 and whole["clip/high_frac"] > 0 and whole["kl"] > 0
    assert whole["ratio/min"] < 1.0 < whole["ratio/max"] and whole["entropy"] > 0
    kept = torch.arange(N) != 6
    if algo:  # mask_truncated: the truncated rows (those at the budget) left the token count
        kept &= ~_rollout().truncated
    assert whole["tokens"] == float(_rollout().completion_mask[kept].sum())
    for micro in (1, 3):
        got = _step_stats(micro, REWARDS, algo=algo)
        assert got.keys() == whole.keys()
        for key, value in whole.items():
            assert got[key] == pytest.approx(value, abs=1e-9), (micro, key)


def _rank_stats(rank: int) -> dict[str, float]:
    half = len(REWARDS_4) // 2
    rows = list(range(rank * half, (rank + 1) * half))
    stats = _step_stats(3, REWARDS_4, rows)
    stats.update({f"new/{k}": v for k, v in _step_stats(3, REWARDS_4, rows, NEW_OPTIONS).items()})
    return stats


@pytest.mark.slow
def test_every_logged_statistic_is_the_same_on_one_rank_and_on_two(tmp_path):
    """Two gloo ranks, each with two of the four groups, log what one process logs on all four."""
    ranks = on_two_gloo_ranks(_rank_stats, tmp_path)
    one = _step_stats(N, REWARDS_4)
    # the entropy quantile over every rank's tokens, truncated rows out of every rank's denominator
    one.update({f"new/{k}": v for k, v in _step_stats(N, REWARDS_4, None, NEW_OPTIONS).items()})
    for rank, two in enumerate(ranks):
        assert two.keys() == one.keys()
        for key, value in one.items():
            assert two[key] == pytest.approx(value, abs=1e-9), (rank, key)


# ---------------------------------------------------------------------------- bfloat16


@pytest.mark.parametrize("lora", [True, False])
def test_a_bf16_update_has_the_float32_loss_and_gradient_direction(tiny_model_path, lora):
    """One update of the tiny model in bf16 and in fp32 on the same sampled rollout (beta 0.04): a finite
    loss within bf16 rounding of fp32's, gradients in the trained weights' dtype (LoRA: float32) that
    point the same way. Measured over 4 rollouts: cosine >= 0.999 overall and >= 0.998 per tensor, the
    norms within 2.2%, the losses within 2.4e-4; the bounds allow 5x (overall) and 12x (per tensor)
    more in 1 - cosine, 10% on the norm, 8e-4 on the loss."""
    from helpers import arithmetic_rollout, dtype_twins

    f32, bf16 = dtype_twins(tiny_model_path, lora)
    rollout = arithmetic_rollout(f32)
    cfg = _cfg(micro=len(rollout.texts), beta=0.04)
    cfg.rollout.temperature = 1.0
    out = {}
    for name, policy in (("f32", f32), ("bf16", bf16)):
        opt = RecordingSGD([p for p in policy.model.parameters() if p.requires_grad], lr=0.0)
        stats = _update(policy, opt, schedule(opt, 0), _prepare(policy, rollout, cfg), cfg)
        out[name] = stats, opt.seen[0]
    (want, want_grads), (got, grads) = out["f32"], out["bf16"]
    assert math.isfinite(got["loss"]) and got["skipped"] == 0.0
    assert got["loss"] == pytest.approx(want["loss"], abs=0.04 * 0.02)  # beta * tests/models' mean gap
    assert {g.dtype for g in grads} == {torch.float32 if lora else torch.bfloat16}
    flat = [torch.cat([g.double().flatten() for g in gs]) for gs in (grads, want_grads)]
    assert torch.cosine_similarity(*flat, dim=0) > 0.995
    for g, w in zip(grads, want_grads):
        assert torch.cosine_similarity(g.double().flatten(), w.double().flatten(), dim=0) > 0.975
    assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=0.1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_low_precision_warning_names_the_weights_an_adamw_step_cannot_move(dtype):
    """Full fine-tuning of 16-bit weights warns, with the size above which AdamW's steps round away; that
    size is checked here by a step. float32 weights (LoRA's adapters beside bf16 ones) do not warn."""
    lr = 1e-5
    assert low_precision_warning([torch.zeros(3), torch.zeros(2, dtype=torch.float64)], lr) is None
    message = low_precision_warning([torch.zeros(3), torch.zeros(3, dtype=dtype)], lr)
    bound = 4 * lr / torch.finfo(dtype).eps  # bf16: 0.00512, fp16: 0.04096
    name = str(dtype).removeprefix("torch.")
    assert f"updates {name} weights" in message and f"larger than {bound:.2g};" in message
    assert "LoRA" in message and "model.dtype=float32" in message
    # One AdamW step (size ~lr whatever the gradient) on weights on either side of the bound.
    weights = torch.tensor([bound * 1.01, -bound * 1.5, 3 * bound, bound / 8], dtype=dtype)
    param = torch.nn.Parameter(weights.clone())
    param.grad = torch.tensor([1.0, -2.0, 0.5, 1.0], dtype=dtype)
    torch.optim.AdamW([param], lr=lr, weight_decay=0.0).step()
    assert torch.equal(param.detach()[:3], weights[:3])  # above the bound: lost
    assert param.detach()[3] != weights[3]  # well below it: applied
