"""Engine options: one frozen dataclass, validated once (``__post_init__``), passed down whole.

``calibration``: ``original`` (the default) feeds each block the original model's hidden states
(the one-shot semantics of the whole-model path); ``sequential`` feeds it the outputs of the
already-reduced blocks (later statistics see earlier reductions). Measured on the bundled
``samples/tiny_lm`` (benchmarks/llm_quality.py), sequential changed nothing for mean replacement
and was worse for the least-squares refit, which regresses the reduced model's own units rather
than the original's, so it is opt-in. ``max_memory`` bounds the
calibration buffers (hidden states at one block boundary, twice, plus one block's captured site
values); past it they spill to memory-mapped files in ``work_dir``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from cmrtool.errors import UsageError

__all__ = ["CALIBRATIONS", "FOLD_CHECKS", "EngineOptions", "parse_memory", "default_max_memory"]

CALIBRATIONS = ("sequential", "original")
FOLD_CHECKS = ("auto", "float64")
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "t": 1 << 40, "tb": 1 << 40}


def default_max_memory() -> int:
    """A quarter of the memory available now (``MemAvailable``), at least 256 MB."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return max(256 << 20, int(line.split()[1]) * 1024 // 4)
    except OSError:
        pass
    return 2 << 30


def parse_memory(text: str | int | None) -> int | None:
    """``"4GB"``, ``"512M"``, ``"1.5g"`` or a byte count → bytes (None stays None)."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise UsageError(f"invalid --max-memory '{text}'", "give a size such as 4GB, 512MB or 2G")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass(frozen=True)
class EngineOptions:
    """How the block engine runs (see the module docstring).

    Args:
        calibration: ``sequential`` or ``original``.
        max_memory: bytes for the calibration buffers (None: :func:`default_max_memory`).
        work_dir: where spilled buffers go (None: a temporary directory next to the output,
            removed at the end).
        batch_size: sequences per forward pass (at most ``batch_tokens`` tokens' worth).
        batch_tokens: token cap of a forward pass (activations of a large layer stay small).
        check_samples: sequences of the per-block fold check (at most ``check_tokens`` tokens;
            0 turns the check off).
        check_tokens: token cap of the per-block fold check.
        check: ``auto``: the first reduced layer is checked in float64, the others screened in
            float32 against a rounding bound and checked in float64 only above it; ``float64``:
            every layer in float64 (see :func:`cmrtool.engine.loop.screen_tolerance`).
        progress: print one line per block on stderr (tokens/s, resident memory).
    """

    calibration: str = "original"
    max_memory: int | None = None
    work_dir: str | None = None
    batch_size: int = 256
    batch_tokens: int = 2048
    check_samples: int = 256
    check_tokens: int = 64
    check: str = "auto"
    progress: bool = False

    def __post_init__(self) -> None:
        if self.calibration not in CALIBRATIONS:
            raise UsageError(f"unknown --calibration '{self.calibration}'", f"choose one of: {', '.join(CALIBRATIONS)}")
        if self.max_memory is not None and self.max_memory < 1:
            raise UsageError(f"--max-memory must be positive, got {self.max_memory}", "e.g. --max-memory 4GB")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}", "e.g. --batch-size 16")
        if self.check not in FOLD_CHECKS:
            raise UsageError(f"unknown --fold-check '{self.check}'", f"choose one of: {', '.join(FOLD_CHECKS)}")
        if self.check_samples < 0 or self.check_tokens < 1:
            raise UsageError("--check-samples must be at least 0", "e.g. --check-samples 4 (0 turns the fold check off)")
        if self.work_dir is not None:
            p = Path(self.work_dir)
            if p.exists() and not p.is_dir():
                raise UsageError(f"--work-dir {p} is not a directory", "give a directory (it is created if missing)")
            if p.exists() and not os.access(p, os.W_OK):
                raise UsageError(f"--work-dir {p} is not writable", "choose a directory you can write to")

    def batch_for(self, tokens_per_sequence: int) -> int:
        """Sequences per forward pass for sequences of this length."""
        return max(1, min(self.batch_size, self.batch_tokens // max(1, tokens_per_sequence)))

    @property
    def budget(self) -> int:
        return self.max_memory if self.max_memory is not None else default_max_memory()
