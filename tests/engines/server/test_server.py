"""rollout.engine=vllm-server against two local `grpo serve` servers of the tiny model (vLLM's CPU
build): token ids in and out, weights broadcast over gloo after each update and checked, faults in
one line. The servers start once per session (~1 minute); skipped without vLLM."""

from __future__ import annotations

import pytest
import torch

from grpo_cli.cli import compose_config, main
from grpo_cli.commands.validate import validate
from grpo_cli.engines import Decoding, Request, build_engine
from grpo_cli.engines.server import ServerEngine, SyncFailed
from grpo_cli.engines.server import group as weight_group
from grpo_cli.models import load_policy
from grpo_cli.models.logprobs import completion_logprobs

TOL = 1e-3  # the bound; measured ~1e-6 in float32 on CPU


def _cfg(urls, *overrides):
    servers = "[" + ",".join(urls) + "]"
    cfg, _ = compose_config("train", ["rollout.engine=vllm-server", f"rollout.servers={servers}", *overrides])
    validate(cfg)
    return cfg


PROBES = [[5, 6, 7, 8, 9, 10, 11, 12], [20, 21, 22, 23, 24, 25], [3, 4, 30, 31, 32, 33, 34]]
START = 3  # the probe's tokens from here are scored, each given those before it


def _trainer_logps(policy) -> list[torch.Tensor]:
    out = []
    with torch.no_grad():
        for seq in PROBES:
            ids = torch.tensor([seq])
            out.append(completion_logprobs(policy.model, ids, torch.ones_like(ids), START)[0].double())
    return out


def _server_diff(engine: ServerEngine, policy) -> list[float]:
    """max |server - trainer| over the probes' tokens, per server."""
    ours = _trainer_logps(policy)
    theirs = engine.score(PROBES, [START] * len(PROBES))
    return [
        max(float((torch.tensor(t, dtype=torch.float64) - o).abs().max()) for t, o in zip(per, ours))
        for per in theirs
    ]


def _step(policy, lr=1e-2):
    """One plain optimizer step that moves the probes' log-probs."""
    opt = torch.optim.SGD([p for p in policy.model.parameters() if p.requires_grad], lr=lr)
    ids = torch.tensor([PROBES[0]])
    (-completion_logprobs(policy.model, ids, torch.ones_like(ids), START).sum()).backward()
    opt.step()


@pytest.mark.parametrize("lora", ["none", "default"])
def test_weights_reach_every_server_and_their_logprobs_are_the_trainers(tiny_servers, lora):
    """After each sync both servers' log-probs on probe sequences equal the trainer's within 1e-3 and
    differ from before it; a skipped sync leaves them measurably behind; the version is reported."""
    cfg = _cfg(tiny_servers, f"lora={lora}", "algo.beta=0.0")
    torch.manual_seed(0)
    policy = load_policy(cfg.model, cfg.lora, beta=0.0)
    engine = build_engine(policy, cfg.rollout, cfg.model, cfg.seed)  # syncs once
    assert max(_server_diff(engine, policy)) < TOL
    before = engine.score(PROBES, [START] * len(PROBES))
    for _ in range(2):
        _step(policy, lr=0.1 if lora == "default" else 1e-2)
        engine.sync()
        assert max(_server_diff(engine, policy)) < TOL
    after = engine.score(PROBES, [START] * len(PROBES))
    moved = max(abs(a - b) for sa, sb in zip(after, before) for pa, pb in zip(sa, sb) for a, b in zip(pa, pb))
    assert moved > 100 * TOL
    for s in engine.servers:
        assert s.call("/weight_info")["weight_version"] == str(engine.version) == "3"
    _step(policy)  # no sync: the servers are behind
    assert min(_server_diff(engine, policy)) > 10 * TOL
    engine.sync()
    engine.close()


def test_generation_is_token_ids_in_and_out_with_the_servers_logprobs(tiny_servers):
    """Requests spread over both servers; the same seed gives the same tokens whichever serves it;
    the stop token ends and is kept; the returned log-probs are the trainer's (synced) within 1e-3."""
    cfg = _cfg(tiny_servers, "lora=none", "algo.beta=0.0")
    policy = load_policy(cfg.model, cfg.lora, beta=0.0)
    engine = build_engine(policy, cfg.rollout, cfg.model, cfg.seed)
    eos = policy.tokenizer.eos_token_id
    prompt = policy.tokenizer("Calculate 2 + 3 =")["input_ids"]
    reqs = [Request(prompt, 4, 12, (eos,), seed=7), Request(prompt, 4, 12, (eos,), seed=7)]
    a, b = engine.generate(reqs, Decoding(temperature=1.0))  # request 0 to server 0, 1 to server 1
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    for c in a:
        assert c.token_ids[-1] == eos or len(c.token_ids) == 12
        assert eos not in c.token_ids[:-1]
        ids = torch.tensor([prompt + c.token_ids])
        with torch.no_grad():
            ours = completion_logprobs(policy.model, ids, torch.ones_like(ids), len(prompt))[0]
        assert float((torch.tensor(c.logprobs) - ours).abs().max()) < TOL
    engine.close()


def test_a_sync_whose_bytes_do_not_match_is_an_error(tiny_servers, monkeypatch):
    """The workers' checksum of what they received must equal the trainer's: here the trainer's
    fingerprint is made to differ, and the sync raises, naming the server, instead of passing."""
    cfg = _cfg(tiny_servers, "lora=none", "algo.beta=0.0")
    policy = load_policy(cfg.model, cfg.lora, beta=0.0)
    engine = build_engine(policy, cfg.rollout, cfg.model, cfg.seed)
    real = weight_group.checksum
    monkeypatch.setattr(weight_group, "checksum", lambda ts: real(ts) + 1.0)
    with pytest.raises(SyncFailed, match=tiny_servers[0]):
        engine.sync()


