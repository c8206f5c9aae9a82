"""``reward=model``: a learned reward model (a sequence classifier) as a reward rule.

It lives with the models, not the rules (grpo_cli/rewards/), because it is a model to load: device,
dtype and the embedded ``tiny-rm`` are resolved here, as for the policy; to the rewarder it is a rule
like any other (a ``_target_`` with keys).

    grpo train reward=model                                        # tiny-rm: the flawed demo model
    grpo train model=qwen reward=model reward.rules.0.name_or_path=Skywork/Skywork-Reward-V2-Qwen3-0.6B
    grpo train reward=model reward.rules.0.device=cuda:1           # the reward model on its own GPU

Any ``AutoModelForSequenceClassification`` with one label (a local directory or a hub id; ``tiny-rm`` is
built here, models/tiny_rm.py). Each completion is scored as the conversation (the row's ``question``
as the user's turn, the model's own words as the assistant's) written by the reward model's *own*
tokenizer and chat template, not the policy's: reward models are trained on their template, and the
policy's may differ. A tokenizer without a chat template needs ``template`` (``{question}`` and
``{completion}``), or is refused at load.

Batches of ``batch_size`` texts are left-padded, with position ids counted from each text's first
token, so a batched score equals the text's score alone (tests/models/test_reward_model.py). ``output``
maps the logit r: ``logit`` (r itself), ``sigmoid`` (in (0, 1): a probability-like score), or
``standardize`` ((r - mean) / std over the texts of one call, which is one rank's step batch: the
scale a reward model's logits happen to have then does not matter beside rule rewards).

Loaded once per command (the rewarder is built before the policy: a wrong path is one line at start),
in ``dtype`` on ``device`` (``auto``: the trainer's, ``model.device``), and freed by ``close()``.
"""

from __future__ import annotations

import gc
import math
from pathlib import Path
from typing import Any

import torch

from grpo_cli.config import ConfigError
from grpo_cli.models import DTYPES, resolve_device, resolve_dtype
from grpo_cli.models.tiny_rm import ensure_tiny_rm
from grpo_cli.runtime.rng import forked_rng

OUTPUTS = ("logit", "sigmoid", "standardize")
EMBEDDED_RM = "tiny-rm"


def resolve_rm_path(name_or_path: str) -> str:
    """``tiny-rm`` is built on first use and cached; anything else is a directory or hub id."""
    if name_or_path == EMBEDDED_RM:
        return str(ensure_tiny_rm())
    return name_or_path


class ModelReward:
    """Scores completions with a sequence-classification reward model."""

    def __init__(
        self,
        name_or_path: str = EMBEDDED_RM,
        device: str = "auto",
        dtype: str = "auto",
        output: str = "logit",
        batch_size: int = 32,
        max_length: int | None = None,
        template: str | None = None,
    ):
        if output not in OUTPUTS:
            raise ConfigError(f"reward model output={output!r}: choose one of {', '.join(OUTPUTS)}")
        if dtype != "auto" and dtype not in DTYPES:
            raise ConfigError(f"reward model dtype={dtype!r}: choose auto or one of {', '.join(DTYPES)}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"reward model batch_size={batch_size!r}: must be a positive integer")
        self.output, self.batch_size = output, batch_size
        self.max_length, self.template = max_length, template
        self.device = resolve_device(device)
        self.model, self.tokenizer = _load(resolve_rm_path(name_or_path), self.device, dtype)
        if template is None and not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(
                f"reward model {name_or_path}: its tokenizer has no chat template; set the rule's template "
                "(e.g. '{question}\\n{completion}') to say how it reads a prompt and a completion"
            )

    def text(self, question: str, completion: str) -> str:
        """What the reward model reads for one completion."""
        if self.template is not None:
            return self.template.replace("{question}", question).replace("{completion}", completion)
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": completion}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False)

    @torch.no_grad()
    def logits(self, texts: list[str]) -> list[float]:
        """The reward model's logit for each text [N], in batches of ``batch_size``."""
        out: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[start : start + self.batch_size],
                return_tensors="pt",
                padding=True,
                truncation=self.max_length is not None,
                max_length=self.max_length,
                add_special_tokens=False,  # the chat template wrote any BOS it wants
            ).to(self.device)
            mask = enc["attention_mask"]
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: each text starts at 0
            logits = self.model(
                input_ids=enc["input_ids"], attention_mask=mask, position_ids=positions
            ).logits
            out += logits[:, 0].float().tolist()
        return out

    def __call__(self, completions: list[str], rows: list[dict]) -> list[float | None]:
        raw = self.logits([self.text(str(r.get("question", "")), c) for c, r in zip(completions, rows)])
        if self.output == "sigmoid":
            return [1.0 / (1.0 + math.exp(-r)) for r in raw]
        if self.output == "standardize":
            if len(raw) < 2:
                return [0.0] * len(raw)
            mean = sum(raw) / len(raw)
            std = math.sqrt(sum((r - mean) ** 2 for r in raw) / (len(raw) - 1))
            return [(r - mean) / (std + 1e-6) for r in raw]
        return raw

    def close(self) -> None:
        """Free the reward model's weights (and its GPU memory) when the command ends."""
        self.model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _load(path: str, device: torch.device, dtype: str) -> tuple[Any, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if path.startswith(("/", ".", "~")) and not Path(path).expanduser().is_dir():  # a path, not a hub id
        raise ConfigError(f"reward model {path!r} cannot be loaded: no such directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        with forked_rng():  # a head initialised on load must not move the run's RNG (LoRA's weights)
            model = AutoModelForSequenceClassification.from_pretrained(
                path, dtype=resolve_dtype(dtype, device)
            )
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"reward model {path!r} cannot be loaded: {first}") from None
    if model.config.num_labels != 1:
        raise ConfigError(
            f"reward model {path}: has {model.config.num_labels} labels; a reward model has one (a score)"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if model.config.pad_token_id is None:  # how the classifier finds each text's last token
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer
