"""Byte-level integrity of model files, checked before their contents are trusted.

TorchScript archives are zip files whose members carry a CRC-32, which ``torch.jit.load`` never
checks: a flipped byte inside a stored tensor loads and compiles into a silently different model.
:func:`check_zip_crc` reads every member and compares its CRC (about 1 GB/s, once per load).

A safetensors file lists each tensor's ``[begin, end)`` byte range; two tensors whose ranges
overlap share bytes, which no writer produces and which makes a weight edit in one show up in the
other. :func:`check_no_overlap` refuses them (zero-size tensors occupy no bytes and are ignored).
"""

from __future__ import annotations

import io
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path

from cmrtool.errors import InputError

__all__ = ["check_zip_crc", "check_no_overlap"]

_CHUNK = 1 << 20


def check_zip_crc(path: str | Path, data: bytes | None = None) -> None:
    """Every member of the zip archive at ``path`` (or in ``data``) matches its stored CRC-32.

    A file that is not a zip at all is left to the loader (it reports that more precisely).
    """
    src = io.BytesIO(data) if data is not None else str(path)
    try:
        z = zipfile.ZipFile(src)
    except (zipfile.BadZipFile, OSError, ValueError):
        return
    with z:
        for info in z.infolist():
            crc = 0
            try:
                with z.open(info) as f:
                    for chunk in iter(lambda: f.read(_CHUNK), b""):
                        crc = zlib.crc32(chunk, crc)
            except (zipfile.BadZipFile, OSError, ValueError, EOFError, zlib.error) as e:
                raise _corrupt(path, info.filename, str(e) or type(e).__name__) from None
            if crc != info.CRC:
                raise _corrupt(path, info.filename, "its CRC-32 does not match")


def _corrupt(path: str | Path, member: str, why: str) -> InputError:
    return InputError(
        f"{path} is corrupt: archive member {member} is damaged ({why})",
        "the file was changed after torch.jit.save wrote it; copy or save it again",
    )


def check_no_overlap(path: str | Path, ranges: Mapping[str, tuple[int, int]]) -> None:
    """No two tensors' ``[begin, end)`` byte ranges overlap."""
    spans = sorted((b, e, name) for name, (b, e) in ranges.items() if e > b)
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise InputError(
                f"{path} is corrupt: tensors '{n0}' and '{n1}' share bytes {b1}..{min(e0, e1)} of the file",
                "each tensor must have its own bytes; save the tensors again with safetensors.torch.save_file",
            )
