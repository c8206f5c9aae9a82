"""`grpo export`: the exported directory is the checkpoint as the trainer loads it (token log-probs equal
within 1e-5 in float32, LoRA merged or full) and loads with transformers alone; a damaged checkpoint and
a non-empty ``out`` are one-line refusals (exit 2) that write nothing.

The checkpoints come from 2-step ``grpo train`` runs on the random 2-layer Qwen2 (conftest), with a
test-local reward that varies within a group, so both steps move the weights (LoRA's B leaves zero).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import rule_module
from helpers import run_train

from grpo_cli.cli import compose_config
from grpo_cli.commands import eval as evaluate
from grpo_cli.commands import export
from grpo_cli.data import build_prompt, load_rows
from grpo_cli.models import load_policy

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]
REWARDS = """
import zlib

def noisy(completions, rows):
    return [float(zlib.crc32(c.encode()) % 4 == 3) for c in completions]
"""
RULE = "reward.rules=[{name:noisy,_target_:grpo_export_rewards.noisy,weight:1.0}]"
LORA = {"lora": ["lora=default", "lora.r=4"], "full": ["lora=none"]}


@pytest.fixture(scope="module")
def rewards_dir(tmp_path_factory) -> Path:
    """Holds the test's reward rule: on sys.path here, on PYTHONPATH for subprocesses."""
    with rule_module(tmp_path_factory.mktemp("rewards"), "grpo_export_rewards", REWARDS) as path:
        yield path


@pytest.fixture(scope="module")
def checkpoints(random_model_dir, rewards_dir, tmp_path_factory) -> dict[str, Path]:
    """checkpoint-2 of a LoRA (r 4) and of a full fine-tuning run, 2 steps each."""
    base = [
        f"model.name_or_path={random_model_dir}", RULE, "train.steps=2", "train.prompts_per_step=2",
        "algo.group_size=4", "rollout.max_new_tokens=4", "train.eval_problems=0", "data.train_size=64",
        "data.test_size=8", "train.lr=1e-2", "console=plain",
    ]  # fmt: skip
    out = {}
    for kind, lora in LORA.items():
        run_dir = tmp_path_factory.mktemp(kind)
        run_train([*base, *lora], run_dir)
        out[kind] = run_dir / "checkpoint-2"
    return out


def run_export(checkpoint: Path, out: Path, *extra: str) -> Path:
    cfg, _ = compose_config("export", [f"checkpoint={checkpoint}", f"out={out}", *extra])
    return export.run(cfg, str(out.parent), overrides=[])


def token_logprobs(model, tokenizer, texts: list[str]) -> list[torch.Tensor]:
    """log p(token t | tokens < t) [T - 1] of each text, one forward each (no padding to differ)."""
    out = []
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            logits = model(input_ids=ids).logits.float()[0, :-1]  # [T - 1, V]
            out.append(logits.log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0])
    return out


def held_out_texts(random_model_dir: Path) -> list[str]:
    """Four held-out prompts with their gold answers: text none of the runs trained on."""
    cfg, _ = compose_config("eval", [f"model.name_or_path={random_model_dir}", "data.test_size=8"])
    return [build_prompt(r, cfg.data.template) + " " + r["answer"] for r in load_rows(cfg.data, "test")[:4]]


@pytest.mark.parametrize("kind", list(LORA))
def test_export_has_the_checkpoints_logprobs_and_loads_without_peft(
    kind, checkpoints, random_model_dir, tmp_path
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = checkpoints[kind]
    out = run_export(ckpt, tmp_path / "exported", "dtype=float32")
    assert not (out / "adapter_config.json").exists() and (out / "generation_config.json").is_file()
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in name for name, _ in exported.named_parameters())
    assert exported.dtype == torch.float32
    # as grpo train / grpo eval load it: base + adapter (not merged), or the full weights
    cfg, _ = compose_config(
        "eval",
        [f"model.name_or_path={random_model_dir}", "model.dtype=float32", "model.device=cpu", *LORA[kind]],
    )
    trained = load_policy(cfg.model, cfg.lora, 0.0, checkpoint=str(ckpt), trainable=False)
    assert trained.is_lora == (kind == "lora")
    tok = AutoTokenizer.from_pretrained(out)
    assert (
        tok.chat_template == trained.tokenizer.chat_template
        and tok.get_vocab() == trained.tokenizer.get_vocab()
    )
    texts = held_out_texts(random_model_dir)
    base = AutoModelForCausalLM.from_pretrained(random_model_dir, dtype=torch.float32).eval()
    want = token_logprobs(trained.model.eval(), tok, texts)
    got = token_logprobs(exported, tok, texts)
    before = token_logprobs(base, tok, texts)
    for w, g, b in zip(want, got, before):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)
        assert (w - b).abs().max() > 1e-3  # training moved them: the equality is not the base's own


