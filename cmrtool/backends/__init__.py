"""Backends: one per checkpoint format, each implementing the four verbs of DESIGN §2.

- :mod:`cmrtool.backends.torchscript.model`: ``torch.jit.save`` files, no Python class needed;
- :mod:`cmrtool.backends.module.model`: nn.Modules from safetensors + ``--arch`` or a Hugging Face
  directory (:mod:`cmrtool.backends.module.checkpoint`, :mod:`cmrtool.backends.module.hf`).

Every backend's model object offers: ``sites`` / ``rejected`` / ``unsupported`` (discovery),
``run(inputs, capture=..., edits=...)`` (capture and override), ``tensors()`` and
``write(path, tensors, plan)`` (writing the reduced checkpoint), plus ``arg_names``, ``dtype``,
``sha256`` and the embedded ``plan`` of a reduced model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cmrtool.errors import InputError, UsageError
from cmrtool.io.files import STDIO

__all__ = ["load_model"]

_TORCHSCRIPT_SUFFIXES = (".pt", ".ts", ".pth", ".jit", ".torchscript")


def load_model(path: str | Path, arch: str | None = None, data: str | Path | None = None) -> Any:
    """Open a checkpoint with the backend its format needs.

    Args:
        path: a TorchScript file (``torch.jit.save``; ``-`` reads one from stdin), a
            ``.safetensors`` state dict (with ``arch``) or a reduced one written by cmrtool, or a
            Hugging Face directory (``config.json`` + ``model.safetensors``).
        arch: ``pkg.module:factory``, a callable returning the nn.Module the weights belong to.
        data: the data file the model will run on: a TorchScript model's non-tensor arguments
            (an ``int`` sample rate) take their values from its 0-d tensors of the same names
            (:mod:`cmrtool.backends.torchscript.tsargs`).

    Example:
        >>> model = load_model("samples/digits_mlp.pt")
        >>> model = load_model("samples/digits_mlp.safetensors", "cmrtool.testing.models:digits_mlp")
    """
    p = str(path)
    suffix = Path(p).suffix.lower()
    if Path(p).is_dir():
        from cmrtool.backends.module.hf import load_dir

        if arch is not None:
            raise UsageError(f"{p} is a directory: --arch applies to .safetensors files only", "drop --arch; a Hugging Face directory names its class in config.json")
        return load_dir(p)
    if suffix == ".safetensors":
        from cmrtool.backends.module.checkpoint import load_safetensors

        return load_safetensors(p, arch)
    if arch is not None:
        raise UsageError(f"--arch applies to .safetensors files, and {p} is not one", "drop --arch for TorchScript checkpoints")
    if suffix == ".onnx":
        raise InputError(f"{p}: ONNX is an output format of cmrtool, not an input", "pass the model the ONNX file was exported from")
    if p == STDIO or suffix in _TORCHSCRIPT_SUFFIXES or suffix == "":
        from cmrtool.backends.torchscript.model import TorchScriptModel

        return TorchScriptModel(p, data)
    raise InputError(
        f"unknown model format '{suffix}' for {p}",
        "pass a TorchScript file (.pt), a .safetensors file with --arch, or a Hugging Face directory",
    )
