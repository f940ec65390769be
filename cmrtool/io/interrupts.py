"""Ctrl-C (SIGINT) and SIGTERM with one outcome: exit 130/143 and no output, or exit 0 and the
complete output; never a traceback, a death by signal, or an output with an error exit.

Three phases, switched by the CLI (this module imports nothing heavy, so the console script
installs it before ``import torch``):

1. **Starting** (:func:`install_early`): a signal is only *recorded*. Python code raising
   ``KeyboardInterrupt`` in the middle of importing torch's C extensions can abort the process
   (SIGABRT); the recorded signal is acted on as soon as the command is ready to run.
2. **Working** (:func:`armed`): a signal raises ``KeyboardInterrupt`` (SIGTERM raises
   :class:`~cmrtool.errors.Interrupted` in the CLI), every ``finally`` removes partial outputs,
   and the CLI prints ``error: interrupted``.
3. **Committed** (:func:`commit_point`, around the ``link``/``rename`` that gives an output its
   name): from the moment the output has its name the command finishes and exits 0; a later
   signal is recorded, not raised. So "exit 130" always means "nothing was written". A command
   that writes several independent outputs (``sweep --keep-models``) calls :func:`rearm` after
   each one to become interruptible again.

After the command (error or not) signals are ignored while the process exits.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["install_early", "armed", "commit_point", "committed", "rearm", "disarm", "pending", "ignore_from_now"]

_state: dict[str, Any] = {"armed": False, "committing": False, "committed": False, "pending": None}
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _record(signum: int, frame: Any) -> None:
    _state["pending"] = signum


def _on_sigint(signum: int, frame: Any) -> None:
    if not _state["armed"] or _state["committing"] or _state["committed"]:
        _state["pending"] = signum
        return
    raise KeyboardInterrupt


def install_early() -> None:
    """Record SIGINT until the command runs (call before importing torch)."""
    if _main_thread():
        signal.signal(signal.SIGINT, _record)


def pending() -> int | None:
    return _state["pending"]


def committed() -> bool:
    """True once an output has its name (or while it is being given one)."""
    return bool(_state["committed"] or _state["committing"])


@contextlib.contextmanager
def armed() -> Iterator[None]:
    """SIGINT raises ``KeyboardInterrupt`` while the command runs (a signal recorded while
    starting is raised at once); the previous handler is restored afterwards."""
    if not _main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    _state.update(armed=True, committing=False, committed=False)
    signal.signal(signal.SIGINT, _on_sigint)
    try:
        if _state["pending"] == signal.SIGINT:
            _state["pending"] = None
            raise KeyboardInterrupt
        yield
    finally:
        _state["armed"] = False
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)


def disarm() -> None:
    """From now on signals are recorded, not raised (the command is reporting its outcome)."""
    _state["armed"] = False


@contextlib.contextmanager
def commit_point() -> Iterator[None]:
    """Wrap the system call that names an output. Signals are blocked around it; if it succeeds
    the command is committed (later signals are recorded); if it fails, a signal that arrived
    meanwhile is raised as usual."""
    blocked = False
    if _main_thread() and hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        blocked = True
    _state["committing"] = True
    ok = False
    try:
        yield
        ok = True
    finally:
        if ok:
            _state["committed"] = True
        _state["committing"] = False
        if blocked:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)


def rearm() -> None:
    """Make the command interruptible again after a completed, independent output; a signal
    recorded meanwhile is raised now."""
    _state["committed"] = False
    if _state["armed"] and _state["pending"] == signal.SIGINT:
        _state["pending"] = None
        raise KeyboardInterrupt


def ignore_from_now() -> None:
    """The process is exiting: a late signal must not kill it (exit −2) or print a traceback."""
    if _main_thread():
        for s in _SIGNALS:
            with contextlib.suppress(ValueError, OSError):
                signal.signal(s, signal.SIG_IGN)
