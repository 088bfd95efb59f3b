"""Tools rlflow ships, usable by name in ``agent.tools``."""

from __future__ import annotations

import ast
import operator

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def calculator(expression: str) -> str:
    """Evaluate an integer arithmetic expression.

    Args:
        expression: integers joined by +, - and *, with optional parentheses, e.g. 12+34.
    """
    def evaluate(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](evaluate(node.left), evaluate(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -evaluate(node.operand)
        raise ValueError("only integers, +, -, * and parentheses are allowed")

    if len(expression) > 64:
        raise ValueError("expression longer than 64 characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"cannot parse {expression!r}") from None
    return str(evaluate(tree.body))


def _python_tool():
    from rlflow.agents.python_tool import python

    return python


BUILTIN = {"calculator": calculator, "python": _python_tool()}
