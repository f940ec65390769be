"""Criteria: pure functions that score every unit of a site (lower = replaced first).

Each criterion returns a score per unit and the replacement it proposes (DESIGN §3.2). Criteria
are registered by name; the CLI's choices come from :data:`REGISTRY`.

==============  ==========================================================  ===============
name            score for unit j                                            replacement
==============  ==========================================================  ===============
``cmr-logit``   ``Var[a_j] · ‖W_c[:, j]‖²`` (CMR paper Thm. 1, A.5)          mean
``cmr-const``   eq. (9): min_c of the quadratic loss proxy eq. (6)          mean (c* opt-in)
``cmr-affine``  ½ h̄_j · ridge residual variance of a_j on r parents (A.5)    affine on parents
``vbp``         ``Var[a_j]`` (eq. (10), Lemma 1 / Theorem 3)                  mean
``magnitude``   ``‖W_c[:, j]‖₂``                                             mean
``taylor``      ``(mean_s g_s a_s)²``, the first-order effect of removal     mean
``gndi``        ``E ‖Σ_pos J^{>ℓ}_j (a_j − b_j)‖₂``, b = mean (seed 003)      mean
``peer``        ``(1 − R²_j) · Var[a_j] · ‖W_c[:, j]‖²``, R² from peers      affine on peers
``cmr-lsq``     greedy OBS: output distortion after refitting on the kept     affine on all
                units, ``‖W'_{:,j}‖²/P_jj`` accumulated (:mod:`cmrtool.reduce.lsq`)  kept units
``random``      seeded uniform                                               mean
==============  ==========================================================  ===============

``W_c[:, j]`` is everything the consumers read from unit j: a Linear column (all columns of the
unit's block when a feature map is flattened into the Linear), or the whole conv kernel slice
``W[:, j, :, :]``; with several consumers the squared norms add. g and h are the per-sample loss
gradient and Gauss-Newton curvature with respect to the unit (:mod:`cmrtool.score.sensitivity`).

``cmr-logit`` is exactly invariant to the positive rescaling ``a_j → s a_j``,
``W_c[:, j] → W_c[:, j] / s`` (Proposition 2): ``Var`` scales by ``s²`` and the squared column
norm by ``s⁻²``; ``cmr-const`` is too (g scales by 1/s, h by 1/s², a by s). For a site feeding
the logits, ``cmr-logit`` equals the expected squared logit distortion of mean replacement.
Under zero gradient and uniform curvature ``cmr-const`` is ``α/2·Var`` (Lemma 1), i.e. ``vbp``.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cmrtool.errors import UsageError
from cmrtool.sites import Consumer, Site

if TYPE_CHECKING:  # torch is imported lazily so that ``cmrtool --help`` stays fast
    import torch

    from cmrtool.score.stats import Comoments, CurvatureSums, Moments

__all__ = [
    "Evidence",
    "CriterionResult",
    "Criterion",
    "REGISTRY",
    "register",
    "get_criterion",
    "parse_criteria",
    "consumer_sq_norms",
    "consumer_matrix",
    "DEFAULT_CRITERION",
    "REPLACEMENT_MODES",
    "AFFINE_MODES",
    "ALLOCATIONS",
]

DEFAULT_CRITERION = "cmr-logit"
# How replaced units are filled at compile time: the criterion's own replacement ("auto"), the
# calibration mean, zero (deletion without a meaningful fold: the baseline folding beats), the
# optimal constant c* of eq. (7) ("optimal"), an affine function of kept units ("affine"), or a
# linear one without intercept ("affine-nobias": folds into the kept columns only, no bias).
REPLACEMENT_MODES = ("auto", "mean", "zero", "optimal", "affine", "affine-nobias")
AFFINE_MODES = ("affine", "affine-nobias")
ALLOCATIONS = ("site", "global")


@dataclass(frozen=True)
class Evidence:
    """Everything a criterion may read about one site.

    Attributes:
        site: the site.
        moments: per-unit count/mean/M2 over the calibration data.
        col_sq_norms: ``‖W_c[:, j]‖²`` summed over consumers, float64 ``(width,)``.
        seed: the run's seed (criteria that draw must use it).
        comoments: the co-moment matrix (criteria that need ``cov``).
        curvature: curvature-weighted sums (criteria that need ``grad``/``curv``).
        gndi_unit, gndi_site, gndi_count: G-NDI sums (criteria that need ``gndi``).
        ridge: relative ridge for regressions (times the mean unit variance).
        parents: parents per unit for affine fits (None: every other unit).
        consumer_weights: everything the consumers read from each unit, ``(rows, width)``
            float64 (criteria that need ``consumers``).
    """

    site: Site
    moments: Moments
    col_sq_norms: torch.Tensor
    seed: int = 0
    comoments: Comoments | None = None
    curvature: CurvatureSums | None = None
    gndi_unit: torch.Tensor | None = None
    gndi_site: float | None = None
    gndi_count: int = 0
    ridge: float = 1e-3
    parents: int | None = 8
    consumer_weights: torch.Tensor | None = None


@dataclass(frozen=True)
class CriterionResult:
    """Scores (lower = replaced first) and the proposed constant per unit, float64 ``(width,)``.

    ``kind`` is ``affine`` when the criterion's natural replacement is an affine function of the
    kept units (fitted at compile time); ``replacement`` then holds the means. ``site_score``
    scores the whole site where the criterion defines one (``gndi``).
    """

    scores: torch.Tensor
    replacement: torch.Tensor
    kind: str = "constant"
    site_score: float | None = None


@dataclass(frozen=True)
class Criterion:
    """A registered criterion.

    Attributes:
        name: the CLI name.
        fn: ``Evidence -> CriterionResult``.
        summary: one line for ``--help``.
        needs: statistics the scoring pass must collect: ``moments``, ``cov``, ``grad``,
            ``curv``, ``gndi``, and ``labels`` (use the model's own predictions when the data
            has no labels); ``consumers``: the consumer weights as a matrix.
        shares_units: scores are on a common (loss or logit) scale across sites, so
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


