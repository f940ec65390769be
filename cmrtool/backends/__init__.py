"""Backends: one per checkpoint format, each implementing the four verbs of DESIGN §2.

Every backend's model object offers: ``sites`` / ``rejected`` / ``unsupported`` (discovery),
``run(inputs, capture=..., edits=...)`` (capture and override), ``tensors()`` and
``write(path, tensors, plan)`` (writing the reduced checkpoint), plus ``arg_names``, ``dtype``,
``sha256`` and the embedded ``plan`` of a reduced model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cmrtool.errors import InputError
from cmrtool.io import STDIO

__all__ = ["load_model"]

_TORCHSCRIPT_SUFFIXES = (".pt", ".ts", ".pth", ".jit", ".torchscript")


def load_model(path: str | Path, arch: str | None = None) -> Any:
    """Open a checkpoint with the backend its format needs.

    Args:
        path: a TorchScript file (``torch.jit.save``), or ``-`` for one on stdin.
        arch: reserved for safetensors checkpoints (``pkg.module:factory``).

    Example:
        >>> model = load_model("samples/digits_mlp.pt")
    """
    p = str(path)
    suffix = Path(p).suffix.lower()
    if suffix == ".safetensors" or Path(p).is_dir():
        raise InputError(
            f"{p}: safetensors and Hugging Face checkpoints are not supported by this version",
            "save the model with torch.jit.script(model).save('model.pt') and pass the .pt file",
        )
    if suffix == ".onnx":
        raise InputError(f"{p}: ONNX is an output format of cmrtool, not an input", "pass the TorchScript model the ONNX file was exported from")
    if p == STDIO or suffix in _TORCHSCRIPT_SUFFIXES or suffix == "":
        from cmrtool.backends.torchscript import TorchScriptModel

        return TorchScriptModel(p)
    raise InputError(f"unknown model format '{suffix}' for {p}", "pass a TorchScript file (.pt) saved by torch.jit.save")
