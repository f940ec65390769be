"""Planning a reduction: scores → selection → replacements (constant, optimal, affine, jointly
refit), in one step or in a schedule of K steps with re-scoring in between.

Fitted replacements (per-unit affine maps, jointly refit constants) come from second-order models of the
network around the observed activations, which can fail far from them (a ReLU/BatchNorm stack
after the site; measured: joint refit took the digits ConvNet from 88% to 27% accuracy). So each
site's fitted replacement is shrunk towards the per-unit constants it started from,
``start + t·(fitted − start)``, with t ∈ {1, ½, ¼, ⅛, 0} chosen by the clamped original's KL to
its own predictions on calibration data: a fit is kept only as far as it helps fidelity.
Dense affine fits (``--parents all``, :mod:`cmrtool.reduce.lsq`) are not shrunk: they are least-squares
projections of the site's own activations (never a worse reconstruction than the means on
calibration data), and the shrink's 5 clamped passes per site are what made it slow at LLM scale.

``--schedule K`` is the CMR paper's iterative recomputation (§5.4, §6): the kept fraction goes
from 1 to ``keep`` geometrically (``keep^(i/K)`` of each site's width after step i); after every
step the plan so far is compiled into a temporary model, which is scored afresh, so later
choices see the earlier replacements. The steps' plans compose into one plan on the original
model (:func:`cmrtool.reduce.plans.compose`), which is what gets folded.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cmrtool.reduce.plans import compose, make_plan, with_affine, with_constants
from cmrtool.score.criteria import AFFINE_MODES
from cmrtool.errors import UsageError
from cmrtool.plan import Plan, Replacement, SitePlan
from cmrtool.score.scoring import ScoreReport, score_model
from cmrtool.sites import Site

__all__ = ["plan_reduction"]


def _needs_affine(report: ScoreReport, replacement: str) -> bool:
    return replacement in AFFINE_MODES or (replacement == "auto" and any(s.replacement_kind == "affine" for s in report.sites))


def _one_step(
    model: Any, data: Any, sites: Sequence[Site], report: ScoreReport | None, keep: float | None, keep_count: int | None,
    round_to: int | None, progress: Callable[..., Any], criterion: str, replacement: str, allocation: str,
    joint_refit: bool, parents: int | None, ridge: float, curvature: str, seed: int, batch_size: int,
    counts: dict[str, int] | None = None, loss: str = "auto",
) -> Plan:
    if report is None:
        extra = frozenset({"grad", "curv"}) if replacement == "optimal" else frozenset()
        with progress(f"scoring ({criterion})", data.n) as advance:
            report = score_model(model, data, criterion, sites, seed, batch_size, advance, None, curvature, parents, ridge, extra, loss)
    plan = make_plan(report, sites, keep, keep_count, round_to, replacement, allocation, counts)
    affine = _needs_affine(report, replacement)
    if (affine or joint_refit) and data is not None:
        from cmrtool import distributed

        if distributed.enabled():
            raise UsageError("fitted replacements (affine, --joint-refit) run in one process, not under torchrun",
                             "run this compile without torchrun")
    if affine:
        if joint_refit:
            raise UsageError("--joint-refit refits constants; it does not apply to affine replacements", "drop --joint-refit or choose a constant replacement")
        if data is None:
            raise UsageError("affine replacements are fitted on calibration data", "pass --calib")
        from cmrtool.reduce.affine import fit_affine

        rep = {sp.name: list(sp.replaced) for sp in plan.sites}
        kept = {sp.name: list(sp.kept) for sp in plan.sites}
        with progress("fitting affine replacements", (1 if parents is None else 2) * data.n) as advance:
            fits = fit_affine(model, data, sites, rep, kept, parents, ridge, weighted=report.criterion != "peer",
                              curvature=curvature, seed=seed, batch_size=batch_size, progress=advance,
                              intercept=replacement != "affine-nobias")
        fitted = with_affine(plan, fits)
        plan = fitted if parents is None else _shrink(model, data, plan, fitted, batch_size)
    if joint_refit:
        from cmrtool.reduce.refit import joint_constants

        constants = {}
        with progress("joint refit", data.n * len(sites)) as advance:
            for site in sites:
                sp = plan.site(site.name)
                # Replacements are fitted to preserve the original's predictions: KL to them unless
                # --loss says otherwise (with training labels the gradient term derails the fit).
                constants[site.name] = joint_constants(
                    model, data, site, sp.replaced, curvature, seed, batch_size, progress=advance,
                    loss="kl" if loss == "auto" else loss, start=sp.replacement.values,
                )
        plan = _shrink(model, data, plan, with_constants(plan, constants), batch_size)
    extras: tuple[tuple[str, Any], ...] = (("joint_refit", True),) if joint_refit else ()
    if affine:
        extras += (("parents", "all" if parents is None else parents), ("ridge", ridge))
    if curvature != "auto":
        extras += (("curvature", curvature),)
    if loss != "auto":
        extras += (("loss", loss),)
    return Plan(
        source_sha256=plan.source_sha256, criterion=plan.criterion, sites=plan.sites, replacement=plan.replacement,
        seed=plan.seed, settings=plan.settings + extras,
    )


_STEPS = (1.0, 0.5, 0.25, 0.125, 0.0)


def _blend(start: SitePlan, fitted: SitePlan, t: float) -> SitePlan:
    """``start + t·(fitted − start)`` for constants; for an affine fit, the intercept blends with
    the start constant and the coefficients scale by t."""
    r0, r1 = start.replacement, fitted.replacement
    values = tuple((1 - t) * a + t * b for a, b in zip(r0.values, r1.values))
    if r1.kind == "affine":
        repl = Replacement("affine", values, r1.parents, tuple(tuple(t * c for c in cs) for cs in r1.coefficients))
    else:
        repl = Replacement("constant", values)
    return SitePlan(fitted.name, fitted.kind, fitted.width, fitted.kept, fitted.replaced, repl)


def _shrink(model: Any, data: Any, start: Plan, fitted: Plan, batch_size: int, samples: int = 1024) -> Plan:
    """Per site, the blend of fitted and start replacements with the lowest calibration KL."""
    import torch
    import torch.nn.functional as F

    from cmrtool.compile.clamp import clamp_edits, site_ranks

    x = list(data.read(0, min(data.n, samples), labels=False).inputs)
    with torch.no_grad():
        ref = F.log_softmax(model.forward(x).to(torch.float64), -1)
    ranks = site_ranks(model, x, [sp.name for sp in fitted.sites])
    # Start from the per-unit constants everywhere and accept, site by site, only what lowers the
    # KL: the result is never worse on calibration data than where it started.
    current = [start.site(sp.name) for sp in fitted.sites]
    chosen = {}
    for i, sp in enumerate(fitted.sites):
        if not sp.replaced:
            continue
        best = None
        for t in _STEPS:
            trial = current[:i] + [_blend(start.site(sp.name), sp, t)] + current[i + 1 :]
            plan = dataclasses.replace(fitted, sites=tuple(trial))
            kl = 0.0
            with torch.no_grad():
                for k in range(0, len(x[0]), batch_size):
                    xb = [v[k : k + batch_size] for v in x]
                    z, _ = model.run(xb, edits=clamp_edits(model, plan, ranks))
                    lq = F.log_softmax(z.to(torch.float64), -1)
                    lp = ref[k : k + batch_size]
                    kl += float((lp.exp() * (lp - lq)).sum())
            if best is None or kl < best[0] - 1e-12:
                best = (kl, t, trial[i])
        assert best is not None
        current[i] = best[2]
        chosen[sp.name] = best[1]
    return dataclasses.replace(fitted, sites=tuple(current), settings=fitted.settings + (("fit_shrinkage", chosen),))


def plan_reduction(
    model: Any,
    data: Any,
    sites: Sequence[Site],
    report: ScoreReport | None,
    keep: float | None,
    keep_count: int | None,
    round_to: int | None,
    schedule: int,
    progress: Callable[..., Any],
    **options: Any,
) -> Plan:
    """The plan that ``compile`` folds (see the module docstring for ``schedule``)."""
    grouped = [s.name for s in sites if s.group != 1]
    if grouped and (schedule > 1 or options.get("joint_refit")):
        raise UsageError(
            f"site {grouped[0]} is grouped (attention heads): --schedule and --joint-refit apply to neuron and channel sites",
            "reduce heads in one step with per-unit constants, or choose other sites with --kind",
        )
    if schedule <= 1:
        return _one_step(model, data, sites, report, keep, keep_count, round_to, progress, **options)
    if options.get("allocation") == "global":
        raise UsageError("--schedule with --allocation global is not supported", "use one of them")
    backend = type(model)
    total: Plan | None = None
    current = model
    with tempfile.TemporaryDirectory(prefix="cmrtool-schedule-") as tmp:
        for step in range(1, schedule + 1):
            counts = {}
            for s in sites:
                goal = keep_count if keep_count is not None else max(1, round((1.0 if keep is None else keep) * s.width))
                target = max(goal, int(round(s.width * (goal / s.width) ** (step / schedule))))
                width = current.site(s.name).width
                if target < width:
                    counts[s.name] = target
            if not counts:
                continue
            step_sites = [current.site(n) for n in counts]
            step_plan = _one_step(current, data, step_sites, None, None, None, round_to if step == schedule else None,
                                  progress, counts=counts, **options)
            total = step_plan if total is None else compose(total, step_plan)
            if step < schedule:
                from cmrtool.compile.run import compile_model

                path = Path(tmp) / f"step{step}.pt"
                compile_model(model, total, path, None)
                current = backend(str(path))
    if total is None:
        raise UsageError("the schedule replaces no units", "lower --keep")
    return dataclasses.replace(total, settings=total.settings + (("schedule", schedule),))
