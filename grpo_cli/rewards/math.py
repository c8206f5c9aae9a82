"""Math reward: 1.0 when the completion's final answer equals the gold answer, else 0.0.

    grpo train reward=math data=gsm8k

A check has three steps:

1. ``extract_answer`` takes the final answer out of the completion: the last ``\\boxed{...}`` (braces
   balanced), else the last ``#### x``, else the last ``Answer: x`` / ``The answer is x``, else (when
   ``fallback_last_number``) the last number in the text. No answer scores 0 without a check.
2. Fast path, in this process: when the answer and the gold are both plain numbers (``-12``,
   ``3.50``, ``1,000``) they are compared as decimals, and identical strings match. The default task
   (integer arithmetic, ~1000 checks per step) never leaves this path.
3. Otherwise math-verify parses both (``parse``) and compares them symbolically (``verify``) in a
   pool of worker processes (``rewards/pool.py``) with a hard wall-clock timeout per check. A check
   that runs past it scores 0 and its worker is killed and replaced; a worker that crashes scores 0
   too. Both are
   counted (``metrics()``: ``timeouts``, ``errors``), never silent. math-verify's own
   ``signal.alarm`` timeouts are switched off: they only work on a main thread and turn a timeout
   into a quiet ``False``.

A gold answer that math-verify cannot parse gives ``None`` ("cannot be judged"), which the
trainer leaves out of the advantages.
"""

from __future__ import annotations

import atexit
import logging
import re
from decimal import Decimal, InvalidOperation
from typing import Any
from weakref import finalize as weakref_finalize

from grpo_cli.rewards.pool import CheckPool

log = logging.getLogger("grpo_cli")

# ----------------------------------------------------------------------------------------------
# Answer extraction


