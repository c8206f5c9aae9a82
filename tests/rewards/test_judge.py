"""The LLM-judge rule against a scripted OpenAI-compatible endpoint in a thread: grades parsed as
scripted, every failure counted once, retries bounded, the on-disk cache, the probe at start, keys from
the environment only; and a training run resumed from a checkpoint whose replayed step asks nothing."""

from __future__ import annotations

import re
import zlib

import pytest
from conftest import start_servers, stop_servers
from fake_endpoint import FakeEndpoint, Reply, Seen, dead_url
from helpers import metric_rows, run_train

from grpo_cli import engines
from grpo_cli.cli import compose_config
from grpo_cli.commands import train
from grpo_cli.config import ConfigError
from grpo_cli.rewards import build_rewarder
from grpo_cli.rewards.judge import JudgeReward, parse_answer

CHAT = "/v1/chat/completions"


def chat_answer(content: str) -> Reply:
    return Reply({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})


class Judge:
    """The scripted judge: the user message's ``say:X`` is answered X; ``hang`` answers after 1 s (past
    the tests' 0.3 s timeout); ``flaky`` is a 500 the first time, then 6; ``down`` is always a 500."""

    def __init__(self, models: tuple[str, ...] = ("judge-model",)):
        self.models = models
        self.flaked: set[str] = set()

    def __call__(self, req: Seen) -> Reply:
        if req.path == "/v1/models":
            return Reply({"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]})
        text = req.body["messages"][-1]["content"]
        if "hang" in text:
            return Reply(chat_answer("5").body, delay=1.0)
        if "down" in text:
            return Reply({"error": "overloaded"}, status=500)
        if "flaky" in text and text not in self.flaked:
            self.flaked.add(text)
            return Reply({"error": "try again"}, status=503)
        if "flaky" in text:
            return chat_answer("6")
        said = re.search(r"say:(\S+)", text)
        return chat_answer(said.group(1) if said else "no idea")


@pytest.fixture
def judge_endpoint():
    with FakeEndpoint(Judge()) as ep:
        yield ep


def judge(ep: FakeEndpoint, tmp_path, **kwargs) -> JudgeReward:
    opts = {
        "base_url": ep.url + "/v1",
        "template": "{completion}",
        "timeout": 0.3,
        "retries": 1,
        "backoff": 0.01,
        "concurrency": 4,
        "cache": str(tmp_path / "judge.sqlite"),
    }
    return JudgeReward(**{**opts, **kwargs})


ROW = {"question": "1+1?", "answer": "2"}


def test_grades_are_the_scripted_ones_and_every_failure_is_counted_once(judge_endpoint, tmp_path):
    texts = ["say:7", "say:garbage", "hang", "flaky", "down", "say:10", "say:11", "say:0"]
    rule = judge(judge_endpoint, tmp_path)
    assert rule.model == "judge-model"  # model=null: the one model the endpoint lists
    scores = rule(texts, [ROW] * len(texts))
    # 7 and 10 and 0 of [0, 10] -> 0.7, 1.0, 0.0; flaky's retry reads 6; 11 is out of range: unparsed.
    assert scores == pytest.approx([0.7, None, None, 0.6, None, 1.0, None, 0.0])
    assert rule.metrics() == {
        "failures": 4.0,  # garbage, hang (timed out twice), down (500 twice), 11
        "unparsed": 2.0,
        "no_reference": 0.0,
        "requests": 8.0,
        "retries": 3.0,  # hang, flaky, down: one retry each (retries=1)
        "cache_hits": 0.0,
    }
    assert judge_endpoint.count(CHAT) == 8 + 3
    sent = next(s.body for s in judge_endpoint.seen if s.path == CHAT)
    assert sent["model"] == "judge-model" and sent["temperature"] == 0.0 and sent["max_tokens"] == 16
    rule.close()


def test_a_second_instance_on_the_same_cache_asks_nothing_and_a_changed_request_misses(
    judge_endpoint, tmp_path
):
    texts = [f"say:{i}" for i in range(5)]
    first = judge(judge_endpoint, tmp_path)
    expected = first(texts, [ROW] * 5)
    first.close()
    asked = judge_endpoint.count(CHAT)
    assert asked == 5 and expected == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])

    again = judge(judge_endpoint, tmp_path)
    assert again(texts, [ROW] * 5) == expected
    assert again.metrics()["cache_hits"] == 5 and again.metrics()["requests"] == 0
    # The raw answer is stored: another parser reads the same answers without asking again.
    raw = judge(judge_endpoint, tmp_path, low=None, high=None)
    assert raw(texts, [ROW] * 5) == [0.0, 1.0, 2.0, 3.0, 4.0] and raw.metrics()["cache_hits"] == 5
    assert judge_endpoint.count(CHAT) == asked

    changes = (
        {"template": "Grade: {completion}"},
        {"model": "other-judge"},
        {"max_tokens": 4},
        {"extra_body": {"top_p": 0.5}},
    )
    for changed in changes:
        rule = judge(judge_endpoint, tmp_path, **changed)
        assert rule(texts, [ROW] * 5) == expected, changed
        assert rule.metrics()["cache_hits"] == 0 and rule.metrics()["requests"] == 5, changed
        rule.close()
    assert judge_endpoint.count(CHAT) == asked + 20
    assert judge_endpoint.seen[-1].body["top_p"] == 0.5  # extra_body goes out with the request
    nocache = judge(judge_endpoint, tmp_path, cache=None)
    nocache(texts, [ROW] * 5)
    assert nocache.metrics()["requests"] == 5 and judge_endpoint.count(CHAT) == asked + 25


