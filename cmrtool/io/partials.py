"""Directory outputs under construction: owned, locked, and cleaned up after a SIGKILL.

A Hugging Face directory is written into a hidden ``.NAME.XXXX.partial/`` beside its
destination and renamed into place when complete (:func:`cmrtool.io.files.atomic_dir`). Ctrl-C and
SIGTERM remove it; SIGKILL (or a power cut) cannot. So each such directory holds a marker file,
:data:`MARKER`, on which the writing process holds an exclusive ``flock`` for as long as it
works. The next cmrtool run that writes into the same parent directory removes every
``.*.partial`` directory whose marker it can lock, i.e. whose writer is gone: only this tool's
partials (the name pattern *and* the marker), never one still being written (the lock is held),
never anything else. The marker is deleted just before the rename, so finished outputs do not
carry it. On systems without ``fcntl`` nothing is removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

__all__ = ["MARKER", "owned_partial", "remove_stale_partials", "set_default_modes"]

MARKER = ".cmrtool-partial"


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def remove_stale_partials(parent: Path) -> list[Path]:
    """Remove this tool's partial directories in ``parent`` whose writer has died; return them."""
    removed: list[Path] = []
    try:
        candidates = [p for p in parent.iterdir() if p.name.startswith(".") and p.name.endswith(".partial")]
    except OSError:
        return removed
    for p in candidates:
        marker = p / MARKER
        if p.is_symlink() or not p.is_dir() or not marker.is_file():
            continue
        try:
            fd = os.open(marker, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            if _try_lock(fd):  # no live writer holds it
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def owned_partial(tmp: Path) -> Iterator[None]:
    """Mark ``tmp`` as this process's partial output (locked marker) while the body runs; the
    marker is removed when the body completes normally, before the caller renames ``tmp``."""
    marker = tmp / MARKER
    fd = os.open(marker, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        _try_lock(fd)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
        with contextlib.suppress(OSError):
            marker.unlink()
    finally:
        os.close(fd)


def set_default_modes(root: Path, umask: int) -> None:
    """Directories 0777 and files 0666 less the umask (0755/0644 usually), as ``save_pretrained``
    gives; ``mkdtemp`` made the tree private (0700)."""
    os.chmod(root, 0o777 & ~umask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~umask)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~umask)
