"""env=openenv: an OpenEnv-shaped game (written here: openenv-core is not needed to run these) on the
real episode loop, token-exact, scored by its own reward through reward=env and the trainer's logs.

``GuessEnv`` has OpenEnv's shape: ``reset(seed=, episode_id=) -> Observation``, ``step(action) ->
Observation`` with pydantic Action/Observation models whose observations carry ``done``, ``reward`` and
``metadata``. A scripted engine plays its turns, so every id an episode holds is known.
"""

from __future__ import annotations

import random
import sys
import threading
import time

import pytest
from helpers import metric_rows, run_train
from pydantic import BaseModel, Field

from grpo_cli.config import ConfigError, EnvConfig, RolloutConfig
from grpo_cli.engines import Completion, Decoding
from grpo_cli.envs.episode import EpisodeSpec, run_episodes
from grpo_cli.models.tiny import make_tokenizer
from grpo_cli.rewards.env import env_reward
from grpo_cli.rollout.generate import episode_rollout, rule_rows

HERE = __name__  # the class paths below name this module


class GuessAction(BaseModel):
    guess: int
    metadata: dict = Field(default_factory=dict)


class GuessObservation(BaseModel):
    hint: str
    done: bool = False
    reward: float | None = None
    metadata: dict = Field(default_factory=dict)


class GuessEnv:
    """Guess a number in 1..8: "higher" / "lower" (reward -0.1) until right (reward 1, done)."""

    closed = 0  # instances closed, over all of them
    release = threading.Event()  # a hanging step waits on it (set at the test's end: no stray thread)

    def __init__(self, high: int = 8, show_id: bool = False, fail: str = ""):
        self.high, self.show_id, self.fail = high, show_id, fail

    def reset(self, seed=None, episode_id=None, **kwargs) -> GuessObservation:
        self.target = random.Random(seed).randint(1, self.high)
        return GuessObservation(hint=f"guess 1-{self.high}" + (f" ({episode_id})" if self.show_id else ""))

    def step(self, action: GuessAction, timeout_s=None, **kwargs) -> GuessObservation:
        if self.fail == "raise":
            raise RuntimeError("the board fell over")
        if self.fail == "hang":
            GuessEnv.release.wait(30)
        if action.guess == self.target:
            return GuessObservation(hint="right", done=True, reward=1.0)
        return GuessObservation(hint="higher" if action.guess < self.target else "lower", reward=-0.1)

    def close(self) -> None:
        GuessEnv.closed += 1


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


class Scripted:
    """An engine that answers a request with ``turns[t]`` + EOS (n copies), t the number of model turns
    its input already holds (EOS-ended), and records every request."""

    name = "scripted"

    def __init__(self, tok, turns: list[str]):
        self.eos, self.requests = tok.eos_token_id, []
        self.turns = [ids(tok, t) + [tok.eos_token_id] for t in turns]

    def generate(self, requests, decoding, progress=None):
        out = []
        for req in requests:
            self.requests.append(req)
            turn = self.turns[min(req.prompt_ids.count(self.eos), len(self.turns) - 1)][: req.max_tokens]
            out.append([Completion(list(turn), [-0.5] * len(turn)) for _ in range(req.n)])
        return out


def seed_with_target(target: int, high: int = 8) -> int:
    return next(s for s in range(1000) if random.Random(s).randint(1, high) == target)


def spec_of(tok, budget: int = 96, **env) -> EpisodeSpec:
    env = {"openenv": f"{HERE}:GuessEnv", "action_field": "guess", **env}
    cfg = EnvConfig(name="openenv", **env)
    return EpisodeSpec.of(cfg, tok, (tok.eos_token_id,), RolloutConfig(max_new_tokens=budget))


def test_a_game_runs_several_turns_token_exact_and_sums_its_own_reward(tok):
    """Opening, three guesses, the hints between them; the model's ids are the sampled ones, the
    game's are observation tokens; the game's rewards (-0.1, -0.1, 1) sum to 0.8; instances closed."""
    seed, closed = seed_with_target(5), GuessEnv.closed
    engine = Scripted(tok, ["2", "7", "5"])
    sp = spec_of(tok)
    prompt = ids(tok, "Find the number.")
    eps = run_episodes(engine, sp, [prompt], [{}], 2, Decoding(), seeds=[seed])
    sp.close()
    eos = [tok.eos_token_id]
    opening, higher, lower = (ids(tok, f"\n{t}\n") for t in ("guess 1-8", "higher", "lower"))
    turns = [ids(tok, g) + eos for g in "275"]
    assert engine.requests[0].prompt_ids == prompt + opening and engine.requests[0].n == 2  # shared
    for ep in eps:
        assert ep.ids == opening + turns[0] + higher + turns[1] + lower + turns[2]
        assert (
            ep.model
            == [0] * len(opening) + [1] * 2 + [0] * len(higher) + [1] * 2 + [0] * len(lower) + [1] * 2
        )
        model_ids = [t for t, m in zip(ep.ids, ep.model) if m]
        assert model_ids == [t for turn in turns for t in turn]  # exactly what the engine sampled
        assert (ep.turns, ep.tool_calls, ep.tool_errors, ep.truncated, ep.done) == (3, 3, 0, False, True)
        assert ep.env_reward == pytest.approx(0.8)
        assert ep.results == ["higher", "lower", "right"]
    assert GuessEnv.closed - closed == 2  # each episode's instance, when its batch ended


