"""User-facing errors and the CLI wrapper that turns them into one clear line.

An error the user can fix (bad config key, missing file, wrong model version, ...) must not
produce a traceback: it prints ``error: <message>`` and exits with status 2. Everything else is a
bug and keeps its traceback so it can be reported.
"""
from __future__ import annotations

import sys
from typing import Callable, NoReturn, Optional, Sequence

__all__ = ["UserError", "run_cli", "is_user_error", "is_user_error_class", "USER_ERROR_CLASS_NAMES",
           "USER_ERROR_EXIT", "INTERRUPT_EXIT"]

USER_ERROR_EXIT = 2
INTERRUPT_EXIT = 130

# Errors raised by other packages that are user-fixable by contract. They are matched by class
# name as well, so a failing import of those packages cannot hide the original error. Every other
# exception class of the project is either one of these (by inheritance: LoraFormatError,
# ClipModelNotFoundError, ShardMissing, ...) or converted where user input raises it
# (tests/test_faults_config.py lists them and checks the list is complete).
USER_ERROR_CLASS_NAMES = ("UserError", "CheckpointError", "DataError", "AdapterError")
_USER_ERROR_CLASS_NAMES = USER_ERROR_CLASS_NAMES


class UserError(Exception):
    """An error the user can fix. The message is ONE line: what, where, how to fix."""


def _user_error_types() -> tuple[type, ...]:
    """The user-error classes of other packages that are already imported. Importing them here
    would cost seconds (torch) on every error; class-name matching covers them anyway."""
    types: list[type] = [UserError]
    for module_name, class_name in (("fileio.errors", "CheckpointError"), ("core.data", "DataError")):
        module = sys.modules.get(module_name)
        cls = getattr(module, class_name, None) if module is not None else None
        if isinstance(cls, type):
            types.append(cls)
    return tuple(types)


def is_user_error_class(cls: type) -> bool:
    """True when exceptions of class ``cls`` are user-fixable (by class, or by class name in its MRO)."""
    if issubclass(cls, _user_error_types()):
        return True
    return any(k.__name__ in _USER_ERROR_CLASS_NAMES for k in cls.__mro__)


def is_user_error(exc: BaseException) -> bool:
    """True when ``exc`` is a user-fixable error (by class, or by class name in its MRO)."""
    return is_user_error_class(type(exc))


def _one_line(message: str) -> str:
    # A multi-line message would break the "one clear line" promise; join the lines instead.
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def run_cli(main: Callable[[list[str]], Optional[int]], argv: Optional[Sequence[str]] = None) -> NoReturn:
    """Run ``main(argv)`` and exit with its return code.

    UserError / CheckpointError / DataError -> ``error: <message>`` on stderr, exit 2, no traceback.
    KeyboardInterrupt -> exit 130. Any other exception propagates (traceback, exit 1).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        code = main(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(INTERRUPT_EXIT)
    except Exception as exc:  # noqa: BLE001 - re-raised unless user-fixable
        if not is_user_error(exc):
            raise
        print(f"error: {_one_line(str(exc))}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)
    sys.exit(int(code or 0))
