"""The one error family of cmrtool.

Every failure a user can cause is a :class:`CmrError` carrying a one-line message and a ``hint``
that names the fix. The CLI prints them as ``error: ...`` / ``hint: ...`` on stderr and exits with
``exit_code``: 1 for bad input, 2 for bad usage, 3 when verification ran and failed.
"""

from __future__ import annotations

__all__ = ["CmrError", "UsageError", "InputError", "UnsupportedModelError", "VerificationFailed", "Interrupted"]


class CmrError(Exception):
    """A failure with a message for a person and a hint that names the fix.

    Args:
        message: one line saying what is wrong.
        hint: one line saying what to do about it.
    """

    exit_code: int = 1

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class InputError(CmrError):
    """A file or tensor given by the user is missing, corrupt, or of the wrong shape."""


class UnsupportedModelError(CmrError):
    """The model loads but has nothing cmrtool can reduce, or a layer it cannot handle."""


class UsageError(CmrError):
    """Options that contradict each other or are out of range (exit code 2)."""

    exit_code = 2


class VerificationFailed(CmrError):
    """Verification ran and a threshold was not met (exit code 3)."""

    exit_code = 3


class Interrupted(BaseException):
    """A termination signal (SIGTERM) arrived; raised like ``KeyboardInterrupt`` so that every
    ``finally`` and cleanup handler runs, and deliberately not an ``Exception``."""
