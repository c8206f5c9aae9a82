"""Generation engines: the hf loop and colocated vLLM (``rollout.engine``) agree with the trainer.

The vLLM tests need `make install-vllm` (CI installs it; elsewhere they skip) and share one engine per
module: start-up and the first call cost ~40 s on 2 cores, later calls and weight pushes are fast.
Every engine here gets a small KV cache (sized from the run), never vLLM's default of ~90% of RAM.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from helpers import roll_out, sequence_logprobs

from grpo_cli import engines
from grpo_cli.cli import compose_config, main
from grpo_cli.commands.validate import validate
from grpo_cli.data import build_prompt, load_rows
from grpo_cli.engines import Decoding
from grpo_cli.models import load_policy
from grpo_cli.models.logprobs import completion_logprobs
from grpo_cli.rewards import build_rewarder
from grpo_cli.rollout.generate import PromptFormat, longest_prompt, score

needs_vllm = pytest.mark.skipif(not engines.vllm_available(), reason="vLLM not installed (make install-vllm)")
TOL = 1e-4  # float32: the engine's log-probs of fixed completions equal the trainer's within this


def _cfg(*overrides: str):
    cfg, _ = compose_config("train", ["rollout.engine=vllm", "console=plain", *overrides])
    validate(cfg)
    return cfg


def test_missing_vllm_is_one_line_exit_2(monkeypatch, capsys):
    """Without vLLM, rollout.engine=vllm names the make target and exits 2 before any model loads."""
    monkeypatch.setattr(engines, "vllm_available", lambda: False)
    loaded = []
    monkeypatch.setattr("grpo_cli.models.load_policy", lambda *a, **k: loaded.append(1))
    for command in ("train", "sample", "eval"):
        assert main([command, "rollout.engine=vllm"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "make install-vllm" in err[0], err
    assert main(["train", "rollout.engine=nope"]) == 2
    assert "choose one of: hf, vllm" in capsys.readouterr().err
    assert not loaded


def test_hf_engine_requests_stop_at_any_stop_id_with_trainer_logprobs(random_model_dir):
    """Token ids in, token ids out: each completion ends at its first stop id (kept), its log-probs are
    the trainer's at the sampling temperature, and a request's seed fixes its draws."""
    from grpo_cli.engines import Decoding, Request

    cfg, _ = compose_config("sample", [f"model.name_or_path={random_model_dir}", "lora=none"])
    policy = load_policy(cfg.model, cfg.lora, beta=0.0, trainable=False)
    engine = engines.build_engine(policy, cfg.rollout, cfg.model, cfg.seed)
    assert engine.name == "hf"
    prompt = policy.tokenizer("Calculate 1 + 2")["input_ids"]
    gen = engine.generate([Request(prompt, 16, 12, (0,), seed=7)], Decoding(temperature=1.3))[0]
    assert len(gen) == 16
    stops = tuple({c.token_ids[3] for c in gen if len(c.token_ids) > 4})[:3]  # ids that occur mid-completion
    assert stops
    cut = engine.generate(
        [Request(prompt, 16, 12, (0, *stops), seed=7)], Decoding(temperature=1.3, logprobs=True)
    )[0]
    for full, c in zip(gen, cut):
        end = next((i + 1 for i, t in enumerate(full.token_ids) if t in (0, *stops)), len(full.token_ids))
        assert c.token_ids == full.token_ids[:end]
    assert any(len(c.token_ids) < len(f.token_ids) for f, c in zip(gen, cut))
    c = max(cut, key=lambda c: len(c.token_ids))
    ids = torch.tensor([prompt + c.token_ids])
    with torch.no_grad():
        ours = completion_logprobs(policy.model, ids, torch.ones_like(ids), len(prompt), temperature=1.3)
    assert torch.allclose(torch.tensor([c.logprobs]), ours, atol=1e-5)


# ------------------------------------------------------------------------------------------ vLLM


def _state() -> dict:
    from grpo_cli.engines.process import memory_policy

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state()[1].copy(),
        "torch": torch.get_rng_state().clone(),
        "set_num_threads": torch.set_num_threads,
        "threads": torch.get_num_threads(),
        "numa": memory_policy(),
    }


@pytest.fixture(scope="module")
def vllm_setup(tiny_model_path):
    """One engine for the module, started here with the process state recorded around the start."""
    from grpo_cli.engines.vllm import shutdown_all

    shutdown_all()  # start fresh: the side-effect tests watch a real start-up
    cfg = _cfg("lora=none", "algo.beta=0.0")
    policy = load_policy(cfg.model, cfg.lora, beta=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a value vLLM's start-up would not choose: is it kept?
    before = _state()
    rows = load_rows(cfg.data, "test")[:64]
    engine = engines.build_engine(policy, cfg.rollout, cfg.model, cfg.seed, _longest(policy, rows, cfg))
    after = _state()
    torch.set_num_threads(threads)
    yield {"cfg": cfg, "policy": policy, "engine": engine, "before": before, "after": after, "rows": rows}
    shutdown_all()


@needs_vllm
def test_engine_start_keeps_global_rng(vllm_setup):
    """LLM(seed=...) reseeds Python, NumPy and torch: the start-up leaves all three where they were."""
    b, a = vllm_setup["before"], vllm_setup["after"]
    assert a["python"] == b["python"]
    assert np.array_equal(a["numpy"], b["numpy"])
    assert torch.equal(a["torch"], b["torch"])


@needs_vllm
def test_engine_sampling_keeps_global_rng(vllm_setup):
    """Seeded requests still draw from the global torch RNG inside vLLM: a rollout leaves it untouched."""
    engine, cfg = vllm_setup["engine"], vllm_setup["cfg"]
    rows = vllm_setup["rows"][:4]
    prompts = [build_prompt(r, cfg.data.template) for r in rows]
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    roll_out(vllm_setup["policy"], rows, prompts, 4, cfg.rollout, seeds=[1, 2, 3, 4], engine=engine)
    assert torch.equal(torch.rand(3), expected)


@needs_vllm
def test_engine_start_keeps_thread_control(vllm_setup):
    """The CPU worker swaps torch.set_num_threads for a no-op: the original is back, and the count kept."""
    b, a = vllm_setup["before"], vllm_setup["after"]
    assert a["set_num_threads"] is b["set_num_threads"]
    assert a["threads"] == b["threads"] == 1
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    assert torch.get_num_threads() == 2
    torch.set_num_threads(threads)


@needs_vllm
def test_engine_start_keeps_numa_policy(vllm_setup):
    """The CPU worker binds the process to one NUMA node (MPOL_BIND): the policy is restored."""
    b, a = vllm_setup["before"], vllm_setup["after"]
    if b["numa"] is None:
        pytest.skip("the NUMA memory policy cannot be read on this platform")
    assert a["numa"] == b["numa"]


@needs_vllm
def test_kv_cache_is_sized_from_the_run(vllm_setup):
    """KV cache = rollout.batch_size sequences of max_model_len tokens, not vLLM's ~90% of RAM."""
    from grpo_cli.engines.vllm import kv_cache_bytes

    engine, cfg, policy = vllm_setup["engine"], vllm_setup["cfg"], vllm_setup["policy"]
    s = engine.settings
    prompts = [build_prompt(r, cfg.data.template) for r in vllm_setup["rows"]]
    longest = max(len(policy.tokenizer(p)["input_ids"]) for p in prompts)
    assert s["max_model_len"] == longest + cfg.rollout.max_new_tokens
    expected = kv_cache_bytes(policy.model.config, s["max_model_len"], cfg.rollout.batch_size, torch.float32)
    assert s["kv_cache_memory_bytes"] == expected < 64 * 2**20
    assert engine.llm.llm_engine.vllm_config.cache_config.kv_cache_memory_bytes == expected


