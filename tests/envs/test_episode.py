"""Multi-turn episodes: token-exact turns, budgets, faults as observations, and tool tokens out of the loss.

A scripted engine (``Scripted``) answers each request with the next turn of a script, so every id an
episode holds is known; the hf engine on a random 2-layer model checks the same loop on a real engine,
where the log-probs the trainer recomputes over a whole episode must equal the sampler's.
"""

from __future__ import annotations

import sys

import pytest
import torch

from grpo_cli.config import AlgoConfig, EnvConfig, LoraConfig, ModelConfig, RolloutConfig
from grpo_cli.core.loss import policy_loss
from grpo_cli.engines import Completion, Decoding
from grpo_cli.engines.hf import HFEngine
from grpo_cli.envs import Observation
from grpo_cli.envs.calc import CalcEnv
from grpo_cli.envs.episode import CUT, EpisodeSpec, observation_ids, run_episodes
from grpo_cli.models import load_policy, load_tokenizer
from grpo_cli.models.logprobs import grouped_completion_logprobs
from grpo_cli.rollout.generate import episode_rollout

MARKERS = ["<calc>", "</calc>", "<result>", "</result>"]
CALC_END = 274  # the id "</calc>" gets in the random model's tokenizer (checked in the fixture)


@pytest.fixture(scope="module")
def tok(random_model_dir):
    t = load_tokenizer(str(random_model_dir))
    t.add_special_tokens({"additional_special_tokens": MARKERS})
    assert t.convert_tokens_to_ids("</calc>") == CALC_END
    return t


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


class Scripted:
    """An engine that answers a request with ``turns[t]`` (n copies), t the number of calls its input
    already holds (the last turn repeats), and records every request."""

    name = "scripted"

    def __init__(self, turns: list[list[int]], stop: int = CALC_END):
        self.turns, self.stop, self.requests = turns, stop, []

    def generate(self, requests, decoding, progress=None):
        out = []
        for req in requests:
            self.requests.append(req)
            t = min(req.prompt_ids.count(self.stop), len(self.turns) - 1)
            turn = self.turns[t][: req.max_tokens]
            out.append([Completion(list(turn), [-0.5] * len(turn)) for _ in range(req.n)])
        return out


def spec(tok, env=None, budget=64, max_turns=4, max_tool_tokens=16, end_on_error=False) -> EpisodeSpec:
    stop = (tok.convert_tokens_to_ids("</calc>"),)
    return EpisodeSpec(
        env or CalcEnv(), tok, (tok.eos_token_id,), stop, budget, max_turns, max_tool_tokens, end_on_error
    )


def test_each_turn_extends_the_last_input_by_the_sampled_and_the_observation_ids(tok):
    call = ids(tok, "<calc>2 + 3 * 4</calc>")
    answer = ids(tok, "14") + [tok.eos_token_id]
    engine = Scripted([call, answer])
    prompt = ids(tok, "Calculate 2 + 3 * 4")
    (ep,) = run_episodes(engine, spec(tok), [prompt], [{"id": "0"}], 1, Decoding(), seeds=[7])
    observation = ids(tok, "<result>14</result>")
    assert engine.requests[0].prompt_ids == prompt
    assert engine.requests[1].prompt_ids == prompt + call + observation  # ids unchanged, nothing re-encoded
    assert engine.requests[1].max_tokens == 64 - len(call) - len(observation)  # the episode's budget left
    assert ep.ids == call + observation + answer
    assert ep.model == [1] * len(call) + [0] * len(observation) + [1] * len(answer)
    assert ep.logprobs == [-0.5] * len(call) + [0.0] * len(observation) + [-0.5] * len(answer)
    assert (ep.turns, ep.tool_calls, ep.tool_errors, ep.truncated, ep.done) == (2, 1, 0, False, True)
    assert tok.eos_token_id not in ep.ids[:-1]  # no EOS the model did not sample


def test_the_episodes_of_a_group_start_together_and_go_on_one_by_one(tok):
    engine = Scripted([ids(tok, "<calc>1+1</calc>"), [tok.eos_token_id]])
    eps = run_episodes(
        engine, spec(tok), [ids(tok, "a"), ids(tok, "b")], [{}, {}], 3, Decoding(), seeds=[1, 2]
    )
    assert [r.n for r in engine.requests[:2]] == [3, 3]  # turn 0: one request per group, its prefill shared
    assert all(r.n == 1 for r in engine.requests[2:]) and len(engine.requests) == 2 + 6
    later_seeds = [r.seed for r in engine.requests[2:]]
    assert len(set(later_seeds)) == 6  # each episode's turn has its own stream
    assert [e.tool_calls for e in eps] == [1] * 6


