"""Files: reading inputs (``-`` is stdin), hashing them, and writing outputs atomically.

Outputs are written to an unnamed file in the destination directory (Linux ``O_TMPFILE``) that
gets its name only when complete, so an interrupted run, even one killed with SIGKILL, never
leaves a partial file; elsewhere a hidden temporary file is renamed into place
(:func:`atomic_write` states the guarantees precisely). An output that would overwrite one of the
command's inputs is always refused; an existing output is refused unless ``force`` is given.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from cmrtool.errors import InputError, UsageError
from cmrtool.io.interrupts import commit_point
from cmrtool.io.noreplace import allow_replace, exists_error, may_replace, rename_dir_noreplace

__all__ = [
    "STDIO",
    "read_bytes",
    "sha256_file",
    "sha256_bytes",
    "require_file",
    "check_output_path",
    "check_output_name",
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


def _can_create_in(directory: Path) -> bool:
    """Try it: permission bits do not tell root about read-only or pseudo filesystems."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            return True
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
    check_output_name(out)
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
    if not parent.is_dir():
        raise InputError(f"output directory is not a directory: {parent}", "give a path inside an existing directory")
    if not os.access(parent, os.W_OK) or not _can_create_in(parent):
        raise InputError(f"output directory is not writable: {parent}", "choose a directory you can write to")
    if out.exists() and not force:
        raise UsageError(f"output {out} already exists", "pass --force to replace it, or choose another name")
    if force:
        allow_replace(out)  # the final link may replace it; without --force it never does
    return out


def check_output_name(out: str | Path) -> None:
    """An output name the filesystem cannot hold (with room for the hidden temporary name,
    ``.NAME.XXXXXXXX.partial``) is a usage error, found before any work."""
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    try:
        name_max = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    room = name_max - len(_hidden_name(out)) + len(out.name)
    if len(out.name.encode()) > room or len(os.fsencode(str(out.absolute()))) >= 4096:
        raise UsageError(
            f"output name is too long ({len(out.name.encode())} bytes; this filesystem allows {room} here)",
            "choose a shorter file name",
        )


_PENDING: set[str] = set()  # paths yielded by atomic_write that are still being written
_NO_SPACE_OR_RIGHTS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)


def _unwritable(directory: Path, e: OSError) -> InputError:
    return InputError(f"cannot write to {directory}: {e.strerror or e}", "choose a directory you can write to (and that has space)")


