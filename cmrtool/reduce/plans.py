"""Plans from scores: which units each site keeps, and the constants that replace the others.

:func:`make_plan` selects kept units per site (:mod:`cmrtool.reduce.selection`) and takes each replaced
unit's constant from the criterion (``replacement="auto"``), the calibration mean (``"mean"``)
or zero (``"zero"``: plain deletion without folding a meaningful constant, the baseline that
shows what folding buys). :func:`with_affine` and :func:`with_constants` swap in fitted
replacements (:mod:`cmrtool.reduce.affine`, :mod:`cmrtool.reduce.refit`); :func:`compose` joins
the steps of a schedule (:mod:`cmrtool.reduce.planner`). The plan goes on to :mod:`cmrtool.compile`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from cmrtool.compile.fold import unit_rows
from cmrtool.errors import InputError, UsageError
from cmrtool.plan import Plan, Replacement, SitePlan
from cmrtool.reduce.selection import choose_kept, kept_width, validate_keep
from cmrtool.score.criteria import ALLOCATIONS, REGISTRY, REPLACEMENT_MODES, get_criterion
from cmrtool.score.scoring import ScoreReport
from cmrtool.sites import Site

__all__ = ["REPLACEMENTS", "make_plan", "with_affine", "with_constants", "compose", "check_allocation"]

REPLACEMENTS = REPLACEMENT_MODES


def _global_counts(
    scores: ScoreReport, sites: Sequence[Site], keep: float | None, keep_count: int | None, round_to: int | None
) -> dict[str, int]:
    """Kept units per site when all sites' units are ranked together (``--allocation global``).

    ``--keep`` is then a fraction of all units, ``--keep-count`` a total; every site keeps at
    least one unit (and ``--round-to`` multiples).
    """
    total = sum(s.width for s in sites)
    k = keep_count if keep_count is not None else max(len(sites), int(round((1.0 if keep is None else keep) * total)))
    if k >= total:
        raise UsageError(f"--keep-count {k} is not below the {total} units of the selected sites", "use a smaller --keep-count")
    ranked = []
    for s in sites:
        for j, v in enumerate(scores.site(s.name).scores):
            ranked.append((-v, s.name, j))
    ranked.sort()
    counts = {s.name: 0 for s in sites}
    for _, name, _ in ranked[:k]:
        counts[name] += 1
    out = {}
    for s in sites:
        c = max(1, counts[s.name])
        if round_to is not None and round_to > 1:
            c = min(s.width, max(round_to, int(round(c / round_to)) * round_to))
        out[s.name] = c
    return out


def check_allocation(allocation: str, criterion: str, sites: Sequence[Site]) -> None:
    """``--allocation global`` ranks units of different sites together: only criteria whose
    scores are on a common scale across sites qualify (DESIGN §3.3)."""
    if allocation not in ALLOCATIONS:
        raise UsageError(f"unknown allocation '{allocation}'", f"choose one of: {', '.join(ALLOCATIONS)}")
    if allocation == "site":
        return
    crit = get_criterion(criterion)
    if crit.shares_units:
        return
    if criterion == "cmr-logit" and all(s.feeds_logits for s in sites):
        return
    shared = sorted(n for n, c in REGISTRY.items() if c.shares_units)
    raise UsageError(
        f"--allocation global needs scores on a common scale across sites; {criterion} scores are per site"
        + (" (cmr-logit qualifies only when every selected site feeds the logits)" if criterion == "cmr-logit" else ""),
        f"use --allocation site, or a criterion that shares units: {', '.join(shared)}",
    )


def make_plan(
    scores: ScoreReport,
    sites: Sequence[Site],
    keep: float | None = None,
    keep_count: int | None = None,
    round_to: int | None = None,
    replacement: str = "auto",
    allocation: str = "site",
    counts: dict[str, int] | None = None,
) -> Plan:
    """Choose kept units per site and their (constant) replacements.

    Args:
        scores: the output of :func:`cmrtool.score.scoring.score_model` (or ``score --json``).
        sites: the sites to reduce; each must be in ``scores``.
        keep: fraction of each site's units to keep (of all units with ``allocation="global"``).
        keep_count: number of units to keep per site (in total with ``allocation="global"``).
        round_to: keep a multiple of this many units.
        replacement: ``auto`` (the criterion's), ``mean``, ``zero``, ``optimal`` (c* of eq. (7),
            needs curvature in the scores). ``affine`` is fitted afterwards by
            :func:`cmrtool.reduce.affine.fit_affine` (the plan then holds the means as placeholders).
        allocation: ``site`` (each site keeps its share) or ``global``.
        counts: explicit kept units per site (overrides keep/keep_count; used by schedules).
    """
    if counts is None:
        validate_keep(keep, keep_count, round_to)
    if replacement not in REPLACEMENTS:
        raise UsageError(f"unknown replacement '{replacement}'", f"choose one of: {', '.join(REPLACEMENTS)}")
    check_allocation(allocation, scores.criterion, sites)
    for site in sites:
        try:
            ss = scores.site(site.name)
        except KeyError:
            raise InputError(
                f"the scores have no site {site.name}",
                "score the same sites you compile (same --site/--kind options)",
            ) from None
        if ss.width != site.width:
            raise InputError(f"scores for site {site.name} have width {ss.width}, the model has {site.width}", "the scores were made for another model")
        if ss.group != site.group:
            raise InputError(f"scores for site {site.name} have {ss.group} values per unit, the model has {site.group}", "the scores were made for another model")
        if replacement == "optimal" and ss.optimal is None:
            raise UsageError(
                "--replacement optimal needs the curvature of the loss, which these scores do not have",
                "score with -c cmr-const, or compile with --calib so cmrtool gathers it",
            )
        if site.group != 1 and replacement == "optimal":
            raise UsageError(
                f"site {site.name} is grouped (attention heads): --replacement {replacement} applies to neuron and channel sites",
                "use --replacement auto, mean, zero or affine for heads",
            )
    if counts is None:
        counts = _global_counts(scores, sites, keep, keep_count, round_to) if allocation == "global" else {
            s.name: kept_width(s.name, s.width, keep, keep_count, round_to) for s in sites
        }
    plans: list[SitePlan] = []
    for site in sites:
        ss = scores.site(site.name)
        kept, replaced = choose_kept(torch.tensor(ss.scores, dtype=torch.float64), counts[site.name])
        source = {
            "auto": ss.replacement, "mean": ss.mean, "zero": (0.0,) * site.channels, "optimal": ss.optimal, "affine": ss.mean,
            "affine-nobias": ss.mean,
        }[replacement]
        assert source is not None
        values = tuple(float(source[i]) for i in unit_rows(replaced, site.group).tolist())
        plans.append(SitePlan(site.name, site.kind, site.width, kept, replaced, Replacement("constant", values), site.group))
    settings = (
        ("keep", keep),
        ("keep_count", keep_count),
        ("round_to", round_to),
        ("allocation", allocation if allocation != "site" else None),
    )
    return Plan(
        source_sha256=scores.source_sha256,
        criterion=scores.criterion,
        sites=tuple(plans),
        replacement=replacement,
        seed=scores.seed,
        settings=tuple((k, v) for k, v in settings if v is not None),
    )


def with_affine(plan: Plan, fits: Mapping[str, Any]) -> Plan:
    """``plan`` with the affine replacements of :func:`cmrtool.reduce.affine.fit_affine`: per site a
    :class:`Replacement` (dense, every kept unit a parent) or ``(intercepts, parents, coefficients)``."""
    sites = []
    for sp in plan.sites:
        if sp.name not in fits or not sp.replaced:
            sites.append(sp)
            continue
        fit = fits[sp.name]
        if isinstance(fit, Replacement):
            repl = fit
        else:
            b0, parents, coefs = fit
            repl = Replacement("affine", tuple(b0), tuple(tuple(p) for p in parents), tuple(tuple(c) for c in coefs))
        sites.append(SitePlan(sp.name, sp.kind, sp.width, sp.kept, sp.replaced, repl, sp.group))
    return dataclasses.replace(plan, sites=tuple(sites))


def with_constants(plan: Plan, constants: dict[str, list[float]]) -> Plan:
    """``plan`` with the replaced units' constants of some sites replaced (joint refit)."""
    sites = []
    for sp in plan.sites:
        if sp.name in constants:
            sp = SitePlan(sp.name, sp.kind, sp.width, sp.kept, sp.replaced, Replacement("constant", tuple(constants[sp.name])))
        sites.append(sp)
    return dataclasses.replace(plan, sites=tuple(sites))


def compose(first: Plan, second: Plan) -> Plan:
    """The plan equal to applying ``first`` then ``second`` (indexed in ``first``'s kept units).

    Constant replacements compose: folding both at once gives the same biases as folding them
    one after the other (Proposition 1 is linear in the folded constants).
    """
    sites = []
    for a in first.sites:
        try:
            b = second.site(a.name)
        except KeyError:
            sites.append(a)
            continue
        if a.replacement.kind != "constant" or b.replacement.kind != "constant":
            raise UsageError("--schedule composes constant replacements only", "drop --schedule, or use a constant replacement")
        mapped = [a.kept[i] for i in b.replaced]
        values = dict(zip(a.replaced, a.replacement.values))
        values.update(zip(mapped, b.replacement.values))
        kept = tuple(a.kept[i] for i in b.kept)
        replaced = tuple(sorted(values))
        sites.append(SitePlan(a.name, a.kind, a.width, kept, replaced, Replacement("constant", tuple(values[j] for j in replaced))))
    named = {sp.name for sp in first.sites}
    sites.extend(b for b in second.sites if b.name not in named)  # first step left these alone
    return dataclasses.replace(first, sites=tuple(sites))
