"""A stand-in for a real hub model, built offline: the real architecture's exact config, random weights,
a byte-level BPE trained here with the family's special tokens at their real ids, and a ChatML template.

    python scripts/make_standin.py --out /tmp/qwen-standin              # Qwen2.5-0.5B-Instruct, 24 layers
    python scripts/make_standin.py --out /tmp/qwen-standin-2l --layers 2
    grpo train model=qwen model.name_or_path=/tmp/qwen-standin data=gsm8k data.path=/path/to/gsm8k

It exercises what a run on the real weights exercises (shapes, a 151,936-token vocabulary, the chat
template, byte-level BPE decoding, the EOS set, memory and speed) but it cannot learn anything: the
weights are random. Learning waits for real weights.

The tokenizer is a genuine ``Qwen2Tokenizer``: transformers 5 picks the tokenizer class from the model
type, so a qwen2 directory comes back as a ``Qwen2Tokenizer`` whatever tokenizer_config.json names, and
that class installs Qwen2's own normaliser (NFC) and pre-tokeniser (its split regex, one digit per
token). The BPE merges are therefore learned under exactly that rule, and the final tokenizer is
constructed by that class, so what is saved is what ``AutoTokenizer`` loads.

Ids are laid out as in the real tokenizer: 151,643 ordinary tokens (the merges learned on local text,
then byte strings that no merge reaches, so they are never produced by encoding but decode to bytes),
then the special tokens from 151,643 (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ...), and
ids up to the config's padded vocabulary size (151,936) that have no token at all, as in the real one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from grpo_cli.config import DataConfig
from grpo_cli.data import arithmetic

# The Qwen2.5 family's shared config.json values (from the hub's files), then each size's own.
_QWEN25 = {
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "max_window_layers": 21,
    "sliding_window": 32768,
    "use_sliding_window": False,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "attention_dropout": 0.0,
    "tie_word_embeddings": True,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}
ARCHS: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b-instruct": {
        **_QWEN25,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
    },
    "qwen2.5-1.5b-instruct": {
        **_QWEN25,
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
    },
}
DEFAULT_ARCH = "qwen2.5-0.5b-instruct"

# Ordinary (BPE) tokens in the Qwen2 tokenizer; the special tokens start here.
NUM_ORDINARY = 151643
# (token, special) in id order from NUM_ORDINARY, as in Qwen2.5's tokenizer_config.json.
SPECIAL_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
EOS_TOKEN, PAD_TOKEN = "<|im_end|>", "<|endoftext|>"
# generation_config.json of Qwen2.5-*-Instruct: generation ends at either token.
GENERATION_CONFIG = {
    "bos_token_id": 151643,
    "pad_token_id": 151643,
    "eos_token_id": [151645, 151643],
    "do_sample": True,
    "repetition_penalty": 1.1,
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
}
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# ChatML, written here: a system turn (the family's default one when none is given), then each message
# as <|im_start|>role\ncontent<|im_end|>\n, tool results as the family renders them (consecutive ones in
# one user turn, each in <tool_response> tags), then the assistant's opening when a reply is wanted.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- set turns = messages[1:] %}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- set turns = messages %}"
    "{%- endif %}"
    "{%- for message in turns %}"
    "{%- if message['role'] == 'tool' %}"
    "{%- if loop.first or turns[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{%- if loop.last or turns[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def corpus(data_dir: Path | None, limit: int | None = None) -> Iterator[str]:
    """Text to learn merges from: GSM8K's train split when it is on disk, else generated arithmetic text.

    Either way a few lines of non-ASCII text are added so that common accented letters get merges
    while rarer characters (CJK, emoji) stay split across byte tokens, as in a real vocabulary.
    """
    gsm8k = data_dir / "gsm8k" / "train.jsonl" if data_dir else None
    if gsm8k is not None and gsm8k.is_file():
        with gsm8k.open() as f:
            for i, line in enumerate(f):
                if limit is not None and i >= limit:
                    break
                row = json.loads(line)
                yield row["question"]
                yield row["answer"]
    else:
        rows = arithmetic.load(DataConfig(), "train")[: limit or None]
        for row in rows:
            yield f"{row['question']} = {row['answer']}. Please reason step by step."
    for _ in range(20):
        yield "Café, naïve, déjà vu, Zürich, señor, 5 € — “quoted” … ±3 °C"


def train_merges(texts: Iterator[str], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE under Qwen2's normaliser and pre-tokeniser: (vocab, merges), at most vocab_size."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), merges


def fill_vocab(vocab: dict[str, int], size: int) -> dict[str, int]:
    """``vocab`` padded with byte strings (pairs, then triples, of byte symbols) up to ``size`` ids.

    No merge produces them, so encoding never does; a model with random weights samples them, and
    they decode to bytes like any other token.
    """
    from tokenizers import pre_tokenizers

    out = dict(vocab)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())

    def strings() -> Iterator[str]:
        for a in alphabet:
            for b in alphabet:
                yield a + b
        for a in alphabet:
            for b in alphabet:
                for c in alphabet:
                    yield a + b + c

    it = strings()
    while len(out) < size:
        s = next(it)
        if s not in out:
            out[s] = len(out)
    return out


def make_tokenizer(texts: Iterator[str], bpe_vocab: int = 32000) -> Any:
    """The stand-in's Qwen2Tokenizer: merges learned on ``texts``, real special-token ids, ChatML template."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = train_merges(texts, bpe_vocab)
    vocab = fill_vocab(vocab, NUM_ORDINARY)
    # The special tokens sit in the vocabulary at their real ids, so registering them below (which
    # Qwen2Tokenizer does for eos/pad itself) reuses those ids instead of appending new ones.
    for i, (token, _) in enumerate(SPECIAL_TOKENS):
        vocab[token] = NUM_ORDINARY + i
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        errors="replace",
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
    )
    tok.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in SPECIAL_TOKENS])
    tok.add_special_tokens(
        {"additional_special_tokens": [t for t, s in SPECIAL_TOKENS if s and t not in (EOS_TOKEN, PAD_TOKEN)]}
    )
    tok.chat_template = CHAT_TEMPLATE
    for i, (token, _) in enumerate(SPECIAL_TOKENS):
        got = tok.convert_tokens_to_ids(token)
        if got != NUM_ORDINARY + i:
            raise RuntimeError(f"stand-in tokenizer: {token} got id {got}, expected {NUM_ORDINARY + i}")
    return tok


