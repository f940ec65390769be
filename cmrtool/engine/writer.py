"""Writing a checkpoint block by block: tensors are appended to data files as they are made, and
each safetensors file (``u64 header length | JSON header | tensor bytes``) is finished at the end,
so memory never holds more than the block being written.

The header (tensor offsets and the metadata, which holds the plan) is only known at the end, so
each data file starts ``reserve`` bytes in. If the finished header fits there it is written in
place, padded with spaces (JSON whitespace; safetensors pads its own headers so), and the file is
renamed into the output: the tensor bytes are written once. A header that does not fit (or an
output on another file system) falls back to writing a new file: header, then the data file
copied behind it in fixed-size chunks.

Small outputs become one ``model.safetensors``; outputs over ``shard_bytes`` become
``model-0000i-of-0000N.safetensors`` shards with a ``model.safetensors.index.json`` (the layout
``save_pretrained`` writes and ``from_pretrained`` reads).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterable
from pathlib import Path

import torch

from cmrtool.io.tensorfile import SAFETENSORS_DTYPES

__all__ = ["StreamWriter"]

_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


class StreamWriter:
    """Append tensors (or raw bytes of a known dtype and shape); :meth:`finish` assembles the files.

    Args:
        scratch: a directory for the data files (removed by the caller); on the output's file
            system, the finished files are renamed instead of copied.
        shard_bytes: start a new shard after this many bytes.
        reserve: bytes left for each file's length field and header (a multiple of 8 is used);
            0 always copies.
    """

    def __init__(self, scratch: str | Path, shard_bytes: int = 4 << 30, reserve: int = 0) -> None:
        self.scratch = Path(scratch)
        self.shard_bytes = shard_bytes
        self.reserve = reserve + (-reserve % 8)
        self._shards: list[tuple[Path, dict[str, dict[str, object]], int]] = []
        self._file = None
        self.names: set[str] = set()
        self.shapes: dict[str, tuple[int, ...]] = {}

    def _target(self, nbytes: int) -> tuple[object, dict[str, dict[str, object]], int]:
        if not self._shards or (self._shards[-1][2] > 0 and self._shards[-1][2] + nbytes > self.shard_bytes):
            if self._file is not None:
                self._file.close()
            path = self.scratch / f"data-{len(self._shards):05d}"
            self._file = open(path, "wb")
            self._file.seek(self.reserve)  # a hole, filled by the header at the end
            self._shards.append((path, {}, 0))
        return self._shards[-1]

    def add_raw(self, name: str, dtype: torch.dtype, shape: Iterable[int], pieces: Iterable[bytes | memoryview], nbytes: int) -> None:
        """Append tensor ``name`` from its raw little-endian bytes."""
        path, header, size = self._target(nbytes)
        written = 0
        for piece in pieces:
            self._file.write(piece)  # type: ignore[attr-defined]
            written += len(piece)
        assert written == nbytes, (name, written, nbytes)
        header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [size, size + nbytes]}
        self._shards[-1] = (path, header, size + nbytes)
        self.names.add(name)
        self.shapes[name] = tuple(shape)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().contiguous().cpu()
        # The tensor's own memory, written without a copy (a view of its bytes).
        data = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
        self.add_raw(name, t.dtype, t.shape, [data], len(data))

    def finish(self, directory: str | Path | None, single: str | Path | None, metadata: dict[str, str]) -> list[Path]:
        """Write the safetensors file(s): ``single`` (one file, whatever its size) or into
        ``directory`` (one ``model.safetensors`` or shards with an index). Returns the files."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if not self._shards:
            self._target(0)
            self._file.close()  # type: ignore[attr-defined]
            self._file = None
        if single is not None:
            merged = {k: v for _, h, _ in self._shards for k, v in h.items()}
            offset = 0
            for _, h, size in self._shards:  # one file: offsets continue across data files
                for k in h:
                    b, e = merged[k]["data_offsets"]  # type: ignore[misc]
                    merged[k] = {**merged[k], "data_offsets": [b + offset, e + offset]}
                offset += size
            self._place(Path(single), merged, [p for p, _, _ in self._shards], metadata)
            return [Path(single)]
        out = Path(directory)  # type: ignore[arg-type]
        n = len(self._shards)
        if n == 1:
            files = [out / "model.safetensors"]
        else:
            files = [out / f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map: dict[str, str] = {}
        total = 0
        for f, (path, header, size) in zip(files, self._shards):
            self._place(f, header, [path], metadata)
            weight_map.update({k: f.name for k in header})
            total += size
        if n > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return files

    def _place(self, dest: Path, header: dict[str, object], data_files: list[Path], metadata: dict[str, str]) -> None:
        text = _header(header, metadata)
        if len(data_files) == 1 and 8 + len(text) <= self.reserve:
            text += b" " * (self.reserve - 8 - len(text))
            with open(data_files[0], "r+b") as f:
                f.write(struct.pack("<Q", len(text)))
                f.write(text)
            try:
                os.replace(data_files[0], dest)
                return
            except OSError:  # another file system (--work-dir elsewhere): copied below
                pass
            with open(dest, "wb") as out, open(data_files[0], "rb") as src:
                shutil.copyfileobj(src, out, 16 << 20)
            os.unlink(data_files[0])
            return
        _assemble(dest, text, data_files, self.reserve)


def _header(header: dict[str, object], metadata: dict[str, str]) -> bytes:
    doc = dict(sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]))  # type: ignore[index]
    doc = {"__metadata__": metadata, **doc}
    text = json.dumps(doc, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % 8)  # the tensor data starts 8-byte aligned, as safetensors writes it


def _assemble(dest: Path, text: bytes, data_files: list[Path], skip: int) -> None:
    with open(dest, "wb") as out:
        out.write(struct.pack("<Q", len(text)))
        out.write(text)
        for path in data_files:
            with open(path, "rb") as src:
                src.seek(skip)
                shutil.copyfileobj(src, out, 16 << 20)
            os.unlink(path)
