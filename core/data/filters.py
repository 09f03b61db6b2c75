"""``dataset_filters`` without ``eval``.

Two accepted forms per rule:

* the official ``[key, 'lambda s: s > 4.5']``: the text is parsed with :mod:`ast` and only a single
  comparison / boolean expression over the lambda's one argument with literals is allowed; it is
  then evaluated by the small interpreter below (never compiled or ``eval``-ed);
* the plain ``[key, '>', 4.5]``.

Rules are plain picklable objects so DataLoader workers (fork or spawn) can use them.

Every accepted expression costs time and memory bounded by its length: ``**`` and shifts are not in
the grammar, ``*`` and ``%`` refuse string/list operands (``'x' * 100000000000`` would allocate
100 GB, ``'%999999999d' % s`` a GB), at config time for literals and at evaluation for values,
and the text is at most ``MAX_LAMBDA_CHARS`` long.
"""
from __future__ import annotations

import ast
import operator
from dataclasses import dataclass
from typing import Any

from .errors import DataError

_CMP = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Gt: operator.gt, ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b,
    ast.Is: operator.is_, ast.IsNot: operator.is_not,
}
# Pow is left out on purpose: `s ** 10 ** 10` would let a config stall a worker.
_NUMERIC_ONLY = (ast.Mult, ast.Mod)  # repetition / %-formatting of strings and lists is unbounded
MAX_LAMBDA_CHARS = 1000
_BIN = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
}
_PLAIN = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le,
    "==": operator.eq, "!=": operator.ne,
    "in": lambda a, b: a in b, "not in": lambda a, b: a not in b,
}
_LITERAL_TYPES = (int, float, str, bool, type(None))


class _Rejected(Exception):
    pass


def _check(node: ast.AST, arg: str) -> None:
    """Raise _Rejected unless ``node`` only uses the allowed grammar."""
    if isinstance(node, ast.BoolOp):
        for v in node.values:
            _check(v, arg)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub, ast.UAdd)):
        _check(node.operand, arg)
    elif isinstance(node, ast.Compare):
        _check(node.left, arg)
        for c in node.comparators:
            _check(c, arg)
        if not all(type(op) in _CMP for op in node.ops):
            raise _Rejected("unsupported comparison")
    elif isinstance(node, ast.BinOp):
        if isinstance(node.op, ast.Pow):
            raise _Rejected("'**' is not allowed (its cost is unbounded, e.g. 10 ** 10 ** 10)")
        if type(node.op) not in _BIN:
            raise _Rejected(f"operator {type(node.op).__name__} is not allowed")
        if isinstance(node.op, _NUMERIC_ONLY) and (_is_sequence_literal(node.left) or _is_sequence_literal(node.right)):
            symbol = "*" if isinstance(node.op, ast.Mult) else "%"
            raise _Rejected(f"'{symbol}' with a string or list operand is not allowed (repetition and "
                            f"formatting cost unbounded memory); '{symbol}' is for numbers")
        _check(node.left, arg)
        _check(node.right, arg)
    elif isinstance(node, ast.Name):
        if node.id != arg:
            raise _Rejected(f"name {node.id!r} is not the lambda argument")
    elif isinstance(node, ast.Constant):
        if not isinstance(node.value, _LITERAL_TYPES):
            raise _Rejected("only int/float/str/bool/None literals are allowed")
    elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        for e in node.elts:
            if not isinstance(e, ast.Constant) or not isinstance(e.value, _LITERAL_TYPES):
                raise _Rejected("containers may only hold literals")
    else:
        raise _Rejected(f"{type(node).__name__} is not allowed")


def _is_sequence_literal(node: ast.AST) -> bool:
    return (isinstance(node, ast.Constant) and isinstance(node.value, str)) or isinstance(
        node, (ast.Tuple, ast.List, ast.Set))


def _numeric_only(op: ast.operator, left: Any, right: Any) -> Any:
    """``*`` / ``%`` of two numbers; a string or list operand (from the sample's json) raises
    instead of repeating or formatting it (a filter error counts the sample as filtered)."""
    for x in (left, right):
        if not isinstance(x, (int, float)):
            raise TypeError(f"dataset filter: {type(op).__name__} needs numbers, got {type(x).__name__}")
    return _BIN[type(op)](left, right)