def test_an_unreachable_server_is_one_line_before_any_model_loads(capsys, monkeypatch):
    """A URL nobody answers: exit 2, one line naming it; the model is never loaded."""
    import grpo_cli.models as models

    monkeypatch.setattr(models, "load_policy", lambda *a, **k: pytest.fail("a model was loaded"))
    url = "http://127.0.0.1:9"
    rc = main(["train", "rollout.engine=vllm-server", f"rollout.servers=[{url}]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and url in err[0] and "grpo serve" in err[0]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["rollout.engine=vllm-server"], "needs rollout.servers"),
        (["rollout.engine=vllm-server", "rollout.servers=[localhost:8000]"], "not an http"),
        (["rollout.max_staleness=1"], "needs rollout.engine=vllm-server"),
        (["rollout.max_staleness=-1"], "must be >= 0"),
        (["algo.engine_is.mode=clip"], "algo.engine_is.mode"),
    ],
)
def test_bad_server_settings_are_one_line(overrides, match, capsys):
    assert main(["train", *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0]


@pytest.mark.slow
def test_calc_episodes_on_the_server_are_token_exact(tools_server):
    """env=calc model=tiny-tools on the server: each later turn goes out as the earlier ids + the
    sampled ids + the tool's ids (nothing re-tokenised), and the trainer's log-probs over whole
    episodes equal the server's on the model's tokens within 1e-3."""
    from grpo_cli.data import load_rows
    from grpo_cli.envs.episode import episode_spec
    from grpo_cli.models.logprobs import grouped_completion_logprobs
    from grpo_cli.rollout.generate import PromptFormat, Sampler

    cfg = _cfg(tools_server, "env=calc", "model=tiny-tools", "data=arithmetic", "lora=none", "algo.beta=0.0")
    policy = load_policy(cfg.model, cfg.lora, beta=0.0)
    engine = build_engine(policy, cfg.rollout, cfg.model, cfg.seed)
    spec = episode_spec(cfg.env, policy, cfg.rollout)
    seen = []

    class Recorder:
        name = engine.name

        def generate(self, requests, decoding, progress=None):
            seen.extend(requests)
            return engine.generate(requests, decoding, progress)

    rows = load_rows(cfg.data, "test")[:8]
    fmt = PromptFormat.of(cfg.data, cfg.model)
    ro = Sampler(Recorder(), policy, fmt, spec, cfg.rollout).generate(rows, 4, seeds=list(range(8)))
    spec.close()
    model = ro.model_mask.bool()
    assert (~model & ro.completion_mask.bool()).any(), "no tool tokens: no episode called the calculator"
    full = [
        p[m.bool()].tolist() + c[k.bool()].tolist()
        for p, m, c, k in zip(ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask)
    ]
    later = seen[len(rows) :]
    assert later, "every episode ended in one turn"
    for req in later:
        assert any(f[: len(req.prompt_ids)] == req.prompt_ids for f in full)
    with torch.no_grad():
        ours = grouped_completion_logprobs(
            policy.model, ro.prompt_ids[::4], ro.prompt_mask[::4], ro.completion_ids, ro.completion_mask, 4
        )
    assert float((ours[model] - ro.engine_logps[model]).abs().max()) < TOL


@pytest.mark.slow
def test_train_on_two_servers_keeps_them_in_sync_every_step(tiny_servers, tmp_path):
    """`grpo train rollout.engine=vllm-server` on both servers, full fine-tuning: logprob_diff < 1e-3
    at every step (the servers sample the weights of the step), and after the run both servers'
    probe log-probs equal the final checkpoint's."""
    from helpers import metric_rows, run_train

    from grpo_cli.models import load_policy as load

    servers = "rollout.servers=[" + ",".join(tiny_servers) + "]"
    run_train(["rollout.engine=vllm-server", servers, "lora=none", "train.steps=6", "train.eval_every=0",
               "train.eval_at_ends=false", "train.lr=1e-3", "console=plain"], tmp_path)  # fmt: skip
    rows = metric_rows(tmp_path)
    assert all(rows[s]["rollout/logprob_diff"] < TOL for s in range(1, 7)), rows
    cfg = _cfg(tiny_servers, f"model.name_or_path={tmp_path / 'checkpoint-6'}", "lora=none", "algo.beta=0.0")
    final = load(cfg.model, cfg.lora, beta=0.0)
    probe = ServerEngine(final, tiny_servers, 60, 60)  # no sync: what the servers hold now
    assert max(_server_diff(probe, final)) < TOL


def test_the_request_body_carries_min_p_off_for_greedy():
    """rollout.min_p goes to vLLM's server in the request body (its ``min_p``), 0 for greedy decoding."""
    from grpo_cli.engines import Decoding, Request
    from grpo_cli.engines.server import ServerEngine

    engine = ServerEngine.__new__(ServerEngine)  # no server: only the body is built
    engine.servers, engine.model_ids, engine.max_model_len = [None], ["m"], 0
    req = Request([5, 6], 4, 8, (0,), seed=3)
    assert engine._body(0, req, Decoding(temperature=0.9, min_p=0.25))["min_p"] == 0.25
    assert engine._body(0, req, Decoding(min_p=0.25, greedy=True))["min_p"] == 0.0
    assert engine._body(0, req, Decoding())["min_p"] == 0.0