def test_episodes_that_open_differently_start_one_by_one_on_their_own_streams(tok):
    sp = spec_of(tok, openenv_args={"show_id": True})
    engine = Scripted(tok, ["1"])
    run_episodes(engine, sp, [ids(tok, "Go.")], [{}], 3, Decoding(), seeds=[4])
    sp.close()
    first = engine.requests[:3]
    assert [r.n for r in first] == [1, 1, 1]
    assert len({tuple(r.prompt_ids) for r in first}) == 3 and len({r.seed for r in first}) == 3


def test_reward_env_scores_what_the_game_gave_and_none_without_an_episode(tok):
    seed = seed_with_target(3)
    sp = spec_of(tok)
    prompts = [ids(tok, "Find it.")]
    eps = run_episodes(Scripted(tok, ["6", "3"]), sp, prompts, [{}], 2, Decoding(), seeds=[seed])
    sp.close()
    ro = episode_rollout(tok, [{}], prompts, eps, 2, "cpu", tools=True)
    assert ro.episode_stats["env_reward"] == pytest.approx([0.9, 0.9])  # -0.1 for 6 ("lower"), 1 for 3
    assert env_reward(ro.texts, rule_rows(ro)) == pytest.approx([0.9, 0.9])
    assert env_reward(["x", "y"], [{}, {"episode": {"turns": 1.0}}]) == [None, None]  # nothing to read


def test_a_turn_that_does_not_parse_is_a_counted_error_and_on_error_end_ends_it(tok):
    seed = seed_with_target(4)
    sp = spec_of(tok)
    (ep,) = run_episodes(Scripted(tok, ["four", "4"]), sp, [[5]], [{}], 1, Decoding(), seeds=[seed])
    assert (ep.tool_calls, ep.tool_errors, ep.turns, ep.env_reward) == (2, 1, 2, pytest.approx(1.0))
    assert ep.results[0].startswith("error: not a valid GuessAction: guess: Input should be a valid integer")
    sp.close()
    sp = spec_of(tok, on_error="end")
    (ep,) = run_episodes(Scripted(tok, ["four", "4"]), sp, [[5]], [{}], 1, Decoding(), seeds=[seed])
    sp.close()
    assert (ep.tool_errors, ep.turns, ep.done, ep.env_reward) == (1, 1, True, 0.0)


def test_without_action_field_a_turn_is_a_json_object_of_the_actions_fields(tok):
    seed = seed_with_target(6)
    sp = spec_of(tok, action_field=None)
    turns = ["[6]", '{"guess": 6}']
    (ep,) = run_episodes(Scripted(tok, turns), sp, [[5]], [{}], 1, Decoding(), seeds=[seed])
    sp.close()
    assert ep.results[0] == "error: the turn is not a JSON object of the action's fields"
    assert (ep.tool_errors, ep.results[1], ep.env_reward) == (1, "right", pytest.approx(1.0))


def test_a_step_that_raises_or_hangs_is_an_error_observation_and_the_run_goes_on(tok):
    sp = spec_of(tok, budget=256, openenv_args={"fail": "raise"})
    (ep,) = run_episodes(Scripted(tok, ["3"]), sp, [[5]], [{}], 1, Decoding(), seeds=[0])
    sp.close()
    assert ep.results == ["error: RuntimeError: the board fell over"] * 3  # the model read each one
    assert (ep.turns, ep.tool_errors, ep.truncated) == (4, 3, True)  # went on to max_turns=4
    GuessEnv.release.clear()
    try:
        sp = spec_of(tok, budget=256, openenv_args={"fail": "hang"}, max_turns=3)
        sp.timeout_s = 0.2
        start = time.monotonic()
        (ep,) = run_episodes(Scripted(tok, ["3"]), sp, [[5]], [{}], 1, Decoding(), seeds=[0])
        assert time.monotonic() - start < 5
        assert ep.results[0] == "error: the tool did not answer within 0.2 s"
        assert ep.results[1] == "error: the environment is still busy with an earlier step"  # not re-entered
        assert ep.tool_errors == 2 and ep.truncated  # max_turns=3 reached
    finally:
        GuessEnv.release.set()  # the hung step returns; its thread ends
        sp.close()


