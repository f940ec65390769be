"""Giving an output its name without ever replacing something that appeared meanwhile.

``check_output_path`` refuses an existing output before the work starts, but another process
may create the same name while cmrtool computes. The no-overwrite rule therefore holds again at
the moment the name is given: files get it by ``link`` (``linkat`` fails with ``EEXIST``,
atomically), directories by ``renameat2(RENAME_NOREPLACE)`` (or, where the kernel or libc lacks
it, by claiming the name with ``mkdir``, which is atomic too, and renaming over that empty,
just-created directory). Of two concurrent compiles to the same ``-o`` exactly one wins; the
other gets the usual "already exists" error and leaves nothing behind. Only an output that
``--force`` allowed to be replaced is ever renamed over (:data:`REPLACEABLE`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from pathlib import Path

from cmrtool.errors import UsageError

__all__ = ["REPLACEABLE", "allow_replace", "may_replace", "exists_error", "rename_dir_noreplace"]

REPLACEABLE: set[str] = set()  # resolved paths that --force allows to be replaced
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def allow_replace(path: str | Path) -> None:
    REPLACEABLE.add(str(Path(path).resolve()))


def may_replace(path: str | Path) -> bool:
    return str(Path(path).resolve()) in REPLACEABLE


def exists_error(path: str | Path) -> UsageError:
    return UsageError(
        f"output {path} already exists (it appeared while cmrtool was working; nothing was replaced)",
        "pass --force to replace it, or choose another name",
    )


def _renameat2(src: str, dest: str) -> bool:
    """``renameat2(RENAME_NOREPLACE)``; False where unavailable (not Linux, old libc or kernel,
    a filesystem without it)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    rc = fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dest), _RENAME_NOREPLACE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), dest)


def rename_dir_noreplace(src: str | Path, dest: str | Path) -> None:
    """Move directory ``src`` to ``dest``; ``FileExistsError`` if ``dest`` exists."""
    if _renameat2(str(src), str(dest)):
        return
    os.mkdir(dest)  # atomic claim: FileExistsError when another process has the name
    try:
        os.replace(src, dest)  # over our own empty directory
    except BaseException:
        os.rmdir(dest)
        raise
