"""The GRPO update on a scored rollout: advantages, the loss input, micro-batched forward/backward,
the optimizer and its schedule.

    inputs = prepare(policy, rollout, algo, micro_batch_size, temperature)   # A_i, mask, pi_ref / pi_old
    stats = update(policy, optimizer, scheduler, inputs, algo, train, temperature)   # mu x k optimizer steps

One step (one rollout batch) makes mu = ``algo.num_iterations`` passes over its batch; each pass makes
k = ``algo.steps_per_generation`` optimizer steps, one per mini-batch of 1/k of the groups (whole
groups, strided: ``mini_batch_rows``; the same split in every pass). pi_old is the
policy that sampled: its log-probs are taken once, before the first optimizer step, whenever mu > 1 or
k > 1, so the first mini-batch's ratios are 1 and later ones move. Each optimizer step's loss is
normalised by its own mini-batch's units (tokens or completions, every rank's). The schedule steps once
per rollout batch, as verl's does: ``train.steps``, the warm-up, the decay, the logs, checkpoints and
``rollout.max_staleness``'s versions all count rollout batches; mu = k = 1 is one optimizer step each.

No I/O and no run state: ``commands.step`` calls these once per step, a test calls them on a rollout
it built. Log-probs run each group's prompt through the model once per micro-batch and its G
completions on the shared key/value cache (``models.logprobs.grouped_completion_logprobs``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from grpo_cli.commands.passes import MicroBatching, micro_logps, mini_batch_logps, mini_batch_rows
from grpo_cli.commands.selections import needs_pi_old, select
from grpo_cli.config import AlgoConfig, TrainConfig
from grpo_cli.core.advantages import BATCH_ESTIMATORS, advantages
from grpo_cli.core.loss import aggregation_units, policy_loss
from grpo_cli.core.mismatch import engine_is_weights
from grpo_cli.core.schedule import schedule
from grpo_cli.core.stats import STAT_COMBINE, LossStats, combine_stats
from grpo_cli.models import Policy, reference
from grpo_cli.rollout.record import Rollout
from grpo_cli.runtime import distributed


@dataclass
class LossInput:
    """A scored rollout made ready for the loss: advantages and the mask of judged tokens."""

    rollout: Rollout
    advantages: torch.Tensor  # [N]
    loss_mask: torch.Tensor  # [N, T]
    ref_logps: torch.Tensor | None  # [N, T]
    old_logps: torch.Tensor | None  # [N, T]
    # [N] bool: completions the seq_mean_* denominators count (all but the truncated ones under
    # algo.mask_truncated; unjudged ones count, as in TRL). None: every row.
    counted: torch.Tensor | None = None
    # [N, T] bool: the tokens that get the policy-gradient term (algo.top_entropy_quantile < 1). None: all.
    pg_mask: torch.Tensor | None = None
    # [N, T] bool: the covariance-selected tokens (algo.objective=clip_cov / kl_cov). None: none.
    cov_mask: torch.Tensor | None = None
    # [N] bool: the completions algo.engine_is mode=reject took out of the step. None: none.
    rejected: torch.Tensor | None = None

    def select(self, rows: torch.Tensor) -> LossInput:
        """The rows ``rows`` [n] (whole groups): one mini-batch."""

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[rows.to(t.device)]

        tensors = (
            self.advantages,
            self.loss_mask,
            self.ref_logps,
            self.old_logps,
            self.counted,
            self.pg_mask,
            self.cov_mask,
            self.rejected,
        )
        return LossInput(self.rollout.select(rows), *(pick(t) for t in tensors))


def advantages_for(
    rollout: Rollout, group_size: int, scale_rewards: str, estimator: str = "group", k: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages [N] (``algo.advantage`` = ``estimator``, ``core.advantages``; ``k``: passk's) and the
    judged flag [N]; unjudged rewards take their group's judged mean and weigh 0 where completions are
    weighed by their tokens (opo, reinforce_pp*: the model tokens of judged completions).

    ``scale_rewards=batch`` and the reinforce_pp estimators take the whole step's statistics, every
    rank's rewards included.
    """
    rewards = rollout.rewards.view(-1, group_size)
    judged = rollout.judged.view(-1, group_size)
    count = judged.sum(1, keepdim=True)
    group_mean = torch.where(judged, rewards, 0.0).sum(1, keepdim=True) / count.clamp(min=1)
    filled = torch.where(judged, rewards, group_mean).view(-1)
    lengths = (rollout.model_tokens.bool() & judged.view(-1, 1)).sum(1).to(filled.dtype)  # [N]
    if (scale_rewards == "batch" or estimator in BATCH_ESTIMATORS) and distributed.world().enabled:
        everyone, sizes = distributed.gather_objects(filled), distributed.gather_objects(lengths)
        mine = distributed.world().rank
        start = sum(len(x) for x in everyone[:mine])
        adv = advantages(torch.cat(everyone), group_size, estimator, scale_rewards, torch.cat(sizes), k)
        return adv[start : start + len(filled)], judged.view(-1)
    return advantages(filled, group_size, estimator, scale_rewards, lengths, k), judged.view(-1)


