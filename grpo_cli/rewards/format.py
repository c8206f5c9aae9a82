"""Format reward: 1.0 when the completion matches a regex (default: ``<think>...</think>`` then an answer).

    grpo train reward=math_format      # 1.0 x math + 0.2 x format

The completion is stripped of surrounding whitespace and must match ``pattern`` as a whole
(``re.fullmatch``, DOTALL so ``.`` spans lines). With ``partial=True`` a completion that does not
match still earns half credit spread over the tag pairs: ``0.5 * present / len(tags)``, where a pair
counts as present when ``<tag>`` comes before ``</tag>`` and each appears exactly once. ``tags``
defaults to the tag names in ``pattern`` (``think`` for the default), so a completion that thinks but
gives no answer after ``</think>`` scores 0.5.
"""

from __future__ import annotations

import re

DEFAULT_PATTERN = r"^<think>.*?</think>\s*\S.*$"


class FormatReward:
    """Reward rule: 1.0 on a full match of ``pattern``, else 0.0 (or partial credit, see the module)."""

    def __init__(self, pattern: str = DEFAULT_PATTERN, partial: bool = False, tags: list[str] | None = None):
        self.regex = re.compile(pattern, re.DOTALL)
        self.partial = partial
        self.tags = (
            list(tags) if tags is not None else sorted(set(re.findall(r"</?([A-Za-z_][\w-]*)>", pattern)))
        )

    def score(self, text: str) -> float:
        """Score of one completion in [0, 1]."""
        text = text.strip()
        if self.regex.fullmatch(text):
            return 1.0
        if not self.partial or not self.tags:
            return 0.0
        present = sum(_pair_present(text, tag) for tag in self.tags)
        return 0.5 * present / len(self.tags)

    def __call__(self, completions: list[str], rows: list[dict]) -> list[float | None]:
        """Scores [N]; ``rows`` are not needed."""
        return [self.score(text) for text in completions]


def _pair_present(text: str, tag: str) -> bool:
    open_tag, close_tag = f"<{tag}>", f"</{tag}>"
    if text.count(open_tag) != 1 or text.count(close_tag) != 1:
        return False
    return text.index(open_tag) < text.index(close_tag)


def format_reward(completions: list[str], rows: list[dict]) -> list[float | None]:
    """``FormatReward()`` with its defaults, as a plain function (for ``_target_`` users)."""
    return FormatReward()(completions, rows)
