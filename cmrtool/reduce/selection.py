"""Selection: how many units a site keeps, and which (the highest-scoring ones).

``--keep`` is a fraction of each site's width (rounded to the nearest unit, at least one),
``--keep-count`` an absolute number; ``--round-to N`` moves the kept width to the nearest
multiple of N (at least N, at most the width) so reduced layers stay GPU-friendly. Units are
kept in descending score order; ties go to the lower index, so selection is deterministic.
Per-site selection keeps the bottom-k rule of Theorem 5 (eq. (18)).
"""

from __future__ import annotations

import torch

from cmrtool.errors import UsageError

__all__ = ["kept_width", "choose_kept", "validate_keep"]


def validate_keep(keep: float | None, keep_count: int | None, round_to: int | None) -> None:
    """Check the selection options before any work is done."""
    if keep is not None and keep_count is not None:
        raise UsageError("--keep and --keep-count are mutually exclusive", "pass one of them")
    if keep is not None and not (0.0 < keep <= 1.0):
        raise UsageError(f"--keep must be in (0, 1], got {keep}", "e.g. --keep 0.5 keeps half the units of each site")
    if keep_count is not None and keep_count < 1:
        raise UsageError(f"--keep-count must be at least 1, got {keep_count}", "e.g. --keep-count 128")
    if round_to is not None and round_to < 1:
        raise UsageError(f"--round-to must be at least 1, got {round_to}", "e.g. --round-to 8")


def kept_width(
    site: str, width: int, keep: float | None = None, keep_count: int | None = None, round_to: int | None = None
) -> int:
    """Number of units ``site`` keeps under the options."""
    if keep_count is not None:
        if keep_count >= width:
            raise UsageError(
                f"--keep-count {keep_count} is not below the width {width} of site {site}",
                "use a smaller --keep-count, or choose sites with --site",
            )
        k = keep_count
    else:
        k = max(1, int(round((1.0 if keep is None else keep) * width)))
    if round_to is not None and round_to > width:
        raise UsageError(
            f"--round-to {round_to} is larger than the width {width} of site {site}, so nothing could be replaced",
            f"use --round-to {width} or less, or choose sites with --site",
        )
    if round_to is not None and round_to > 1:
        k = int(round(k / round_to)) * round_to
        k = min(width, max(round_to, k))
    return min(k, width)


def choose_kept(scores: torch.Tensor, k: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Keep the ``k`` highest scores; return sorted (kept, replaced) index tuples."""
    width = int(scores.numel())
    order = torch.sort(scores.to(torch.float64), descending=True, stable=True).indices
    kept = sorted(int(i) for i in order[:k])
    kept_set = set(kept)
    replaced = [i for i in range(width) if i not in kept_set]
    return tuple(kept), tuple(replaced)
