"""ONNX output for every backend (DESIGN §2, §3.5 step 4).

- A TorchScript model goes through the legacy (TorchScript-based) exporter; an nn.Module through
  the dynamo exporter (``torch.export``; needs ``onnxscript``). When dynamo cannot export a
  module, the legacy exporter is tried and the report says so.
- The batch axis is dynamic; weights are stored inline (models under 2 GB); the model is put
  back in eval mode afterwards; the plan of a reduced model goes into the ONNX metadata_props
  (``cmrtool_plan``; a large plan's affine matrices only by reference and sha256, see
  :mod:`cmrtool.io.planstore`); the file is written atomically.
- The result is checked with ``onnx.checker`` and run with onnxruntime on the check batch:
  ``max |onnxruntime(x) − torch(x)|`` is reported (and must be small for the export to count).

Operators ONNX cannot express (e.g. the fused multi-head attention kernel that
``nn.MultiheadAttention`` uses in eval mode) give an error that names them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cmrtool.errors import InputError, UnsupportedModelError
from cmrtool.io.files import atomic_write, require_file
from cmrtool.io.planstore import split as split_plan

__all__ = ["OnnxReport", "export_onnx", "onnx_parity"]

_OUTPUT = "logits"


@dataclass(frozen=True)
class OnnxReport:
    """Where the ONNX file went, which exporter made it, and its parity with torch."""

    path: str
    exporter: str
    max_abs_diff: float
    samples: int
    notes: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "exporter": self.exporter, "max_abs_diff": self.max_abs_diff, "samples": self.samples, "notes": list(self.notes)}


class _Logits(nn.Module):
    """``model.forward`` as a module: positional inputs in, the logits tensor out."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.inner = model.module
        self.kwargs = dict(getattr(model, "call_kwargs", {}))
        # A model whose inputs are not its first arguments (GPT-2's mask) is called by name.
        self.names = list(model.arg_names) if getattr(model, "by_name", False) else None

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        from cmrtool.backends.module.model import output_tensor

        if self.names:
            return output_tensor(self.inner(**dict(zip(self.names, args)), **self.kwargs))
        return output_tensor(self.inner(*args, **self.kwargs))


def _legacy(module: Any, example: tuple[torch.Tensor, ...], path: Path, names: list[str]) -> None:
    axes = {n: {0: "batch"} for n in [*names, _OUTPUT]}
    torch.onnx.export(module, example, str(path), dynamo=False, input_names=names, output_names=[_OUTPUT], dynamic_axes=axes)


def _dynamo(module: nn.Module, example: tuple[torch.Tensor, ...], path: Path, names: list[str]) -> None:
    batch = torch.export.Dim("batch")
    program = torch.onnx.export(
        module, example, dynamo=True, input_names=names, output_names=[_OUTPUT],
        dynamic_shapes={"args": tuple({0: batch} for _ in example)},
    )
    program.save(str(path), external_data=False)


@contextlib.contextmanager
def _quiet() -> Any:
    """The exporters print progress and warnings; keep them off the CLI's stdout and stderr."""
    buf = io.StringIO()
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _first_line(e: BaseException) -> str:
    text = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return (text[0] if text else type(e).__name__)[:240]


def export_onnx(model: Any, path: str | Path, inputs: Sequence[torch.Tensor]) -> OnnxReport:
    """Export a backend model to ONNX, check it, and measure its parity on ``inputs``.

    Args:
        model: a backend model (TorchScript or nn.Module), e.g. the reduced model compile wrote.
        path: the ``.onnx`` file (written atomically).
        inputs: a batch of forward arguments (the parity check runs on all of it).

    Raises:
        UnsupportedModelError: the model uses an operator that ONNX export cannot express.
    """
    import onnx

    module = model.module
    names = list(model.arg_names[: len(inputs)])
    example = tuple(t[:2] for t in inputs)  # two samples: a batch of one would be specialized
    notes: list[str] = []
    with atomic_write(path) as tmp:
        try:
            with _quiet():
                if isinstance(module, torch.jit.ScriptModule):
                    exporter = "legacy"
                    _legacy(module, example, tmp, names)
                else:
                    try:
                        exporter = "dynamo"
                        _dynamo(_Logits(model).eval(), example, tmp, names)
                    except Exception as e:
                        exporter = "legacy"
                        notes.append(f"the dynamo exporter failed ({_first_line(e)}); used the legacy exporter")
                        _legacy(_Logits(model).eval(), example, tmp, names)
        except Exception as e:
            raise UnsupportedModelError(
                f"ONNX export failed: {_first_line(e)}",
                "the model uses an operator ONNX cannot express (e.g. the fused attention of nn.MultiheadAttention in eval mode); "
                "keep the reduced checkpoint, or replace that layer with one built from plain ops",
            ) from e
        finally:
            module.eval()
        if model.plan is not None:  # the plan travels with every reduced artefact (DESIGN §4)
            proto = onnx.load(str(tmp))
            # A large plan's matrices stay in the checkpoint: here they are references with sha256.
            onnx.helper.set_model_props(proto, {"cmrtool_plan": split_plan(model.plan)[0]})
            onnx.save(proto, str(tmp))
        try:
            onnx.checker.check_model(str(tmp))
        except Exception as e:
            raise UnsupportedModelError(f"the exported ONNX model is invalid: {_first_line(e)}", "please report this with CMRTOOL_DEBUG=1") from e
        try:
            diff = onnx_parity(tmp, model, [list(inputs)])
        except InputError as e:
            raise UnsupportedModelError(
                f"onnxruntime cannot run the exported model: {e.message.split(': ', 1)[-1]}",
                "onnxruntime lacks some float64 kernels: export a float32 copy of the model"
                if model.dtype == torch.float64 else "the operator is missing from onnxruntime's CPU provider; keep the torch checkpoint",
            ) from e
    return OnnxReport(str(path), exporter, diff, int(inputs[0].shape[0]), tuple(notes))


def onnx_parity(path: str | Path, reduced: Any, batches: Sequence[Sequence[torch.Tensor]]) -> float:
    """max |onnxruntime(x) − R(x)| over ``batches``."""
    require_file(path, "ONNX file")
    try:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for bad files
        raise InputError(f"{path} is not a loadable ONNX model: {str(e).splitlines()[0][:160]}", "export it again (cmrtool compile --onnx)") from e
    names = [i.name for i in sess.get_inputs()]
    worst = 0.0
    with torch.no_grad():
        for x in batches:
            if len(names) != len(x):
                raise InputError(f"{path} takes {len(names)} inputs, the model takes {len(x)}", "export the ONNX file from the reduced model")
            try:
                out = sess.run(None, {nm: t.numpy() for nm, t in zip(names, x)})[0]
            except Exception as e:
                raise InputError(f"onnxruntime could not run {path}: {str(e).splitlines()[0][:160]}", "export the ONNX file from the reduced model with a dynamic batch axis") from e
            ref = reduced.forward(list(x)).to(torch.float64)
            worst = max(worst, float((torch.from_numpy(out).to(torch.float64) - ref).abs().max()))
    return worst
