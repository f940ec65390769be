"""Compile: scores → plan → folded tensors → a smaller checkpoint, checked against the original.

:func:`make_plan` selects kept units per site (:mod:`cmrtool.selection`) and takes each replaced
unit's constant from the criterion (``replacement="auto"``), the calibration mean (``"mean"``)
or zero (``"zero"``: plain deletion without folding a meaningful constant, the baseline that
shows what folding buys).

:func:`compile_model` folds the plan (:func:`cmrtool.fold.fold`, a pure function), writes the
checkpoint to an unnamed temporary file, reloads it and measures the **fold error**
``max |R(x) − O_clamped(x)|`` on a check batch, where ``O_clamped`` is the original with
replaced units fixed to their replacements (DESIGN §3.5 step 1). Only then does the file get
its name in the directory; an exact site whose fold error exceeds float rounding aborts the
compile. The write is atomic (:func:`cmrtool.io.atomic_write`: an interrupted or killed compile
leaves no file), and under torchrun only rank 0 writes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cmrtool import distributed
from cmrtool.criteria import REPLACEMENT_MODES
from cmrtool.errors import CmrError, InputError, UsageError
from cmrtool.fold import fold
from cmrtool.io import atomic_write
from cmrtool.plan import Plan, Replacement, SitePlan
from cmrtool.scoring import ScoreReport
from cmrtool.selection import choose_kept, kept_width, validate_keep
from cmrtool.sites import Site

__all__ = ["REPLACEMENTS", "make_plan", "clamp_edits", "fold_error", "CompileReport", "compile_model"]

REPLACEMENTS = REPLACEMENT_MODES
# Relative tolerance for "equal to float rounding" per dtype (max |Δ| / max |logit|).
_ROUNDING = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def make_plan(
    scores: ScoreReport,
    sites: Sequence[Site],
    keep: float | None = None,
    keep_count: int | None = None,
    round_to: int | None = None,
    replacement: str = "auto",
) -> Plan:
    """Choose kept units per site and their replacements.

    Args:
        scores: the output of :func:`cmrtool.scoring.score_model` (or ``score --json``).
        sites: the sites to reduce; each must be in ``scores``.
        keep: fraction of each site's units to keep.
        keep_count: number of units to keep per site (instead of ``keep``).
        round_to: keep a multiple of this many units.
        replacement: ``auto`` (the criterion's), ``mean`` or ``zero``.
    """
    validate_keep(keep, keep_count, round_to)
    if replacement not in REPLACEMENTS:
        raise UsageError(f"unknown replacement '{replacement}'", f"choose one of: {', '.join(REPLACEMENTS)}")
    plans: list[SitePlan] = []
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
        k = kept_width(site.name, site.width, keep, keep_count, round_to)
        kept, replaced = choose_kept(torch.tensor(ss.scores, dtype=torch.float64), k)
        source = {"auto": ss.replacement, "mean": ss.mean, "zero": (0.0,) * site.width}[replacement]
        values = tuple(float(source[j]) for j in replaced)
        plans.append(SitePlan(site.name, site.kind, site.width, kept, replaced, Replacement("constant", values)))
    settings = (
        ("keep", keep),
        ("keep_count", keep_count),
        ("round_to", round_to),
    )
    return Plan(
        source_sha256=scores.source_sha256,
        criterion=scores.criterion,
        sites=tuple(plans),
        replacement=replacement,
        seed=scores.seed,
        settings=tuple((k, v) for k, v in settings if v is not None),
    )


def _unit_shape(site: Site, rank: int) -> tuple[int, ...]:
    """Shape that broadcasts a per-unit vector over a site value of ``rank`` dims."""
    if site.kind == "channel":
        return (site.width,) + (1,) * max(rank - 2, 0)
    return (site.width,)


def clamp_edits(
    model: Any, plan: Plan, ranks: Mapping[str, int], dtype: torch.dtype | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Edits that fix every replaced unit of ``plan`` to its constant (``O_clamped``).

    Args:
        model: the original model (its sites give the unit axes).
        plan: the plan.
        ranks: number of dims of each site value (from a capture).
        dtype: dtype of the fill values (the model's).
    """
    dtype = dtype or model.dtype
    edits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for sp in plan.sites:
        if not sp.replaced:
            continue
        site = model.site(sp.name)
        mask = torch.zeros(site.width, dtype=torch.bool)
        fill = torch.zeros(site.width, dtype=dtype)
        idx = torch.as_tensor(sp.replaced, dtype=torch.long)
        mask[idx] = True
        fill[idx] = torch.tensor(sp.replacement.values, dtype=torch.float64).to(dtype)
        shape = _unit_shape(site, ranks[sp.name])
        edits[sp.name] = (mask.reshape(shape), fill.reshape(shape))
    return edits


def site_ranks(model: Any, inputs: Sequence[torch.Tensor], names: Sequence[str]) -> dict[str, int]:
    """Number of dims of each named site value, from one capture on the first sample."""
    with torch.no_grad():
        _, values = model.run([t[:1] for t in inputs], capture=list(names))
    return {k: v.dim() for k, v in values.items()}


@dataclass(frozen=True)
class FoldError:
    """``max |R(x) − O_clamped(x)|`` and the same relative to ``max |O_clamped(x)|``."""

    max_abs: float
    relative: float
    samples: int


def fold_error(original: Any, reduced: Any, plan: Plan, inputs: Sequence[torch.Tensor]) -> FoldError:
    """Measure the fold error of ``reduced`` against ``original`` clamped by ``plan``."""
    ranks = site_ranks(original, inputs, [s.name for s in plan.sites])
    edits = clamp_edits(original, plan, ranks)
    with torch.no_grad():
        clamped, _ = original.run(inputs, edits=edits)
        out = reduced.forward(inputs)
    diff = (out.to(torch.float64) - clamped.to(torch.float64)).abs().max().item()
    scale = max(clamped.to(torch.float64).abs().max().item(), 1e-30)
    return FoldError(diff, diff / scale, int(inputs[0].shape[0]))


@dataclass(frozen=True)
class CompileReport:
    """What compile did: sizes before/after, per-site widths, and the measured fold error."""

    output: str
    plan: Plan
    params_before: int
    params_after: int
    sites: tuple[dict[str, Any], ...]
    fold_error: FoldError | None = None
    notes: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        fe = self.fold_error
        return {
            "output": self.output,
            "criterion": self.plan.criterion,
            "replacement": self.plan.replacement,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "param_ratio": self.params_after / max(self.params_before, 1),
            "fold_error": None if fe is None else fe.max_abs,
            "fold_error_relative": None if fe is None else fe.relative,
            "fold_check_samples": None if fe is None else fe.samples,
            "sites": list(self.sites),
            "notes": list(self.notes),
        }


def compile_model(
    model: Any,
    plan: Plan,
    output: str | Path,
    check_inputs: Sequence[torch.Tensor] | None = None,
) -> CompileReport:
    """Fold ``plan`` into ``model`` and write the reduced checkpoint to ``output`` atomically.

    The output must already have been validated (:func:`cmrtool.io.check_output_path`). With
    ``check_inputs`` the written file is reloaded and its fold error measured before it is moved
    into place; sites marked ``exact`` must match the clamped original to float rounding.

    Returns:
        a :class:`CompileReport`.
    """
    tensors = model.tensors()
    result = fold(tensors, model.sites, plan)
    fe: FoldError | None = None
    notes: list[str] = []
    out = Path(output)
    distributed.sync()  # under torchrun: every rank is ready and none failed before rank 0 writes
    with atomic_write(out) if distributed.is_writer() else contextlib.nullcontext() as tmp:
        if tmp is None:  # another torchrun rank: same plan, rank 0 writes and checks it
            check_inputs = None
        else:
            model.write(tmp, result.tensors, plan)
        reduced = type(model)(str(tmp)) if check_inputs is not None else None
        if reduced is not None and check_inputs is not None:
            fe = fold_error(model, reduced, plan, check_inputs)
            exact = all(model.site(s.name).fold == "exact" for s in plan.sites if s.replaced)
            tol = _ROUNDING.get(model.dtype, 1e-5)
            if exact and not fe.relative <= tol:  # NaN fails too
                raise CmrError(
                    f"the compiled model differs from the clamped original by {fe.max_abs:.3g} (relative {fe.relative:.3g})",
                    "this model's graph is not supported for exact folding; set CMRTOOL_DEBUG=1 and report it",
                )
            if not exact:
                notes.append("interior-exact sites: the fold error includes the zero-padding border effect")
    params_after = sum(t.numel() for name, t in result.tensors.items() if model.is_parameter(name) or name in result.added)
    site_rows = []
    for sp in plan.sites:
        site = model.site(sp.name)
        site_rows.append(
            {
                "name": sp.name,
                "kind": sp.kind,
                "width": sp.width,
                "kept": len(sp.kept),
                "replaced": len(sp.replaced),
                "fold": site.fold,
            }
        )
    return CompileReport(
        output=str(out),
        plan=plan,
        params_before=model.num_params(),
        params_after=params_after,
        sites=tuple(site_rows),
        fold_error=fe,
        notes=tuple(notes),
    )
