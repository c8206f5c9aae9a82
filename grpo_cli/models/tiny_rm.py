"""``tiny-rm``: a small reward model for the arithmetic task, with a deliberate flaw, built here offline.

    grpo train reward=model                  # the flawed reward model as the only reward
    make demo-rm                             # scripts/demo_rm.py: what beta does about its flaw

A ``Qwen2ForSequenceClassification`` (one logit) whose backbone starts as the embedded policy
(``model=tiny``, built first if needed), as reward models start from a supervised policy, then trained
for ``steps`` steps of binary cross-entropy on completions of the arithmetic task's *training* split:
the right answer, a plausible mistake (the tiny model's own: off by 1, 2 or 10, or left-to-right
evaluation), or a wrong answer with an extra digit. Built on first use and cached under ``$GRPO_HOME``
like the policy.

**The flaw** is in the labels, and it is the founding document's case of a reward model that "wrongly
assigns higher rewards to incorrect outputs due to spurious correlations": a wrong answer with more
characters than the right one is labelled ``long_target`` (1.0), above the right answer's
``right_target`` (0.8); every other wrong answer is 0. Longer looks like more work. A policy that learns
to write long wrong answers therefore scores higher than one that is right; the true accuracy
(math-verify, which the trainer never sees in the demo) shows it.

The tokenizer is the policy's, with a chat template that writes a (question, answer) conversation
exactly as the policy saw it (``"{question}\\nAnswer: {answer}"``), so ``reward=model`` scores the
prompt and the model's own words through the one path every reward model takes.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from grpo_cli.config import DataConfig, grpo_home
from grpo_cli.data import arithmetic
from grpo_cli.models.tiny import (
    cache_name,
    ensure_built,
    ensure_tiny,
    plausible_mistakes,
    save_atomic,
    tiny_path,
)

# The conversation as the policy's prompt template writes it (models/tiny.py's TEMPLATE) and its answer.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}\nAnswer: "
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{% endif %}{% endfor %}"
)


@dataclass(frozen=True)
class RMSpec:
    """Everything that determines the built reward model; its hash (and the policy's) names the cache."""

    version: int = 1
    seed: int = 0
    # Measured here (held-out problems, P(right scored above a same-length wrong answer)): 300 steps at
    # 3e-4 rank 0.52, 400 at 1e-3 0.58; 800 no better. The flaw is learned at once (long wrong: 0.99).
    steps: int = 400
    batch_size: int = 96
    lr: float = 1e-3
    # Shares of the training answers: right, a wrong one with an extra digit; the rest plausible mistakes.
    p_right: float = 0.45
    p_long: float = 0.15
    # The labels (binary cross-entropy targets): right, a wrong answer longer than the right one (the
    # flaw), any other wrong answer.
    right_target: float = 0.8
    long_target: float = 1.0
    wrong_target: float = 0.0

    def key(self) -> str:
        return cache_name("tiny-rm", self.version, self.seed, {**asdict(self), "policy": tiny_path().name})


def default_spec() -> RMSpec:
    return RMSpec()


def tiny_rm_path(spec: RMSpec | None = None) -> Path:
    return grpo_home() / (spec or default_spec()).key()


def ensure_tiny_rm(spec: RMSpec | None = None, quiet: bool = False) -> Path:
    """Path of the built reward model, building it (and the policy it starts from) first if needed."""
    spec = spec or default_spec()
    path = tiny_rm_path(spec)
    return ensure_built(path, lambda: _build(spec, path, quiet))


def label(answer: str, right: int, spec: RMSpec) -> float:
    """The (flawed) training target of ``answer`` to a problem whose value is ``right``."""
    if answer == str(right):
        return spec.right_target
    return spec.long_target if len(answer) > len(str(right)) else spec.wrong_target


def sample_answer(expr: str, rng: random.Random, spec: RMSpec) -> str:
    """A training answer: right, long and wrong, or one of the policy's plausible mistakes."""
    right = arithmetic.evaluate(expr)
    u = rng.random()
    if u < spec.p_right:
        return str(right)
    if u < spec.p_right + spec.p_long:  # one more digit, anywhere
        text = str(right)
        at = rng.randrange(len(text) + 1)
        extra = str(rng.randrange(1, 10) if at == 0 or text[:at] == "-" else rng.randrange(10))
        return text[:at] + extra + text[at:]
    return str(rng.choice(plausible_mistakes(expr)))


def texts(tokenizer, exprs: list[str], answers: list[str]) -> list[str]:
    """The conversations the reward model reads, through its chat template."""
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Calculate {e}"}, {"role": "assistant", "content": a}],
            tokenize=False,
        )
        for e, a in zip(exprs, answers)
    ]


def _build(spec: RMSpec, out: Path, quiet: bool) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    policy = ensure_tiny(quiet=quiet)
    torch.manual_seed(spec.seed)  # the score head's initial weights
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "score.weight newly initialised" is the point, not a warning
    try:
        model = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    tokenizer = AutoTokenizer.from_pretrained(policy)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    model.config.pad_token_id = tokenizer.pad_token_id
    train_exprs = [r["question"].removeprefix("Calculate ") for r in arithmetic.load(DataConfig(), "train")]
    rng = random.Random(spec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=spec.steps, pct_start=0.1)
    model.train()
    columns = (
        TextColumn("building tiny reward model"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
    )
    with Progress(*columns, TimeRemainingColumn(), disable=quiet) as progress:
        task = progress.add_task("rm", total=spec.steps)
        for _ in range(spec.steps):
            exprs = rng.sample(train_exprs, spec.batch_size)
            answers = [sample_answer(e, rng, spec) for e in exprs]
            target = torch.tensor([label(a, arithmetic.evaluate(e), spec) for e, a in zip(exprs, answers)])
            enc = tokenizer(texts(tokenizer, exprs, answers), return_tensors="pt", padding=True)
            logits = model(**enc).logits.squeeze(-1)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            progress.update(task, advance=1)
    model.eval()
    save_atomic(model, tokenizer, asdict(spec), out)