_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
_HASHES = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_IS = re.compile(r"(?:\banswer\s*:|\bthe\s+(?:final\s+)?answer\s+is\b:?)[ \t]*([^\n]*)", re.IGNORECASE)
# A minus sign counts only when it is not a binary minus ("3-5" ends in 5, "is -5" in -5).
_NUMBER = re.compile(r"(?:(?<![\w)\]])-)?\d+(?:,\d{3})*(?:\.\d+)?")
_PLAIN_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def _braced(text: str, start: int) -> str | None:
    """Content of the brace group opening at ``text[start] == "{"``; None when it never closes."""
    depth = 0
    for i in range(start, len(text)):
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` (or ``\\boxed 5``); None when there is none."""
    for match in reversed(list(_BOXED.finditer(text))):
        end = match.end()
        if end < len(text) and text[end] == "{":
            content = _braced(text, end)
            if content is not None:  # a truncated box is skipped for an earlier complete one
                return content
        elif end < len(text) and match.group().endswith((" ", "\t")):
            token = text[end:].split(maxsplit=1)
            if token:
                return token[0].rstrip("$.,")
    return None


def _clean(answer: str) -> str:
    """Drop surrounding whitespace, ``$`` delimiters and a sentence's final period."""
    answer = answer.strip().rstrip(".").strip()
    if answer.startswith("$") and answer.endswith("$") and len(answer) > 1:
        answer = answer.strip("$").strip()
    return answer.rstrip(".").strip()


def extract_answer(text: str, fallback_last_number: bool = True) -> str | None:
    """The final answer stated in ``text``, or None.

    Order: last ``\\boxed{...}``, last ``#### x``, last ``Answer: x`` / ``The answer is x`` (rest
    of that line), then the last number when ``fallback_last_number``. Used by the math reward and
    by ``grpo eval``'s majority vote.
    """
    boxed = last_boxed(text)
    if boxed is not None:
        return _clean(boxed)
    for pattern in (_HASHES, _ANSWER_IS):
        matches = [m.group(1) for m in pattern.finditer(text)]
        stated = [_clean(m) for m in matches if _clean(m)]
        if stated:
            return stated[-1]
    if fallback_last_number:
        numbers = _NUMBER.findall(text)
        if numbers:
            return numbers[-1]
    return None


def as_number(text: str) -> Decimal | None:
    """``text`` as a Decimal when it is a plain number (``-3``, ``2.50``, ``$1,000``), else None."""
    text = text.strip().removeprefix("\\$").removeprefix("$").rstrip(".").strip()
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    if not _PLAIN_NUMBER.fullmatch(text):
        return None
    try:
        return Decimal(text)
    except InvalidOperation:
        return None


def fast_check(answer: str, gold: str) -> float | None:
    """1.0 / 0.0 when decidable without math-verify (plain numbers, identical strings), else None."""
    if answer.strip() == gold.strip():
        return 1.0
    a, g = as_number(answer), as_number(gold)
    if a is not None and g is not None:
        return 1.0 if a == g else 0.0
    return None


# ----------------------------------------------------------------------------------------------
# math-verify in worker processes


def _wrap(answer: str) -> str:
    # A box tells math-verify's LaTeX extractor where the whole answer is (measured on MATH-500:
    # boxed and $...$ both parse every gold answer; boxed is twice as fast).
    return "\\boxed{" + answer + "}"


def verify_answer(answer: str, gold: str) -> float | None:
    """math-verify's verdict, in the calling process: 1.0, 0.0, or None when the gold does not parse."""
    from math_verify import parse, verify

    gold_parsed = _parse_gold(gold)
    if not gold_parsed:
        return None
    answer_parsed = parse(_wrap(answer), parsing_timeout=None)
    if not answer_parsed:
        return 0.0
    return 1.0 if verify(gold_parsed, answer_parsed, timeout_seconds=None) else 0.0


_GOLD_CACHE: dict[str, Any] = {}


def _parse_gold(gold: str) -> Any:
    # A group of G completions shares one gold answer: parse it once per worker.
    if gold not in _GOLD_CACHE:
        from math_verify import parse

        if len(_GOLD_CACHE) > 4096:
            _GOLD_CACHE.clear()
        _GOLD_CACHE[gold] = parse(_wrap(gold), parsing_timeout=None)
    return _GOLD_CACHE[gold]


def _import_math_verify() -> None:
    """A worker's start: math-verify imported (the slow part) and its own timeout warnings silenced."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # we time out checks ourselves
    import math_verify  # noqa: F401


class MathReward:
    """Reward rule: 1.0 if the completion's final answer equals ``row["answer"]``, 0.0 if not, None
    when the gold answer cannot be parsed (or is missing).

    Args:
        fallback_last_number: with no boxed / ``####`` / ``Answer:`` answer, use the last number.
        timeout: hard wall-clock limit in seconds for one math-verify check (parse + verify).
        workers: math-verify worker processes (started on the first check that needs one).
        fast_path: compare plain numbers and identical strings in-process; False sends every check
            through math-verify (benchmarks, tests of the verifier).
        memory_mb: address-space limit of each worker process (0: none).
    """

    def __init__(
        self,
        fallback_last_number: bool = True,
        timeout: float = 5.0,
        workers: int = 2,
        fast_path: bool = True,
        memory_mb: int = 4096,
    ):
        self.fallback_last_number, self.fast_path = fallback_last_number, fast_path
        self._pool = CheckPool(
            workers, timeout, memory_mb, check=verify_answer, prepare=_import_math_verify, name="math-verify"
        )
        self._last: dict[str, float] = {}
        self._warned: set[str] = set()
        weakref_finalize(self, self._pool.close)

    def __call__(self, completions: list[str], rows: list[dict]) -> list[float | None]:
        """Scores [N] for N completions and their rows; see the class docstring."""
        scores: list[float | None] = [0.0] * len(completions)
        slow: list[tuple[int, str, str]] = []
        no_answer = 0
        for i, (text, row) in enumerate(zip(completions, rows)):
            gold = str(row.get("answer", "") or "").strip()
            answer = extract_answer(text, self.fallback_last_number) if gold else None
            if not gold:
                scores[i] = None
            elif answer is None:
                no_answer += 1
            elif self.fast_path and (quick := fast_check(answer, gold)) is not None:
                scores[i] = quick
            else:
                slow.append((i, answer, gold))
        counts = {"timeouts": 0, "errors": 0}
        if slow:
            for (i, answer, _), (status, score) in zip(slow, self._pool.run([(a, g) for _, a, g in slow])):
                scores[i] = score
                if status != "ok":
                    counts["timeouts" if status == "timeout" else "errors"] += 1
                    self._warn_once(status, answer)
        self._last = {**counts, "no_answer": float(no_answer), "verified": float(len(slow))}
        return scores

    def metrics(self) -> dict[str, float]:
        """Counts of the last call: ``timeouts``, ``errors`` (both scored 0), ``no_answer``, ``verified``
        (checks that went to math-verify)."""
        return dict(self._last)

    def close(self) -> None:
        """Stop the worker processes (a later call starts new ones)."""
        self._pool.close()

    def _warn_once(self, status: str, answer: str) -> None:
        if status not in self._warned:
            self._warned.add(status)
            what = f"timed out after {self._pool.timeout:g} s" if status == "timeout" else "crashed"
            log.warning(
                "math-verify check %s (answer %.60r); scored 0 and counted in reward/<rule>/%ss",
                what,
                answer,
                status if status == "timeout" else "error",
            )


_DEFAULT: MathReward | None = None


def math_reward(completions: list[str], rows: list[dict]) -> list[float | None]:
    """``MathReward()`` with its defaults, as a plain function (for ``_target_`` users)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = MathReward()
        atexit.register(_DEFAULT.close)
    return _DEFAULT(completions, rows)
