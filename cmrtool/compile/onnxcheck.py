"""``verify --onnx``: the ONNX file must be an export of *this* reduced model, and agree with it.

``compile --onnx`` writes the plan into the ONNX ``metadata_props`` (``cmrtool_plan``; a large
plan's affine matrices by reference and sha256 only, :mod:`cmrtool.io.planstore`); verify
compares it with the reduced checkpoint's plan before running anything, so another model's
export (same inputs, different weights) is refused instead of reported as a large "parity".
Parity then has a threshold: max |onnxruntime(x) − R(x)| above :data:`ONNX_TOLERANCE` fails
verification (float32 exports agree to about 1e-5 on logits of order 10).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cmrtool.errors import InputError
from cmrtool.plan import Plan

__all__ = ["ONNX_TOLERANCE", "check_onnx_plan", "onnx_failure"]

ONNX_TOLERANCE = 1e-3
_HINT = "pass the .onnx file that 'cmrtool compile --onnx' wrote with this reduced model"


def check_onnx_plan(path: str | Path, reduced: Any) -> None:
    """Refuse an ONNX file whose embedded plan is missing or differs from ``reduced.plan``."""
    import onnx

    from cmrtool.io.files import require_file

    require_file(path, "ONNX file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises its own types for garbage
        raise InputError(f"{path} is not a readable ONNX model: {str(e).splitlines()[0][:160] if str(e) else type(e).__name__}", _HINT) from e
    props = {p.key: p.value for p in proto.metadata_props}
    text = props.get("cmrtool_plan")
    if text is None:
        raise InputError(f"{path} carries no cmrtool plan, so it cannot be checked against {reduced.path}", _HINT)
    other = InputError(f"{path} was exported from another reduction: its plan differs from the plan of {reduced.path}", _HINT)
    if reduced.plan is None:
        raise other
    try:  # a large plan's matrices are references: resolved against the checkpoint's own (sha256 checked)
        exported = Plan.loads(text, reduced.plan.matrices(), str(reduced.path))
    except InputError as e:
        raise other from e
    if exported != reduced.plan:
        raise other


def onnx_failure(diff: float | None) -> str | None:
    """The failure line for a parity above the tolerance (None when it passes or was not run)."""
    if diff is None or diff <= ONNX_TOLERANCE:
        return None
    return f"ONNX max |diff| {diff:.3g} > {ONNX_TOLERANCE}"