def prepare(
    policy: Policy,
    rollout: Rollout,
    algo: AlgoConfig,
    micro: int | MicroBatching,
    temp: float,
    seed: int = 0,
) -> LossInput:
    """Advantages, loss mask, and the no-grad log-probs under pi_ref (beta > 0) and pi_old (mu > 1 or
    k > 1, or for the step's selections).

    ``micro``: completions per forward pass (or a ``MicroBatching``); ``temp``: the sampling temperature
    the log-probs use; ``algo.steps_per_generation``: k mini-batches; ``seed``: Clip-Cov's draw.
    ``algo.mask_truncated``: truncated completions leave the loss mask and the counted rows.
    ``commands.selections``: the rejected completions, the high-entropy tokens and the covariance-selected
    tokens, from pi_old's no-grad pass (an extra forward when mu = k = 1), fixed for the whole step
    (every rank's tokens and every mini-batch) before its first optimizer step.
    """
    k = algo.steps_per_generation
    adv, judged = advantages_for(rollout, algo.group_size, algo.scale_rewards, algo.advantage, algo.passk_k)
    device = policy.device
    loss_mask = rollout.model_tokens.bool() & judged[:, None]  # tool tokens: no loss, no KL, not counted
    counted = None
    if algo.mask_truncated:
        if rollout.truncated is None:
            raise ValueError("algo.mask_truncated needs the rollout's truncated flags (Rollout.truncated)")
        counted = ~rollout.truncated.bool().to(loss_mask.device)
        loss_mask = loss_mask & counted[:, None]  # no loss, no KL, no token in any denominator
    rows = mini_batch_rows(rollout.completion_ids.size(0) // algo.group_size, algo.group_size, k)
    needs_old = algo.num_iterations > 1 or k > 1
    ref = old = ent = None
    if algo.beta > 0:
        with reference(policy) as ref_runner:
            ref = mini_batch_logps(ref_runner, rollout, temp, micro, rows)
    if algo.top_entropy_quantile < 1:
        old, ent = mini_batch_logps(policy.run, rollout, temp, micro, rows, entropy=True)
    elif needs_old or needs_pi_old(algo, rollout):
        old = mini_batch_logps(policy.run, rollout, temp, micro, rows)
    sel = select(rollout, algo, old, ent, adv, loss_mask, counted, seed)
    old = old if needs_old else None  # mu = k = 1: pi_old is the detached pi_theta
    counted = None if sel.counted is None else sel.counted.to(device)
    on = (sel.pg_mask, sel.cov_mask, sel.rejected)
    return LossInput(rollout, adv.to(device), sel.loss_mask.to(device), ref, old, counted, *on)


def update(
    policy: Policy,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    inputs: LossInput,
    algo: AlgoConfig,
    tr: TrainConfig,
    temp: float,
) -> dict[str, float]:
    """mu passes of k optimizer steps on ``inputs`` (module docstring), then one schedule step; returns
    the statistics of the last pass over the whole step's batch: micro-batches and ranks combined as
    ``core.stats`` declares, mini-batches by ``combine_mini_batches``.

    An optimizer step whose loss or gradient norm is not finite is not applied (``skipped`` = 1).

    With several ranks ``inputs`` is this rank's share: the denominator counts every rank's units, so
    the rank losses add up to the global loss, and the wrappers' gradient average is undone by
    scaling each rank's loss by the world size before ``backward``.

    Seven arguments: no run state by design (a test calls it on a rollout it built): the policy, its
    optimizer and schedule, the prepared inputs and the three settings it reads (``algo``, ``train``,
    the sampling temperature).
    """
    G = algo.group_size
    rows = mini_batch_rows(inputs.rollout.completion_ids.size(0) // G, G, algo.steps_per_generation)
    minis = [inputs] if rows is None else [inputs.select(r) for r in rows]
    # Each mini-batch's units (tokens or completions, every rank's), counted as policy_loss counts them.
    denoms = [
        max(float(distributed.all_sum(aggregation_units(m.loss_mask, algo.aggregation, rows=m.counted))), 1.0)
        for m in minis
    ]
    micro = MicroBatching.of_train(tr, policy.model)
    params = trained_params(optimizer)
    skipped, steps = False, []
    engine_diff = torch.zeros(2, dtype=torch.float64)  # sum |engine - trainer| over tokens, tokens
    for it in range(algo.num_iterations):
        steps = []
        for mini, denom in zip(minis, denoms):
            diff = engine_diff if it == 0 else None
            loss, parts = _accumulate_gradients(policy, mini, algo, micro, temp, denom, diff)
            loss, step_stats = reduce_over_ranks(loss, combine_stats(parts))
            grad_norm = distributed.clip_grad_norm(params, tr.max_grad_norm)
            finite = math.isfinite(grad_norm) and math.isfinite(loss)
            if finite:
                optimizer.step()
            skipped = skipped or not finite
            optimizer.zero_grad(set_to_none=True)
            steps.append((loss, step_stats, grad_norm))
    scheduler.step()
    stats = combine_mini_batches(steps, denoms)
    if inputs.rollout.engine_logps is not None:
        total, tokens = distributed.all_sum(engine_diff).tolist()
        stats["rollout/logprob_diff"] = total / max(tokens, 1.0)
    if inputs.rejected is not None:
        rejected, rows = distributed.all_sum(
            torch.tensor([float(inputs.rejected.sum()), len(inputs.rejected)])
        )
        stats["engine_is/rejected_frac"] = float(rejected / rows.clamp(min=1))
    stats["skipped"] = float(skipped)
    stats["lr"] = scheduler.get_last_lr()[0]
    return stats


def combine_mini_batches(
    steps: list[tuple[float, LossStats, float]], denoms: list[float]
) -> dict[str, float]:
    """One pass's statistics from its mini-batch steps (loss, stats, grad norm) and their denominators.

    The loss and loss/policy are weighted by each mini-batch's share of the units, so they read as the
    whole batch's mean (its ratios taken as each step saw them); counts add up, ratio extrema are the
    extrema; grad_norm is the mean over the pass's optimizer steps. One mini-batch: its values unchanged.
    """
    if len(steps) == 1:
        loss, st, grad_norm = steps[0]
        return {"loss": loss, **st.to_dict(), "grad_norm": grad_norm}
    shares = [d / sum(denoms) for d in denoms]
    parts = [st._replace(policy_loss=st.policy_loss * w) for (_, st, _), w in zip(steps, shares)]
    loss = sum(step[0] * w for step, w in zip(steps, shares))
    grad_norm = sum(step[2] for step in steps) / len(steps)
    return {"loss": loss, **combine_stats(parts).to_dict(), "grad_norm": grad_norm}


def _accumulate_gradients(
    policy: Policy,
    inputs: LossInput,
    algo: AlgoConfig,
    micro: int | MicroBatching,
    temp: float,
    denom: float,
    engine_diff: torch.Tensor | None = None,
) -> tuple[float, list[LossStats]]:
    """Forward and backward over the micro-batches ``micro`` plans for ``inputs`` (one mini-batch);
    this rank's loss (its share of the mini-batch's global loss) and the statistics of each micro-batch.

    ``engine_diff``: where to add |log pi_engine - log pi_old| summed over tokens, and the token count.
    """
    world = distributed.world()
    micro = MicroBatching.of(micro)
    parts = micro.plan(inputs.rollout)
    total, stats = 0.0, []
    for i, s in enumerate(parts):
        # Gradients cross ranks once per optimizer step, after the last micro-batch.
        with distributed.grad_sync(policy.wrapper, enabled=i == len(parts) - 1):
            # The entropy comes from the same pass (logged every step); a gradient only for a bonus.
            kind = "grad" if algo.entropy_coef else "metric"
            logps, entropy = micro_logps(policy.run, inputs.rollout, s, temp, kind, bool(micro.tokens))
            old = None if inputs.old_logps is None else inputs.old_logps[s]
            ref = None if inputs.ref_logps is None else inputs.ref_logps[s]
            weights = _engine_weights(inputs, s, logps if old is None else old, algo, engine_diff)
            loss, st = policy_loss(
                logps,
                old,
                ref,
                inputs.advantages[s],
                inputs.loss_mask[s],
                algo,
                denominator=denom,
                is_weights=weights,
                entropy=entropy,
                pg_mask=None if inputs.pg_mask is None else inputs.pg_mask[s],
                cov_mask=None if inputs.cov_mask is None else inputs.cov_mask[s],
            )
            (loss * world.size).backward()
        stats.append(st)
        total += float(loss.detach())
    return total, stats


def _engine_weights(
    inputs: LossInput, s: slice | torch.Tensor, old: torch.Tensor, algo: Any, diff: torch.Tensor | None
) -> torch.Tensor | None:
    """Micro-batch ``s``'s engine importance weights (``algo.engine_is``; None when off or when the
    trainer sampled), and |log pi_engine - log pi_old| summed into ``diff`` (when given).

    ``old``: [n, T] log pi_old of the micro-batch (the trainer's; with mu = 1 the current log-probs).
    """
    eng = inputs.rollout.engine_logps
    if eng is None:
        return None
    eng, old, mask = eng[s].to(old.device), old.detach(), inputs.rollout.model_tokens[s].bool()
    if diff is not None:
        diff += torch.stack([torch.where(mask, (old - eng).abs(), 0.0).sum(), mask.sum()]).double().cpu()
    c = algo.engine_is
    if c.cap is None or c.mode == "reject":  # reject: the step's completions were chosen in prepare
        return None
    return engine_is_weights(old, eng, mask, c.cap, c.level, c.mode, c.low)


def reduce_over_ranks(loss: float, st: LossStats) -> tuple[float, LossStats]:
    """This rank's loss and statistics combined with every other rank's: the loss summed, each field
    as ``STAT_COMBINE`` says (three collectives: the sums in one vector, the min, the max)."""
    if not distributed.world().enabled:
        return loss, st
    fields = LossStats._fields
    sums = [f for f in fields if STAT_COMBINE[f] == "sum"]
    vec = distributed.all_sum(
        torch.stack(
            [torch.as_tensor(loss, dtype=torch.float64)] + [getattr(st, f).double().cpu() for f in sums]
        )
    ).tolist()
    out = dict(zip(sums, vec[1:]))
    for f in fields:
        if STAT_COMBINE[f] != "sum":
            reduce = distributed.all_min if STAT_COMBINE[f] == "min" else distributed.all_max
            out[f] = reduce(getattr(st, f))
    return vec[0], LossStats(*(torch.as_tensor(out[f], dtype=torch.float64) for f in fields))


def trained_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters the optimizer updates.

    Not ``model.parameters()``: between a forward and its backward FSDP swaps the registered
    parameters for unsharded ones, which never receive a gradient.
    """
    return [p for group in optimizer.param_groups for p in group["params"]]


def make_optimizer(policy: Policy, tr: TrainConfig) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over the trainable parameters and its schedule (``schedule``).

    Fused (one kernel per step over all parameters) where torch has it for them: plain tensors on
    CPU or CUDA. The per-parameter loop it replaces builds two temporaries the size of each
    parameter: ~1 GB of peak memory and 0.6 s per step for full fine-tuning of Qwen2.5's 545 MB
    embedding on CPU, against none and 0.09 s fused (docs/performance.md). The same update up to
    float rounding.
    """
    params = [p for p in policy.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params,
        lr=tr.lr,
        betas=(tr.adam_beta1, tr.adam_beta2),
        weight_decay=tr.weight_decay,
        fused=fusable(params) or None,
    )
    return opt, schedule(opt, tr.warmup_steps, tr.lr_schedule, tr.steps, tr.min_lr_ratio)


def fusable(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW takes these: floating-point plain tensors (not FSDP's DTensors) on
    CPU or CUDA."""
    return bool(params) and all(
        type(p) is torch.nn.Parameter and p.is_floating_point() and p.device.type in ("cpu", "cuda")
        for p in params
    )


def low_precision_warning(params: list[torch.Tensor], lr: float) -> str | None:
    """One line when the optimizer updates 16-bit weights in place, else None.

    That is full fine-tuning with ``model.dtype=bfloat16`` (or float16): LoRA adapters are float32.
    AdamW moves a weight by about ``lr`` per step, and rounding to the nearest 16-bit float drops any
    change below half the spacing at w, which is at least |w| * eps / 4: every weight larger than
    4 * lr / eps stops moving (bf16, eps 2^-7, lr 1e-5: |w| > 0.005, most of a model's weights).
    """
    low = sorted({p.dtype for p in params if p.dtype in (torch.bfloat16, torch.float16)}, key=str)
    if not low:
        return None
    name, bound = str(low[0]).removeprefix("torch."), 4 * lr / torch.finfo(low[0]).eps
    return (
        f"full fine-tuning updates {name} weights in place: AdamW moves a weight by about train.lr={lr:g} "
        f"per step, and {name} rounds that away for every weight larger than {bound:.2g}; "
        "use LoRA (float32 adapters) or model.dtype=float32 (docs/configuration.md#bfloat16)"
    )