def test_budgets_turns_and_long_answers_end_episodes_as_truncated(tok):
    call = ids(tok, "<calc>2 ** 60</calc>")
    long_answer = run_episodes(
        Scripted([call, [tok.eos_token_id]]), spec(tok, max_tool_tokens=8), [[5]], [{}], 1, Decoding()
    )
    obs = long_answer[0].ids[len(call) : len(long_answer[0].ids) - 1]
    # The tool's text is cut to 8 tokens ending in the marker; the framing around it stays whole.
    assert obs[0] == tok.convert_tokens_to_ids("<result>") and obs[-1] == tok.convert_tokens_to_ids(
        "</result>"
    )
    assert len(obs) == 8 + 2 and tok.decode(obs[1:-1]).endswith(CUT) and tok.decode(obs[1:-1]).startswith("1")
    no_room = run_episodes(Scripted([call]), spec(tok, budget=len(call) + 3), [[5]], [{}], 1, Decoding())[0]
    assert no_room.truncated and no_room.ids == call and no_room.tool_calls == 1  # the answer did not fit
    capped = run_episodes(Scripted([call]), spec(tok, max_turns=2), [[5]], [{}], 1, Decoding())[0]
    assert capped.turns == 2 and capped.truncated and capped.tool_calls == 1
    cut_turn = run_episodes(
        Scripted([ids(tok, "<calc>1+")]), spec(tok, budget=3), [[5]], [{}], 1, Decoding()
    )[0]
    assert (
        cut_turn.truncated and cut_turn.tool_calls == 0 and len(cut_turn.ids) == 3
    )  # a cut call runs no tool


def test_a_tool_that_raises_is_an_error_the_model_reads_or_the_end_when_asked(tok):
    class Broken:
        stop_strings = ("</calc>",)

        def reset(self, row, seed):
            return None

        def step(self, state, text):
            raise RuntimeError("the tool fell over")

    call = ids(tok, "<calc>1</calc>")
    ep = run_episodes(
        Scripted([call, [tok.eos_token_id]]),
        spec(tok, Broken(), max_tool_tokens=64),
        [[5]],
        [{}],
        1,
        Decoding(),
    )[0]
    assert (ep.tool_calls, ep.tool_errors, ep.turns) == (1, 1, 2)
    assert "RuntimeError: the tool fell over" in tok.decode(ep.ids)
    ended = run_episodes(
        Scripted([call]), spec(tok, Broken(), end_on_error=True), [[5]], [{}], 1, Decoding()
    )[0]
    assert ended.done and not ended.truncated and ended.ids == call and ended.tool_errors == 1


def test_an_environment_that_answers_none_ends_the_episode(tok):
    class Once:
        stop_strings = ("</calc>",)

        def reset(self, row, seed):
            return {"seed": seed}

        def step(self, state, text):
            return None

    ep = run_episodes(
        Scripted([ids(tok, "<calc>1</calc>")]), spec(tok, Once()), [[5]], [{}], 1, Decoding(), [3]
    )[0]
    assert ep.done and ep.state == {"seed": 3} and ep.turns == 1 and ep.tool_calls == 0


def test_the_rollout_keeps_tool_tokens_out_of_the_loss_and_its_counts(tok):
    call, answer = ids(tok, "<calc>1+1</calc>"), ids(tok, "2") + [tok.eos_token_id]
    eps = run_episodes(
        Scripted([call, answer]), spec(tok), [ids(tok, "q")], [{"id": "0"}], 2, Decoding(), [0]
    )
    ro = episode_rollout(tok, [{"id": "0"}], [ids(tok, "q")], eps, 2, torch.device("cpu"))
    n_obs = len(ids(tok, "<result>2</result>"))
    assert ro.completion_mask.sum(1).tolist() == [len(call) + n_obs + len(answer)] * 2  # attention: all
    assert ro.lengths.tolist() == [len(call) + len(answer)] * 2  # counts: the model's tokens only
    assert ro.model_mask[0, len(call) : len(call) + n_obs].sum() == 0
    assert ro.episode_stats["tool_calls"] == [1.0, 1.0] and ro.episode_stats["tool_tokens"] == [n_obs] * 2
    assert ro.texts[0] == "1+1\n2"  # the model's two turns, special markers dropped, the tool's "2" not in
    assert ro.episode_texts == {"model_turns": [["1+1", "2"]] * 2, "tool_results": [["2"]] * 2}


