"""Calibration hidden states at one block boundary, and the dataset view a block reads them through.

A buffer is one tensor, ``(sequences, tokens, hidden)`` for hidden states or ``(kept tokens,
width)`` for a site's captured values (token-major, padding dropped), in memory while the
buffers together stay under the budget and otherwise in a memory-mapped file in the work
directory (``torch.from_file(shared=True)``: pages are written back to the file and dropped by
the kernel under memory pressure). :class:`BlockData` offers a buffer under the interface of
:class:`cmrtool.io.data.Dataset`, so the scoring, planning and fitting functions of the whole-model
path run on a block unchanged: each batch is ``(hidden_states, attention_mask)``, and its
``hidden_states`` is a view into the buffer (which is how a block knows which rows it ran).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from cmrtool.io.data import Batch
from cmrtool.errors import UsageError

__all__ = ["BufferPool", "BlockData"]


class BufferPool:
    """Allocates the engine's buffers: in memory until ``budget`` bytes, then file-backed.

    Args:
        budget: bytes that may live in memory.
        work_dir: directory for file-backed buffers (created when first needed).
    """

    def __init__(self, budget: int, work_dir: Path) -> None:
        self.budget = budget
        self.work_dir = work_dir
        self.in_memory = 0
        self.spilled = 0
        self._count = 0

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        if self.in_memory + nbytes <= self.budget:
            self.in_memory += nbytes
            return torch.zeros(shape, dtype=dtype)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix=f"buffer{self._count}-", dir=self.work_dir)
        self._count += 1
        try:
            os.ftruncate(fd, max(nbytes, 1))
        except OSError as e:
            os.close(fd)
            raise UsageError(f"cannot create a {nbytes >> 20} MB buffer in {self.work_dir}: {e.strerror}",
                             "free disk space or choose another --work-dir") from None
        os.close(fd)
        t = torch.from_file(path, shared=True, size=math.prod(shape), dtype=dtype).reshape(shape)
        os.unlink(path)  # the mapping keeps the data; nothing is left behind
        self.spilled += nbytes
        return t


class BlockData:
    """A hidden-state buffer as a dataset of ``(hidden_states, attention_mask)`` batches."""

    has_labels = False
    keys = ("hidden_states", "attention_mask")

    def __init__(self, hidden: torch.Tensor, mask: torch.Tensor, rows: int | None = None, path: str = "<hidden states>") -> None:
        self.hidden = hidden
        self.mask = mask
        self.n = int(hidden.shape[0] if rows is None else rows)
        self.path = path
        self.float_dtype = hidden.dtype

    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"hidden_states": tuple(self.hidden.shape), "attention_mask": tuple(self.mask.shape)}

    def chunk_batches(self, batch_size: int) -> int:
        if batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {batch_size}", "e.g. --batch-size 16")
        return 1

    def read(self, start: int, stop: int, labels: bool = True) -> Batch:
        stop = min(stop, self.n)
        return Batch((self.hidden[start:stop], self.mask[start:stop]), None, start)

    def batches(self, batch_size: int, limit: int | None = None, labels: bool = True, start: int = 0) -> Iterator[Batch]:
        self.chunk_batches(batch_size)
        n = self.n if limit is None else min(self.n, limit)
        for b0 in range(max(0, start), n, batch_size):
            yield self.read(b0, min(n, b0 + batch_size))

    def all(self, limit: int | None = None) -> Batch:
        return self.read(0, self.n if limit is None else min(self.n, limit))
