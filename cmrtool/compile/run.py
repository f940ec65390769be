"""Compile: scores → plan → folded tensors → a smaller checkpoint, checked against the original.

:func:`make_plan` selects kept units per site (:mod:`cmrtool.reduce.selection`) and takes each replaced
unit's constant from the criterion (``replacement="auto"``), the calibration mean (``"mean"``)
or zero (``"zero"``: plain deletion without folding a meaningful constant, the baseline that
shows what folding buys).

:func:`compile_model` folds the plan (:func:`cmrtool.compile.fold.fold`, a pure function), writes the
checkpoint to an unnamed temporary file (or a temporary directory), reloads it with the
backend that wrote it (``model.reopen``) and measures the **fold error**
``max |R(x) − O_clamped(x)|`` on a check batch, where ``O_clamped`` is the original with
replaced units fixed to their replacements (DESIGN §3.5 step 1). Only then does the file get
its name in the directory; an exact site whose fold error exceeds float rounding aborts the
compile. The write is atomic (:func:`cmrtool.io.files.atomic_write`: an interrupted or killed compile
leaves no file), and under torchrun only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cmrtool import __version__, distributed
from cmrtool.score.criteria import ALLOCATIONS, REGISTRY, REPLACEMENT_MODES, get_criterion
from cmrtool.errors import CmrError, InputError, UnsupportedModelError, UsageError
from cmrtool.compile.fold import fold, unit_rows
from cmrtool.io.files import atomic_dir, atomic_write
from cmrtool.plan import Plan, Replacement, SitePlan
from cmrtool.score.scoring import ScoreReport
from cmrtool.reduce.selection import choose_kept, kept_width, validate_keep
from cmrtool.sites import Site

COMPILE_SCHEMA_VERSION = 1  # of the compile --json document (DESIGN §7)

if TYPE_CHECKING:
    from cmrtool.compile.export import OnnxReport

__all__ = [
    "REPLACEMENTS", "make_plan", "with_affine", "with_constants", "compose", "check_allocation", "clamp_edits",
    "fold_error", "CompileReport", "compile_model", "output_kind",
]

REPLACEMENTS = REPLACEMENT_MODES
# Relative tolerance for "equal to float rounding" per dtype (max |Δ| / max |logit|).
_ROUNDING = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}


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


def _unit_shape(site: Site, rank: int) -> tuple[int, ...]:
    """Shape that broadcasts a per-unit vector over a site value of ``rank`` dims."""
    if site.kind == "channel":
        return (site.width,) + (1,) * max(rank - 2, 0)
    return (site.channels,)


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
    edits: dict[str, tuple[torch.Tensor, ...]] = {}
    for sp in plan.sites:
        if not sp.replaced:
            continue
        site = model.site(sp.name)
        if sp.replacement.kind == "affine":
            edits[sp.name] = _affine_map(sp, ranks[sp.name], site.kind, dtype)
            continue
        mask = torch.zeros(site.channels, dtype=torch.bool)
        fill = torch.zeros(site.channels, dtype=dtype)
        idx = unit_rows(sp.replaced, site.group)
        mask[idx] = True
        fill[idx] = torch.tensor(sp.replacement.values, dtype=torch.float64).to(dtype)
        shape = _unit_shape(site, ranks[sp.name])
        edits[sp.name] = (mask.reshape(shape), fill.reshape(shape))
    return edits


def _affine_map(sp: SitePlan, rank: int, kind: str, dtype: torch.dtype) -> tuple[str, torch.Tensor, torch.Tensor]:
    """``("map", Mᵀ, c)``: kept units map to themselves, replaced unit j to ``β0 + β·a_P``
    (dense: the replaced values to ``β0 + B a_K``, over channels for grouped units)."""
    r = sp.replacement
    if r.matrix:
        w = sp.width * sp.group
        s_idx, k_idx = unit_rows(sp.replaced, sp.group), unit_rows(sp.kept, sp.group)
        m = torch.eye(w, dtype=torch.float64)
        m[s_idx] = 0.0
        m[s_idx[:, None], k_idx[None, :]] = r.dense(s_idx.numel())
        c = torch.zeros(w, dtype=torch.float64)
        c[s_idx] = torch.tensor(r.values, dtype=torch.float64)
        shape = (w,) + (1,) * max(rank - 2, 0) if kind == "channel" else (w,)
        return ("map", m.T.contiguous().to(dtype), c.reshape(shape).to(dtype))
    w = sp.width
    m = torch.eye(w, dtype=torch.float64)  # rows: output unit, columns: input unit
    c = torch.zeros(w, dtype=torch.float64)
    for j, b0, parents, coefs in zip(sp.replaced, r.values, r.parents, r.coefficients):
        m[j] = 0.0
        for p, beta in zip(parents, coefs):
            m[j, p] = beta
        c[j] = b0
    shape = (w,) + (1,) * max(rank - 2, 0) if kind == "channel" else (w,)
    return ("map", m.T.contiguous().to(dtype), c.reshape(shape).to(dtype))


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


_CHECK_BYTES = 64 << 20  # logits per fold-check pass (a language model's are tokens × vocab)


def fold_error(original: Any, reduced: Any, plan: Plan, inputs: Sequence[torch.Tensor]) -> FoldError:
    """Measure the fold error of ``reduced`` against ``original`` clamped by ``plan``, in passes
    whose logits take about ``_CHECK_BYTES`` (sized from the first sample's)."""
    ranks = site_ranks(original, inputs, [s.name for s in plan.sites])
    edits = clamp_edits(original, plan, ranks)
    n = int(inputs[0].shape[0])
    diff, scale, start, size = 0.0, 0.0, 0, 1
    with torch.no_grad():
        while start < n:
            chunk = [t[start : start + size] for t in inputs]
            clamped, _ = original.run(chunk, edits=edits)
            out = reduced.forward(chunk)
            diff = max(diff, (out.to(torch.float64) - clamped.to(torch.float64)).abs().max().item())
            scale = max(scale, clamped.to(torch.float64).abs().max().item())
            start += size
            per_sample = clamped.numel() * 8 // max(int(clamped.shape[0]) if clamped.dim() else 1, 1)
            size = max(1, _CHECK_BYTES // max(per_sample, 1))
    scale = max(scale, 1e-30)
    return FoldError(diff, diff / scale, n)


@dataclass(frozen=True)
class CompileReport:
    """What compile did: sizes before/after, per-site widths, the measured fold error, and the
    ONNX export with its onnxruntime parity when one was asked for."""

    output: str
    plan: Plan
    params_before: int
    params_after: int
    sites: tuple[dict[str, Any], ...]
    fold_error: FoldError | None = None
    notes: tuple[str, ...] = field(default=())
    onnx: OnnxReport | None = None
    written_as: str | None = None  # a Hugging Face directory: the stock class that loads it


    def to_json(self) -> dict[str, Any]:
        fe = self.fold_error
        return {
            "schema_version": COMPILE_SCHEMA_VERSION,
            "tool_version": __version__,
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
            "onnx": None if self.onnx is None else self.onnx.to_json(),
            "onnx_max_abs_diff": None if self.onnx is None else self.onnx.max_abs_diff,
            "written_as": self.written_as,
        }


def output_kind(path: str | Path) -> str:
    """``onnx`` (a ``.onnx`` file), ``dir`` (a trailing ``/`` or an existing directory: a Hugging
    Face directory), or ``file`` (the backend's own checkpoint format)."""
    p = str(path)
    if Path(p).suffix.lower() == ".onnx":
        return "onnx"
    if p.endswith(("/", os.sep)) or Path(p).is_dir():
        return "dir"
    return "file"


@contextlib.contextmanager
def _staging(out: Path, kind: str) -> Iterator[Path]:
    """Where the reduced checkpoint is written before it is moved into place (or, for an ONNX
    output, a scratch file that is discarded)."""
    if kind == "dir":
        with atomic_dir(out) as tmp:
            yield tmp
    elif kind == "onnx":
        with tempfile.TemporaryDirectory() as d:
            yield Path(d) / "reduced"
    else:
        with atomic_write(out) as tmp:
            yield tmp


def compile_model(
    model: Any,
    plan: Plan,
    output: str | Path,
    check_inputs: Sequence[torch.Tensor] | None = None,
    onnx: str | Path | None = None,
) -> CompileReport:
    """Fold ``plan`` into ``model`` and write the reduced model to ``output`` atomically.

    ``output`` is the backend's checkpoint (``.pt`` for TorchScript, ``.safetensors`` with the
    plan in its metadata for nn.Modules), a Hugging Face directory (a path ending in ``/``; Hugging
    Face inputs with uniform widths), or a ``.onnx`` file. It must already have been validated
    (:func:`cmrtool.io.files.check_output_path`). With ``check_inputs`` the written model is reloaded
    and its fold error measured before it is moved into place; sites marked ``exact`` must match
    the clamped original to float rounding. ``onnx`` also exports the reduced model to that file
    (ONNX needs ``check_inputs``, for the export and the onnxruntime parity check).

    Returns:
        a :class:`CompileReport`.
    """
    from cmrtool.compile.export import export_onnx

    tensors = model.tensors()
    result = fold(tensors, model.sites, plan)
    out = Path(output)
    kind = output_kind(output)
    onnx_path = out if kind == "onnx" else (Path(onnx) if onnx is not None else None)
    if onnx_path is not None and check_inputs is None:
        raise UsageError("ONNX export needs example inputs", "pass --calib: its first samples are exported and checked with onnxruntime")
    fe: FoldError | None = None
    notes: list[str] = []
    onnx_report = None
    reduced = None
    distributed.sync()  # under torchrun: every rank is ready and none failed before rank 0 writes
    if distributed.is_writer():  # other ranks hold the same plan; rank 0 writes and checks it
        with _staging(out, kind) as stage:
            (model.write_dir if kind == "dir" else model.write)(stage, result.tensors, plan)
            if check_inputs is not None:
                reduced = model.reopen(stage)
                fe = _checked_fold_error(model, reduced, plan, check_inputs, notes)
                if onnx_path is not None:
                    onnx_report = export_onnx(reduced, onnx_path, check_inputs)
                    notes.extend(onnx_report.notes)
    if reduced is not None:
        params_after = reduced.num_params()
    else:
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
        onnx=onnx_report,
    )


def _checked_fold_error(model: Any, reduced: Any, plan: Plan, inputs: Sequence[torch.Tensor], notes: list[str]) -> FoldError:
    """The fold error of the written model; an ``exact`` plan must meet float rounding."""
    try:
        fe = fold_error(model, reduced, plan, inputs)
    except CmrError:
        raise
    except Exception as e:  # the reduced module's own forward failed
        raise UnsupportedModelError(
            f"the reduced model does not run: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
            "its forward may hard-code a layer width or head count; choose other sites with --site or --kind",
        ) from e
    exact = all(model.site(s.name).fold == "exact" for s in plan.sites if s.replaced)
    tol = _ROUNDING.get(model.dtype, 1e-5)
    if exact and not fe.relative <= tol:  # NaN fails too
        raise CmrError(
            f"the compiled model differs from the clamped original by {fe.max_abs:.3g} (relative {fe.relative:.3g})",
            "this model's graph is not supported for exact folding; set CMRTOOL_DEBUG=1 and report it",
        )
    if not exact:
        notes.append("interior-exact sites: the fold error includes the zero-padding border effect")
    return fe
