"""Builders and servers the tests share; not test modules (pytest collects nothing here)."""

#: The one wall-clock bound of the tests (child processes, waits for a child's output): a guard
#: against a hang only, never a speed check, so a loaded CI machine cannot fail a test by being
#: slow (speed is measured by bench/, issue 26).
HANG_S = 3600
