"""The embedded default model: a small Qwen2 that knows some arithmetic, built here, offline.

    grpo train                 # builds it on first use (about a minute on 2 cores), then trains it
    python scripts/build_tiny_model.py --out /tmp/tiny   # build it somewhere explicit

The tokenizer is a genuine ``Qwen2Tokenizer`` (byte-level BPE with Qwen's pre-tokenizer regex) with
no merges: one token per byte. Using Qwen's own tokenizer class matters: transformers 5 picks the
tokenizer class from the model type, so any other class saved next to a Qwen2 config comes back as
a Qwen2Tokenizer anyway, and a mismatched one silently drops spaces and newlines.

Warm-up is supervised training on the synthetic arithmetic task with deliberately noisy labels: half
of the targets are the right answer, the other half a plausible mistake (left-to-right evaluation
that ignores precedence, or the right answer off by 1, 2 or 10). The model therefore puts real but
not overwhelming probability on the right answer, and its samples at temperature 1 are right well
under half the time: exactly the situation GRPO improves, since sharpening the policy toward its
rewarded samples then raises sampled accuracy by tens of points within minutes on CPU. A model
warmed up on clean labels instead fails where it lacks the skill, which no reward can teach in a
few hundred steps.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from grpo_cli.config import DataConfig, grpo_home
from grpo_cli.data import arithmetic, build_prompt
from grpo_cli.runtime.rng import forked_rng

EOS = "<|endoftext|>"
# The arithmetic data group's prompt template; the model is warmed up on exactly this format.
TEMPLATE = "{question}\nAnswer: "


@dataclass(frozen=True)
class TinySpec:
    """Everything that determines the built model; its hash names the cache directory."""

    version: int = 1
    seed: int = 0
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    steps: int = 1200
    batch_size: int = 128
    # 1e-3: measured here, 3e-3 plateaus at ~14% greedy accuracy where 1e-3 reaches ~64%.
    lr: float = 1e-3
    # Probability that a warm-up target is the right answer (the rest are plausible mistakes).
    p_correct: float = 0.5
    # The tool variant (model=tiny-tools): the calculator's markers in the tokenizer, a share p_tool of
    # the warm-up answers written as a call (<calc>expr</calc><result>v</result>v), and direct answers
    # right with p_correct where left-to-right evaluation gives the right value too, p_correct_hard
    # where precedence matters: the tool pays only on the hard ones.
    tools: bool = False
    p_tool: float = 0.25
    p_correct_easy: float = 0.9
    p_correct_hard: float = 0.3

    def key(self) -> str:
        """Cache directory name: readable, plus a hash of every field so any change rebuilds (the
        tool fields count only for the tool variant, so the default model keeps its name)."""
        fields = asdict(self)
        if not self.tools:
            for name in ("tools", "p_tool", "p_correct_easy", "p_correct_hard"):
                fields.pop(name)
        return cache_name(f"tiny{'-tools' if self.tools else ''}", self.version, self.seed, fields)


def default_spec() -> TinySpec:
    """The embedded model's spec (one place, so a test can swap in a small one with monkeypatch)."""
    return TinySpec()


def tiny_path(spec: TinySpec | None = None) -> Path:
    return grpo_home() / (spec or default_spec()).key()


def ensure_tiny(spec: TinySpec | None = None, quiet: bool = False) -> Path:
    """Path of the built tiny model, building it first if it is not cached yet."""
    spec = spec or default_spec()
    path = tiny_path(spec)
    return ensure_built(path, lambda: _build(spec, path, quiet))


def cache_name(stem: str, version: int, seed: int, fields: dict) -> str:
    """The cache directory of a built model (tiny, tiny-rg, tiny-rm): readable, ``<stem>-v<version>-
    s<seed>``, plus a hash of ``fields``, so a change to any field builds a new model beside the old."""
    digest = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]
    return f"{stem}-v{version}-s{seed}-{digest}"


def ensure_built(path: Path, build_into: Callable[[], None]) -> Path:
    """``path``, after ``build_into()`` has written it (``save_atomic``) unless a built model is there.

    The global RNGs are left as found: the first run on a machine builds the model inside ``grpo
    train``, after the run's seed is set, and must then draw the same LoRA weights as every later run.
    """
    if not (path / "config.json").is_file():
        with forked_rng():
            build_into()
    return path


# Whole-word tokens for the fixed words of the arithmetic prompt, so a prompt is ~13 tokens, not ~28:
# the warm-up and every GRPO step cost proportionally less. Everything else is one token per byte.
WORDS = ("Calculate", "Answer", "\u0120+", "\u0120-", "\u0120*")
MARKERS = ("<calc>", "</calc>", "<result>", "</result>")  # env=calc's call and result tokens


def make_tokenizer(tools: bool = False, words: tuple[str, ...] = WORDS):
    """One token per byte, whole words for the prompt's fixed ``words`` (byte-level, ``\u0120`` = a
    leading space); with ``tools`` the calculator's four markers as single tokens too."""
    from tokenizers import AddedToken, pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {EOS: 0}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    merges = []
    for word in words:
        for i in range(2, len(word) + 1):
            if (word[: i - 1], word[i - 1]) not in merges:  # words may share a prefix ("\u0120t")
                merges.append((word[: i - 1], word[i - 1]))
            vocab.setdefault(word[:i], len(vocab))
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token=EOS, pad_token=EOS, unk_token=None)
    if tools:
        tok.add_tokens([AddedToken(m, special=False, normalized=False) for m in MARKERS])
    return tok


