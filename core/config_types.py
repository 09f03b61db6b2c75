"""Type checking and light coercion of YAML values against dataclass type hints.

Used by ``core.config.load_config``. Supported hints: ``int``, ``float`` (accepts int, and numeric
strings such as ``1e-4`` that PyYAML 1.1 reads as text), ``str``, ``bool`` (accepts the strings
``true``/``false`` in any case), ``Any``, ``Optional[X]``, ``Union[...]`` / ``X | Y``,
``list[X]``, ``tuple[X, ...]`` / ``tuple[X, Y]`` (from YAML lists), ``dict[K, V]`` and
``Literal[...]``, nested arbitrarily (e.g. ``list[list[str | int | float | None]]``).

Also the YAML reader of configs, :func:`load_yaml_unique`: PyYAML keeps the last of two equal keys
of a mapping without a word, so a config that sets ``lr`` twice would train with whichever came
last; here a repeated key is an error naming the key and both lines.
"""
from __future__ import annotations

import re
import types
import typing
from typing import IO, Any, Literal, Union

import yaml

__all__ = ["TypeMismatch", "DuplicateKey", "coerce_value", "type_name", "load_yaml_unique"]

# What YAML 1.2 (and a human) reads as a float but PyYAML's YAML 1.1 resolver leaves as a string.
_FLOAT_TEXT = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


class TypeMismatch(Exception):
    """A value does not match a type hint (caught and reworded by the config loader)."""


class DuplicateKey(yaml.YAMLError):
    """A YAML mapping holds the same key twice. ``key``, ``line`` (1-based, the repeat) and
    ``first_line`` (where the key was first set) say where."""

    def __init__(self, key: Any, line: int, first_line: int) -> None:
        super().__init__(f"duplicate key {key!r} at line {line} (first set at line {first_line})")
        self.key, self.line, self.first_line = key, line, first_line


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader whose mappings refuse repeated keys (at any nesting depth)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # '<<' merge keys may repeat and are resolved by PyYAML itself
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue  # PyYAML reports unhashable keys itself, with its own message
            line = key_node.start_mark.line + 1
            if key in seen:
                raise DuplicateKey(key, line, seen[key])
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml_unique(stream: Union[str, bytes, IO]) -> Any:
    """``yaml.safe_load`` that raises :class:`DuplicateKey` (a ``yaml.YAMLError``) when a mapping
    repeats a key."""
    return yaml.load(stream, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def type_name(tp: Any) -> str:
    """A short human-readable spelling of a type hint, e.g. ``list[str | None]``."""
    if tp is type(None) or tp is None:
        return "None"
    if tp is Any:
        return "any"
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        if args:
            inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
            return f"{name}[{inner}]"
        return name
    return getattr(tp, "__name__", str(tp))


def coerce_value(value: Any, tp: Any) -> Any:
    """Return ``value`` checked against ``tp`` (lists become tuples for tuple hints, numeric
    strings become floats for float hints). Raises TypeMismatch when it does not fit."""
    if tp is Any:
        return value
    if tp is type(None) or tp is None:
        if value is None:
            return None
        raise TypeMismatch
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        for allowed in args:
            # bool is an int in Python; do not let True match Literal[1].
            if value == allowed and type(value) is type(allowed):
                return value
        raise TypeMismatch
    if origin in (Union, types.UnionType):
        # Exact (uncoerced) matches first so that e.g. "1e-4" stays a string in `str | float`.
        for option in args:
            if _plain_match(value, option):
                return coerce_value(value, option)
        for option in args:
            try:
                return coerce_value(value, option)
            except TypeMismatch:
                continue
        raise TypeMismatch
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise TypeMismatch
        (item_tp,) = args or (Any,)
        return [coerce_value(v, item_tp) for v in value]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeMismatch
        if not args:
            return tuple(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce_value(v, args[0]) for v in value)
        if len(args) != len(value):
            raise TypeMismatch
        return tuple(coerce_value(v, a) for v, a in zip(value, args))
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeMismatch
        key_tp, val_tp = args or (Any, Any)
        return {coerce_value(k, key_tp): coerce_value(v, val_tp) for k, v in value.items()}
    if origin is not None:
        raise TypeError(f"unsupported config type hint {tp!r}")
    return _coerce_scalar(value, tp)


def _plain_match(value: Any, tp: Any) -> bool:
    """Whether ``value`` fits ``tp`` without any coercion (only decides for scalars)."""
    if tp in (int, float, str, bool):
        if tp is float:
            return isinstance(value, float)
        if tp is int:
            return isinstance(value, int) and not isinstance(value, bool)
        return type(value) is tp
    if tp is type(None) or tp is None:
        return value is None
    return False


def _coerce_scalar(value: Any, tp: type) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise TypeMismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeMismatch
    if tp is float:
        if isinstance(value, bool):
            raise TypeMismatch
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
            return float(value)
        raise TypeMismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeMismatch
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise TypeMismatch
    raise TypeError(f"unsupported config type hint {tp!r}")
