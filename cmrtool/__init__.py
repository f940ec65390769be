"""cmrtool: reduce trained PyTorch networks by mechanism replacement, exactly folded and verified.

The library is the product; the ``cmrtool`` command is a thin client over it. Heavy modules
(torch, onnx) are imported by the functions that need them, so ``import cmrtool`` is cheap.
"""

from __future__ import annotations

import sys
from typing import Any

__version__ = "0.1.0"

if sys.argv[:1] == ["-m"] and __name__ == "cmrtool":  # ``python -m cmrtool`` is starting: Ctrl-C is
    from cmrtool.io.interrupts import install_early  # recorded from here on (cmrtool.io.interrupts),

    install_early()  # not raised inside the imports; a library import leaves signals alone

__all__ = ["__version__", "load_reduced"]


def __getattr__(name: str) -> Any:
    """``cmrtool.load_reduced``, imported on first use (it needs torch)."""
    if name == "load_reduced":
        from cmrtool.backends.module.checkpoint import load_reduced

        return load_reduced
    raise AttributeError(f"module 'cmrtool' has no attribute {name!r}")
