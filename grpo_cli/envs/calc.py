"""A calculator tool: the model writes ``<calc>2 + 3 * 4</calc>``, decoding stops at ``</calc>``, and
``<result>14</result>`` enters its context.

    grpo train env=calc model=tiny-tools           # the tiny model with the four markers as tokens
    grpo train env=calc model.name_or_path=<a model whose tokenizer has the four markers as tokens>

The tool's text is the value (``14``) or the error (``error: division by zero``), tokenized as plain
text; ``<result>`` and ``</result>`` are the framing, the only marker tokens in an observation.

Expressions are integers with + - * / // % ** and parentheses, evaluated on their syntax tree (no
``eval``), with bounds on size and exponent so no call runs away. A malformed or failing call comes
back as ``<result>error: ...</result>``.
"""

from __future__ import annotations

import ast
import operator
from typing import Any

from grpo_cli.envs.protocol import Observation

OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
MAX_EXPR_CHARS, MAX_EXPONENT, MAX_ABS = 200, 64, 10**30


def evaluate(expr: str) -> int | float:
    """The value of an arithmetic expression; ValueError for anything else or out of bounds."""
    if len(expr) > MAX_EXPR_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPR_CHARS} characters")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError:
        raise ValueError("not an arithmetic expression") from None
    return _value(tree.body)


def _value(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        v = _value(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in OPS:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ValueError(f"exponent above {MAX_EXPONENT}")
        try:
            out = OPS[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ValueError("division by zero") from None
        if abs(out) > MAX_ABS:
            raise ValueError("result out of range")
        return out
    raise ValueError(f"{type(node).__name__} is not allowed")


def format_number(v: int | float) -> str:
    """Integers as integers (6.0 -> 6), other floats to 6 significant digits."""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return f"{v:.6g}" if isinstance(v, float) else str(v)


class CalcEnv:
    """Stateless: every call is answered on its own."""

    stop_strings = ("</calc>",)
    call_strings = ("<calc>",)
    banned_strings = ("<result>", "</result>")  # only the calculator writes results
    token_help = (
        "use model=tiny-tools (the tiny model with them), or add <calc> </calc> <result> </result> to "
        "the model's tokenizer (tokenizer.add_tokens) and resize its embeddings"
    )

    def __init__(self, cfg: Any = None, tokenizer: Any = None):
        self.cfg = cfg

    def reset(self, row: dict, seed: int) -> None:
        return None

    def framing(self, obs: Observation) -> tuple[str, str]:
        return "<result>", "</result>"

    def step(self, state: Any, turn_text: str) -> Observation:
        text = turn_text.rstrip()
        start = text.rfind("<calc>")
        if start < 0 or not text.endswith("</calc>"):  # the turn ended on </calc> without an opening <calc>
            return Observation("error: no <calc> before </calc>", error=True)
        try:
            expr = text[start + len("<calc>") : -len("</calc>")]
            return Observation(format_number(evaluate(expr)))
        except ValueError as exc:
            return Observation(f"error: {exc}", error=True)
