"""The Qwen2.5 stand-in (grpo_cli/standin.py, scripts/make_standin.py): real config, real special ids,
a tokenizer that AutoTokenizer loads as the same Qwen2Tokenizer, ChatML, byte-level decoding."""

from __future__ import annotations

import json

import pytest

from grpo_cli.models.standin import ARCHS, NUM_ORDINARY, SPECIAL_TOKENS


@pytest.fixture(scope="module")
def tok(standin_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(standin_dir)


def test_config_is_the_real_architecture_but_for_layers(standin_dir):
    config = json.loads((standin_dir / "config.json").read_text())
    real = ARCHS["qwen2.5-0.5b-instruct"]
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
    ):
        assert config[key] == real[key], key
    assert (config["hidden_size"], config["vocab_size"], config["num_key_value_heads"]) == (896, 151936, 2)
    assert config["num_hidden_layers"] == 2
    assert config["tie_word_embeddings"] is True
    assert config["rope_parameters"]["rope_theta"] == 1e6
    assert config["max_position_embeddings"] == 32768
    gen = json.loads((standin_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [151645, 151643] and gen["pad_token_id"] == 151643


def test_tokenizer_class_special_ids_and_eos(tok):
    assert type(tok).__name__ == "Qwen2Tokenizer"
    for i, (token, _) in enumerate(SPECIAL_TOKENS):
        assert tok.convert_tokens_to_ids(token) == NUM_ORDINARY + i
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 151643
    assert tok.convert_tokens_to_ids("<|im_start|>") == 151644
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 151645)
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 151643)
    assert tok.bos_token is None


def test_qwen2_pretokenisation_one_digit_per_token(tok):
    # Qwen2's split regex isolates each digit: "2024" is four tokens whatever the merges learned.
    ids = tok("2024", add_special_tokens=False)["input_ids"]
    assert [tok.decode([i]) for i in ids] == ["2", "0", "2", "4"]


def test_chat_template_is_chatml(tok):
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], tokenize=False, add_generation_prompt=True
    )
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    custom = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert (
        custom
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == 151644 and ids.count(151645) == 2


def test_byte_level_round_trip_of_split_characters(tok):
    text = "Natalia sold 48/2 = 24 clips. 日本 café €5 🙂"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    # "日" is three bytes and no merge joins them: it spans several tokens, none decodable alone.
    ja = tok("日", add_special_tokens=False)["input_ids"]
    assert len(ja) > 1
    assert all(tok.decode([i]) != "日" for i in ja)


def test_builder_is_seeded(tmp_path, standin_dir):
    # Same seed, same first weights: compare one tensor of the fixture's file with a fresh init.
    import torch
    from safetensors import safe_open
    from transformers import Qwen2ForCausalLM

    from grpo_cli.models.standin import make_config

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(make_config(layers=2)).to(torch.bfloat16)
    with safe_open(str(standin_dir / "model.safetensors"), "pt") as f:
        saved = f.get_tensor("model.layers.1.mlp.down_proj.weight")
    assert torch.equal(saved, model.model.layers[1].mlp.down_proj.weight.detach())
