"""Per-sample fidelity figures of verify (DESIGN §3.5): KL, top-1 margins, and the statistics on them.

- :func:`wilson`: the 95% Wilson score interval of an agreement rate;
- :func:`margin_certificate`: Theorem 2's lower bound on IIA from the low-level margins and the
  distortion ``D2 = E‖z_H − z_L‖²``: ``sup_ε [1 − P(m ≤ 2ε) − D2/ε²]``;
- float64 log-softmax, KL and margins over logits laid out ``(classes, rows)``.

Per-token figures of token models are :mod:`cmrtool.verify.token_metrics`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = ["wilson", "margin_certificate"]


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a proportion k/n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, center - half)
    hi = 1.0 if k == n else min(1.0, center + half)  # exact at the ends, where rounding would bite
    return (lo, hi)


def margin_certificate(margins: Any, d2: float) -> tuple[float, float | None]:
    """Theorem 2's bound ``sup_ε [1 − P(m ≤ 2ε) − D2/ε²]``, clamped at 0, and its ε.

    Between jumps of the empirical CDF the bound rises with ε, so the supremum is approached
    just below each distinct margin m_(k): ``1 − #{m < m_(k)}/n − 4·D2/m_(k)²``.

    Args:
        margins: the top-1 margins of the low-level logits (a tensor or an array).
        d2: the distortion, E‖z_H − z_L‖² (or its ℓ∞ form).
    """
    m = np.maximum(np.asarray(margins, dtype=np.float64).reshape(-1), 0.0)
    n = m.size
    if n == 0:
        return 0.0, None
    values, counts = np.unique(m, return_counts=True)  # sorted
    below = np.cumsum(counts) - counts  # #{m < value}
    positive = values > 0
    if d2 == 0:
        # No distortion: the bound is 1 − P(m = 0) (ties can always flip), approached as ε → 0.
        return 1.0 - int(counts[~positive].sum()) / n, 0.0
    if not positive.any():
        return 0.0, None
    with np.errstate(divide="ignore", over="ignore"):
        bound = 1.0 - below[positive] / n - 4.0 * d2 / np.square(values[positive])
    best = int(np.argmax(bound))
    value = float(bound[best])
    return (max(0.0, value), float(values[positive][best]) / 2 if value > 0 else None)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    """Log-softmax over axis 0 of float64 logits laid out ``(classes, rows)`` (see :func:`_logits64`)."""
    shifted = z - z.max(axis=0)
    return shifted - np.log(np.exp(shifted).sum(axis=0))


def _kl_logs(lp: np.ndarray, lq: np.ndarray) -> np.ndarray:
    """Per-row KL from log-probabilities laid out ``(classes, rows)``."""
    return (np.exp(lp) * (lp - lq)).sum(axis=0)


def _logits64(z: torch.Tensor) -> np.ndarray:
    """Logits as a float64 ``(classes, rows)`` array, one column per prediction (per sample, or
    per sample and position for per-token logits). The summary statistics run in numpy over
    this transposed layout: reducing 10 classes for 2000 rows is then one vectorised pass per
    class instead of 2000 short loops (~30× faster than torch or numpy on ``(rows, classes)``)."""
    return np.ascontiguousarray(z.detach().to(torch.float64).reshape(-1, z.shape[-1]).numpy().T)


def _margin(z: np.ndarray) -> np.ndarray:
    """Top-1 margin per column of ``(classes, rows)`` logits: largest minus second largest
    (∞ with one class)."""
    if z.shape[0] < 2:
        return np.full(z.shape[1], np.inf)
    top = z.max(axis=0)
    rest = z.copy()
    rest[z.argmax(axis=0), np.arange(z.shape[1])] = -np.inf  # one copy of the maximum removed
    return top - rest.max(axis=0)