@pytest.mark.parametrize("tools", [True, False])
def test_the_rollout_records_which_completions_hit_the_budget_without_eos(tok, tools):
    """``Rollout.truncated`` (what algo.mask_truncated reads) for a single turn and for episodes: an
    answer ending in EOS is not truncated, one the budget cut is; select and concat keep it aligned."""
    answer = ids(tok, "12") + [tok.eos_token_id]
    long = ids(tok, "1 2 3 4 5 6 7 8 9 10 11 12")
    rows, prompts = [{"id": "0"}, {"id": "1"}], [ids(tok, "q"), ids(tok, "r")]
    eps = [
        *run_episodes(Scripted([answer]), spec(tok, budget=8), prompts[:1], rows[:1], 1, Decoding(), [0]),
        *run_episodes(Scripted([long]), spec(tok, budget=8), prompts[1:], rows[1:], 1, Decoding(), [1]),
    ]
    ro = episode_rollout(tok, rows, prompts, eps, 1, torch.device("cpu"), tools)
    assert ro.truncated.tolist() == [False, True]
    assert ro.select([1, 0]).truncated.tolist() == [True, False]
    assert bool(ro.completion_ids[1, ro.lengths[1] - 1] != tok.eos_token_id)


def test_a_tool_text_holding_control_strings_is_plain_text_inside_the_framing(tok):
    """The calculator's error names its markers: they come back as characters, and the observation's
    marker ids are exactly the framing's one <result> and one </result>."""
    env = CalcEnv()
    obs = env.step(None, "no opening </calc>")
    assert "<calc>" in obs.text and "</calc>" in obs.text
    got = observation_ids(spec(tok, max_tool_tokens=64), obs)
    markers = {tok.convert_tokens_to_ids(m): m for m in MARKERS}
    assert [markers[i] for i in got if i in markers] == ["<result>", "</result>"]
    assert got[0] == tok.convert_tokens_to_ids("<result>") and got[-1] == tok.convert_tokens_to_ids(
        "</result>"
    )
    assert tok.decode(got[1:-1]) == obs.text  # the text itself, character for character
    # Cut to 6 tokens: the text ends in the cut marker, the closing marker is still last.
    cut = observation_ids(spec(tok, max_tool_tokens=6), obs)
    assert len(cut) == 6 + 2 and tok.decode(cut[1:-1]).endswith(CUT)
    assert cut[-1] == tok.convert_tokens_to_ids("</result>")


def test_under_reward_math_a_number_only_the_tool_wrote_earns_nothing(tok):
    """The model calls, reads <result>14</result>, and stops: its own words hold no 14, so reward=math
    scores 0. Judged on the merged text (the tool's result included) the same episode scored 1."""
    from grpo_cli.cli import compose_config
    from grpo_cli.rewards import build_rewarder
    from grpo_cli.rollout.generate import rule_rows, score

    call = ids(tok, "<calc>2 + 3 * 4</calc>")
    eps = run_episodes(Scripted([call, [tok.eos_token_id]]), spec(tok), [ids(tok, "q")], [{}], 1, Decoding())
    row = {"id": "0", "question": "Calculate 2 + 3 * 4", "answer": "14"}
    ro = episode_rollout(tok, [row], [ids(tok, "q")], eps, 1, torch.device("cpu"))
    cfg, _ = compose_config("train", ["reward=math"])
    with build_rewarder(cfg.reward) as rewarder:
        merged = tok.decode(ro.completion_ids[0].tolist())  # the episode with the tool's tokens, markers kept
        assert merged.startswith("<calc>2 + 3 * 4</calc><result>14</result>")
        assert rewarder([merged], [row]).total == [1.0]  # what the rules used to read
        score(ro, rewarder)
    assert ro.texts == ["2 + 3 * 4"] and ro.rewards.tolist() == [0.0]
    record = rule_rows(ro)[0]["episode"]
    assert record["tool_results"] == ["14"] and record["tool_calls"] == 1.0  # the record beside the words


