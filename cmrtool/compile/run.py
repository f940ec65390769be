"""Compile: a plan → folded tensors → a smaller checkpoint, checked against the original.

The plan comes from :mod:`cmrtool.reduce.plans` (kept units and their replacements).
:func:`compile_model` folds it (:func:`cmrtool.compile.fold.fold`, a pure function), writes the
checkpoint to an unnamed temporary file (or a temporary directory), reloads it with the
backend that wrote it (``model.reopen``) and measures the **fold error**
``max |R(x) − O_clamped(x)|`` on a check batch, where ``O_clamped`` is the original with
replaced units fixed to their replacements (:mod:`cmrtool.compile.clamp`, DESIGN §3.5 step 1). Only then does the file get
its name in the directory; an exact site whose fold error exceeds float rounding aborts the
compile. The write is atomic (:func:`cmrtool.io.files.atomic_write`: an interrupted or killed compile
leaves no file), and under torchrun only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cmrtool import __version__, distributed
from cmrtool.compile.clamp import FoldError, fold_error
from cmrtool.compile.fold import fold
from cmrtool.errors import CmrError, UnsupportedModelError, UsageError
from cmrtool.io.files import atomic_dir, atomic_write
from cmrtool.plan import Plan

COMPILE_SCHEMA_VERSION = 1  # of the compile --json document (DESIGN §7)

if TYPE_CHECKING:
    from cmrtool.compile.export import OnnxReport

__all__ = ["CompileReport", "compile_model", "output_kind"]

# Relative tolerance for "equal to float rounding" per dtype (max |Δ| / max |logit|).
_ROUNDING = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}


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
