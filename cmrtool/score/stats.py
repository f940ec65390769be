"""Streaming per-unit statistics in float64, mergeable across batches and ranks (DESIGN §3.1).

:class:`Moments` keeps count, mean and M2 (the sum of squared deviations) per unit and merges two
partial results with Chan et al.'s parallel update::

    n = n_a + n_b,  δ = μ_b − μ_a,  μ = μ_a + δ n_b / n,  M2 = M2_a + M2_b + δ² n_a n_b / n

(applied k batches at a time in its k-way form ``μ = Σ n_i μ_i / n``,
``M2 = Σ M2_i + Σ n_i (μ_i − μ)²``), so statistics over a whole calibration set do not depend on
how it was batched beyond float
rounding, and never require holding the activations. ``Var[a_j] = M2_j / n`` (the population
variance of eq. (10) of the CMR paper). The accumulators are float64; each batch's partial mean
and M2 are computed in the activations' own precision by the two-pass algorithm
(:meth:`Moments.update_value`).

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

    _FLUSH = 64  # per-batch partials buffered before one vectorized merge

    def __init__(self, width: int) -> None:
        self.width = width
        self._count = 0
        self._mean = torch.zeros(width, dtype=torch.float64)
        self._m2 = torch.zeros(width, dtype=torch.float64)
        # Buffered partials are copied into one preallocated float64 block (exact for float32
        # and float64 inputs) instead of keeping the small tensors a batch produced: dozens of
        # live small tensors between freed activation buffers fragment the heap, which made RSS
        # grow by ~1 MB per batch until the next merge (measured on the digits ConvNet).
        self._counts: list[int] = []
        self._buffer: torch.Tensor | None = None  # (2, _FLUSH, width): means, M2s
        self._scratch: torch.Tensor | None = None

    # Totals, with any buffered batches merged first.
    @property
    def count(self) -> int:
        self._flush()
        return self._count

    @property
    def mean(self) -> torch.Tensor:
        self._flush()
        return self._mean

    @property
    def m2(self) -> torch.Tensor:
        self._flush()
        return self._m2

    def update(self, samples: torch.Tensor) -> Moments:
        """Fold in a ``(samples, width)`` batch."""
        return self.update_value(samples, -1)

    def update_value(self, value: torch.Tensor, unit_axis: int) -> Moments:
        """Fold in a site value of any rank; every index but ``unit_axis`` is a sample."""
        return self.add_partial(*self.partial(value, unit_axis))

    def partial(self, value: torch.Tensor, unit_axis: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        """One batch's ``(count, mean, M2)`` per unit, without folding it in.

        The batch's mean and M2 come from the two-pass algorithm (mean, then the sum of squared
        deviations from it) reduced over the other axes in place, without transposing the
        activations. The pass runs in the activation's precision (float64 stays float64; half
        precision is upcast to float32): the two-pass form is accurate to a few ulps of that
        precision, and is 5-10x faster on CPU than Welford's ``var_mean`` or a float64 copy of
        every activation.
        """
        x = value.detach()
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        axis = unit_axis % x.dim()
        dims = tuple(d for d in range(x.dim()) if d != axis)
        n = x.numel() // max(x.shape[axis], 1)
        if n == 0 or not dims:
            return n, x.reshape(-1), torch.zeros(x.shape, dtype=x.dtype)
        mean = x.mean(dims, keepdim=True)
        buf = self._scratch
        if buf is None or buf.shape != x.shape or buf.dtype != x.dtype:
            buf = self._scratch = torch.empty_like(x, memory_format=torch.contiguous_format)
        m2 = torch.sub(x, mean, out=buf).square_().sum(dims)  # reuse: no new page faults per batch
        return n, mean.reshape(-1), m2

    def add_partial(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> Moments:
        """Fold in one batch's ``(count, mean, M2)``, e.g. computed inside a model's graph."""
        if n <= 0:
            return self
        if self._buffer is None:
            self._buffer = torch.empty(2, self._FLUSH, self.width, dtype=torch.float64)
        k = len(self._counts)
        self._buffer[0, k].copy_(mean.reshape(-1))
        self._buffer[1, k].copy_(m2.reshape(-1))
        self._counts.append(int(n))
        if k + 1 >= self._FLUSH:
            self._flush()
        return self

    def _flush(self) -> None:
        """Merge buffered batches: the k-way form of Chan's update, vectorized over batches."""
        k = len(self._counts)
        if k == 0:
            return
        assert self._buffer is not None
        if self._count == 0 and k == 1:  # nothing to merge with yet
            self._count, self._mean, self._m2 = self._counts[0], self._buffer[0, 0].clone(), self._buffer[1, 0].clone()
            self._counts = []
            return
        counts = torch.tensor([float(self._count)] + [float(c) for c in self._counts], dtype=torch.float64)
        means = torch.cat([self._mean[None], self._buffer[0, :k]])  # (k + 1, width)
        m2s = torch.cat([self._m2[None], self._buffer[1, :k]])
        self._counts = []
        total = counts.sum()
        mean = (counts[:, None] * means).sum(0) / total
        self._m2 = m2s.sum(0) + (counts[:, None] * (means - mean).square()).sum(0)
        self._mean = mean
        self._count = int(total.item())

    def merge(self, other: Moments) -> Moments:
        """Fold in another partial result (e.g. from another rank)."""
        if other.width != self.width:
            raise ValueError(f"cannot merge moments of width {other.width} into width {self.width}")
        if other.count:
            self.add_partial(other.count, other.mean, other.m2)
            self._flush()
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
        m._count = int(state["count"].item())
        m._mean = state["mean"].to(torch.float64).clone()
        m._m2 = state["m2"].to(torch.float64).clone()
        return m