def _unnamed_file(directory: Path) -> int | None:
    """An unnamed regular file in ``directory`` (Linux ``O_TMPFILE``), or None where unsupported."""
    flag = getattr(os, "O_TMPFILE", 0)
    if not flag or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        return os.open(directory, flag | os.O_RDWR | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno in _NO_SPACE_OR_RIGHTS:
            raise _unwritable(directory, e) from e
        return None  # EOPNOTSUPP, EISDIR, EINVAL: the filesystem or kernel lacks O_TMPFILE


def _hidden_name(dest: Path) -> str:
    return f".{dest.name}.{secrets.token_hex(4)}.partial"


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``path``; move it to ``path`` on success.

    An existing ``path`` (allowed by ``--force``) is replaced only once the new one is complete;
    without it the final rename fails if ``path`` appeared meanwhile. On any exception the
    temporary directory is removed and ``path`` is left as it was; one left by a SIGKILL is
    removed by the next run into the same directory (:mod:`cmrtool.io.partials`).
    """
    import shutil

    from cmrtool.io.partials import owned_partial, remove_stale_partials, set_default_modes

    dest = Path(path)
    remove_stale_partials(dest.parent)  # left by a SIGKILLed run (cmrtool.io.partials)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    old: Path | None = None
    try:
        try:
            with owned_partial(tmp):
                yield tmp
        except OSError as e:
            if e.errno in _NO_SPACE_OR_RIGHTS:
                raise _unwritable(dest.parent, e) from e
            raise
        set_default_modes(tmp, _umask())
        if may_replace(dest) and dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
            os.replace(dest, old / dest.name)
        try:
            with commit_point():
                rename_dir_noreplace(tmp, dest)
        except FileExistsError:
            raise exists_error(dest) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not dest.exists():
            os.replace(old / dest.name, dest)  # put the replaced directory back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_write(path: str | Path, replace: bool | None = None) -> Iterator[Path]:
    """Yield a path to write the output through; the output appears at ``path`` only on success.

    An existing ``path`` is replaced only when ``replace`` is true (None: when
    :func:`check_output_path` was given ``force`` for it); otherwise the final link fails with
    "already exists", even when the file appeared while the output was being written.

    Guarantees (Linux, on filesystems with ``O_TMPFILE``: ext4, xfs, btrfs, tmpfs):

    - the file is created *unnamed* in the destination directory and the yielded path is its
      ``/proc/self/fd/N`` alias, which writers open by name and readers reload (``compile``
      measures the fold error on exactly what it wrote); until the final link nothing in the
      directory has a name, so any exception, SIGTERM, or even SIGKILL or a power cut while
      writing leaves nothing behind;
    - on success the data is fsynced and linked to ``path`` in one ``linkat``. With ``--force``
      over an existing file it is linked under a hidden name and renamed over ``path``: a
      SIGKILL between those two system calls is the only way a ``.NAME.XXXX.partial`` remains.

    Elsewhere (no ``O_TMPFILE``): a hidden ``.NAME.XXXX.partial`` file in the destination
    directory, renamed into place on success and removed on any exception, including Ctrl-C and
    SIGTERM; SIGKILL during the write leaves it.

    An ``atomic_write`` on a path that an outer ``atomic_write`` yielded writes straight into it
    (the outer one provides the atomicity).
    """
    dest = Path(path)
    if str(dest) in _PENDING:
        yield dest
        return
    directory = dest.parent if str(dest.parent) else Path(".")
    fd = _unnamed_file(directory)
    if fd is None:
        with _named_temp(dest, directory, may_replace(dest) if replace is None else replace) as tmp:
            yield tmp
        return
    alias = f"/proc/self/fd/{fd}"
    _PENDING.add(alias)
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        _PENDING.discard(alias)
        os.close(fd)
        raise _unwritable(directory, e) from e
    try:
        try:
            yield Path(alias)
        except OSError as e:  # ENOSPC, EDQUOT… while writing: a bad-input message, not a crash
            if e.errno in _NO_SPACE_OR_RIGHTS:
                raise _unwritable(directory, e) from e
            raise
        _PENDING.discard(alias)
        try:
            with commit_point():
                _link_into_place(fd, alias, dest.name, dir_fd, may_replace(dest) if replace is None else replace)
        except FileExistsError:
            raise exists_error(dest) from None
        except OSError as e:
            raise _unwritable(directory, e) from e
    finally:
        _PENDING.discard(alias)
        os.close(dir_fd)
        os.close(fd)  # an unnamed file that was never linked vanishes here


def _link_into_place(fd: int, alias: str, name: str, dir_fd: int, replace: bool) -> None:
    """fsync the unnamed file and give it ``name``; an existing file is replaced (atomically)
    only when ``replace`` (``--force``), else ``FileExistsError`` (:mod:`cmrtool.io.noreplace`)."""
    os.fsync(fd)
    try:
        os.link(alias, name, dst_dir_fd=dir_fd)  # linkat(..., AT_SYMLINK_FOLLOW)
    except FileExistsError:  # --force over an existing output: link aside, then rename over it
        if not replace:
            raise
        hidden = _hidden_name(Path(name))
        os.link(alias, hidden, dst_dir_fd=dir_fd)
        try:
            os.replace(hidden, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(hidden, dir_fd=dir_fd)
            raise
    with contextlib.suppress(OSError):
        os.fsync(dir_fd)  # make the new name durable


@contextlib.contextmanager
def _named_temp(dest: Path, directory: Path, replace: bool) -> Iterator[Path]:
    """The portable fallback of :func:`atomic_write`: a hidden temp file renamed into place."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=directory)
        os.fchmod(fd, 0o666 & ~_umask())
        os.close(fd)
    except OSError as e:
        raise _unwritable(directory, e) from e
    tmp_path = Path(tmp)
    _PENDING.add(tmp)
    try:
        try:
            yield tmp_path
            with open(tmp_path, "rb+") as f:
                os.fsync(f.fileno())
        except OSError as e:
            if e.errno in _NO_SPACE_OR_RIGHTS:
                raise _unwritable(directory, e) from e
            raise
        with commit_point():
            if replace:
                os.replace(tmp_path, dest)
            else:
                try:
                    os.link(tmp_path, dest)  # fails if the name appeared meanwhile
                except FileExistsError:
                    raise exists_error(dest) from None
        with contextlib.suppress(OSError):
            tmp_path.unlink()
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise
    finally:
        _PENDING.discard(tmp)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)


def write_with(path: str | Path, writer: Callable[[Path], None]) -> None:
    """Run ``writer(tmp_path)`` and atomically move the result to ``path``."""
    with atomic_write(path) as tmp:
        writer(tmp)
