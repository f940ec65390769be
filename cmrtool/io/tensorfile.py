"""Tensor files read by row ranges with positioned reads: safetensors and ``.npy``.

A row range ``[start, stop)`` of a row-major tensor is one contiguous byte range of the file::

    offset = data_start + begin + start · row_bytes,   row_bytes = prod(shape[1:]) · itemsize

so a batch costs one ``pread`` into a fresh tensor, and nothing else of the file enters the
process. Memory-mapping (what ``safetensors.safe_open`` and ``np.load(mmap_mode="r")`` do) would
be as cheap per read, but every page touched stays mapped and counts towards the process's
resident set, so a streaming pass over an N-byte file ends with N bytes resident (measured:
peak RSS grew by the file's size; see ``benchmarks/memory.py``).

The headers are parsed and validated here (sizes, dtypes, shapes, offsets inside the file), so
a truncated or corrupt file is an :class:`~cmrtool.errors.InputError`, never a crash or a
short read. Byte order: safetensors and the ``.npy`` files accepted here are little-endian.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from cmrtool.errors import InputError

__all__ = ["TensorInfo", "RowFile", "SafetensorsFile", "NpyFile"]

_MAX_HEADER = 100_000_000  # the safetensors format's own limit on header size

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
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

_NPY_DTYPES: dict[str, torch.dtype] = {
    "<f8": torch.float64,
    "<f4": torch.float32,
    "<f2": torch.float16,
    "<i8": torch.int64,
    "<i4": torch.int32,
    "<i2": torch.int16,
    "|i1": torch.int8,
    "|u1": torch.uint8,
    "|b1": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in its file: dtype, shape, and its byte offset from the data start."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.dtype.itemsize


class RowFile:
    """Named tensors in one file, read by row ranges (subclasses parse the header)."""

    def __init__(self, path: str, infos: dict[str, TensorInfo], data_start: int) -> None:
        self.path = path
        self.infos = infos
        self._data_start = data_start
        self._fd: int | None = None

    def names(self) -> list[str]:
        return list(self.infos)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of tensor ``name`` as a new tensor (one positioned read)."""
        info = self.infos[name]
        if not info.shape:
            raise InputError(f"tensor '{name}' in {self.path} is a scalar", "store one row per sample")
        start, stop = max(0, start), min(info.shape[0], stop)
        n = max(0, stop - start)
        out = torch.empty((n * info.row_bytes,), dtype=torch.uint8)
        if out.numel():
            self._read_into(out, self._data_start + info.offset + start * info.row_bytes)
        return out.view(info.dtype).reshape((n, *info.shape[1:]))

    def _read_into(self, out: torch.Tensor, offset: int) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        view = memoryview(out.numpy())
        done = 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got <= 0:
                raise InputError(f"data file {self.path} ended early (truncated while reading?)", "regenerate the file")
            done += got

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


def _corrupt(path: str, what: str) -> InputError:
    return InputError(
        f"cannot read data file {path}: {what}",
        "the file is truncated or not in the format its extension says; regenerate it",
    )


def _check_layout(path: str, infos: dict[str, TensorInfo], ends: dict[str, int], data_bytes: int) -> None:
    from cmrtool.io.integrity import check_no_overlap

    for name, info in infos.items():
        size = math.prod(info.shape) * info.dtype.itemsize
        if info.offset < 0 or ends[name] - info.offset != size or ends[name] > data_bytes:
            raise _corrupt(path, f"tensor '{name}' does not fit its shape {list(info.shape)} in the file (truncated?)")
    check_no_overlap(path, {name: (info.offset, ends[name]) for name, info in infos.items()})


class SafetensorsFile(RowFile):
    """A safetensors file: ``u64 header length | JSON header | tensor bytes``, little-endian.

    Args:
        path: the file.
    """

    def __init__(self, path: str | Path) -> None:
        path = str(path)
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _corrupt(path, f"{size} bytes is too short for a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise _corrupt(path, f"its header claims {n} bytes, the file has {size}")
            header = f.read(n)
        infos, ends = parse_safetensors_header(path, header)
        _check_layout(path, infos, ends, size - 8 - n)
        super().__init__(path, infos, 8 + n)


def parse_safetensors_header(path: str, header: bytes) -> tuple[dict[str, TensorInfo], dict[str, int]]:
    """Validate a safetensors JSON header; return the tensors' infos and end offsets."""
    try:
        doc = json.loads(header.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _corrupt(path, "its header is not valid JSON") from None
    if not isinstance(doc, dict):
        raise _corrupt(path, "its header is not a JSON object")
    infos: dict[str, TensorInfo] = {}
    ends: dict[str, int] = {}
    for name, entry in doc.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise _corrupt(path, f"entry '{name}' of its header is not an object")
        code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(code, str):
            raise _corrupt(path, f"tensor '{name}' has no dtype")
        if code not in SAFETENSORS_DTYPES:
            raise InputError(
                f"tensor '{name}' in {path} has dtype {code}, which cmrtool does not read",
                "store inputs as float32 (or integer token ids) and labels as int64",
            )
        if not _int_list(shape) or not _int_list(offsets, 2) or offsets[0] > offsets[1]:
            raise _corrupt(path, f"tensor '{name}' has an invalid shape or offsets")
        infos[name] = TensorInfo(SAFETENSORS_DTYPES[code], tuple(shape), offsets[0])
        ends[name] = offsets[1]
    return infos, ends


def _int_list(x: object, length: int | None = None) -> bool:
    return (
        isinstance(x, list)
        and (length is None or len(x) == length)
        and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**62 for v in x)
    )


class NpyFile(RowFile):
    """A ``.npy`` file holding one C-ordered array, exposed as ``name``.

    Args:
        path: the file.
        name: the name the array is known by (``input``).
    """

    def __init__(self, path: str | Path, name: str) -> None:
        from numpy.lib import format as npy

        path = str(path)
        size = os.path.getsize(path)
        try:
            with open(path, "rb") as f:
                version = npy.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = npy.read_array_header_1_0(f, max_header_size=1 << 20)
                elif version == (2, 0):
                    shape, fortran, dtype = npy.read_array_header_2_0(f, max_header_size=1 << 20)
                else:
                    raise ValueError(f"unsupported .npy version {version}")
                start = f.tell()
        except (ValueError, OSError, SyntaxError, TypeError, EOFError) as e:
            raise _corrupt(path, str(e).splitlines()[0] if str(e) else type(e).__name__) from None
        if dtype.hasobject:
            raise InputError(f"{path} holds Python objects", "save a numeric array (np.save with a float32 or int64 array)")
        code = dtype.str  # explicit byte order: '<f4', '|u1', '>f4' (big-endian: refused)
        if code not in _NPY_DTYPES:
            raise InputError(f"{path} holds dtype {dtype}, which cmrtool does not read", "save the array as float32 (or int64)")
        if fortran and len(shape) > 1:
            raise InputError(f"{path} is stored in Fortran order", "save it with np.save(path, np.ascontiguousarray(a))")
        shape = tuple(int(d) for d in shape)
        info = TensorInfo(_NPY_DTYPES[code], shape, 0)
        _check_layout(path, {name: info}, {name: math.prod(shape) * info.dtype.itemsize}, size - start)
        super().__init__(path, {name: info}, start)