def make_model(spec: TinySpec, vocab_size: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(spec.seed)
    return Qwen2ForCausalLM(config)


def noisy_answer(expr: str, rng: random.Random, p_correct: float) -> str:
    """The right answer with probability p_correct, else a plausible mistake."""
    right = arithmetic.evaluate(expr)
    if rng.random() < p_correct:
        return str(right)
    return str(rng.choice(plausible_mistakes(expr)))


def plausible_mistakes(expr: str) -> list[int]:
    """The warm-up's wrong answers to ``expr``, to draw from: off by 1, 2 or 10, and left-to-right
    evaluation (three times as likely) where precedence matters."""
    right = arithmetic.evaluate(expr)
    mistakes = [right + d for d in (-10, -2, -1, 1, 2, 10)]
    if (ltr := left_to_right(expr)) != right:
        mistakes += [ltr] * 3
    return mistakes


def left_to_right(expr: str) -> int:
    """``expr`` evaluated left to right, ignoring precedence: the misconception the warm-up teaches."""
    tokens = expr.split()
    value = int(tokens[0])
    for op, num in zip(tokens[1::2], tokens[2::2]):
        n = int(num)
        value = value + n if op == "+" else value - n if op == "-" else value * n
    return value


def _example(encode, tokenizer, expr: str, rng: random.Random, spec: TinySpec) -> tuple[list[int], list[int]]:
    """Input ids and labels (-100 where nothing is learned) of one warm-up example."""
    prompt = list(encode(build_prompt({"question": f"Calculate {expr}"}, TEMPLATE)))
    eos = [tokenizer.eos_token_id]
    if spec.tools and rng.random() < spec.p_tool:  # a call: learned up to </calc>, then copying the result
        value = str(arithmetic.evaluate(expr))
        call, result = list(encode(f"<calc>{expr}</calc>")), list(encode(f"<result>{value}</result>"))
        answer = list(encode(value)) + eos
        return prompt + call + result + answer, [-100] * len(prompt) + call + [-100] * len(result) + answer
    p = spec.p_correct
    if spec.tools:
        p = spec.p_correct_hard if left_to_right(expr) != arithmetic.evaluate(expr) else spec.p_correct_easy
    answer = list(encode(noisy_answer(expr, rng, p))) + eos
    return prompt + answer, [-100] * len(prompt) + answer


def _batch(tokenizer, exprs: list[str], rng: random.Random, spec: TinySpec):
    """Right-padded input ids and labels (-100 outside what is learned) for one warm-up batch."""
    encode = _encoder(tokenizer)
    return pad_batch([_example(encode, tokenizer, expr, rng, spec) for expr in exprs], tokenizer.pad_token_id)


def pad_batch(examples: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, labels) pairs -> right-padded [B, T] ids and [B, T] labels (-100 in the padding)."""
    seqs, labels = zip(*examples)
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id)
    lab = torch.full((len(seqs), width), -100)
    for i, (s, y) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(y)] = torch.tensor(y)
    return ids, lab


@functools.lru_cache(maxsize=4)
def _encoder(tokenizer):
    """Memoised text -> ids: the warm-up sees each of ~9k prompts many times; tokenizing them anew
    was a tenth of the build time."""
    return functools.lru_cache(maxsize=None)(lambda text: tuple(tokenizer(text)["input_ids"]))


def build(spec: TinySpec, out: Path, quiet: bool = False) -> None:
    """Warm up the tiny model and save it atomically to ``out`` (model + tokenizer + spec); the global
    RNGs are left as found (see ``ensure_built``)."""
    with forked_rng():
        _build(spec, out, quiet)


def _build(spec: TinySpec, out: Path, quiet: bool) -> None:
    tokenizer = make_tokenizer(spec.tools)
    model = make_model(spec, len(tokenizer))
    train_exprs = [r["question"].removeprefix("Calculate ") for r in arithmetic.load(DataConfig(), "train")]
    rng = random.Random(spec.seed)
    warm_up(
        model, spec, lambda: _batch(tokenizer, rng.sample(train_exprs, spec.batch_size), rng, spec), quiet
    )
    save_atomic(model, tokenizer, asdict(spec), out)


def warm_up(model, spec: TinySpec, next_batch, quiet: bool, label: str = "building tiny model") -> None:
    """``spec.steps`` AdamW steps (one-cycle schedule) on ``next_batch() -> (ids, labels)``, with a bar."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=spec.steps, pct_start=0.05)
    model.train()
    columns = (TextColumn(label), BarColumn(), TextColumn("{task.completed}/{task.total}"))
    with Progress(*columns, TimeRemainingColumn(), disable=quiet) as progress:
        task = progress.add_task("warm-up", total=spec.steps)
        for _ in range(spec.steps):
            ids, labels = next_batch()
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            progress.update(task, advance=1)
    model.eval()


def save_atomic(model, tokenizer, spec: dict, out: Path) -> None:
    """Model, tokenizer and ``tiny_spec.json`` written to a temporary directory, then renamed to ``out``
    (a process that finished first keeps its copy)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "tiny_spec.json").write_text(json.dumps(spec, indent=2))
        if out.exists():  # another process finished first; keep theirs
            return
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
