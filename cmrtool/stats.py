"""Streaming per-unit statistics in float64, mergeable across batches and ranks (DESIGN §3.1).

:class:`Moments` keeps count, mean and M2 (the sum of squared deviations) per unit and merges two
partial results with Chan et al.'s parallel update::

    n = n_a + n_b,  δ = μ_b − μ_a,  μ = μ_a + δ n_b / n,  M2 = M2_a + M2_b + δ² n_a n_b / n

so statistics over a whole calibration set do not depend on how it was batched beyond float
rounding, and never require holding the activations. ``Var[a_j] = M2_j / n`` (the population
variance of eq. (10) of the CMR paper).

Samples: a neuron site contributes one sample per row (and per token for ``(n, t, width)``
values); a channel site one per (image, position).
"""

from __future__ import annotations

import torch

__all__ = ["Moments", "as_samples"]


def as_samples(value: torch.Tensor, unit_axis: int) -> torch.Tensor:
    """Reshape a site value to ``(samples, width)``: the unit axis last, all others flattened."""
    if unit_axis not in (-1, value.dim() - 1):
        value = value.movedim(unit_axis, -1)
    return value.reshape(-1, value.shape[-1])


class Moments:
    """Per-unit count, mean and M2, accumulated in float64.

    Example:
        >>> m = Moments(3)
        >>> m.update(torch.randn(100, 3))
        >>> m.var.shape
        torch.Size([3])
    """

    def __init__(self, width: int) -> None:
        self.width = width
        self.count = 0
        self.mean = torch.zeros(width, dtype=torch.float64)
        self.m2 = torch.zeros(width, dtype=torch.float64)

    def update(self, samples: torch.Tensor) -> Moments:
        """Fold in a ``(samples, width)`` batch."""
        x = samples.detach().to(torch.float64)
        n = x.shape[0]
        if n == 0:
            return self
        mean = x.mean(0)
        m2 = (x - mean).square().sum(0)
        return self._merge(n, mean, m2)

    def merge(self, other: Moments) -> Moments:
        """Fold in another partial result (e.g. from another rank)."""
        if other.width != self.width:
            raise ValueError(f"cannot merge moments of width {other.width} into width {self.width}")
        return self._merge(other.count, other.mean, other.m2)

    def _merge(self, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor) -> Moments:
        n_a = self.count
        if n_b == 0:
            return self
        if n_a == 0:
            self.count, self.mean, self.m2 = n_b, mean_b.clone(), m2_b.clone()
            return self
        n = n_a + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta.square() * (n_a * n_b / n)
        self.count = n
        return self

    @property
    def var(self) -> torch.Tensor:
        """Population variance per unit, ``M2 / n``."""
        return self.m2 / max(self.count, 1)

    def state(self) -> dict[str, torch.Tensor]:
        return {"count": torch.tensor([self.count], dtype=torch.float64), "mean": self.mean, "m2": self.m2}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> Moments:
        m = cls(int(state["mean"].numel()))
        m.count = int(state["count"].item())
        m.mean = state["mean"].to(torch.float64).clone()
        m.m2 = state["m2"].to(torch.float64).clone()
        return m