def _reduce_dims(value: torch.Tensor, unit_axis: int) -> tuple[int, tuple[int, ...]]:
    axis = unit_axis % value.dim()
    return axis, tuple(d for d in range(value.dim()) if d != axis)


def _per_unit(t: torch.Tensor, axis: int, rank: int) -> torch.Tensor:
    """A ``(width,)`` vector shaped to broadcast along ``axis`` of a value of ``rank`` dims."""
    shape = [1] * rank
    shape[axis] = -1
    return t.reshape(shape)


class Comoments:
    """Per-site mean and co-moment matrix ``C = Σ (a − ā)(a − ā)ᵀ`` (width × width), float64.

    The covariance is ``C / n``. Sums are kept around a fixed reference K (the first batch's
    mean), ``S1 = Σ (a − K)``, ``S2 = Σ (a − K)(a − K)ᵀ``, so ``C = S2 − S1 S1ᵀ / n`` does not
    cancel; partial results in different references merge exactly (``merge``). Each batch's
    product ``(a − K)ᵀ(a − K)`` is computed in the activations' precision (float64 stays float64,
    half precision is upcast to float32) and added into the float64 accumulator in row blocks
    of at most ``_BLOCK_BYTES``, so a wide site (a 14,336-unit FFN: 1.6 GB in float64) holds one
    float64 matrix plus a block, never a second full-size float64 temporary. Needed by ``peer``
    (R² of a unit from its peers), ``cmr-lsq`` and affine replacements (ridge fits).
    """

    _BLOCK_BYTES = 64 << 20

    def __init__(self, width: int) -> None:
        self.width = width
        self.count = 0
        self._shift: torch.Tensor | None = None
        self._s1 = torch.zeros(width, dtype=torch.float64)
        self._s2 = torch.zeros(width, width, dtype=torch.float64)
        self._cov: torch.Tensor | None = None

    def update_value(self, value: torch.Tensor, unit_axis: int) -> Comoments:
        x = as_samples(value.detach(), unit_axis)  # (samples, width)
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        n = x.shape[0]
        if n == 0:
            return self
        if self._shift is None:
            self._shift = x.mean(0).to(torch.float64)
        xs = x - self._shift.to(x.dtype)
        self._s1 += xs.sum(0, dtype=torch.float64)
        rows = max(1, self._BLOCK_BYTES // max(8 * self.width, 1))
        for r0 in range(0, self.width, rows):
            r1 = min(self.width, r0 + rows)
            self._s2[r0:r1] += (xs[:, r0:r1].T @ xs).to(torch.float64)
        self.count += n
        self._cov = None
        return self

    def merge(self, other: Comoments) -> Comoments:
        if other.count == 0:
            return self
        assert other._shift is not None
        if self._shift is None:
            self._shift = other._shift.clone()
        d = other._shift - self._shift  # a − K_self = (a − K_other) + d
        self._s2 += other._s2 + torch.outer(d, other._s1) + torch.outer(other._s1, d) + other.count * torch.outer(d, d)
        self._s1 += other._s1 + other.count * d
        self.count += other.count
        self._cov = None
        return self

    @property
    def mean(self) -> torch.Tensor:
        if self._shift is None:
            return torch.zeros(self.width, dtype=torch.float64)
        return self._shift + self._s1 / max(self.count, 1)

    def block(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``cov[rows][:, cols]`` without forming the full covariance (one gather of the block)."""
        n = max(self.count, 1)
        out = self._s2[rows[:, None], cols[None, :]]
        return out.sub_(torch.outer(self._s1[rows], self._s1[cols]), alpha=1.0 / n).div_(n)

    @property
    def c(self) -> torch.Tensor:
        """The co-moment matrix ``Σ (a − ā)(a − ā)ᵀ`` (a new tensor)."""
        return torch.outer(self._s1, self._s1).div_(-max(self.count, 1)).add_(self._s2)

    @property
    def cov(self) -> torch.Tensor:
        """The population covariance ``C / n``, computed once per state (one width² matrix)."""
        if self._cov is None:
            self._cov = self.c.div_(max(self.count, 1))
        return self._cov


class CurvatureSums:
    """Per-unit sums for the quadratic replacement-risk proxy (CMR paper eq. (6)-(9)).

    For samples s with activation a_s, loss gradient g_s and Gauss-Newton curvature h_s with
    respect to the unit, it keeps ``n``, ``Σh``, ``Σh·a'``, ``Σh·a'²``, ``Σg``, ``Σg·a'`` in
    float64, where ``a' = a − K`` is shifted by a fixed per-unit reference K (the first batch's
    mean) so that the weighted variances in eq. (9) do not cancel. The proxy is invariant to
    that shift: ``Q(c) = Σ g (c − a) + ½ Σ h (c − a)²`` depends on ``c − a`` only.
    """

    def __init__(self, width: int) -> None:
        self.width = width
        self.count = 0
        self.shift: torch.Tensor | None = None
        z = torch.zeros(width, dtype=torch.float64)
        self.h, self.ha, self.haa, self.g, self.ga = z.clone(), z.clone(), z.clone(), z.clone(), z.clone()

    def update(self, a: torch.Tensor, g: torch.Tensor | None, h: torch.Tensor | None, unit_axis: int) -> CurvatureSums:
        """Fold in a batch: site value ``a`` and, per element, gradient ``g`` and curvature ``h``."""
        axis, dims = _reduce_dims(a, unit_axis)
        a64 = a.detach().to(torch.float64)
        if self.shift is None:
            self.shift = a64.mean(dims) if dims else a64.clone()
        ap = a64 - _per_unit(self.shift, axis, a64.dim())
        self.count += a.numel() // a.shape[axis]
        if h is not None:
            h64 = h.detach().to(torch.float64)
            self.h += h64.sum(dims)
            self.ha += (h64 * ap).sum(dims)
            self.haa += (h64 * ap * ap).sum(dims)
        if g is not None:
            g64 = g.detach().to(torch.float64)
            self.g += g64.sum(dims)
            self.ga += (g64 * ap).sum(dims)
        return self

    def merge(self, other: CurvatureSums) -> CurvatureSums:
        """Add another partial result, re-expressing its sums in this object's shift."""
        if other.count == 0:
            return self
        if self.shift is None:
            self.shift = other.shift.clone() if other.shift is not None else None
        d = (other.shift - self.shift) if other.shift is not None and self.shift is not None else torch.zeros(self.width, dtype=torch.float64)
        # a' (self) = a'' (other) + d
        self.h += other.h
        self.ha += other.ha + d * other.h
        self.haa += other.haa + 2 * d * other.ha + d * d * other.h
        self.g += other.g
        self.ga += other.ga + d * other.g
        self.count += other.count
        return self

    def optimal(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(c*, s) per unit: eq. (7) and eq. (9).

        Units with no curvature (Σh ≈ 0) get c* = the reference K (the first batch's mean) and a
        score of 0: the proxy measures no effect of replacing them.
        """
        n = max(self.count, 1)
        shift = self.shift if self.shift is not None else torch.zeros(self.width, dtype=torch.float64)
        scale = self.h.abs().max().clamp_min(1e-300)
        ok = self.h > 1e-12 * scale
        hs = torch.where(ok, self.h, torch.ones_like(self.h))
        num = self.ha - self.g
        c_shifted = torch.where(ok, num / hs, torch.zeros_like(num))
        score = (0.5 * self.haa - self.ga - 0.5 * num * num / hs) / n
        # Negative scores are kept: the proxy predicts that replacing such a unit lowers the loss.
        score = torch.where(ok, score, torch.zeros_like(score))
        return c_shifted + shift, score
