"""cmrtool: reduce trained PyTorch networks by mechanism replacement, exactly folded and verified.

The library is the product; the ``cmrtool`` command is a thin client over it. Heavy modules
(torch, onnx) are imported by the functions that need them, so ``import cmrtool`` is cheap.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "load_reduced"]


def __getattr__(name: str) -> Any:
    """``cmrtool.load_reduced``, imported on first use (it needs torch)."""
    if name == "load_reduced":
        from cmrtool.backends.checkpoint import load_reduced

        return load_reduced
    raise AttributeError(f"module 'cmrtool' has no attribute {name!r}")
