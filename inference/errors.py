"""The one error type inference code raises for problems the user can fix.

It is the project's ``core.errors.UserError``, so ``core.errors.run_cli`` prints it as a single
``error: ...`` line (exit 2, no traceback).
"""
from core.errors import UserError

__all__ = ["UserError"]
