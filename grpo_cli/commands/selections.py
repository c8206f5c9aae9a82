"""What a step fixes once, from pi_old over every rank's tokens, before its first optimizer step.

    selected = select(rollout, algo, old, entropy, advantages, loss_mask, counted, seed)

- the completions the engine mismatch rejects (``algo.engine_is.mode=reject``, ``core.mismatch``):
  they leave the loss mask and every denominator;
- the high-entropy tokens (``algo.top_entropy_quantile`` < 1): the only ones given the policy gradient;
- the covariance-selected tokens of ``algo.objective=clip_cov`` / ``kl_cov`` (``core.covariance``).

Each is computed over the whole step (every rank's values gathered in rank order, the one-process
layout), so a split into micro-batches, mini-batches or ranks selects exactly what the whole batch
would, and none of them moves during the step's mu x k optimizer steps. ``commands.update.prepare``
runs the no-grad pass of pi_old they read (an extra forward when mu = k = 1) and calls `select`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from grpo_cli.core.covariance import clip_cov_tokens, kl_cov_tokens, selection_count, token_covariance
from grpo_cli.core.loss import entropy_threshold
from grpo_cli.core.mismatch import rejected_sequences
from grpo_cli.core.objectives import COVARIANCE_OBJECTIVES
from grpo_cli.rollout.record import Rollout
from grpo_cli.runtime import distributed

# Relative tolerance under which two values are one (see high_entropy_tokens): above float32's rounding
# of a value recomputed in another batch shape (~1e-7), below real differences between contexts.
ENTROPY_TIE = 1e-5


class Selected(NamedTuple):
    """The step's selections ([N] or [N, T] bool on the loss mask's device; None: not asked for)."""

    loss_mask: torch.Tensor  # [N, T], less the rejected completions
    counted: torch.Tensor | None  # [N] rows the seq_mean_* denominators count, less the rejected ones
    rejected: torch.Tensor | None  # [N] completions the engine mismatch rejected
    pg_mask: torch.Tensor | None  # [N, T] the high-entropy tokens
    cov_mask: torch.Tensor | None  # [N, T] the covariance-selected tokens


def needs_pi_old(algo: Any, rollout: Rollout) -> bool:
    """Whether `select` reads pi_old's log-probs (or entropies) at all."""
    return (
        algo.top_entropy_quantile < 1
        or algo.objective in COVARIANCE_OBJECTIVES
        or rejects(algo.engine_is, rollout)
    )


def rejects(eis: Any, rollout: Rollout) -> bool:
    """mode=reject is on and another engine sampled (the hf engine's mu is pi_old itself)."""
    return eis.cap is not None and eis.mode == "reject" and rollout.engine_logps is not None


def select(
    rollout: Rollout,
    algo: Any,
    old: torch.Tensor | None,
    entropy: torch.Tensor | None,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    counted: torch.Tensor | None,
    seed: int = 0,
) -> Selected:
    """The step's selections (module docstring) from pi_old's log-probs ``old`` [N, T] and entropies
    ``entropy`` [N, T] (None where not needed), the advantages [N] and the loss mask [N, T].

    ``seed``: Clip-Cov's random draw among its candidates (the same on every rank; the step number
    keeps a resumed run's draws).
    """
    rejected = None
    if rejects(algo.engine_is, rollout):
        eis, device = algo.engine_is, old.device
        eng, model = rollout.engine_logps.to(device), rollout.model_tokens.bool().to(device)
        rejected = rejected_sequences(old, eng, model, eis.cap, eis.statistic, eis.low).to(loss_mask.device)
        loss_mask = loss_mask & ~rejected[:, None]  # no loss, no KL, no token in any denominator
        counted = ~rejected if counted is None else counted & ~rejected
    pg_mask = cov_mask = None
    if algo.top_entropy_quantile < 1:
        pg_mask = high_entropy_tokens(entropy, loss_mask.to(entropy.device), algo.top_entropy_quantile)
    if algo.objective in COVARIANCE_OBJECTIVES:
        cov_mask = covariance_tokens(old, advantages, loss_mask.to(old.device), algo, seed)
    return Selected(loss_mask, counted, rejected, pg_mask, cov_mask)


def high_entropy_tokens(entropy: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """[N, T] bool: tokens of ``mask`` whose entropy is at or above the (1 - quantile) quantile of
    every rank's masked tokens (``core.loss.entropy_threshold``), so a split over ranks or
    micro-batches selects the same tokens as the whole step would."""
    values = entropy[mask].double().cpu()
    if distributed.world().enabled:
        values = torch.cat(distributed.gather_objects(values))
    threshold = entropy_threshold(values, quantile)
    # Ties are common: the G completions of a group share their first token's context, so its entropy
    # is one value G times, but computed in other micro-batch or rank shapes it differs in the last
    # bits; a strict >= would then split the tie by rounding. Values within ENTROPY_TIE count as equal.
    slack = ENTROPY_TIE * max(1.0, abs(float(threshold)))
    return mask & (entropy.double() >= threshold.to(entropy.device) - slack)


def covariance_tokens(
    old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, algo: Any, seed: int
) -> torch.Tensor:
    """[N, T] bool: the tokens of ``mask`` that Clip-Cov cuts out or KL-Cov penalises, chosen over every
    rank's tokens (``core.covariance``: Cov = (log pi_old - mean)(A - mean), means over the step)."""
    adv = advantages.to(old.device)[:, None].expand_as(old)
    lp, a = old[mask].double().cpu(), adv[mask].double().cpu()
    start = 0
    if distributed.world().enabled:
        lps, advs = distributed.gather_objects(lp), distributed.gather_objects(a)
        start = sum(len(x) for x in lps[: distributed.world().rank])
        lp, a = torch.cat(lps), torch.cat(advs)
    cov = token_covariance(lp, a)
    if algo.objective == "kl_cov":
        # Equal log-probs of one context (a group's first tokens) with equal advantages tie exactly,
        # and recomputed in other shapes differ in the last bits: ties count as one value here too.
        chosen = kl_cov_tokens(cov, selection_count(algo.kl_cov_ratio, cov.numel()), ENTROPY_TIE)
    else:
        count = selection_count(algo.clip_cov_ratio, cov.numel())
        chosen = clip_cov_tokens(cov, count, algo.clip_cov_lb, algo.clip_cov_ub, seed)
    out = torch.zeros_like(mask)
    out[mask] = chosen[start : start + int(mask.sum())].to(mask.device)
    return out
