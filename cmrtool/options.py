"""Range checks for numeric options, done before any work (a usage error, exit code 2).

Each check exists because the unchecked value did something silent: ``--threads 0`` meant "the
default", ``--check-samples -1`` skipped the fold check, ``--min-iia nan`` compared false and so
never failed, a negative ``--ridge`` made the ridge system indefinite, ``--parents 0`` fitted an
affine replacement on no units.
"""

from __future__ import annotations

import math

from cmrtool.errors import UsageError

__all__ = ["check_at_least", "check_finite", "check_thresholds"]


def check_at_least(flag: str, value: int | None, low: int, example: str) -> None:
    """``value`` (when given) is an integer of at least ``low``."""
    if value is not None and value < low:
        raise UsageError(f"{flag} must be at least {low}, got {value}", f"e.g. {flag} {example}")


def check_finite(flag: str, value: float | None, low: float | None = None, high: float | None = None, example: str = "") -> None:
    """``value`` (when given) is a finite number in [low, high]."""
    if value is None:
        return
    if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
        span = f"in [{low}, {high}]" if low is not None and high is not None else f"at least {low}" if low is not None else "finite"
        raise UsageError(f"{flag} must be a finite number {span}, got {value}", f"e.g. {flag} {example}" if example else "give a number")


def check_thresholds(min_iia: float | None, max_kl: float | None, max_fold_error: float | None) -> None:
    """Verification thresholds: NaN would make every comparison false, so a check that never fails."""
    check_finite("--min-iia", min_iia, 0.0, 1.0, "0.9")
    check_finite("--max-kl", max_kl, 0.0, None, "0.5")
    check_finite("--max-fold-error", max_fold_error, 0.0, None, "1e-4")