def test_dtype_key_sets_the_written_weights(checkpoints, tmp_path):
    from safetensors import safe_open

    out = run_export(checkpoints["lora"], tmp_path / "bf16", "dtype=bfloat16")
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


def grpo(command: str, *args: str, rewards_dir: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(rewards_dir), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    return subprocess.run([sys.executable, "-m", "grpo_cli", command, *args, f"hydra.run.dir={tmp_path / command}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip


def test_a_damaged_checkpoint_is_refused_in_evals_one_line(
    checkpoints, random_model_dir, rewards_dir, tmp_path
):
    ckpt = tmp_path / "checkpoint-2"
    shutil.copytree(checkpoints["full"], ckpt)
    weights = ckpt / "model.safetensors"  # listed in the manifest
    weights.write_bytes(weights.read_bytes()[:1000])
    out = tmp_path / "exported"
    refused = grpo("export", f"checkpoint={ckpt}", f"out={out}", rewards_dir=rewards_dir, tmp_path=tmp_path)
    by_eval = grpo("eval", f"checkpoint={ckpt}", f"model.name_or_path={random_model_dir}", "lora=none",
                   rewards_dir=rewards_dir, tmp_path=tmp_path)  # fmt: skip
    assert refused.returncode == by_eval.returncode == 2, refused.stderr[-2000:]
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert lines == [f"grpo export: error: {ckpt}: not a whole checkpoint: model.safetensors: size (1,000 bytes, "
                     f"the manifest says {(checkpoints['full'] / 'model.safetensors').stat().st_size:,})"]  # fmt: skip
    assert [
        line.replace("grpo eval", "grpo export") for line in by_eval.stderr.splitlines() if line.strip()
    ] == lines
    assert not out.exists() and not out.with_name("exported.partial").exists()


def test_a_non_empty_out_is_refused_and_left_as_it_was(checkpoints, rewards_dir, tmp_path):
    out = tmp_path / "exported"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    refused = grpo("export", f"checkpoint={checkpoints['lora']}", f"out={out}", rewards_dir=rewards_dir,
                   tmp_path=tmp_path)  # fmt: skip
    assert refused.returncode == 2
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert lines == [
        f"grpo export: error: out={out}: exists and is not empty; name a new directory (nothing was written)"
    ]
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine\n"


def test_grpo_eval_of_the_export_equals_grpo_eval_of_the_checkpoint(checkpoints, random_model_dir, tmp_path):
    """The same pass@1 and the same completions: the export samples what the checkpoint samples."""
    out = run_export(checkpoints["lora"], tmp_path / "exported", "dtype=float32")
    shared = [RULE, "data.test_size=8", "eval.problems=6", "eval.samples=2", "eval.k=[1]", "eval.bootstrap=20",
              "rollout.max_new_tokens=4", "seed=3", "model.dtype=float32", "model.device=cpu"]  # fmt: skip
    results = {}
    for name, given in (
        (
            "checkpoint",
            [f"model.name_or_path={random_model_dir}", *LORA["lora"], f"checkpoint={checkpoints['lora']}"],
        ),
        ("export", [f"model.name_or_path={out}", "lora=none"]),
    ):
        cfg, _ = compose_config("eval", [*shared, *given])
        results[name] = evaluate.run(cfg, str(tmp_path / name), overrides=[*shared, *given])["results"][0]
        records = (tmp_path / name / "eval_completions.jsonl").read_text().splitlines()
        results[name]["completions"] = [json.loads(r)["completion"] for r in records]
    a, b = results["checkpoint"], results["export"]
    assert a["metrics"]["pass@1"] == b["metrics"]["pass@1"]
    assert a["completions"] == b["completions"]
