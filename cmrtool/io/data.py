"""Calibration and held-out data: tensor files read lazily, in batches.

A data file holds the model's inputs under ``input`` (or under the names of the forward
arguments, e.g. ``input_ids`` and ``attention_mask``) and optionally integer ``labels``. Formats:
safetensors (read row range by row range with positioned reads, never whole and never
memory-mapped: :mod:`cmrtool.io.tensorfile`), ``.npy`` (a single ``input`` array, read the same
way), ``.npz`` and ``.pt`` (``weights_only=True``); the last two are held whole, so prefer
safetensors for large data. ``-`` reads a safetensors file from standard input (buffered
whole). Every batch is checked for NaN and Inf before it reaches the model.
"""

from __future__ import annotations

import math
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cmrtool.errors import InputError, UsageError
from cmrtool.io.files import STDIO, read_bytes, require_file
from cmrtool.io.tensorfile import NpyFile, RowFile, SafetensorsFile

__all__ = ["Batch", "Dataset", "open_data"]

LABELS = "labels"
INPUT = "input"
_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Batch:
    """One slice of a dataset: the forward arguments in order, labels if present."""

    inputs: tuple[torch.Tensor, ...]
    labels: torch.Tensor | None
    start: int

    def __len__(self) -> int:
        return int(self.inputs[0].shape[0])


