"""Compile: scores → plan → folded tensors → a smaller checkpoint, checked against the original.

:func:`make_plan` selects kept units per site (:mod:`cmrtool.selection`) and takes each replaced
unit's constant from the criterion (``replacement="auto"``), the calibration mean (``"mean"``)
or zero (``"zero"``: plain deletion without folding a meaningful constant, the baseline that
shows what folding buys).

:func:`compile_model` folds the plan (:func:`cmrtool.fold.fold`, a pure function), writes the
checkpoint to a temporary file (or directory), reloads it with the backend that wrote it
(``model.reopen``) and measures the **fold error**
``max |R(x) − O_clamped(x)|`` on a check batch, where ``O_clamped`` is the original with
replaced units fixed to their replacements (DESIGN §3.5 step 1). Only then is the file renamed
into place; an exact site whose fold error exceeds float rounding aborts the compile.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cmrtool.criteria import REPLACEMENT_MODES
from cmrtool.errors import CmrError, InputError, UnsupportedModelError, UsageError
from cmrtool.fold import fold, unit_rows
from cmrtool.io import atomic_dir, atomic_write
from cmrtool.plan import Plan, Replacement, SitePlan
from cmrtool.scoring import ScoreReport
from cmrtool.selection import choose_kept, kept_width, validate_keep
from cmrtool.sites import Site

if TYPE_CHECKING:
    from cmrtool.export import OnnxReport

__all__ = ["REPLACEMENTS", "make_plan", "clamp_edits", "fold_error", "CompileReport", "compile_model", "output_kind"]

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
        if ss.group != site.group:
            raise InputError(f"scores for site {site.name} have {ss.group} values per unit, the model has {site.group}", "the scores were made for another model")
        k = kept_width(site.name, site.width, keep, keep_count, round_to)
        kept, replaced = choose_kept(torch.tensor(ss.scores, dtype=torch.float64), k)
        source = {"auto": ss.replacement, "mean": ss.mean, "zero": (0.0,) * site.channels}[replacement]
        values = tuple(float(source[i]) for i in unit_rows(replaced, site.group).tolist())
        plans.append(SitePlan(site.name, site.kind, site.width, kept, replaced, Replacement("constant", values), site.group))
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
    edits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for sp in plan.sites:
        if not sp.replaced:
            continue
        site = model.site(sp.name)
        mask = torch.zeros(site.channels, dtype=torch.bool)
        fill = torch.zeros(site.channels, dtype=dtype)
        idx = unit_rows(sp.replaced, site.group)
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
            "onnx": None if self.onnx is None else self.onnx.to_json(),
            "onnx_max_abs_diff": None if self.onnx is None else self.onnx.max_abs_diff,
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
    (:func:`cmrtool.io.check_output_path`). With ``check_inputs`` the written model is reloaded
    and its fold error measured before it is moved into place; sites marked ``exact`` must match
    the clamped original to float rounding. ``onnx`` also exports the reduced model to that file
    (ONNX needs ``check_inputs``, for the export and the onnxruntime parity check).

    Returns:
        a :class:`CompileReport`.
    """
    from cmrtool.export import export_onnx

    tensors = model.tensors()
    result = fold(tensors, model.sites, plan)
    out = Path(output)
    kind = output_kind(output)
    onnx_path = out if kind == "onnx" else (Path(onnx) if onnx is not None else None)
    if onnx_path is not None and check_inputs is None:
        raise UsageError("ONNX export needs example inputs", "pass --calib: its first samples are exported and checked with onnxruntime")
    fe: FoldError | None = None
    onnx_report = None
    notes: list[str] = []
    with _staging(out, kind) as stage:
        (model.write_dir if kind == "dir" else model.write)(stage, result.tensors, plan)
        reduced = model.reopen(stage) if check_inputs is not None else None
        if reduced is not None and check_inputs is not None:
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
    if exact and fe.relative > tol:
        raise CmrError(
            f"the compiled model differs from the clamped original by {fe.max_abs:.3g} (relative {fe.relative:.3g})",
            "this model's graph is not supported for exact folding; set CMRTOOL_DEBUG=1 and report it",
        )
    if not exact:
        notes.append("interior-exact sites: the fold error includes the zero-padding border effect")
    return fe
