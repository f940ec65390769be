"""Inspect: what a model offers for reduction — sites, widths, fold kinds, parameters and MACs.

MACs need an example input: the first sample of a data file, an explicit ``input_shape``, or
the input shapes a reduced checkpoint's plan recorded at compile time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from cmrtool import __version__
from cmrtool.measure.macs import count_macs
from cmrtool.sites import Rejection, Site

__all__ = ["InspectReport", "inspect_model", "example_inputs"]

INSPECT_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class InspectReport:
    path: str
    format: str
    sha256: str
    sites: tuple[Site, ...]
    rejected: tuple[Rejection, ...]
    unsupported: tuple[str, ...]
    params: int
    macs: int | None
    input_shapes: tuple[tuple[int, ...], ...] | None
    reduced: dict[str, Any] | None = None
    notes: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": INSPECT_SCHEMA_VERSION,
            "tool_version": __version__,
            "path": self.path,
            "format": self.format,
            "sha256": self.sha256,
            "params": self.params,
            "macs": self.macs,
            "input_shapes": None if self.input_shapes is None else [list(s) for s in self.input_shapes],
            "sites": [s.to_json() for s in self.sites],
            "rejected": [r.to_json() for r in self.rejected],
            "unsupported": list(self.unsupported),
            "reduced": self.reduced,
            "notes": list(self.notes),
        }


def example_inputs(model: Any, shapes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Zero tensors of the given shapes in the model's dtype (integer for token-id arguments)."""
    out = []
    for i, shape in enumerate(shapes):
        name = model.arg_names[i] if i < len(model.arg_names) else ""
        integer = name.endswith("_ids") or name in ("attention_mask", "token_type_ids")
        out.append(torch.zeros(*shape, dtype=torch.long if integer else model.dtype))
    return out


def inspect_model(model: Any, inputs: Sequence[torch.Tensor] | None = None) -> InspectReport:
    """Summarize ``model``; with ``inputs`` (a batch of one) also count MACs.

    Example:
        >>> report = inspect_model(load_model("samples/digits_mlp.pt"), [torch.zeros(1, 1, 8, 8)])
        >>> report.macs
    """
    notes: list[str] = list(getattr(model, "notes", []))
    shapes: tuple[tuple[int, ...], ...] | None = None
    if inputs is None and model.plan is not None:
        recorded = dict(model.plan.settings).get("input_shapes")
        if recorded:
            inputs = example_inputs(model, [[1, *s[1:]] for s in recorded])
    macs: int | None = None
    if inputs is not None:
        inputs = [t[:1] for t in inputs]
        shapes = tuple(tuple(t.shape) for t in inputs)
        macs = count_macs(model, inputs)
    else:
        notes.append("MACs need an example input: pass --calib DATA or --input-shape 1,1,8,8")
    reduced = None
    if model.plan is not None:
        plan = model.plan
        reduced = {
            "criterion": plan.criterion,
            "source_sha256": plan.source_sha256,
            "sites": [{"name": s.name, "width": s.width, "kept": len(s.kept)} for s in plan.sites],
        }
    return InspectReport(
        path=model.path,
        format=model.format,
        sha256=model.sha256,
        sites=tuple(model.sites),
        rejected=tuple(model.rejected),
        unsupported=tuple(model.unsupported),
        params=model.num_params(),
        macs=macs,
        input_shapes=shapes,
        reduced=reduced,
        notes=tuple(notes),
    )