def parse_criteria(criteria: str | Sequence[str]) -> tuple[str, ...]:
    """Criterion names from ``"cmr-logit,vbp"`` or a sequence, each checked against the registry,
    duplicates dropped (``audit --criteria``, ``sweep --criterion``)."""
    items = [c.strip() for c in criteria.split(",")] if isinstance(criteria, str) else [str(c) for c in criteria]
    out: list[str] = []
    for c in filter(None, items):
        get_criterion(c)
        if c not in out:
            out.append(c)
    if not out:
        raise UsageError("no criteria given", "e.g. cmr-logit,vbp,random")
    return tuple(out)


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


def consumer_matrix(site: Site, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Every consumer's weights as one ``(rows, width)`` float64 matrix: column j is all that unit
    j feeds (a Linear's column; per kernel tap or flattened position, one row block each), so
    ``‖W[:, j]‖²`` is :func:`consumer_sq_norms` and ``W Σ Wᵀ`` the consumers' output covariance
    (exact for Linear consumers of unit-last sites; per position for blocks and kernels)."""
    import torch

    parts = [_unit_view(tensors[c.weight], c, site.width).permute(0, 2, 1).reshape(-1, site.width) for c in site.consumers]
    return torch.cat(parts) if parts else torch.zeros(0, site.width, dtype=torch.float64)


@register("cmr-logit", "Var[a_j]·‖W_c[:,j]‖²: expected logit distortion of mean replacement (default)")
def cmr_logit(ev: Evidence) -> CriterionResult:
    return CriterionResult(ev.moments.var * ev.col_sq_norms, ev.moments.mean.clone())


@register("vbp", "Var[a_j]: variance-based pruning (not invariant to rescaling)")
def vbp(ev: Evidence) -> CriterionResult:
    return CriterionResult(ev.moments.var.clone(), ev.moments.mean.clone())


@register("magnitude", "‖W_c[:,j]‖₂: norm of the consumer weights reading the unit")
def magnitude(ev: Evidence) -> CriterionResult:
    return CriterionResult(ev.col_sq_norms.sqrt(), ev.moments.mean.clone())


@register("cmr-const", "eq. (9): minimal quadratic loss increase of replacing the unit by its optimal constant c*", frozenset({"moments", "grad", "curv"}), shares_units=True)
def cmr_const(ev: Evidence) -> CriterionResult:
    # The score is eq. (9). Its minimiser c* (eq. (7)) is what --replacement optimal folds; the
    # default is the mean, which measured far better on the samples: where the model is confident
    # the curvature is tiny, so the gradient correction −Σg/Σh pushes c* far outside the range
    # where the quadratic proxy holds (digits MLP, keep 0.5: 9% accuracy with c*, 77% with means).
    assert ev.curvature is not None
    _, score = ev.curvature.optimal()
    return CriterionResult(score, ev.moments.mean.clone())


@register("cmr-affine", "½·mean curvature·ridge residual variance of the unit on its r most correlated peers (affine replacement)", frozenset({"moments", "cov", "curv"}))
def cmr_affine(ev: Evidence) -> CriterionResult:
    from cmrtool.reduce.affine import peer_residual_variance

    from cmrtool.reduce.affine import conditional_variance

    assert ev.comoments is not None and ev.curvature is not None
    hbar = ev.curvature.h / max(ev.curvature.count, 1)
    cov = ev.comoments.cov
    resid = conditional_variance(cov, ev.ridge) if ev.parents is None else peer_residual_variance(cov, ev.parents, ev.ridge)
    return CriterionResult(0.5 * hbar * resid, ev.moments.mean.clone(), kind="affine")


@register("taylor", "(mean g·a)²: first-order loss change of removing the unit (pseudo-labels without labels)", frozenset({"moments", "grad", "labels"}))
def taylor(ev: Evidence) -> CriterionResult:
    cs = ev.curvature
    assert cs is not None and cs.shift is not None
    ga = (cs.ga + cs.shift * cs.g) / max(cs.count, 1)  # unshifted Σ g a / n
    return CriterionResult(ga.square(), ev.moments.mean.clone())


@register("gndi", "E‖J(a_j − mean)‖₂: downstream effect of setting the unit to its mean (G-NDI, exact Jacobians)", frozenset({"moments", "gndi"}), shares_units=True)
def gndi(ev: Evidence) -> CriterionResult:
    assert ev.gndi_unit is not None
    n = max(ev.gndi_count, 1)
    return CriterionResult(ev.gndi_unit / n, ev.moments.mean.clone(), site_score=(ev.gndi_site or 0.0) / n)


@register("peer", "(1 − R²)·Var·‖W_c‖²: logit distortion left after predicting the unit from its peers", frozenset({"moments", "cov"}))
def peer(ev: Evidence) -> CriterionResult:
    from cmrtool.reduce.affine import conditional_variance

    assert ev.comoments is not None
    return CriterionResult(conditional_variance(ev.comoments.cov, ev.ridge) * ev.col_sq_norms, ev.moments.mean.clone(), kind="affine")


@register("cmr-lsq", "greedy OBS: consumer-output distortion left after refitting the removed units on all kept units (pairs with --replacement affine)", frozenset({"moments", "cov", "consumers"}))
def cmr_lsq(ev: Evidence) -> CriterionResult:
    # Compensation-aware: a unit scores by the distortion its removal adds once it and the units
    # removed before it are refit on the kept ones (cmrtool.reduce.lsq.greedy_removal). The kept set at
    # any keep fraction is the greedy's, since its removal order is nested.
    from cmrtool.reduce.lsq import greedy_removal, removal_scores

    assert ev.comoments is not None and ev.consumer_weights is not None
    order, added = greedy_removal(ev.comoments.cov, ev.consumer_weights, ev.ridge)
    return CriterionResult(removal_scores(order, added), ev.moments.mean.clone(), kind="affine")


@register("random", "seeded uniform scores: a reference selector")
def random_(ev: Evidence) -> CriterionResult:
    import torch

    # The stream depends on the seed and the site's name only, not on the order sites are scored.
    g = torch.Generator().manual_seed((ev.seed * 1_000_003 + zlib.crc32(ev.site.name.encode())) % (2**63))
    return CriterionResult(torch.rand(ev.site.width, generator=g, dtype=torch.float64), ev.moments.mean.clone())