@pytest.mark.parametrize(
    "path, message",
    [
        ("no_such_pkg.envs:Game", "env.openenv=no_such_pkg.envs.Game: no module 'no_such_pkg'"),
        (f"{HERE}:NoSuchEnv", f"{HERE} has no attribute 'NoSuchEnv'"),
        (f"{HERE}:HERE", "is not an environment class"),
        (None, "env=openenv needs env.openenv=module:Class"),
        ("openenv_needed:Game", "openenv-core is not installed: pip install 'grpo-cli[openenv]'"),
    ],
)
def test_a_class_that_cannot_be_loaded_is_one_config_line(tok, tmp_path, monkeypatch, path, message):
    (tmp_path / "openenv_needed.py").write_text("from openenv.core.env_server import Environment\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "openenv", None)  # as if openenv-core were not installed
    with pytest.raises(ConfigError) as err:
        spec_of(tok, openenv=path) if path else EpisodeSpec.of(
            EnvConfig(name="openenv"), tok, (tok.eos_token_id,), RolloutConfig()
        )
    assert message in str(err.value) and "\n" not in str(err.value)
    sys.modules.pop("openenv_needed", None)


def test_env_openenv_without_a_class_is_refused_before_any_model_loads():
    from grpo_cli.cli import compose_config
    from grpo_cli.commands.validate import validate

    cfg, _ = compose_config("train", ["env=openenv", "reward=env"])
    with pytest.raises(ConfigError, match=r"^env=openenv needs env.openenv=module:Class"):
        validate(cfg)


class SayAction(BaseModel):
    text: str


class SayObservation(BaseModel):
    heard: str
    done: bool = False
    reward: float | None = None


class TallyEnv:
    """Rewards each turn with a tenth of its length; done after two turns. Records what it gave."""

    given: dict[str, float] = {}  # episode id -> the sum of its rewards

    def reset(self, seed=None, episode_id=None):
        self.id, self.steps = episode_id, 0
        TallyEnv.given[episode_id] = 0.0
        return SayObservation(heard="say something")

    def step(self, action: SayAction) -> SayObservation:
        self.steps += 1
        reward = len(action.text) / 10
        TallyEnv.given[self.id] += reward
        return SayObservation(heard=action.text[::-1], reward=reward, done=self.steps >= 2)


def test_train_logs_the_environments_own_reward_as_reward_env(random_model_dir, tmp_path):
    """A 2-step grpo train env=openenv reward=env on the random model: each step's reward/env and
    episode/env_reward are the mean of what the game itself handed out to that step's 8 episodes."""
    TallyEnv.given.clear()
    letters = ",".join("abcdefghijklmnopqrstuvwxyz")  # ~1 token in 10 of the random model ends a turn
    run_train(
        [f"model.name_or_path={random_model_dir}", "lora=none", "env=openenv", f"env.openenv={HERE}:TallyEnv",
         "env.action_field=text", f"env.turn_stops=[{letters}]", "env.max_turns=3", "reward=env",
         "train.prompts_per_step=2", "algo.group_size=4", "rollout.max_new_tokens=32", "train.eval_every=0",
         "data.train_size=16", "data.test_size=4", "console=plain", "train.steps=2"],
        tmp_path / "run",
    )  # fmt: skip
    rows = metric_rows(tmp_path / "run")
    given = list(TallyEnv.given.values())  # in episode order: step 1's 8, then step 2's
    assert sorted(rows) == [1, 2] and len(given) == 16
    assert sum(given) > 0  # the game was played: some turns ended on a stop and were rewarded
    for step, batch in ((1, given[:8]), (2, given[8:])):
        assert rows[step]["reward/env"] == pytest.approx(sum(batch) / 8)
        assert rows[step]["episode/env_reward"] == pytest.approx(sum(batch) / 8)
        assert rows[step]["reward/env/unjudged"] == 0


def test_a_real_openenv_environment_subclass_plays_the_same_game(tok):
    """Where openenv-core is installed (make install-openenv): a subclass of its Environment, with its
    Action/Observation bases (extra fields forbidden), runs through the adapter unchanged."""
    interfaces = pytest.importorskip("openenv.core.env_server.interfaces")
    types = pytest.importorskip("openenv.core.env_server.types")

    class Guess(types.Action):
        guess: int

    class Hint(types.Observation):
        hint: str = ""

    class RealGuess(interfaces.Environment[Guess, Hint, types.State]):
        def reset(self, seed=None, episode_id=None, **kwargs) -> Hint:
            self.target, self._state = random.Random(seed).randint(1, 8), types.State(episode_id=episode_id)
            return Hint(hint="guess 1-8")

        def step(self, action: Guess, timeout_s=None, **kwargs) -> Hint:
            right = action.guess == self.target
            return Hint(hint="right" if right else "no", done=right, reward=1.0 if right else 0.0)

        @property
        def state(self):
            return self._state

    globals()["RealGuess"] = RealGuess  # the class path names this module
    try:
        sp = spec_of(tok, budget=256, openenv=f"{HERE}:RealGuess", action_field=None)
        turns = ['{"guess": 9, "extra": 1}', f'{{"guess": {random.Random(2).randint(1, 8)}}}']
        (ep,) = run_episodes(Scripted(tok, turns), sp, [[5]], [{}], 1, Decoding(), seeds=[2])
        sp.close()
        assert ep.results == ["error: not a valid Guess: extra: Extra inputs are not permitted", "right"]
        assert (ep.tool_errors, ep.env_reward, ep.done) == (1, 1.0, True)
    finally:
        globals().pop("RealGuess")