def _fixed_completions(policy, rows, template, n_tokens=8):
    """Prompt ids [P, L] (left-padded) + completions [P, T]: random tokens, fixed by a seeded generator."""
    from helpers import encode_prompts

    tok = policy.tokenizer
    ids, mask = encode_prompts(tok, [build_prompt(r, template) for r in rows], False, policy.device)
    gen = torch.Generator().manual_seed(0)
    comp = torch.randint(3, len(tok) - 1, (ids.size(0), n_tokens), generator=gen)
    return ids, mask, comp


def _max_diff(engine, policy, ids, mask, comp) -> float:
    seqs = [p[m.bool()].tolist() + c.tolist() for p, m, c in zip(ids, mask, comp)]
    starts = [int(m.sum()) for m in mask]
    theirs = torch.tensor(sequence_logprobs(engine, seqs, starts))
    with torch.no_grad():
        full = torch.cat([ids, comp], 1)
        ours = completion_logprobs(
            policy.model, full, torch.cat([mask, torch.ones_like(comp)], 1), ids.size(1)
        )
    return float((theirs - ours).abs().max())


def _train_steps(policy, ids, mask, comp, steps, sync=None, lr=1e-2):
    """Plain optimizer steps (raise the fixed completions' log-probs), each followed by ``sync``."""
    params = [p for p in policy.model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    full, fmask = torch.cat([ids, comp], 1), torch.cat([mask, torch.ones_like(comp)], 1)
    for _ in range(steps):
        loss = -completion_logprobs(policy.model, full, fmask, ids.size(1)).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if sync is not None:
            sync()


@needs_vllm
@pytest.mark.parametrize("lora", ["none", "default"])
def test_weight_sync_is_exact(vllm_setup, lora):
    """Engine log-probs of fixed completions = the trainer's within 1e-4, before and after 3 updates.

    A step without its push leaves the engine measurably behind: the same check then fails.
    """
    from grpo_cli.engines.vllm import VLLMEngine

    cfg = _cfg(f"lora={lora}", "algo.beta=0.0")
    torch.manual_seed(0)
    policy = load_policy(cfg.model, cfg.lora, beta=0.0)
    engine = VLLMEngine.for_policy(
        policy, cfg.rollout, cfg.model, cfg.seed, _longest(policy, vllm_setup["rows"], cfg)
    )
    assert engine.llm is vllm_setup["engine"].llm  # the module's engine, re-pushed
    ids, mask, comp = _fixed_completions(policy, vllm_setup["rows"][:8], cfg.data.template)
    assert _max_diff(engine, policy, ids, mask, comp) < TOL
    _train_steps(policy, ids, mask, comp, 3, sync=engine.sync)
    assert _max_diff(engine, policy, ids, mask, comp) < TOL
    _train_steps(policy, ids, mask, comp, 1, sync=None)  # a skipped push
    assert _max_diff(engine, policy, ids, mask, comp) > 100 * TOL
    engine.sync()


def _rollouts(cfg, policy, rows, group_size, greedy, engine_name):
    prompts = [build_prompt(r, cfg.data.template) for r in rows]
    cfg.rollout.engine = engine_name
    engine = engines.build_engine(policy, cfg.rollout, cfg.model, cfg.seed, _longest(policy, rows, cfg))
    seeds = None if greedy else list(range(len(rows)))
    ro = roll_out(policy, rows, prompts, group_size, cfg.rollout, greedy=greedy, seeds=seeds, engine=engine)
    engine.close()
    return ro


def _longest(policy, rows, cfg) -> int:
    return longest_prompt(policy.tokenizer, rows, PromptFormat.of(cfg.data, cfg.model))


@needs_vllm
def test_greedy_matches_hf_token_for_token(vllm_setup):
    cfg, policy = vllm_setup["cfg"], vllm_setup["policy"]
    vllm_setup["engine"].sync()
    rows = vllm_setup["rows"][:32]
    hf = _rollouts(cfg, policy, rows, 1, True, "hf")
    vl = _rollouts(cfg, policy, rows, 1, True, "vllm")
    assert vl.engine_logps is not None and hf.engine_logps is None
    assert torch.equal(hf.completion_mask, vl.completion_mask)
    assert torch.equal(hf.completion_ids, vl.completion_ids)
    assert hf.texts == vl.texts


@needs_vllm
def test_sampled_reward_within_hf_interval(vllm_setup):
    """64 prompts x 8 samples each: vLLM's mean reward lies in the hf engine's 95% interval."""
    cfg, policy = vllm_setup["cfg"], vllm_setup["policy"]
    vllm_setup["engine"].sync()
    rows, G = vllm_setup["rows"], 8
    rewarder = build_rewarder(cfg.reward)
    try:
        hf = score(_rollouts(cfg, policy, rows, G, False, "hf"), rewarder)
        vl = score(_rollouts(cfg, policy, rows, G, False, "vllm"), rewarder)
    finally:
        rewarder.close()
    per_prompt = hf.rewards.view(-1, G).mean(1)  # prompts are the independent units
    mean, se = float(per_prompt.mean()), float(per_prompt.std()) / math.sqrt(len(per_prompt))
    assert 0.05 < mean < 0.95, mean  # the check means something only when rewards vary
    assert abs(float(vl.rewards.mean()) - mean) <= 1.96 * se, (float(vl.rewards.mean()), mean, se)
    # The engine's log-probs are the trainer's for the tokens it sampled (temperature 1, no filtering).
    with torch.no_grad():
        full = torch.cat([vl.prompt_ids, vl.completion_ids], 1)
        fmask = torch.cat([vl.prompt_mask, vl.completion_mask], 1)
        ours = completion_logprobs(policy.model, full, fmask, vl.prompt_ids.size(1))
    m = vl.completion_mask.bool()
    assert float((ours - vl.engine_logps)[m].abs().max()) < TOL


def test_sleep_mode_frees_between_rollouts_and_wakes_for_the_push(random_model_dir):
    """rollout.sleep on CUDA (no sleep mode on CPU, so a recording stand-in for vLLM's LLM): the trainer's
    pause puts the engine to sleep (level 2: weights too), the next sync wakes the weights, pushes, then
    wakes the KV cache; a rollout while asleep pushes first."""
    from grpo_cli.engines.vllm import VLLMEngine

    class Recorder:
        def __init__(self):
            self.calls = []

        def __getattr__(self, name):
            return lambda *a, **k: self.calls.append((name, k.get("tags", k.get("level"))))

    cfg, _ = compose_config("sample", [f"model.name_or_path={random_model_dir}", "lora=none"])
    policy = load_policy(cfg.model, cfg.lora, beta=0.0, trainable=False)
    llm = Recorder()
    engine = VLLMEngine(llm, policy, {"enable_sleep_mode": True, "max_model_len": 64})
    engine.pause()
    engine.pause()  # already asleep: nothing more
    engine.sync()
    assert llm.calls == [
        ("sleep", 2),
        ("wake_up", ["weights"]),
        ("collective_rpc", None),
        ("wake_up", ["kv_cache"]),
        ("reset_prefix_cache", None),
    ]
    engine.settings["enable_sleep_mode"] = False  # the CPU build: pause does nothing
    engine.pause()
    assert len(llm.calls) == 5 and not engine.asleep


@needs_vllm
def test_vllm_episodes_are_token_exact_and_their_logprobs_the_trainers(vllm_setup):
    """Multi-turn on vLLM: every later turn's input is an earlier input + sampled ids + the observation's
    ids, and the trainer's log-probs over whole episodes equal the engine's on model tokens (1e-4)."""
    from grpo_cli.envs import Observation
    from grpo_cli.envs.episode import EpisodeSpec, run_episodes
    from grpo_cli.models.logprobs import grouped_completion_logprobs
    from grpo_cli.rollout.generate import episode_rollout

    class Ok:
        stop_strings = ()

        def reset(self, row, seed):
            return None

        def step(self, state, text):
            return Observation(" ok")

    cfg, policy, engine = vllm_setup["cfg"], vllm_setup["policy"], vllm_setup["engine"]
    engine.sync()
    tok = policy.tokenizer
    rows = vllm_setup["rows"][:4]
    prompts = PromptFormat.of(cfg.data, cfg.model).encode(tok, rows)
    digits = tuple(tok.convert_tokens_to_ids(list("0123456789")))  # the tiny model's answers: a call each
    spec = EpisodeSpec(Ok(), tok, policy.eos_ids, digits, cfg.rollout.max_new_tokens, 3, 4, False)
    seen = []

    class Recorder:
        def generate(self, requests, decoding, progress=None):
            seen.extend(requests)
            return engine.generate(requests, decoding, progress)

    eps = run_episodes(Recorder(), spec, prompts, rows, 2, Decoding(), seeds=[1, 2, 3, 4])
    assert sum(e.tool_calls for e in eps) >= 4
    for req in seen[
        len(rows) :
    ]:  # later turns: a prefix of some episode's full ids, ending on an observation
        full = [p + e.ids for p, e in zip([p for p in prompts for _ in range(2)], eps)]
        assert any(f[: len(req.prompt_ids)] == req.prompt_ids for f in full)
        assert tok.decode(req.prompt_ids[-len(tok(" ok", add_special_tokens=False)["input_ids"]) :]) == " ok"
    ro = episode_rollout(tok, rows, prompts, eps, 2, policy.device)
    with torch.no_grad():
        ours = grouped_completion_logprobs(
            policy.model, ro.prompt_ids[::2], ro.prompt_mask[::2], ro.completion_ids, ro.completion_mask, 2
        )
    model = ro.model_mask.bool()
    assert float((ours[model] - ro.engine_logps[model]).abs().max()) < TOL


@needs_vllm
def test_min_p_on_vllm_keeps_the_hf_samplers_support(vllm_setup):
    """rollout.min_p on vLLM: every sampled token lies inside the support the hf sampler keeps
    (``filter_logits`` on the trainer's logits), and vLLM's log-prob of it, taken after its own min-p,
    equals the hf sampler's renormalised over that support (1e-4): a support differing by a token of
    the removed mass (> 1% per step on average here) would move it by more."""
    from grpo_cli.engines import Request
    from grpo_cli.engines.hf.decode import filter_logits

    cfg, policy, engine = vllm_setup["cfg"], vllm_setup["policy"], vllm_setup["engine"]
    engine.sync()
    prompts = PromptFormat.of(cfg.data, cfg.model).encode(policy.tokenizer, vllm_setup["rows"][:8])
    temperature, min_p = 1.5, 0.1
    reqs = [Request(p, 8, 12, tuple(policy.eos_ids), seed=i) for i, p in enumerate(prompts)]
    out = engine.generate(reqs, Decoding(temperature=temperature, min_p=min_p))
    removed, gaps, unfiltered = [], [], []
    for prompt, group in zip(prompts, out):
        for c in group:
            ids = torch.tensor([prompt + c.token_ids])
            with torch.no_grad():
                logits = policy.model(ids).logits[0, len(prompt) - 1 : -1].float()  # [T, V]
            kept = filter_logits(logits, temperature, 0, 1.0, min_p)
            tok, theirs = torch.tensor(c.token_ids)[:, None], torch.tensor(c.logprobs)
            ours = kept.log_softmax(-1).gather(1, tok).squeeze(1)
            assert torch.isfinite(ours).all(), "vLLM sampled a token min-p removes"
            gaps.append((ours - theirs).abs().max())
            p = torch.softmax(logits / temperature, -1)
            removed.append(p.masked_fill(torch.isfinite(kept), 0.0).sum(-1).mean())
            unfiltered.append((p.log().gather(1, tok).squeeze(1) - theirs).abs().max())
    assert float(torch.stack(gaps).max()) < TOL
    assert float(torch.stack(removed).mean()) > 0.01
    # The same check against the unfiltered distribution fails: vLLM did renormalise over a support.
    assert float(torch.stack(unfiltered).max()) > 100 * TOL
