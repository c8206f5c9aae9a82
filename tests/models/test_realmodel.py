"""The real-model path on a 2-layer Qwen2.5-0.5B-Instruct stand-in (``standin_dir``): chat template,
the EOS set, byte-level decoding, ``grpo train model=qwen data=gsm8k``, its checkpoint under plain
peft, ``grpo eval`` / ``grpo sample`` on it, no held-out generation with ``train.eval_every=0``, no
deprecation warnings from our calls into transformers, bf16 weights with fp32 log-probs on CPU.

The end-to-end tests (marked slow, kept in CI) share one training run (a module fixture: 2 steps of
2 prompts x 2 completions of 4 tokens): at 151,936 vocabulary entries every decode step is dominated
by the output layer, so runs are few and short. Rewards come from a test-local rule that varies within a group (random weights never
answer right), so the updates are not zero.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import rule_module
from helpers import encode_prompts, roll_out

from grpo_cli.cli import compose_config
from grpo_cli.commands import eval as evaluate
from grpo_cli.commands import heldout, train
from grpo_cli.commands.validate import validate
from grpo_cli.engines import Decoding
from grpo_cli.models import load_policy
from grpo_cli.run.runlog import read_metrics

IM_START, IM_END, ENDOFTEXT = 151644, 151645, 151643
STEPS, MAX_NEW = 2, 4
REWARDS = "def noisy(completions, rows):\n    return [float(sum(map(ord, c)) % 3) for c in completions]\n"

GSM8K_ROWS = [
    ("Tom has 3 apples and buys 4 more. How many apples does he have?", "3 + 4 = 7\n#### 7"),
    ("A book costs 12 € and a pen 3 €. What do both cost?", "12 + 3 = 15\n#### 15"),
    ("Sara runs 5 km a day for 6 days. How far does she run?", "5 * 6 = 30\n#### 30"),
    ("There are 20 birds; 8 fly away. How many remain?", "20 - 8 = 12\n#### 12"),
]


@pytest.fixture(scope="module")
def gsm8k_dir(tmp_path_factory) -> Path:
    """A GSM8K-format directory (train.jsonl, test.jsonl) of a few problems: no shared data needed."""
    path = tmp_path_factory.mktemp("gsm8k")
    for split in ("train", "test"):
        lines = [json.dumps({"question": q, "answer": a}, ensure_ascii=False) for q, a in GSM8K_ROWS]
        (path / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module", autouse=True)
def _reward_module(tmp_path_factory):
    with rule_module(tmp_path_factory.mktemp("realmodel-rewards"), "realmodel_rewards", REWARDS):
        yield


def _train_args(standin_dir: Path, gsm8k_dir: Path) -> list[str]:
    return [
        "reward.rules=[{name:noisy,_target_:realmodel_rewards.noisy,weight:1.0}]",
        "model=qwen",
        f"model.name_or_path={standin_dir}",
        "data=gsm8k",
        f"data.path={gsm8k_dir}",
        f"train.steps={STEPS}",
        "train.prompts_per_step=2",
        "algo.group_size=2",
        f"rollout.max_new_tokens={MAX_NEW}",
        "train.eval_every=0",
        "train.lr=1e-2",
        "lora.r=4",
        "console=plain",
    ]


@pytest.fixture(scope="module")
def trained(standin_dir, gsm8k_dir, tmp_path_factory):
    """`grpo train model=qwen model.name_or_path=<stand-in> data=gsm8k ... train.eval_every=0`, 2 steps,
    with every warning recorded and the held-out generation calls counted."""
    run_dir = tmp_path_factory.mktemp("qwen-run")
    cfg, _ = compose_config("train", _train_args(standin_dir, gsm8k_dir))
    validate(cfg)
    calls = []
    real_rollout = heldout.held_out_rollout

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real_rollout(*args, **kwargs)

    heldout.held_out_rollout = counting
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train.run(cfg, str(run_dir), overrides=[])
    finally:
        heldout.held_out_rollout = real_rollout
    return {"dir": run_dir, "cfg": cfg, "warnings": caught, "held_out_calls": calls}


@pytest.mark.slow
def test_train_model_qwen_on_the_standin_runs_two_steps(trained):
    rows = read_metrics(trained["dir"])
    assert [r["step"] for r in rows] == [1, 2]  # no step-0 row: eval_every=0 evaluates nothing
    assert all(0 < r["completion_len"] <= MAX_NEW and r["grad_norm"] > 0 for r in rows)
    assert (trained["dir"] / f"checkpoint-{STEPS}" / "adapter_config.json").is_file()
    saved = (trained["dir"] / f"checkpoint-{STEPS}" / "config.yaml").read_text()
    assert f"max_new_tokens: {MAX_NEW}" in saved and "chat_template: true" in saved


@pytest.mark.slow
def test_eval_every_zero_generates_no_held_out_completion(trained):
    assert trained["held_out_calls"] == []
    assert not any(k.startswith("eval/") for r in read_metrics(trained["dir"]) for k in r)


def test_held_out_schedule(standin_dir, gsm8k_dir):
    cfg, _ = compose_config("train", _train_args(standin_dir, gsm8k_dir))
    tr = cfg.train
    tr.steps = 10
    assert [s for s in range(11) if heldout.held_out_due(s, tr)] == []
    tr.eval_at_ends = True
    assert [s for s in range(11) if heldout.held_out_due(s, tr)] == [0, 10]
    tr.eval_at_ends, tr.eval_every = False, 4
    assert [s for s in range(11) if heldout.held_out_due(s, tr)] == [0, 4, 8, 10]
    tr.eval_problems = 0
    assert [s for s in range(11) if heldout.held_out_due(s, tr)] == []


@pytest.mark.slow
def test_no_deprecation_warnings_from_our_calls_into_transformers(trained):
    # Every FutureWarning / DeprecationWarning of the run (a train step, rollout with the KV cache,
    # grouped log-probs, a checkpoint save). The run installs a filter for one peft-internal warning.
    noisy = [
        f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})"
        for w in trained["warnings"]
        if issubclass(w.category, (FutureWarning, DeprecationWarning))
    ]
    assert noisy == []


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft's call, not ours
def test_checkpoint_reloads_with_plain_peft_to_the_same_logprobs(trained, standin_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpo_cli.models.logprobs import completion_logprobs

    ckpt = trained["dir"] / f"checkpoint-{STEPS}"
    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = tok("Tom has 3 apples. 日本 #### 7", return_tensors="pt")["input_ids"]
    mask = torch.ones_like(ids)
    base = AutoModelForCausalLM.from_pretrained(standin_dir, dtype=torch.float32)
    plain = PeftModel.from_pretrained(base, ckpt).eval()
    with torch.no_grad():
        logits = plain(input_ids=ids, attention_mask=mask).logits.double()
        ref = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        with plain.disable_adapter():
            untrained = torch.log_softmax(plain(input_ids=ids).logits.double()[:, :-1], -1)
            untrained = untrained.gather(-1, ids[:, 1:, None]).squeeze(-1)
    cfg = trained["cfg"]
    ours = load_policy(cfg.model, cfg.lora, beta=0.0, checkpoint=str(ckpt), trainable=False)
    with torch.no_grad():
        got = completion_logprobs(ours.model.eval(), ids, mask, 1).double()
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    assert (ref - untrained).abs().max() > 1e-3  # the adapter was trained: the comparison has teeth


@pytest.mark.slow
def test_eval_on_the_checkpoint_takes_its_length_and_template(trained, standin_dir, gsm8k_dir, tmp_path):
    ckpt = trained["dir"] / f"checkpoint-{STEPS}"
    # No model=qwen, no rollout.max_new_tokens: both come from the checkpoint's run (gsm8k's default
    # would be 512 tokens and model.chat_template false).
    args = [
        f"checkpoint={ckpt}",
        f"model.name_or_path={standin_dir}",
        "data=gsm8k",
        f"data.path={gsm8k_dir}",
        "eval.problems=2",
        "eval.samples=2",
        "eval.k=[1,2]",
        "eval.bootstrap=10",
        "console=plain",
    ]
    cfg, _ = compose_config("eval", args)
    assert cfg.rollout.max_new_tokens == 512 and cfg.model.chat_template is False
    validate(cfg)
    out = evaluate.run(cfg, str(tmp_path), overrides=args)
    assert cfg.rollout.max_new_tokens == MAX_NEW and cfg.model.chat_template is True
    (entry,) = out["results"]
    assert entry["checkpoint"] == str(ckpt) and entry["n"] == 2
    assert {"pass@1", "pass@2", "greedy/pass@1", "completion_len"} <= set(entry["metrics"])
    records = [json.loads(line) for line in (tmp_path / "eval_completions.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 2 + 2
    assert all(1 <= r["tokens"] <= MAX_NEW for r in records)


def test_command_line_settings_win_over_the_checkpoints(tmp_path, caplog):
    from grpo_cli.run.saved import inherit

    ckpt = tmp_path / "checkpoint-5"
    ckpt.mkdir()
    (ckpt / "config.yaml").write_text(
        "model: {chat_template: true, system_prompt: Be brief.}\nrollout: {max_new_tokens: 300}\n"
        "data: {name: gsm8k, template: 'Q: {question}'}\n"
    )
    given = ["data=gsm8k", "rollout.max_new_tokens=64"]
    cfg, _ = compose_config("eval", given)
    with caplog.at_level("INFO", logger="grpo_cli"):
        taken = inherit(cfg, ["base", str(ckpt)], given)
    assert cfg.rollout.max_new_tokens == 64  # given on the command line
    assert (cfg.model.chat_template, cfg.model.system_prompt, cfg.data.template) == (
        True,
        "Be brief.",
        "Q: {question}",
    )
    assert set(taken) == {"model.chat_template", "model.system_prompt", "data.template"}
    assert "model.chat_template=True" in caplog.text
    other, _ = compose_config("eval", ["data=math500"])  # another data source: its own template stays
    inherit(other, [str(ckpt)], [])
    assert other.rollout.max_new_tokens == 300 and other.data.template != "Q: {question}"


@pytest.mark.slow
def test_sample_on_the_standin(standin_dir, gsm8k_dir, tmp_path, caplog):
    from grpo_cli.commands import sample

    args = [
        "model=qwen",
        f"model.name_or_path={standin_dir}",
        "data=gsm8k",
        f"data.path={gsm8k_dir}",
        "sample.prompts=2",
        "algo.group_size=2",
        "rollout.max_new_tokens=3",
        "console=plain",
    ]
    cfg, _ = compose_config("sample", args)
    validate(cfg)
    with caplog.at_level("INFO", logger="grpo_cli"):
        records = sample.run(cfg, str(tmp_path))
    assert len(records) == 4 and [r["prompt_index"] for r in records] == [0, 0, 1, 1]
    assert all(1 <= r["tokens"] <= 3 for r in records)
    assert (
        json.loads((tmp_path / "samples.jsonl").read_text().splitlines()[0])["prompt"] == records[0]["prompt"]
    )
    assert "sampling: 4 completions" in caplog.text  # the progress task's closing line


# ---------------------------------------------------------------------------- prompts and decoding


@pytest.fixture(scope="module")
def policy(standin_dir):
    from grpo_cli.config import LoraConfig, ModelConfig

    return load_policy(
        ModelConfig(name_or_path=str(standin_dir), dtype="float32", chat_template=True),
        LoraConfig(enabled=False),
        beta=0.0,
        trainable=False,
    )


def test_encoded_prompt_starts_with_the_templates_first_special_token(policy):
    tok = policy.tokenizer
    ids, mask = encode_prompts(tok, ["Hi", "What is 12 + 30?"], True, torch.device("cpu"))
    assert tok.padding_side == "left" and tok.pad_token_id == ENDOFTEXT
    for row, m in zip(ids, mask):
        first = int(m.argmax())  # the first real token (left padding before it)
        assert int(row[first]) == IM_START
        assert (row[:first] == ENDOFTEXT).all() and not m[:first].any()
        assert int(row[-1]) == 198 or tok.decode(row[-3:]) == "assistant\n"  # ends at the reply's opening
    assert mask[0].sum() < mask[1].sum()  # the shorter prompt is the padded one
    custom, _ = encode_prompts(tok, ["Hi"], True, torch.device("cpu"), system_prompt="Be brief.")
    assert tok.decode(custom[0]).startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_batched_greedy_decoding_equals_one_prompt_at_a_time(policy):
    from grpo_cli.config import RolloutConfig

    prompts = ["Hi", "A book costs 12 € and a pen 3 €. What do both cost?"]
    rows = [{"id": str(i)} for i in range(2)]
    ro = RolloutConfig(max_new_tokens=3)
    together = roll_out(policy, rows, prompts, 1, ro, chat_template=True, greedy=True)
    for i in range(2):
        alone = roll_out(policy, rows[i : i + 1], prompts[i : i + 1], 1, ro, chat_template=True, greedy=True)
        assert (
            together.completion_ids[i, : alone.completion_ids.size(1)].tolist()
            == alone.completion_ids[0].tolist()
        )


def _scripted(policy, script: list[int]):
    """A forward hook making the output layer pick ``script[k]`` at the k-th call (prefill = 0)."""
    calls = [0]

    def hook(module, args, out):
        forced = torch.full_like(out, -1e4)
        forced[..., script[min(calls[0], len(script) - 1)]] = 0.0
        calls[0] += 1
        return forced

    return policy.model.get_output_embeddings().register_forward_hook(hook)


@pytest.mark.parametrize("stop", [IM_END, ENDOFTEXT])
def test_completion_stops_at_either_eos_and_its_mask_covers_it(policy, stop):
    from grpo_cli.config import RolloutConfig

    tok = policy.tokenizer
    text = "日 é"
    body = tok(text, add_special_tokens=False)["input_ids"]
    # The three bytes of 日 are separate tokens: a decoder working token by token would break it.
    assert len(body) > 3
    handle = _scripted(policy, [*body, stop, *body])
    try:
        ro = roll_out(
            policy, [{"id": "0"}], ["Say it."], 2, RolloutConfig(max_new_tokens=20), chat_template=True
        )
    finally:
        handle.remove()
    n = len(body) + 1
    assert ro.completion_ids.shape == (2, n)  # decoding ended at the EOS: no column after it
    assert ro.completion_ids[:, : n - 1].tolist() == [body, body]
    assert ro.completion_ids[:, -1].tolist() == [stop, stop]
    assert ro.completion_mask.tolist() == [[1] * n, [1] * n]  # EOS included in the loss mask
    assert ro.texts == [text, text]  # whole characters, no EOS text


def test_rows_after_eos_are_masked_in_a_longer_batch(policy):
    from grpo_cli.engines.hf.decode import sample_group

    tok = policy.tokenizer
    ids, mask = encode_prompts(tok, ["a"], True, torch.device("cpu"))
    # Row 0 ends at step 2 (<|im_end|>), row 1 runs to the budget: the EOS set is {im_end, endoftext}.
    script = {0: [17, 17], 1: [IM_END, 18], 2: [19, 19], 3: [20, 20]}
    calls = [0]

    def hook(module, args, out):
        forced = torch.full_like(out, -1e4)
        picks = script[min(calls[0], 3)][-out.size(0) :]
        for r, t in enumerate(picks):
            forced[r, -1, t] = 0.0
        calls[0] += 1
        return forced

    handle = policy.model.get_output_embeddings().register_forward_hook(hook)
    try:
        c_ids, c_mask = sample_group(
            policy.model, ids, mask, 2, 4, policy.eos_ids, tok.pad_token_id, decoding=Decoding(greedy=True)
        )
    finally:
        handle.remove()
    assert policy.eos_ids == (IM_END, ENDOFTEXT)
    assert c_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert c_ids[0, :2].tolist() == [17, IM_END]


# ---------------------------------------------------------------------------- bf16 and progress


@pytest.mark.slow
def test_bf16_weights_train_a_step_on_cpu_with_fp32_logprobs(standin_dir, gsm8k_dir, tmp_path):
    from grpo_cli.config import LoraConfig, ModelConfig
    from grpo_cli.models.logprobs import completion_logprobs

    args = [
        *_train_args(standin_dir, gsm8k_dir),
        "model.dtype=bfloat16",
        "train.steps=1",
        "rollout.max_new_tokens=2",
    ]
    cfg, _ = compose_config("train", args)
    validate(cfg)
    train.run(cfg, str(tmp_path), overrides=[])
    (row,) = read_metrics(tmp_path)
    assert row["loss"] == row["loss"] and row["grad_norm"] > 0
    policy = load_policy(ModelConfig(name_or_path=str(standin_dir), dtype="bfloat16"), LoraConfig(), beta=0.0)
    assert next(policy.model.parameters()).dtype == torch.bfloat16
    ids = torch.tensor([[IM_START, 17, 18, 19]])
    logps = completion_logprobs(policy.model, ids, torch.ones_like(ids), 1)
    assert logps.dtype == torch.float32 and logps.requires_grad


def test_generation_progress_shows_completions_and_tokens_per_second(caplog):
    import io

    from rich.console import Console

    from grpo_cli.run.progress import GenerationProgress, cost_line

    console = Console(file=io.StringIO(), force_terminal=True, width=160)
    bars = GenerationProgress(console)
    with caplog.at_level("INFO", logger="grpo_cli"), bars.task("held-out: sampling", 8) as advance:
        advance(4, 100)
        bars._progress.refresh()
        shown = console.file.getvalue()
        advance(4, 60)
    assert "held-out: sampling" in shown and "4/8" in shown and "tokens/s" in shown
    assert "held-out: sampling: 8 completions, 160 tokens in" in caplog.text
    assert cost_line("held-out evaluation", 200, 4, True, 512, 3) == (
        "held-out evaluation: 200 problems x (4 samples + 1 greedy) = 1,000 completions of up to 512 "
        "tokens (<= 512,000 tokens), 3 times in this run"
    )
