"""The one error type inference code raises for problems the user can fix.

It is the project's ``core.errors.UserError`` so that ``run_cli`` prints it as a single line.
"""
try:
    from core.errors import UserError
except ImportError:  # TODO(core owner): drop this fallback once core/errors.py has landed everywhere
    class UserError(Exception):  # type: ignore[no-redef]
        """A configuration or input error the user can fix (printed as one line)."""

__all__ = ["UserError"]