def _eval(node: ast.AST, value: Any) -> Any:
    """Interpret a checked expression with the lambda argument bound to ``value``."""
    if isinstance(node, ast.BoolOp):
        if isinstance(node.op, ast.And):
            result: Any = True
            for v in node.values:
                result = _eval(v, value)
                if not result:
                    return result
            return result
        result = False
        for v in node.values:
            result = _eval(v, value)
            if result:
                return result
        return result
    if isinstance(node, ast.UnaryOp):
        x = _eval(node.operand, value)
        if isinstance(node.op, ast.Not):
            return not x
        return -x if isinstance(node.op, ast.USub) else +x
    if isinstance(node, ast.Compare):
        left = _eval(node.left, value)
        for op, comp in zip(node.ops, node.comparators):
            right = _eval(comp, value)
            if not _CMP[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.BinOp):
        left, right = _eval(node.left, value), _eval(node.right, value)
        if isinstance(node.op, _NUMERIC_ONLY):
            return _numeric_only(node.op, left, right)
        return _BIN[type(node.op)](left, right)
    if isinstance(node, ast.Name):
        return value
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Tuple):
        return tuple(e.value for e in node.elts)  # type: ignore[attr-defined]
    if isinstance(node, ast.List):
        return [e.value for e in node.elts]  # type: ignore[attr-defined]
    if isinstance(node, ast.Set):
        return {e.value for e in node.elts}  # type: ignore[attr-defined]
    raise AssertionError(type(node))  # unreachable: _check ran first


def parse_lambda(text: str, where: str = "dataset_filters") -> tuple[str, ast.AST]:
    """Parse ``'lambda s: <expr>'`` and return (argument name, checked body).

    Raises DataError quoting ``text`` when it is not a one-argument lambda whose body is a single
    comparison / boolean expression over that argument and literals.
    """
    if len(text) > MAX_LAMBDA_CHARS:
        raise DataError(f"{where}: the filter is {len(text)} characters long (at most {MAX_LAMBDA_CHARS}); "
                        f"write e.g. 'lambda s: s > 4.5'")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, RecursionError, MemoryError, ValueError) as e:
        raise DataError(f"{where}: cannot parse {text[:80]!r}: {getattr(e, 'msg', None) or type(e).__name__}") from None
    lam = tree.body
    if not isinstance(lam, ast.Lambda):
        raise DataError(f"{where}: {text!r} is not a lambda; write e.g. 'lambda s: s > 4.5'")
    a = lam.args
    if (len(a.args) != 1 or a.posonlyargs or a.kwonlyargs or a.vararg or a.kwarg or a.defaults):
        raise DataError(f"{where}: {text!r} must take exactly one plain argument")
    arg = a.args[0].arg
    body = lam.body
    if not (isinstance(body, (ast.Compare, ast.BoolOp))
            or (isinstance(body, ast.UnaryOp) and isinstance(body.op, ast.Not))):
        raise DataError(f"{where}: {text!r} must be a comparison or boolean expression "
                        f"(e.g. 'lambda s: s > 4.5')")
    try:
        _check(body, arg)
    except RecursionError:
        raise DataError(f"{where}: {text[:80]!r} is nested too deeply") from None
    except _Rejected as e:
        raise DataError(f"{where}: {text!r} is not allowed: {e} (only comparisons, and/or/not, "
                        f"arithmetic and literals over the argument)") from None
    return arg, body


@dataclass
class FilterRule:
    """One rule: ``predicate(json[key])`` must be truthy for the sample to be kept."""

    key: str
    text: str                      # as written in the config, for messages
    body: ast.AST | None = None    # lambda form
    op: str | None = None          # plain form
    value: Any = None

    def __call__(self, x: Any) -> bool:
        if self.body is not None:
            return bool(_eval(self.body, x))
        return bool(_PLAIN[self.op](x, self.value))  # type: ignore[index]


def parse_filter(rule: object, index: int = 0) -> FilterRule:
    """Parse one ``dataset_filters`` entry (either form); DataError names the entry."""
    where = f"dataset_filters[{index}]"
    if not isinstance(rule, (list, tuple)) or len(rule) not in (2, 3) or not isinstance(rule[0], str):
        raise DataError(f"{where}: expected [key, 'lambda s: ...'] or [key, op, value], got {rule!r}")
    key = rule[0]
    if len(rule) == 2:
        if not isinstance(rule[1], str):
            raise DataError(f"{where}: the second item of {rule!r} must be a lambda string")
        _, body = parse_lambda(rule[1], where)
        return FilterRule(key=key, text=rule[1], body=body)
    op, value = rule[1], rule[2]
    if op not in _PLAIN:
        raise DataError(f"{where}: operator {op!r} is not one of {sorted(_PLAIN)}")
    if op in ("in", "not in"):
        if not isinstance(value, (list, tuple)):
            raise DataError(f"{where}: {op!r} needs a list of values, got {value!r}")
        value = tuple(value)
    elif not isinstance(value, _LITERAL_TYPES):
        raise DataError(f"{where}: value {value!r} must be a number, string, bool or null")
    return FilterRule(key=key, text=f"{op} {value!r}", op=op, value=value)


def parse_filters(rules: list | None) -> list[FilterRule]:
    """Parse the whole ``dataset_filters`` list (None / empty = keep everything)."""
    if not rules:
        return []
    if not isinstance(rules, (list, tuple)):
        raise DataError(f"dataset_filters: expected a list of rules, got {rules!r}")
    return [parse_filter(r, i) for i, r in enumerate(rules)]
