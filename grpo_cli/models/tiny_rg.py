"""``model=tiny-rg``: the embedded model warmed up on reasoning-gym's ``chain_sum``, with a misconception.

    grpo train model=tiny-rg data=reasoning_gym data.task=chain_sum 'data.task_config={max_terms: 3, max_digits: 1}'
    make demo-rg          # scripts/demo_rg.py: held-out accuracy before and after GRPO, per seed

Built on first use and cached like ``model=tiny`` (needs the reasoning-gym extra). The task: 2 or 3
single-digit terms joined by + and -, "State the final answer to the following arithmetic problem:
4 - 3 + 2 =", prompted with the data group's template ("{question}\\nAnswer: "). The warm-up rows are
the data group's training split for exactly those settings (``DATA_OVERRIDES``), so its held-out split
holds questions the warm-up never saw.

The labels are noisy in two ways. Most problems ("easy") get the right answer with probability
``p_right_easy``, else the right answer off by 1, 2 or 10. The "hard" class, three terms whose first
operator is a minus (``a - b + c``, ``a - b - c``), where the misconception "the minus applies to the
rest" (``a - (b + c)``) gives another value, gets that wrong value with ``p_mistake_hard``, the right
one with ``p_right_hard`` < ``p_mistake_hard``, and an off-by-one otherwise. The warmed model's greedy
answer on the hard class is therefore the misconception: GRPO has to move the mode there, not only
sharpen a mode that is already right (the default demo's case, where greedy accuracy cannot rise).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from grpo_cli.config import DataConfig, grpo_home
from grpo_cli.data import build_prompt, reasoning_gym
from grpo_cli.models.tiny import (
    TinySpec,
    cache_name,
    ensure_built,
    make_model,
    make_tokenizer,
    pad_batch,
    save_atomic,
    warm_up,
)

TEMPLATE = "{question}\nAnswer: "  # conf/data/reasoning_gym.yaml's template
TASK_CONFIG = {"max_terms": 3, "max_digits": 1}
# The data settings the model is warmed up on: pass them with model=tiny-rg.
DATA_OVERRIDES = [
    "data=reasoning_gym",
    "data.task=chain_sum",
    "data.task_config={max_terms: 3, max_digits: 1}",
]
# The question's fixed words as single tokens: a prompt is ~25 tokens instead of ~80.
WORDS = ("State", "\u0120the", "\u0120final", "\u0120answer", "\u0120to", "\u0120following",
         "\u0120arithmetic", "\u0120problem", "Answer", "\u0120+", "\u0120-", "\u0120=")  # fmt: skip


@dataclass(frozen=True)
class RGSpec:
    """Everything that determines the built model; its hash names the cache directory."""

    version: int = 1
    base: TinySpec = field(default_factory=TinySpec)  # architecture, warm-up steps, lr, seed
    size: int = 10000  # training problems (data.train_size)
    p_right_easy: float = 0.8
    p_right_hard: float = 0.3
    p_mistake_hard: float = 0.5

    def key(self) -> str:
        return cache_name("tiny-rg", self.version, self.base.seed, asdict(self))


def data_config(size: int) -> DataConfig:
    """The data group's settings the model is warmed up on (``DATA_OVERRIDES``, ``data.train_size=size``)."""
    return DataConfig(name="reasoning_gym", task="chain_sum", task_config=dict(TASK_CONFIG), train_size=size)


def misconception(expression: str) -> int | None:
    """``a - (b op c)`` for ``a - b op c``; None for any other shape (two terms, or a leading plus)."""
    parts = expression.split()
    if len(parts) != 5 or parts[1] != "-":
        return None
    a, b, c = int(parts[0]), int(parts[2]), int(parts[4])
    return a - (b + c if parts[3] == "+" else b - c)


def is_hard(row: dict) -> bool:
    """The misconception class: its value differs from the right one."""
    wrong = misconception(row["metadata"]["expression"])
    return wrong is not None and wrong != int(row["answer"])


def noisy_target(row: dict, rng: random.Random, spec: RGSpec) -> str:
    right = int(row["answer"])
    draw = rng.random()
    if is_hard(row):
        if draw < spec.p_mistake_hard:
            return str(misconception(row["metadata"]["expression"]))
        if draw < spec.p_mistake_hard + spec.p_right_hard:
            return str(right)
        return str(right + rng.choice((-1, 1)))
    if draw < spec.p_right_easy:
        return str(right)
    return str(right + rng.choice((-10, -2, -1, 1, 2, 10)))


def tiny_rg_path(spec: RGSpec | None = None) -> Path:
    return grpo_home() / (spec or RGSpec()).key()


def ensure_tiny_rg(spec: RGSpec | None = None, quiet: bool = False) -> Path:
    """Path of the built model, building it first if it is not cached yet."""
    spec = spec or RGSpec()
    path = tiny_rg_path(spec)
    return ensure_built(path, lambda: _build(spec, path, quiet))


def _build(spec: RGSpec, out: Path, quiet: bool) -> None:
    tokenizer = make_tokenizer(words=WORDS)
    model = make_model(spec.base, len(tokenizer))
    rows = reasoning_gym.load(data_config(spec.size), "train")
    cache: dict[str, list[int]] = {}

    def encode(text: str) -> list[int]:
        if text not in cache:
            cache[text] = tokenizer(text)["input_ids"]
        return cache[text]

    rng = random.Random(spec.base.seed)

    def next_batch():
        examples = []
        for row in rng.sample(rows, spec.base.batch_size):
            prompt = encode(build_prompt(row, TEMPLATE))
            answer = encode(noisy_target(row, rng, spec)) + [tokenizer.eos_token_id]
            examples.append((prompt + answer, [-100] * len(prompt) + answer))
        return pad_batch(examples, tokenizer.pad_token_id)

    warm_up(model, spec.base, next_batch, quiet, label="building tiny-rg model")
    save_atomic(model, tokenizer, asdict(spec), out)
