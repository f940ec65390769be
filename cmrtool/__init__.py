"""cmrtool: reduce trained PyTorch networks by mechanism replacement, exactly folded and verified.

The library is the product; the ``cmrtool`` command is a thin client over it. Heavy modules
(torch, onnx) are imported by the functions that need them, so ``import cmrtool`` is cheap.
"""

from __future__ import annotations

__version__ = "0.1.0"
