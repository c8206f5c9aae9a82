"""The run object: one build for every command, closed in reverse order by one ``with``, also when the
build fails half-way (what was built is closed once, the rest never existed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from grpo_cli.cli import compose_config
from grpo_cli.commands import build


class Part:
    """A stand-in for a built resource that records its closing."""

    def __init__(self, name: str, log: list[str]):
        self.name, self.log = name, log

    def close(self) -> None:
        self.log.append(self.name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@pytest.fixture
def parts(monkeypatch):
    """Every builder of ``commands.build`` replaced by a recording stand-in; ``fail`` names the one
    that raises."""
    log: list[str] = []
    state = {"fail": None, "policies": 0}

    def maker(name, value):
        def make(*args, **kwargs):
            if state["fail"] == name:
                raise RuntimeError(f"{name} failed")
            return value(*args, **kwargs)

        return make

    def policy(*args, **kwargs):
        state["policies"] += 1
        return SimpleNamespace(tokenizer=None, name=f"policy-{state['policies']}")

    monkeypatch.setattr(build, "load_policy", maker("policy", policy))
    monkeypatch.setattr(build, "episode_spec", maker("spec", lambda *a: Part("spec", log)))
    monkeypatch.setattr(
        build, "build_engine", maker("engine", lambda p, *a: Part(f"engine of {p.name}", log))
    )
    monkeypatch.setattr(build, "build_rewarder", maker("rewarder", lambda *a: Part("rewarder", log)))
    return log, state


def _eval_cfg():
    cfg, _ = compose_config("eval", ["eval.problems=3"])
    return cfg


def test_a_run_closes_what_it_built_once_in_reverse_order(parts):
    log, _ = parts
    with build.build_run(_eval_cfg()) as run:
        assert len(run.held_out) == 3 and run.sampler.engine is run.engine
    assert log == ["engine of policy-1", "spec", "rewarder"]


@pytest.mark.parametrize(
    ("fail", "closed"),
    [("rewarder", []), ("policy", ["rewarder"]), ("spec", ["rewarder"]), ("engine", ["spec", "rewarder"])],
)
def test_a_build_that_fails_half_way_closes_only_what_was_built(parts, fail, closed):
    log, state = parts
    state["fail"] = fail
    with pytest.raises(RuntimeError, match=f"{fail} failed"):
        build.build_run(_eval_cfg())
    assert log == closed
    if fail == "rewarder":  # the rules come first: a judge that does not answer costs no model load
        assert state["policies"] == 0


def test_eval_over_checkpoints_keeps_the_rows_spec_and_rules_and_swaps_policy_and_engine(parts):
    log, state = parts
    with build.build_run(_eval_cfg()) as run:
        spec, rewarder, rows = run.spec, run.rewarder, run.held_out
        run.load_checkpoint("base")
        assert log == ["engine of policy-1"]  # released before the next model loads
        assert (run.spec, run.rewarder, run.held_out) == (spec, rewarder, rows)
        assert run.policy.name == "policy-2" and run.engine.name == "engine of policy-2"
    assert log == ["engine of policy-1", "engine of policy-2", "spec", "rewarder"]
    assert state["policies"] == 2


def test_train_builds_its_reward_rules_before_any_model(monkeypatch, tmp_path):
    """A reward rule that cannot start (a dead judge, a wrong reward-model path) is the one line the
    user sees, before the policy (minutes for a large model) loads."""
    from grpo_cli.config import ConfigError

    def no_model(*args, **kwargs):
        raise AssertionError("the policy loaded before the reward rules")

    monkeypatch.setattr(build, "load_policy", no_model)
    cfg, _ = compose_config("train", ["reward=model", "reward.rules.0.name_or_path=/nonexistent/rm"])
    with pytest.raises(ConfigError, match="reward model '/nonexistent/rm' cannot be loaded"):
        build.build_train_run(cfg, tmp_path / "run")