@pytest.mark.parametrize("aggregation", ["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"])
def test_masked_tool_tokens_have_no_loss_and_no_gradient(aggregation):
    """The loss over a mask with tool positions off equals a float64 reference over model tokens only."""
    torch.manual_seed(0)
    N, T = 4, 7
    logps = torch.randn(N, T, dtype=torch.float64).clamp(max=-0.01).requires_grad_()
    ref = logps.detach() + 0.1 * torch.randn(N, T, dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=torch.float64)
    mask = torch.ones(N, T, dtype=torch.bool)
    mask[:, 2:4] = False  # a tool answer in every episode
    mask[1, 6] = False  # padding
    algo = AlgoConfig(beta=0.04, aggregation=aggregation, max_completion_length=T)
    loss, _ = policy_loss(logps, None, ref, adv, mask, algo)
    loss.backward()
    assert torch.all(logps.grad[~mask] == 0)
    # Reference: on-policy ratio 1, so per token -A + beta * k3(ref - logp).
    d = ref - logps.detach()
    per = -adv[:, None] + 0.04 * (d.exp() - d - 1)
    m = mask.double()
    expected = {
        "seq_mean_token_mean": ((per * m).sum(1) / m.sum(1)).mean(),
        "token_mean": (per * m).sum() / m.sum(),
        "seq_mean_token_sum_norm": (per * m).sum() / (N * T),
    }[aggregation]
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-12, abs=1e-12)


class SpaceTool:
    """A test environment: every turn that ends on a space is answered with a short text."""

    stop_strings = (" ",)

    def __init__(self, cfg=None):
        self.cfg = cfg

    def reset(self, row, seed):
        return None

    def step(self, state, text):
        return Observation(" ok")


def test_the_trainer_recomputes_the_samplers_log_probs_over_whole_episodes(random_model_dir):
    """hf engine, real model: per model token, the log-prob of one forward over the whole episode (tool
    tokens as context) equals the sampler's, turn by turn, within 1e-4."""
    model_cfg = ModelConfig(name_or_path=str(random_model_dir), device="cpu", dtype="float32")
    policy = load_policy(model_cfg, LoraConfig(enabled=False), beta=0.0, trainable=False)
    tok = policy.tokenizer
    prompts = [ids(tok, "Calculate 1 + 2"), ids(tok, "Calculate 3 * 4")]
    engine = HFEngine(policy, batch_size=64)
    # The random model's tokens are near-uniform: 40 stop ids of 273 end about one turn in seven tokens.
    stop = tuple(range(100, 140))
    sp = EpisodeSpec(SpaceTool(), tok, (tok.eos_token_id,), stop, 40, 4, 8, False)
    eps = run_episodes(
        engine, sp, prompts, [{}, {}], 3, Decoding(temperature=0.9, logprobs=True), seeds=[1, 2]
    )
    assert sum(e.tool_calls for e in eps) >= 3  # the loop really went through tool answers
    ro = episode_rollout(tok, [{}, {}], prompts, eps, 3, torch.device("cpu"))
    with torch.no_grad():
        p_rows = slice(0, None, 3)
        ours = grouped_completion_logprobs(
            policy.model, ro.prompt_ids[p_rows], ro.prompt_mask[p_rows], ro.completion_ids, ro.completion_mask,
            group_size=3, temperature=0.9,
        )  # fmt: skip
    model = ro.model_mask.bool()
    assert torch.allclose(ours[model], ro.engine_logps[model], atol=1e-4)


def test_a_user_environment_from_its_own_file_runs_through_env_target(
    tmp_path, random_model_dir, monkeypatch
):
    """env._target_=module.Class: grpo sample runs episodes with it; the tool answers show in the table."""
    from grpo_cli.cli import compose_config
    from grpo_cli.commands import sample

    (tmp_path / "my_env.py").write_text(
        "from grpo_cli.envs import Observation\n\n"
        "class Echo:\n"
        "    stop_strings = (' ',)\n"
        "    def __init__(self, cfg):\n        self.cfg = cfg\n"
        "    def reset(self, row, seed):\n        return []\n"
        "    def step(self, state, text):\n        state.append(text)\n"
        "        return Observation(' seen') if len(state) < 2 else None\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg, _ = compose_config(
        "sample",
        [f"model.name_or_path={random_model_dir}", "lora=none", "env._target_=my_env.Echo",
         "rollout.max_new_tokens=24", "sample.prompts=2", "algo.group_size=4", "console=plain"],
    )  # fmt: skip
    records = sample.run(cfg, str(tmp_path))
    assert len(records) == 8
    assert any(r["tool_calls"] >= 1 for r in records)
    assert all(r["tool_calls"] <= 1 for r in records)  # Echo ends an episode at its second call
    sys.modules.pop("my_env", None)


