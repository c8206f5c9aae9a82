"""Math reward: answer extraction, the in-process fast path, math-verify in worker processes with hard
timeouts, and the acceptance checks on real GSM8K and MATH-500 rows."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from grpo_cli.rewards.math import MathReward, as_number, extract_answer, fast_check, math_reward


def shared_data() -> Path | None:
    """$GRPO_SHARED_DATA, else the first ``shared/data`` found walking up from the repository root."""
    if os.environ.get("GRPO_SHARED_DATA"):
        return Path(os.environ["GRPO_SHARED_DATA"])
    repo = Path(__file__).resolve().parents[2]
    for parent in (repo, *repo.parents):
        if (parent / "shared" / "data").is_dir():
            return parent / "shared" / "data"
    return None


def read_jsonl(relative: str) -> list[dict]:
    root = shared_data()
    if root is None or not (root / relative).is_file():
        pytest.skip(f"{relative} not found under $GRPO_SHARED_DATA or ../shared/data (the issue's real data)")
    with open(root / relative, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def verifier():
    """Every check through math-verify (no fast path), two workers, shared by the module's tests."""
    reward = MathReward(fast_path=False, workers=2, timeout=10.0)
    yield reward
    reward.close()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so the total is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("\\boxed{1} then \\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # the last box, braces balanced
        ("\\boxed{a{b}c} and a cut-off \\boxed{x+", "a{b}c"),  # an unclosed box is skipped
        ("\\boxed 5", "5"),
        ("She pays 3 * 6 = 18.\n#### 1,234", "1,234"),
        ("Answer: $42$.", "42"),
        ("the final answer is -7", "-7"),
        ("The answer is: \\frac{3}{4}\nThanks", "\\frac{3}{4}"),
        ("first 12 then 3-5", "5"),  # a binary minus is not a sign
        ("we get -3.5 apples", "-3.5"),
        ("no digits here", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_without_fallback():
    assert extract_answer("it is 42", fallback_last_number=False) is None
    assert extract_answer("#### 42", fallback_last_number=False) == "42"


def test_plain_numbers_and_fast_check():
    assert as_number("1,000") == as_number("1000.0") == 1000
    assert as_number("$18") == 18 and as_number("-2.5") == -2.5
    assert as_number("1,2") is None and as_number("\\frac{1}{2}") is None
    assert fast_check("18.00", "18") == 1.0
    assert fast_check("17", "18") == 0.0
    assert fast_check("\\frac{1}{2}", "\\frac{1}{2}") == 1.0  # identical strings
    assert fast_check("0.5", "\\frac{1}{2}") is None  # needs math-verify


def test_fast_path_needs_no_worker():
    reward = MathReward()
    rows = [{"answer": "14"}, {"answer": "-3"}, {"answer": "14"}, {"answer": ""}]
    scores = reward(["14", "x = -3", "I think 15", "anything"], rows)
    assert scores == [1.0, 1.0, 0.0, None]  # an empty gold cannot be judged
    assert reward.metrics()["verified"] == 0
    assert reward._pool._pool == []  # no process was started
    assert math_reward(["#### 7"], [{"answer": "7"}]) == [1.0]


def test_math_verify_equivalences(verifier):
    rows = [{"answer": a} for a in ("\\frac{1}{2}", "\\frac{14}{3}", "(1, 2)", "\\sqrt{8}", "10")]
    completions = [
        "\\boxed{0.5}",
        "\\boxed{\\dfrac{14}{3}}",
        "\\boxed{(1,2)}",
        "\\boxed{2\\sqrt{2}}",
        "\\boxed{11}",
    ]
    assert verifier(completions, rows) == [1.0, 1.0, 1.0, 1.0, 0.0]
    assert verifier.metrics()["timeouts"] == 0 and verifier.metrics()["errors"] == 0


def test_unparsable_gold_is_unjudged(verifier):
    assert verifier(["\\boxed{3}"], [{"answer": "}{"}]) == [None]  # math-verify parses nothing from it


def test_pathological_check_times_out_and_is_counted():
    reward = MathReward(fast_path=False, workers=1, timeout=1.0)
    try:
        assert reward(["\\boxed{1}"], [{"answer": "1"}]) == [1.0]  # worker started and warm
        start = time.monotonic()
        # 9^(9^9) has ~370 million digits: sympy grinds on it far past any timeout.
        scores = reward(["\\boxed{9^{9^{9}}}", "\\boxed{2}"], [{"answer": "3"}, {"answer": "2"}])
        elapsed = time.monotonic() - start
        assert scores == [0.0, 1.0]
        assert reward.metrics()["timeouts"] == 1 and reward.metrics()["errors"] == 0
        assert elapsed < 1.0 + 4.0  # the timeout plus a replacement worker's start
        assert reward(["\\boxed{4}"], [{"answer": "4"}]) == [1.0]  # the pool recovered
    finally:
        reward.close()


def test_worker_crash_scores_zero_and_is_counted():
    reward = MathReward(fast_path=False, workers=1, timeout=30.0)
    try:
        reward(["\\boxed{1}"], [{"answer": "1"}])
        worker = reward._pool._pool[0]
        threading.Timer(0.5, worker.proc.kill).start()  # dies mid-check, as on a segfault
        assert reward(["\\boxed{9^{9^{9}}}"], [{"answer": "3"}]) == [0.0]
        assert reward.metrics()["errors"] == 1 and reward.metrics()["timeouts"] == 0
        assert reward(["\\boxed{4}"], [{"answer": "4"}]) == [1.0]
    finally:
        reward.close()


def _bump_final_number(solution: str) -> str:
    head, tail = solution.rsplit("####", 1)
    number = as_number(tail.strip())
    return f"{head}#### {number + 1}"


@pytest.fixture(scope="module")
def gsm8k() -> tuple[list[dict], list[dict]]:
    records = read_jsonl("gsm8k/test.jsonl")
    return records, [{"answer": r["answer"].rsplit("####", 1)[1].strip().replace(",", "")} for r in records]


@pytest.mark.slow
@pytest.mark.parametrize("path", ["fast", "math-verify"])
def test_gsm8k_gold_solutions_score_one_and_wrong_finals_zero(gsm8k, verifier, path):
    records, rows = gsm8k
    assert len(records) == 1319
    reward = MathReward() if path == "fast" else verifier
    right = reward([r["answer"] for r in records], rows)
    wrong = reward([_bump_final_number(r["answer"]) for r in records], rows)
    failures = [records[i]["answer"][-40:] for i, s in enumerate(right) if s != 1.0]
    assert len(failures) <= 0.005 * len(records), failures[:20]
    assert all(s == 0.0 for s in wrong), [
        records[i]["answer"][-40:] for i, s in enumerate(wrong) if s != 0.0
    ][:20]


@pytest.mark.slow
def test_math500_boxed_gold_scores_one(verifier):
    records = read_jsonl("math500/test.jsonl")
    assert len(records) == 500
    rows = [{"answer": r["answer"]} for r in records]
    scores = verifier([f"The answer is \\boxed{{{r['answer']}}}" for r in records], rows)
    failures = [f"{r['unique_id']}: {r['answer']!r} -> {s}" for r, s in zip(records, scores) if s != 1.0]
    assert len(failures) <= 0.02 * len(records), "\n".join(failures)
    assert verifier.metrics()["timeouts"] == 0


@pytest.mark.slow
def test_math500_numeric_gold_plus_one_scores_zero(verifier):
    records = [r for r in read_jsonl("math500/test.jsonl") if as_number(r["answer"]) is not None]
    assert len(records) > 200
    completions = [f"The answer is \\boxed{{{as_number(r['answer']) + 1}}}" for r in records]
    scores = verifier(completions, [{"answer": r["answer"]} for r in records])
    wrong = [r["answer"] for r, s in zip(records, scores) if s != 0.0]
    assert not wrong, wrong


def test_no_answer_counts():
    reward = MathReward(fallback_last_number=False)
    assert reward(["I am not sure", "Answer: 3"], [{"answer": "3"}] * 2) == [0.0, 1.0]
    assert reward.metrics()["no_answer"] == 1


def test_reward_runs_from_a_thread():
    # signal.alarm timeouts (math-verify's own) fail off the main thread; ours do not depend on it.
    reward = MathReward(fast_path=False, workers=1)
    out = {}
    thread = threading.Thread(
        target=lambda: out.setdefault("s", reward(["\\boxed{0.5}"], [{"answer": "1/2"}]))
    )
    thread.start()
    thread.join(60)
    reward.close()
    assert out["s"] == [1.0]
