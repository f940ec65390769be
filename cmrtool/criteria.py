"""Criteria: pure functions that score every unit of a site (lower = replaced first).

Each criterion returns a score per unit and the replacement it proposes for that unit
(DESIGN §3.2). Criteria are registered by name; the CLI's choices come from :data:`REGISTRY`.

==============  ==========================================================  ============
name            score for unit j                                            replacement
==============  ==========================================================  ============
``cmr-logit``   ``Var[a_j] · ‖W_c[:, j]‖²`` (CMR paper Thm. 1, A.5)          mean
``vbp``         ``Var[a_j]`` (eq. (10), Lemma 1 / Theorem 3)                  mean
``magnitude``   ``‖W_c[:, j]‖₂``                                             mean
``random``      seeded uniform                                               mean
==============  ==========================================================  ============

``W_c[:, j]`` is everything the consumers read from unit j: a Linear column (all columns of the
unit's block when a feature map is flattened into the Linear), or the whole conv kernel slice
``W[:, j, :, :]``; with several consumers the squared norms add.

``cmr-logit`` is exactly invariant to the positive rescaling ``a_j → s a_j``,
``W_c[:, j] → W_c[:, j] / s`` (Proposition 2): ``Var`` scales by ``s²`` and the squared column
norm by ``s⁻²``. For a site feeding the logits it equals the expected squared logit distortion
of mean replacement, ``E‖W_c[:, j] (ā_j − a_j)‖²``.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cmrtool.errors import UsageError
from cmrtool.sites import Consumer, Site

if TYPE_CHECKING:  # torch is imported lazily so that ``cmrtool --help`` stays fast
    import torch

    from cmrtool.stats import Moments

__all__ = [
    "Evidence",
    "CriterionResult",
    "Criterion",
    "REGISTRY",
    "register",
    "get_criterion",
    "consumer_sq_norms",
    "DEFAULT_CRITERION",
    "REPLACEMENT_MODES",
]

DEFAULT_CRITERION = "cmr-logit"
# How replaced units are filled at compile time: the criterion's own replacement ("auto"), the
# calibration mean, or zero (deletion without a meaningful fold: the baseline folding beats).
REPLACEMENT_MODES = ("auto", "mean", "zero")


@dataclass(frozen=True)
class Evidence:
    """Everything a criterion may read about one site.

    Attributes:
        site: the site.
        moments: per-unit count/mean/M2 over the calibration data.
        col_sq_norms: ``‖W_c[:, j]‖²`` summed over consumers, float64 ``(width,)``.
        seed: the run's seed (criteria that draw must use it).
    """

    site: Site
    moments: Moments
    col_sq_norms: torch.Tensor
    seed: int = 0


@dataclass(frozen=True)
class CriterionResult:
    """Scores (lower = replaced first) and the proposed constant per unit, float64 ``(width,)``."""

    scores: torch.Tensor
    replacement: torch.Tensor


@dataclass(frozen=True)
class Criterion:
    """A registered criterion.

    Attributes:
        name: the CLI name.
        fn: ``Evidence -> CriterionResult``.
        summary: one line for ``--help``.
        needs: statistics the scoring pass must collect (``moments``).
        shares_units: scores are on a common (logit or loss) scale across sites, so
            ``--allocation global`` may rank units of different sites together.
    """

    name: str
    fn: Callable[[Evidence], CriterionResult]
    summary: str
    needs: frozenset[str]
    shares_units: bool = False


REGISTRY: dict[str, Criterion] = {}


def register(
    name: str, summary: str, needs: frozenset[str] = frozenset({"moments"}), shares_units: bool = False
) -> Callable[[Callable[[Evidence], CriterionResult]], Callable[[Evidence], CriterionResult]]:
    """Decorator: register ``fn`` as criterion ``name``."""

    def deco(fn: Callable[[Evidence], CriterionResult]) -> Callable[[Evidence], CriterionResult]:
        REGISTRY[name] = Criterion(name, fn, summary, needs, shares_units)
        return fn

    return deco


def get_criterion(name: str) -> Criterion:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UsageError(
            f"unknown criterion '{name}'", f"choose one of: {', '.join(sorted(REGISTRY))}"
        ) from None


def _unit_view(weight: torch.Tensor, consumer: Consumer, width: int) -> torch.Tensor:
    """The consumer weight as ``(out, width, rest)``: everything unit j feeds in ``[:, j, :]``."""
    import torch

    w = weight.to(torch.float64)
    if consumer.op == "conv":
        return w.reshape(w.shape[0], w.shape[1], -1)  # (out, width, kh*kw)
    if consumer.layout == "strided":
        return w.reshape(w.shape[0], consumer.block, width).transpose(1, 2)  # cols t*width + j
    return w.reshape(w.shape[0], width, consumer.block)  # cols j*block + b


def consumer_sq_norms(site: Site, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``Σ_consumers ‖W_c[:, j]‖²`` per unit, float64 ``(width,)``."""
    import torch

    total = torch.zeros(site.width, dtype=torch.float64)
    for c in site.consumers:
        total += _unit_view(tensors[c.weight], c, site.width).square().sum(dim=(0, 2))
    return total


@register("cmr-logit", "Var[a_j]·‖W_c[:,j]‖²: expected logit distortion of mean replacement (default)")
def cmr_logit(ev: Evidence) -> CriterionResult:
    return CriterionResult(ev.moments.var * ev.col_sq_norms, ev.moments.mean.clone())


@register("vbp", "Var[a_j]: variance-based pruning (not invariant to rescaling)")
def vbp(ev: Evidence) -> CriterionResult:
    return CriterionResult(ev.moments.var.clone(), ev.moments.mean.clone())


@register("magnitude", "‖W_c[:,j]‖₂: norm of the consumer weights reading the unit")
def magnitude(ev: Evidence) -> CriterionResult:
    return CriterionResult(ev.col_sq_norms.sqrt(), ev.moments.mean.clone())


@register("random", "seeded uniform scores: a reference selector")
def random_(ev: Evidence) -> CriterionResult:
    import torch

    # The stream depends on the seed and the site's name only, not on the order sites are scored.
    g = torch.Generator().manual_seed((ev.seed * 1_000_003 + zlib.crc32(ev.site.name.encode())) % (2**63))
    return CriterionResult(torch.rand(ev.site.width, generator=g, dtype=torch.float64), ev.moments.mean.clone())
