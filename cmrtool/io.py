"""Files: reading inputs (``-`` is stdin), hashing them, and writing outputs atomically.

Outputs are written to a temporary file in the destination directory and renamed into place,
so an interrupted run never leaves a partial file. An output that would overwrite one of the
command's inputs is always refused; an existing output is refused unless ``force`` is given.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from cmrtool.errors import InputError, UsageError

__all__ = [
    "STDIO",
    "read_bytes",
    "sha256_file",
    "sha256_bytes",
    "require_file",
    "check_output_path",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_dir",
]

STDIO = "-"
_stdin_cache: bytes | None = None


def read_bytes(path: str | Path) -> bytes:
    """Read a whole input file; ``-`` reads standard input (once; later calls reuse it)."""
    global _stdin_cache
    if str(path) == STDIO:
        if _stdin_cache is None:
            _stdin_cache = sys.stdin.buffer.read()
        return _stdin_cache
    p = require_file(path)
    try:
        return p.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read {p}: {e.strerror}", "check the file's permissions") from e


def require_file(path: str | Path, what: str = "file") -> Path:
    """Return ``path`` as a Path after checking it names a readable regular file."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} not found: {p}", "check the path (relative paths start at the current directory)")
    if p.is_dir():
        raise InputError(f"{what} is a directory, not a file: {p}", "pass the file inside it")
    if not os.access(p, os.R_OK):
        raise InputError(f"{what} is not readable: {p}", "check the file's permissions")
    return p


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    """sha256 of a file's bytes (``-`` hashes the buffered standard input)."""
    if str(path) == STDIO:
        return sha256_bytes(read_bytes(path))
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output_path(output: str | Path, inputs: Iterable[str | Path], force: bool = False, directory: bool = False) -> Path:
    """Validate an output path before any work is done.

    Refuses an output equal to an input (always), an existing file (unless ``force``), and a
    directory that does not exist or cannot be written. With ``directory`` the output is a
    directory to create, which must not contain an input (an existing one is replaced only with
    ``force``).
    """
    out = Path(output)
    for inp in inputs:
        if str(inp) == STDIO:
            continue
        ip = Path(inp)
        if out.resolve() == ip.resolve() or _same_file(out, ip) or (directory and ip.resolve().is_relative_to(out.resolve())):
            raise UsageError(
                f"output {out} is {'or contains ' if directory else ''}one of the inputs",
                "write the result to a new file; cmrtool never overwrites its inputs",
            )
    if directory and out.exists() and not out.is_dir():
        raise UsageError(f"output {out} exists and is not a directory", "choose another name, or drop the trailing '/' to write a file")
    if not directory and out.is_dir():
        raise UsageError(f"output {out} is a directory", "give a file name, e.g. reduced.pt")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.exists():
        raise InputError(f"output directory does not exist: {parent}", f"create it first: mkdir -p {parent}")
    if not os.access(parent, os.W_OK):
        raise InputError(f"output directory is not writable: {parent}", "choose a directory you can write to")
    if out.exists() and not force:
        raise UsageError(f"output {out} already exists", "pass --force to replace it, or choose another name")
    return out


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``path``; move it to ``path`` on success.

    An existing ``path`` (allowed by ``--force``) is replaced only once the new one is complete.
    On any exception the temporary directory is removed and ``path`` is left as it was.
    """
    import shutil

    dest = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    old: Path | None = None
    try:
        yield tmp
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
            os.replace(dest, old / dest.name)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not dest.exists():
            os.replace(old / dest.name, dest)  # put the replaced directory back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the destination directory; rename it to ``path`` on success.

    On any exception (including KeyboardInterrupt) the temporary file is removed and nothing
    appears at ``path``.
    """
    dest = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent or Path("."))
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)


def write_with(path: str | Path, writer: Callable[[Path], None]) -> None:
    """Run ``writer(tmp_path)`` and atomically move the result to ``path``."""
    with atomic_write(path) as tmp:
        writer(tmp)