def make_config(arch: str = DEFAULT_ARCH, layers: int | None = None) -> Any:
    from transformers import Qwen2Config

    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r}: choose one of {', '.join(ARCHS)}")
    values = dict(ARCHS[arch])
    if layers is not None:
        values["num_hidden_layers"] = layers
        values["max_window_layers"] = min(values["max_window_layers"], layers)
    return Qwen2Config(**values, pad_token_id=None)


def build_standin(
    out: Path,
    arch: str = DEFAULT_ARCH,
    layers: int | None = None,
    seed: int = 0,
    dtype: str = "bfloat16",
    data_dir: Path | None = None,
    bpe_vocab: int = 32000,
    corpus_limit: int | None = None,
) -> Path:
    """Write the stand-in model directory to ``out`` (atomically) and return it.

    ``layers`` overrides the architecture's layer count (tests use 2); ``dtype`` is the dtype of the
    saved weights (the hub checkpoints are bfloat16); ``data_dir`` holds ``gsm8k/train.jsonl`` for the
    tokenizer's training text (None or missing: generated text); ``corpus_limit`` caps its rows.

    Eight arguments: the builder's options (the shape, the tokenizer's corpus and vocabulary, the seed),
    each a flag of ``scripts/make_standin.py``.
    """
    from transformers import GenerationConfig, Qwen2ForCausalLM

    out = Path(out)
    tokenizer = make_tokenizer(corpus(data_dir, corpus_limit), bpe_vocab)
    config = make_config(arch, layers)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(getattr(torch, dtype)).eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".standin-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        GenerationConfig(**GENERATION_CONFIG).save_pretrained(tmp)
        spec = {"arch": arch, "layers": config.num_hidden_layers, "seed": seed, "dtype": dtype}
        (tmp / "standin.json").write_text(json.dumps(spec, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; a model directory is shared like any other
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