def test_the_default_cache_lives_under_grpo_home(judge_endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("GRPO_HOME", str(tmp_path / "home"))
    rule = judge(judge_endpoint, tmp_path, cache="auto")
    rule(["say:3"], [ROW])
    rule.close()
    assert (tmp_path / "home" / "judge_cache.sqlite").is_file()
    assert not (tmp_path / "judge.sqlite").exists()


def test_parsers_read_what_they_say():
    assert parse_answer("8/10, because", "number") == 8.0
    assert parse_answer("Score: -2.5e1", "number") == -25.0
    assert parse_answer("no digits here", "number") is None
    assert parse_answer("YES, it is right", "yesno") == 1.0
    assert parse_answer("Well... no.", "yesno") == 0.0
    assert parse_answer("yesterday nothing", "yesno") is None  # whole words only
    assert parse_answer('```json\n{"score": 4, "why": "close"}\n```', "json", "score") == 4.0
    assert parse_answer('{"score": "7"}', "json", "score") == 7.0
    assert parse_answer('{"ok": true}', "json", "ok") == 1.0
    assert parse_answer('{"why": "no score"}', "json", "score") is None
    assert parse_answer("{not json", "json", "score") is None


def test_yesno_and_json_parsers_score_through_the_rule(judge_endpoint, tmp_path):
    yesno = judge(judge_endpoint, tmp_path, parser="yesno")
    assert yesno(["say:Yes.", "say:no", "say:maybe"], [ROW] * 3) == [1.0, 0.0, None]
    assert yesno.metrics()["unparsed"] == 1
    as_json = judge(judge_endpoint, tmp_path, parser="json", field="s", low=0, high=4)
    assert as_json(['say:{"s":3}', 'say:{"t":3}'], [ROW] * 2) == [0.75, None]


def test_a_template_that_needs_a_reference_cannot_judge_a_row_without_one(judge_endpoint, tmp_path):
    rows = [ROW, {"question": "open-ended"}, {"question": "empty", "answer": ""}]
    rule = judge(judge_endpoint, tmp_path, template="{question} / {reference} / {completion}")
    assert rule(["say:5"] * 3, rows) == [0.5, None, None]
    assert rule.metrics()["no_reference"] == 2 and rule.metrics()["requests"] == 1
    assert rule.metrics()["failures"] == 0  # not the judge's fault: the rewarder counts it as unjudged
    sent = [s.body["messages"][-1]["content"] for s in judge_endpoint.seen if s.path == CHAT]
    assert sent == ["1+1? / 2 / say:5"]
    without = judge(judge_endpoint, tmp_path, template="{question}: {completion}")
    assert without(["say:5"] * 3, rows) == [0.5, 0.5, 0.5]


def test_a_dead_endpoint_is_one_line_at_construction(tmp_path):
    url = dead_url() + "/v1"
    with pytest.raises(ConfigError) as info:
        JudgeReward(base_url=url, cache=str(tmp_path / "c.sqlite"), timeout=1.0)
    assert url in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "c.sqlite").exists()  # nothing made before the probe failed


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"api_key": "sk-secret"}, "api_key_env="),
        ({"api_key_env": "GRPO_TEST_NO_SUCH_KEY"}, "GRPO_TEST_NO_SUCH_KEY"),
        ({"parser": "regex"}, "number, yesno, json"),
        ({"low": 5, "high": 1}, "low < high"),
        ({"template": "{answer}: {completion}"}, r"\{answer\}"),
        ({"timeout": 0}, "timeout"),
        ({"retries": -1}, "retries"),
        ({"base_url": "127.0.0.1:8000"}, "not a URL"),
    ],
)
def test_bad_options_are_one_line(judge_endpoint, tmp_path, monkeypatch, kwargs, message):
    monkeypatch.delenv("GRPO_TEST_NO_SUCH_KEY", raising=False)
    with pytest.raises(ConfigError, match=message) as info:
        judge(judge_endpoint, tmp_path, **kwargs)
    assert "\n" not in str(info.value) and "sk-secret" not in str(info.value)