def test_result_markers_are_never_sampled_and_calls_can_be_forbidden(random_model_dir):
    """The hf engine draws no banned id, even where the model puts all its mass on one; with
    env.allow_calls=false the call token is banned too."""
    from grpo_cli.engines import Request

    model_cfg = ModelConfig(name_or_path=str(random_model_dir), device="cpu", dtype="float32")
    policy = load_policy(model_cfg, LoraConfig(enabled=False), beta=0.0, trainable=False)
    banned = tuple(range(3, 270))  # nearly the whole vocabulary of the random model
    engine = HFEngine(policy, batch_size=64)
    out = engine.generate([Request([5, 6, 7], 8, 12, (0,), seed=1)], Decoding(banned_ids=banned))[0]
    drawn = {t for c in out for t in c.token_ids}
    assert drawn and not drawn & set(banned)
    tok = load_tokenizer(str(random_model_dir))
    tok.add_special_tokens({"additional_special_tokens": MARKERS})
    on = EpisodeSpec.of(EnvConfig(name="calc"), tok, (tok.eos_token_id,), RolloutConfig(max_new_tokens=16))
    off = EpisodeSpec.of(
        EnvConfig(name="calc", allow_calls=False), tok, (tok.eos_token_id,), RolloutConfig(max_new_tokens=16)
    )
    ids_of = tok.convert_tokens_to_ids
    assert set(on.banned_ids) == {ids_of("<result>"), ids_of("</result>")}
    assert set(off.banned_ids) == set(on.banned_ids) | {ids_of("<calc>")}
    # With calls forbidden a stray close marker is text: not a stop, not a call, no tool answer.
    assert on.tool_stop_ids == (CALC_END,) and off.tool_stop_ids == ()
    stray = ids(tok, "12</calc>") + [tok.eos_token_id]
    (ep,) = run_episodes(Scripted([stray]), off, [[5]], [{}], 1, Decoding())
    assert (ep.ids, ep.tool_calls, ep.tool_errors, ep.turns, ep.truncated) == (stray, 0, 0, 1, False)


def test_a_tool_that_hangs_is_answered_with_an_error_when_its_time_is_up(tok):
    import time

    class Hangs:
        stop_strings = ("</calc>",)

        def reset(self, row, seed):
            return None

        def step(self, state, text):
            time.sleep(30)

    sp = spec(tok, Hangs(), max_tool_tokens=64)
    sp.timeout_s = 0.2
    start = time.monotonic()
    ep = run_episodes(
        Scripted([ids(tok, "<calc>1</calc>"), [tok.eos_token_id]]), sp, [[5]], [{}], 1, Decoding()
    )[0]
    assert time.monotonic() - start < 5
    assert ep.tool_errors == 1 and "did not answer within 0.2 s" in tok.decode(ep.ids)


def test_env_calc_on_a_tokenizer_without_its_markers_names_the_fix():
    """The README's env=calc on the default tiny model: the error says model=tiny-tools, in one line."""
    from grpo_cli.config import ConfigError
    from grpo_cli.models.tiny import make_tokenizer

    plain = make_tokenizer()
    with pytest.raises(ConfigError) as err:
        EpisodeSpec.of(EnvConfig(name="calc"), plain, (plain.eos_token_id,), RolloutConfig())
    assert (
        "'</calc>'" in str(err.value) and "model=tiny-tools" in str(err.value) and "\n" not in str(err.value)
    )
    tools = make_tokenizer(tools=True)  # the tiny-tools tokenizer has them
    assert EpisodeSpec.of(EnvConfig(name="calc"), tools, (tools.eos_token_id,), RolloutConfig()).tool_stop_ids


def test_a_user_environment_that_cannot_load_or_build_is_one_line_naming_env_target(tmp_path, monkeypatch):
    """env._target_ goes through the rule loader: a missing module, a missing class and a constructor
    that raises are each one ConfigError line naming the key; the user's own ConfigError is kept."""
    from grpo_cli.config import ConfigError
    from grpo_cli.envs import build_env

    (tmp_path / "broken_env.py").write_text(
        "from grpo_cli.config import ConfigError\n\n"
        "class Raises:\n    def __init__(self, cfg):\n        raise ValueError('needs a board size')\n\n"
        "class Refuses:\n    def __init__(self, cfg):\n        raise ConfigError('env.board: must be set')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cases = {
        "no_such_env_module.Env": "env._target_=no_such_env_module.Env: no module 'no_such_env_module'",
        "broken_env.Missing": "broken_env has no attribute 'Missing'",
        "broken_env.Raises": "env._target_=broken_env.Raises: cannot be built: ValueError: needs a board size",
        "broken_env.Refuses": "env.board: must be set",
    }
    for target, message in cases.items():
        with pytest.raises(ConfigError) as err:
            build_env(EnvConfig(_target_=target))
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    sys.modules.pop("broken_env", None)
