"""Grouped units: an attention head is one unit made of ``group`` channels (DESIGN §3.4, CMR A.6).

A head site's value is the attention output before the output projection, ``(…, width·group)``;
head h owns channels ``h·g … h·g+g−1`` and the o_proj columns of the same block. Its replacement
is the position-constant vector ``c_h = E[a_h]`` (the mean over calibration tokens), which folds
as ``b_o' = b_o + W_o[:, block_h] c_h`` (Proposition 10).

Statistics (:class:`GroupMoments`): per head, the mean vector and the ``g × g`` covariance
``Σ_h``, streamed in float64 and merged with Chan's update ``C = C_a + C_b + δδᵀ n_a n_b / n``.

Scores per head (lower = replaced first):

- ``cmr-logit``: ``E‖W_h (a_h − ā_h)‖² = tr(W_hᵀ W_h Σ_h)`` with ``W_h = W_o[:, block_h]``, the
  exact expected squared distortion of o_proj's output under mean replacement (the full
  quadratic form, not its diagonal);
- ``vbp``: ``tr Σ_h``; ``magnitude``: ``‖W_h‖_F``;
- any other criterion: the sum, over the head's channels, of the criterion's score for each
  channel taken as a unit of its own (a channel-level view of the site).

The replacement is the criterion's per-channel replacement (the mean for every built-in
criterion), so a head's replacement is a vector of ``g`` values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from cmrtool.score.criteria import Criterion, CriterionResult, Evidence, consumer_sq_norms
from cmrtool.sites import Site
from cmrtool.score.stats import as_samples

__all__ = ["GroupMoments", "new_moments", "channel_view", "score_grouped", "head_quadratic"]


class GroupMoments:
    """Per-group mean vectors and covariance matrices, accumulated in float64.

    Duck-compatible with :class:`cmrtool.score.stats.Moments` (``width``, ``count``, ``mean``, ``m2``,
    ``var``, ``update_value``) over the ``groups·size`` channels, plus ``cov`` ``(groups, size, size)``.
    """

    def __init__(self, groups: int, size: int) -> None:
        self.groups, self.size = groups, size
        self.width = groups * size  # channels, as Moments counts units
        self.count = 0
        self._mean = torch.zeros(groups, size, dtype=torch.float64)
        self._c = torch.zeros(groups, size, size, dtype=torch.float64)

    def update_value(self, value: torch.Tensor, unit_axis: int) -> GroupMoments:
        """Fold in a site value; every index but ``unit_axis`` is a sample."""
        x = as_samples(value.detach(), unit_axis).to(torch.float64).reshape(-1, self.groups, self.size)  # (n, G, g)
        n = x.shape[0]
        if n == 0:
            return self
        mean = x.mean(0)
        xc = x - mean
        c = torch.einsum("ngi,ngj->gij", xc, xc)
        total = self.count + n
        delta = mean - self._mean
        self._c += c + delta[:, :, None] * delta[:, None, :] * (self.count * n / total)
        self._mean += delta * (n / total)
        self.count = total
        return self

    def add_partial(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> GroupMoments:
        raise NotImplementedError("grouped sites are accumulated from captured values, not in-graph partials")

    @property
    def mean(self) -> torch.Tensor:
        return self._mean.reshape(-1)

    @property
    def m2(self) -> torch.Tensor:
        return torch.diagonal(self._c, dim1=1, dim2=2).reshape(-1)

    @property
    def var(self) -> torch.Tensor:
        return self.m2 / max(self.count, 1)

    @property
    def cov(self) -> torch.Tensor:
        """Population covariance per group, ``(groups, size, size)``."""
        return self._c / max(self.count, 1)


def new_moments(site: Site) -> object:
    """The accumulator a site needs: :class:`~cmrtool.score.stats.Moments`, or grouped moments for heads."""
    from cmrtool.score.stats import Moments

    return Moments(site.width) if site.group == 1 else GroupMoments(site.width, site.group)


def channel_view(site: Site) -> Site:
    """The site with every channel of every group as a unit of its own (consumers read one column each)."""
    return dataclasses.replace(
        site,
        kind="neuron",
        width=site.channels,
        group=1,
        producers=(),
        consumers=tuple(dataclasses.replace(c, block=1) for c in site.consumers),
    )


def head_quadratic(site: Site, cov: torch.Tensor, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``tr(W_hᵀ W_h Σ_h)`` per group, summed over consumers, float64 ``(width,)``."""
    total = torch.zeros(site.width, dtype=torch.float64)
    for c in site.consumers:
        w = tensors[c.weight].to(torch.float64).reshape(-1, site.width, site.group)  # (out, G, g)
        gram = torch.einsum("ogi,ogj->gij", w, w)
        total += (gram * cov).sum(dim=(1, 2))
    return total


def score_grouped(
    crit: Criterion, site: Site, moments: GroupMoments, tensors: Mapping[str, torch.Tensor], seed: int = 0
) -> CriterionResult:
    """Scores per group ``(width,)`` and the replacement per channel ``(width·group,)``."""
    view = channel_view(site)
    sq = consumer_sq_norms(view, tensors)
    res = crit.fn(Evidence(site=view, moments=moments, col_sq_norms=sq, seed=seed))  # type: ignore[arg-type]
    if crit.name == "cmr-logit":
        scores = head_quadratic(site, moments.cov, tensors)
    elif crit.name == "magnitude":
        scores = sq.reshape(site.width, site.group).sum(1).sqrt()
    else:
        scores = res.scores.reshape(site.width, site.group).sum(1)
    return CriterionResult(scores, res.replacement)