def test_model_null_needs_one_served_model(tmp_path):
    with FakeEndpoint(Judge(models=("a", "b"))) as ep:
        with pytest.raises(ConfigError, match="set model="):
            judge(ep, tmp_path)
        assert judge(ep, tmp_path, model="b").model == "b"


def test_the_key_is_sent_from_the_named_environment_variable(judge_endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("GRPO_TEST_JUDGE_KEY", "s3cret")
    rule = judge(judge_endpoint, tmp_path, api_key_env="GRPO_TEST_JUDGE_KEY")
    rule(["say:1"], [ROW])
    assert [s.headers.get("Authorization") for s in judge_endpoint.seen] == ["Bearer s3cret"] * 2
    judge(judge_endpoint, tmp_path, cache=None)(["say:1"], [ROW])
    assert all("Authorization" not in s.headers for s in judge_endpoint.seen[2:])


def test_the_shipped_group_builds_with_every_key(judge_endpoint, tmp_path):
    cfg, _ = compose_config("train", ["reward=judge"])
    (spec,) = cfg.reward.rules
    spec = {**spec, "base_url": judge_endpoint.url + "/v1", "cache": str(tmp_path / "c.sqlite")}
    with build_rewarder([spec]) as rewarder:
        result = rewarder(["say:8", "say:?"], [ROW, ROW])
    assert result.per_rule["judge"] == [0.8, None]  # the default template: 0-10, the first number
    assert result.metrics["reward/judge/failures"] == 1 and result.metrics["reward/judge/unjudged"] == 1
    assert "reward/judge/cache_hits" in result.counts


# --- end to end: grpo train with the judge, resumed from a checkpoint ------------------------------


def crc_judge(req: Seen) -> Reply:
    """0..10 by a checksum of the message: varies within a group, the same for the same text."""
    if req.path == "/v1/models":
        return Reply({"data": [{"id": "crc"}]})
    return chat_answer(str(zlib.crc32(req.body["messages"][-1]["content"].encode()) % 11))


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_a_resumed_training_run_replays_its_step_from_the_judge_cache(
    random_model_dir, tmp_path, monkeypatch
):
    """3 steps of 2 prompts x 4 completions, a checkpoint every 2 steps; the run dies in step 3's
    logging (after its rewards) and is resumed from checkpoint-2: the replayed step 3 samples the same
    completions (exact resume), so all 8 grades come from the cache and the judge is asked nothing."""
    with FakeEndpoint(crc_judge) as ep:
        rule = (
            "reward.rules=[{name:judge,_target_:grpo_cli.rewards.judge.JudgeReward,weight:1.0,"
            f"base_url:'{ep.url}/v1',cache:'{tmp_path / 'judge.sqlite'}',concurrency:2,timeout:30}}]"
        )
        args = [
            f"model.name_or_path={random_model_dir}", "lora=none", rule, "train.prompts_per_step=2",
            "algo.group_size=4", "rollout.max_new_tokens=4", "train.eval_every=0", "data.train_size=64",
            "data.test_size=8", "train.lr=1e-2", "console=plain", "train.steps=3", "train.save_every=2",
        ]  # fmt: skip
        real = train._log_step

        def dies_at_step_3(t, logger, step, *rest):
            if step == 3:
                raise RuntimeError("killed")
            return real(t, logger, step, *rest)

        monkeypatch.setattr(train, "_log_step", dies_at_step_3)
        with pytest.raises(RuntimeError, match="killed"):
            run_train(args, tmp_path / "run")
        monkeypatch.setattr(train, "_log_step", real)
        asked = ep.count(CHAT)
        assert asked == 3 * 8  # steps 1-3, step 3's grades cached before the crash
        run_train([*args, "train.resume=auto"], tmp_path / "run")
        assert ep.count(CHAT) == asked  # the replayed step 3 asked nothing

    rows = metric_rows(tmp_path / "run")
    assert sorted(rows) == [1, 2, 3]
    for step in (1, 2):
        assert rows[step]["reward/judge/requests"] == 8 and rows[step]["reward/judge/cache_hits"] == 0
    assert rows[3]["reward/judge/cache_hits"] == 8 and rows[3]["reward/judge/requests"] == 0
    assert rows[3]["reward/judge/failures"] == 0
    assert 0 <= rows[3]["reward/judge"] <= 1  # grades of 0..10 mapped to [0, 1]


# --- against grpo serve of the tiny model (vLLM's CPU build) ---------------------------------------

# The tiny model has no chat template; the server is given one: the messages' text as is.
PLAIN_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


@pytest.fixture(scope="module")
def tiny_judge(tmp_path_factory, tiny_model_path):
    """One `grpo serve` of the tiny model for this module; skipped without vLLM."""
    if not engines.vllm_available():
        pytest.skip("vLLM not installed (make install-vllm)")
    log_dir = tmp_path_factory.mktemp("judge-server")
    (log_dir / "plain.jinja").write_text(PLAIN_TEMPLATE)
    urls, procs = start_servers(
        ["tiny"], log_dir, vllm_args=("--chat-template", str(log_dir / "plain.jinja"))
    )
    yield urls[0]
    stop_servers(procs)


@pytest.mark.slow
def test_a_real_server_answers_and_what_parses_is_in_range(tiny_judge, tmp_path):
    """The tiny model is no judge: most answers will not be a number in [0, 100]. Every request must
    come back (no failed request), and each failure is an unparsed answer, exactly the ones not in range."""
    rule = JudgeReward(
        base_url=tiny_judge + "/v1",
        template="{question} {completion}",
        low=0,
        high=100,
        max_tokens=6,
        timeout=120,
        concurrency=2,
        cache=str(tmp_path / "judge.sqlite"),
    )
    texts = [f"{a} + {b} = " for a, b in ((3, 4), (12, 30), (5, 5), (40, 2), (7, 1), (9, 9))]
    rows = [{"question": "Compute:", "answer": "x"}] * len(texts)
    scores = rule(texts, rows)
    parsed = [s for s in scores if s is not None]
    metrics = rule.metrics()
    assert metrics["requests"] == len(texts) and metrics["retries"] == 0
    assert metrics["failures"] == metrics["unparsed"] == len(texts) - len(parsed)
    assert all(0 <= s <= 1 for s in parsed)
    assert rule(texts, rows) == scores and rule.metrics()["cache_hits"] == len(texts)
    rule.close()


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_a_judge_that_fails_mid_run_is_counted_and_the_run_goes_on(random_model_dir, tmp_path):
    """The judge answers step 1, then goes down (500s) for step 2, then answers garbage for half of step
    3: the run finishes its 3 steps and its checkpoint, every failed grade is counted and is None (out
    of the loss, never a silent 0), and what was written before the failures is all there."""
    state = {"chats": 0}

    def failing(req: Seen) -> Reply:
        if req.path == "/v1/models":
            return Reply({"data": [{"id": "j"}]})
        state["chats"] += 1
        n = state["chats"]
        if 8 < n <= 8 + 8 * 2:  # step 2: its 8 grades, each tried twice (retries=1): all 500
            return Reply({"error": "down"}, status=500)
        if n > 8 + 16 and n % 2:
            return chat_answer("no grade here")
        return chat_answer(str(n % 11))

    with FakeEndpoint(failing) as ep:
        rule = (
            "reward.rules=[{name:judge,_target_:grpo_cli.rewards.judge.JudgeReward,weight:1.0,"
            f"base_url:'{ep.url}/v1',cache:null,concurrency:1,timeout:30,retries:1,backoff:0.01}}]"
        )
        args = [
            f"model.name_or_path={random_model_dir}", "lora=none", rule, "train.prompts_per_step=2",
            "algo.group_size=4", "rollout.max_new_tokens=4", "train.eval_every=0", "data.train_size=64",
            "data.test_size=8", "console=plain", "train.steps=3", "train.save_every=1",
        ]  # fmt: skip
        run_train(args, tmp_path / "run")
    rows = metric_rows(tmp_path / "run")
    assert sorted(rows) == [1, 2, 3]
    assert rows[1]["reward/judge/failures"] == 0 and rows[1]["reward/judge/unjudged"] == 0
    assert rows[2]["reward/judge/failures"] == 8 and rows[2]["reward/judge/retries"] == 8
    assert rows[2]["reward/unjudged"] == 8 and "reward/judge" not in rows[2]  # nothing judged, no 0 mean
    assert rows[3]["reward/judge/failures"] == rows[3]["reward/judge/unparsed"] == 4
    assert (tmp_path / "run" / "checkpoint-3" / "trainer_state.pt").is_file()  # saved after the failures


def test_grpo_eval_with_the_judge_pays_once_for_the_same_completions(tmp_path):
    """grpo eval of a completions file with reward=judge, twice: the second evaluation asks the judge
    nothing (every grade from the on-disk cache) and reports the same rewards."""
    import json

    from grpo_cli.commands import eval as evaluate
    from grpo_cli.config import DataConfig
    from grpo_cli.data import arithmetic

    rows = arithmetic.load(DataConfig(), "test")[:3]
    records = [{"id": r["id"], "completion": f"{r['answer']} or {i}"} for r in rows for i in range(2)]
    path = tmp_path / "completions.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in records))
    with FakeEndpoint(crc_judge) as ep:
        rule = (
            "reward.rules=[{name:judge,_target_:grpo_cli.rewards.judge.JudgeReward,weight:1.0,"
            f"base_url:'{ep.url}/v1',cache:'{tmp_path / 'judge.sqlite'}',concurrency:2,timeout:30}}]"
        )
        results = []
        for run in ("first", "second"):
            cfg, _ = compose_config("eval", [f"eval.completions={path}", rule])
            evaluate.run(cfg, str(tmp_path / run), overrides=[])
            results.append([json.loads(x) for x in (tmp_path / run / "eval_completions.jsonl").open()])
            if run == "first":
                assert ep.count(CHAT) == len(records)
        assert ep.count(CHAT) == len(records)  # the second evaluation asked nothing
    first, second = ([(r["completion"], r["reward"]) for r in res] for res in results)
    assert first == second and len(first) == len(records)
    assert len({reward for _, reward in first}) > 1  # the grades vary: a cache mix-up would show