class _Reader:
    """Uniform lazy access to named tensors: shape, dtype, and row slices."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: RowFile | None = None
        self._arrays: dict[str, Any] = {}
        suffix = Path(path).suffix.lower()
        try:
            if path != STDIO:  # first: a missing file or a directory says so, whatever its suffix
                require_file(path, "data file")
            if path == STDIO:
                from safetensors.torch import load as st_load

                self._arrays = dict(st_load(read_bytes(path)))
            elif suffix in (".safetensors", ".st"):
                self._file = SafetensorsFile(path)
            elif suffix == ".npy":
                self._file = NpyFile(path, INPUT)
            elif suffix == ".npz":
                import numpy as np

                with np.load(path, allow_pickle=False) as z:
                    self._arrays = {k: torch.from_numpy(_plain(z[k], k, path)) for k in z.files}
            elif suffix in (".pt", ".pth", ".bin"):
                if _is_torchscript(path):
                    raise InputError(
                        f"{path} is a TorchScript model, not a data file",
                        "pass the data file (e.g. calib.safetensors with 'input' and 'labels')",
                    )
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
                if isinstance(obj, torch.Tensor):
                    obj = {INPUT: obj}
                if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
                    raise InputError(
                        f"{path} does not hold a tensor or a dict of tensors",
                        "save data as {'input': tensor, 'labels': tensor}",
                    )
                self._arrays = dict(obj)
            else:
                raise InputError(
                    f"unknown data format '{suffix or path}'",
                    "use .safetensors (recommended), .npz, .npy or .pt",
                )
        except InputError:
            raise
        except Exception as e:  # corrupt or truncated files raise library-specific errors
            raise InputError(
                f"cannot read data file {path}: {_first_line(e)}",
                "the file is truncated or not in the format its extension says; regenerate it",
            ) from e

    def names(self) -> list[str]:
        return self._file.names() if self._file is not None else list(self._arrays)

    def shape(self, name: str) -> tuple[int, ...]:
        if self._file is not None:
            return self._file.infos[name].shape
        return tuple(self._arrays[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        if self._file is not None:
            return self._file.infos[name].dtype
        return self._arrays[name].dtype

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        if self._file is not None:
            return self._file.rows(name, start, stop)
        return self._arrays[name][start:stop]


def _plain(arr: Any, name: str, path: str) -> Any:
    """A numpy array torch can take (numeric, native byte order), or an InputError."""
    import numpy as np

    if arr.dtype.hasobject or arr.dtype.kind not in "biufc":
        raise InputError(f"array '{name}' in {path} has dtype {arr.dtype}", "store inputs as float32 (or int64 token ids)")
    return np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("="), copy=False))


def _is_zip(path: str) -> bool:
    return zipfile.is_zipfile(path)


def _is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n for n in z.namelist())


def _row_bytes(reader: _Reader, name: str) -> int:
    shape = reader.shape(name)
    numel = 1
    for d in shape[1:]:
        numel *= int(d)
    return numel * reader.dtype(name).itemsize


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


class Dataset:
    """A data file bound to a model's forward arguments.

    Args:
        path: the data file (or ``-`` for safetensors on stdin).
        arg_names: the model's forward argument names (without ``self``); the first one is
            also reachable as ``input``.
        required: how many leading arguments must be present (the rest have defaults).
        float_dtype: floating inputs are cast to this dtype (the model's).

    Example:
        >>> ds = Dataset("samples/calib.safetensors", ["x"])
        >>> for batch in ds.batches(256): ...
    """

    def __init__(
        self,
        path: str | Path,
        arg_names: Sequence[str] = (INPUT,),
        required: int = 1,
        float_dtype: torch.dtype | None = None,
    ) -> None:
        self.path = str(path)
        self._reader = _Reader(self.path)
        self.float_dtype = float_dtype
        names = self._reader.names()
        self.keys = self._bind(names, list(arg_names), required)
        self.has_labels = LABELS in names
        self.n = self._check_rows(names)

    def _bind(self, names: list[str], arg_names: list[str], required: int) -> list[str]:
        keys: list[str] = []
        for i, arg in enumerate(arg_names):
            if arg in names:
                keys.append(arg)
            elif i == 0 and INPUT in names:
                keys.append(INPUT)
            elif i < required:
                found = ", ".join(sorted(names)) or "nothing"
                want = f"'{INPUT}'" if i == 0 else f"'{arg}'"
                raise InputError(
                    f"data file {self.path} has no tensor {want} (found: {found})",
                    f"store the model's inputs as {want}"
                    + (f" (forward arguments: {', '.join(arg_names)})" if len(arg_names) > 1 else ""),
                )
            else:
                break
        return keys

    def _check_rows(self, names: list[str]) -> int:
        counts = {k: self._reader.shape(k)[0] if self._reader.shape(k) else -1 for k in self.keys}
        if self.has_labels:
            counts[LABELS] = self._reader.shape(LABELS)[0] if self._reader.shape(LABELS) else -1
        if any(c < 0 for c in counts.values()):
            bad = [k for k, c in counts.items() if c < 0]
            raise InputError(f"tensor '{bad[0]}' in {self.path} is a scalar", "store one row per sample")
        if len(set(counts.values())) > 1:
            desc = ", ".join(f"{k}: {c}" for k, c in counts.items())
            raise InputError(f"tensors in {self.path} have different numbers of rows ({desc})", "store one row per sample in every tensor")
        n = next(iter(counts.values()))
        if n == 0:
            raise InputError(f"data file {self.path} is empty (0 samples)", "pass a file with at least one sample")
        for k in self.keys:
            dt = self._reader.dtype(k)
            if dt == torch.bool or not (dt.is_floating_point or dt in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)):
                raise InputError(f"tensor '{k}' in {self.path} has unsupported dtype {dt}", "store inputs as float32 (or integer token ids)")
        if self.has_labels:
            dt = self._reader.dtype(LABELS)
            if dt.is_floating_point or dt == torch.bool:
                raise InputError(f"'labels' in {self.path} has dtype {dt}, expected integers", "store class indices as int64")
            if len(self._reader.shape(LABELS)) != 1:
                raise InputError(f"'labels' in {self.path} has shape {self._reader.shape(LABELS)}, expected (n,)", "store one class index per sample")
        return int(n)

    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: self._reader.shape(k) for k in self.keys}

    def chunk_batches(self, batch_size: int) -> int:
        """How many batches one read-ahead chunk holds (at most 16, about 16 MB at most)."""
        if batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {batch_size}", "e.g. --batch-size 256")
        per_row = max(1, sum(_row_bytes(self._reader, k) for k in self.keys))
        return max(1, min(16, (16 << 20) // (per_row * batch_size)))

    def batches(self, batch_size: int, limit: int | None = None, labels: bool = True, start: int = 0) -> Iterator[Batch]:
        """Yield consecutive batches of rows ``[start, limit)``, reading only those rows (labels if asked).

        Rows are read ahead in chunks of several batches (about 16 MB at most), so a read and
        a finiteness check cost once per chunk, not once per batch. Batch boundaries fall at
        ``start + i · batch_size`` whatever the chunking, so a batch's contents do not depend on
        how many batches were read together (distributed scoring relies on this).
        """
        chunk = batch_size * self.chunk_batches(batch_size)
        n = self.n if limit is None else min(self.n, limit)
        for c0 in range(max(0, start), n, chunk):
            block = self.read(c0, min(n, c0 + chunk), labels)
            for b0 in range(0, len(block), batch_size):
                b1 = b0 + batch_size
                yield Batch(
                    tuple(t[b0:b1] for t in block.inputs),
                    None if block.labels is None else block.labels[b0:b1],
                    c0 + b0,
                )

    def read(self, start: int, stop: int, labels: bool = True) -> Batch:
        inputs = []
        for k in self.keys:
            t = self._reader.rows(k, start, stop)
            if t.dtype.is_floating_point:
                # One reduction: any NaN/Inf makes the sum non-finite (overflow only triggers
                # the exact check below, which then finds nothing).
                if not math.isfinite(float(t.sum(dtype=torch.float64))) and not bool(torch.isfinite(t).all()):
                    bad = int((~torch.isfinite(t)).reshape(t.shape[0], -1).any(1).nonzero()[0, 0]) + start
                    raise InputError(
                        f"tensor '{k}' in {self.path} has NaN or Inf (first at sample {bad})",
                        "remove or fix those samples before calibrating",
                    )
                if self.float_dtype is not None and t.dtype != self.float_dtype:
                    t = t.to(self.float_dtype)
            inputs.append(t)
        y = self._reader.rows(LABELS, start, stop).long() if self.has_labels and labels else None
        return Batch(tuple(inputs), y, start)

    def all(self, limit: int | None = None) -> Batch:
        return self.read(0, self.n if limit is None else min(self.n, limit))


def open_data(path: str | Path, model: Any) -> Dataset:
    """Open a data file for ``model`` (anything with ``arg_names``, ``required_args``, ``dtype``),
    refusing data the model cannot take (:func:`cmrtool.io.datacheck.check_data`)."""
    from cmrtool.io.datacheck import check_data

    ds = Dataset(path, model.arg_names, model.required_args, model.dtype)
    if hasattr(model, "forward"):
        check_data(ds, model)
    return ds
