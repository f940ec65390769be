"""Lazy checkpoint weights: safetensors files (one, or shards named by
``model.safetensors.index.json``) read tensor by tensor with positioned reads.

Nothing is memory-mapped: a memory-mapped page counts towards the process's resident memory
once touched, so reading a whole checkpoint through a mapping would make resident memory grow to
the checkpoint's size. A tensor read here is a fresh allocation that is freed with the block
that uses it. Unchanged tensors are copied to the output in fixed-size chunks (:meth:`chunks`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch

from cmrtool.errors import InputError
from cmrtool.io.tensorfile import SafetensorsFile, TensorInfo

__all__ = ["LazyWeights", "weight_files"]

_CHUNK = 64 << 20


def weight_files(directory: str | Path) -> list[Path]:
    """The safetensors files of a Hugging Face directory (shards in index order)."""
    from cmrtool.backends.module.hf import _weight_files

    return _weight_files(Path(directory))


class LazyWeights:
    """Every tensor of a checkpoint by name, read only when asked for.

    Example:
        >>> w = LazyWeights("llama-dir")
        >>> w.get("model.layers.0.mlp.down_proj.weight", torch.float32).shape
    """

    def __init__(self, directory: str | Path) -> None:
        self.files = weight_files(directory)
        if not self.files:
            raise InputError(f"{directory} has no model.safetensors", "re-save the model with model.save_pretrained(dir)")
        self._where: dict[str, SafetensorsFile] = {}
        for f in self.files:
            sf = SafetensorsFile(f)
            for name in sf.names():
                self._where[name] = sf
        floats = [i.dtype for i in self.infos().values() if i.dtype.is_floating_point]
        self.dtype = max(set(floats), key=floats.count) if floats else torch.float32

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def info(self, name: str) -> TensorInfo:
        return self._where[name].infos[name]

    def infos(self) -> dict[str, TensorInfo]:
        return {k: f.infos[k] for k, f in self._where.items()}

    def nbytes(self, name: str) -> int:
        info = self.info(name)
        return math.prod(info.shape) * info.dtype.itemsize

    def _read(self, name: str, start: int, nbytes: int) -> torch.Tensor:
        sf = self._where[name]
        out = torch.empty((nbytes,), dtype=torch.uint8)
        if nbytes:
            sf._read_into(out, sf._data_start + sf.infos[name].offset + start)
        return out

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor ``name`` as a new tensor (cast to ``dtype`` if given)."""
        info = self.info(name)
        t = self._read(name, 0, self.nbytes(name)).view(info.dtype).reshape(info.shape)
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    def gather(self, name: str, ids: torch.Tensor, dtype: torch.dtype, rows_per_read: int = 4096) -> torch.Tensor:
        """Rows ``ids`` of a 2-D tensor (an embedding table) without reading all of it at once."""
        info = self.info(name)
        flat = ids.reshape(-1).long()
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= info.shape[0]):
            raise InputError(f"token ids outside the vocabulary of {info.shape[0]}", "the calibration data was tokenized for another model")
        out = torch.empty((flat.numel(), *info.shape[1:]), dtype=dtype)
        order = torch.argsort(flat)
        sorted_ids = flat[order]
        row = info.row_bytes
        for r0 in range(0, info.shape[0], rows_per_read):
            lo = int(torch.searchsorted(sorted_ids, r0))
            hi = int(torch.searchsorted(sorted_ids, r0 + rows_per_read))
            if lo == hi:
                continue
            r1 = min(info.shape[0], r0 + rows_per_read)
            block = self._read(name, r0 * row, (r1 - r0) * row).view(info.dtype).reshape(r1 - r0, *info.shape[1:])
            out[order[lo:hi]] = block[sorted_ids[lo:hi] - r0].to(dtype)
        return out.reshape(*ids.shape, *info.shape[1:])

    def chunks(self, name: str, chunk: int = _CHUNK) -> Iterator[memoryview]:
        """The raw bytes of tensor ``name`` in pieces of at most ``chunk`` bytes (views of fresh
        buffers, so they are written without another copy)."""
        total = self.nbytes(name)
        for start in range(0, total, chunk):
            yield memoryview(self._read(name, start, min(chunk, total - start)).numpy())

    def under(self, prefix: str) -> list[str]:
        """Names of the tensors below module path ``prefix``."""
        p = prefix + "." if prefix else ""
        return [n for n in self._where if n.startswith(p)]

    def close(self) -> None:
        for sf in set(self._where.values()):
            sf.close()


