"""Calibration and held-out data: tensor files read lazily, in batches.

A data file holds the model's inputs under ``input`` (or under the names of the forward
arguments, e.g. ``input_ids`` and ``attention_mask``) and optionally integer ``labels``. Formats:
safetensors (read slice by slice, never whole), ``.npz``, ``.npy`` (a single ``input`` array,
memory-mapped) and ``.pt`` (loaded with ``weights_only=True``). ``-`` reads a safetensors file
from standard input. Every batch is checked for NaN and Inf before it reaches the model.
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

from cmrtool.errors import InputError
from cmrtool.io import STDIO, read_bytes, require_file

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
        self._st: Any = None
        self._slices: dict[str, Any] = {}
        self._arrays: dict[str, Any] = {}
        suffix = Path(path).suffix.lower()
        try:
            if path == STDIO:
                from safetensors.torch import load as st_load

                self._arrays = dict(st_load(read_bytes(path)))
            elif suffix in (".safetensors", ".st"):
                from safetensors import safe_open

                require_file(path, "data file")
                self._st = safe_open(path, framework="pt")
            elif suffix == ".npy":
                import numpy as np

                require_file(path, "data file")
                self._arrays = {INPUT: np.load(path, mmap_mode="r", allow_pickle=False)}
            elif suffix == ".npz":
                import numpy as np

                require_file(path, "data file")
                with np.load(path, allow_pickle=False) as z:
                    self._arrays = {k: z[k] for k in z.files}
            elif suffix in (".pt", ".pth", ".bin"):
                require_file(path, "data file")
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
                if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
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
        return list(self._st.keys()) if self._st is not None else list(self._arrays)

    def shape(self, name: str) -> tuple[int, ...]:
        if self._st is not None:
            return tuple(self._st.get_slice(name).get_shape())
        return tuple(self._arrays[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        if self._st is not None:
            return _st_dtype(self._st.get_slice(name).get_dtype())
        arr = self._arrays[name]
        if isinstance(arr, torch.Tensor):
            return arr.dtype
        return torch.from_numpy(arr[:0].copy()).dtype

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        if self._st is not None:
            sl = self._slices.get(name)
            if sl is None:
                sl = self._slices[name] = self._st.get_slice(name)
            return sl[start:stop]
        arr = self._arrays[name][start:stop]
        if isinstance(arr, torch.Tensor):
            return arr
        import numpy as np

        return torch.from_numpy(np.array(arr, copy=True))  # memory-mapped rows are read-only


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


_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _st_dtype(code: str) -> torch.dtype:
    return _ST_DTYPES.get(code, torch.float32)


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

    def batches(self, batch_size: int, limit: int | None = None, labels: bool = True) -> Iterator[Batch]:
        """Yield consecutive batches, reading only those rows from disk (labels if asked).

        Rows are read ahead in chunks of several batches (about 16 MB at most), so a slice call
        and a finiteness check cost once per chunk, not once per batch.
        """
        if batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {batch_size}", "pass --batch-size 256")
        n = self.n if limit is None else min(self.n, limit)
        per_row = max(1, sum(_row_bytes(self._reader, k) for k in self.keys))
        chunk = batch_size * max(1, min(16, (16 << 20) // (per_row * batch_size)))
        for c0 in range(0, n, chunk):
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
    """Open a data file for ``model`` (anything with ``arg_names``, ``required_args``, ``dtype``)."""
    return Dataset(path, model.arg_names, model.required_args, model.dtype)
