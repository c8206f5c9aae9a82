"""The remote rule against a scripted scoring service in a thread: the documented JSON shape both ways,
batches, scores as scripted, malformed answers and failed batches counted exactly, the probe at start."""

from __future__ import annotations

import pytest
from fake_endpoint import FakeEndpoint, Reply, Seen, dead_url

from grpo_cli.cli import compose_config
from grpo_cli.config import ConfigError
from grpo_cli.rewards import build_rewarder
from grpo_cli.rewards.remote import RemoteReward


class Scorer:
    """Scores each item by its completion: ``num:X`` -> X, ``null`` -> null, ``str`` -> "abc"; a batch
    with ``hang`` answers after 1 s (past the 0.3 s timeout), with ``down`` is always a 500, with
    ``flaky`` is a 500 the first time, with ``short`` answers one score too few."""

    def __init__(self, probe_answer: object = None):
        self.probe_answer = {"scores": []} if probe_answer is None else probe_answer
        self.flaked = False

    def score(self, completion: str) -> object:
        if completion.startswith("num:"):
            return float(completion[4:])
        return {"str": "abc", "flaky": 0.75, "true": True}.get(completion)

    def __call__(self, req: Seen) -> Reply:
        texts = [item["completion"] for item in req.body["items"]]
        if not texts:
            return Reply(self.probe_answer)
        if "hang" in texts:
            return Reply({"scores": [0.0] * len(texts)}, delay=1.0)
        if "down" in texts:
            return Reply({"error": "broken"}, status=500)
        if "flaky" in texts and not self.flaked:
            self.flaked = True
            return Reply({"error": "busy"}, status=502)
        scores = [self.score(t) for t in texts]
        return Reply({"scores": scores[:-1] if "short" in texts else scores})


@pytest.fixture
def scorer():
    with FakeEndpoint(Scorer()) as ep:
        yield ep


def remote(ep: FakeEndpoint, **kwargs) -> RemoteReward:
    opts = {"url": ep.url + "/score", "batch_size": 2, "timeout": 0.3, "retries": 1, "backoff": 0.01}
    return RemoteReward(**{**opts, **kwargs})


def test_scores_are_the_scripted_ones_and_failed_batches_are_counted(scorer):
    texts = [
        "num:0.5",
        "null",
        "num:1",
        "str",
        "flaky",
        "num:0.25",
        "down",
        "num:3",
        "hang",
        "num:1",
        "short",
        "num:2",
    ]
    rule = remote(scorer)
    rows = [{"id": i // 4, "question": f"q{i // 4}", "answer": str(i // 4)} for i in range(len(texts))]
    scores = rule(texts, rows)
    assert scores == [0.5, None, 1.0, None, 0.75, 0.25, None, None, None, None, None, None]
    # "str" (1) + the down batch (2) + the hung batch (2) + the short answer (2); null is the service's
    # "cannot judge", not a failure.
    assert rule.metrics() == {"failures": 7.0, "requests": 6.0, "retries": 3.0}
    assert scorer.count("/score") == 1 + 6 + 3  # the probe, six batches, three retries
    items = [item for s in scorer.seen[1:] for item in s.body["items"]]
    first = {i["id"]: i for i in items}  # retried batches send the same items again
    assert sorted(first) == list(range(12))
    assert first[5] == {
        "id": 5,
        "question": "q1",
        "completion": "num:0.25",
        "reference": "1",
        "row": {"id": 1, "question": "q1", "answer": "1"},
    }
    rule.close()


def test_non_numbers_are_failures_and_a_row_without_an_answer_sends_a_null_reference(scorer):
    rule = remote(scorer, batch_size=8)
    assert rule(["true", "num:2"], [{"question": "q"}, {"question": "q", "answer": "x"}]) == [None, 2.0]
    assert rule.metrics()["failures"] == 1 and rule.metrics()["requests"] == 1
    assert [i["reference"] for i in scorer.seen[-1].body["items"]] == [None, "x"]


def test_the_probe_posts_an_empty_batch(scorer):
    remote(scorer)
    assert [(s.method, s.path, s.body) for s in scorer.seen] == [("POST", "/score", {"items": []})]


def test_a_dead_or_misbehaving_service_is_one_line_at_construction():
    url = dead_url() + "/score"
    with pytest.raises(ConfigError) as info:
        RemoteReward(url=url, timeout=1.0)
    assert url in str(info.value) and "\n" not in str(info.value)
    with FakeEndpoint(Scorer(probe_answer={"error": "no"})) as ep:
        with pytest.raises(ConfigError, match=r'expected \{"scores": \[\]\}') as info:
            remote(ep)
        assert "\n" not in str(info.value)


def test_the_key_comes_from_the_environment_only(scorer, monkeypatch):
    with pytest.raises(ConfigError, match="api_key_env=") as info:
        remote(scorer, api_key="sk-secret")
    assert "sk-secret" not in str(info.value) and "\n" not in str(info.value)
    monkeypatch.delenv("GRPO_TEST_NO_SUCH_KEY", raising=False)
    with pytest.raises(ConfigError, match="GRPO_TEST_NO_SUCH_KEY"):
        remote(scorer, api_key_env="GRPO_TEST_NO_SUCH_KEY")
    monkeypatch.setenv("GRPO_TEST_SCORER_KEY", "s3cret")
    remote(scorer, api_key_env="GRPO_TEST_SCORER_KEY")(["num:1"], [{}])
    assert [s.headers.get("Authorization") for s in scorer.seen] == ["Bearer s3cret"] * 2


def test_the_shipped_group_builds_with_every_key(scorer):
    cfg, _ = compose_config("train", ["reward=remote"])
    (spec,) = cfg.reward.rules
    with build_rewarder([{**spec, "url": scorer.url + "/score"}]) as rewarder:
        result = rewarder(["num:1", "num:0", "null"], [{"question": "q", "answer": "a"}] * 3)
    assert result.per_rule["remote"] == [1.0, 0.0, None]
    assert result.metrics["reward/remote/failures"] == 0 and result.metrics["reward/remote/unjudged"] == 1
    assert result.metrics["reward/remote/requests"] == 1  # batch_size 64: one POST
