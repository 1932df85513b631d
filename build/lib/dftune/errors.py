"""The error every entry point reports as one line with exit code 2 (a flag or path the user must fix)."""

from __future__ import annotations

EXIT_BAD_INPUT = 2


class UsageError(Exception):
    """A flag or path the user must fix; reported as one line with exit code 2."""
