"""The process around a command: the one error boundary, signals and the exit code.

:func:`main` runs the Typer app (:mod:`cmrtool.cli.app`) and is the one error boundary: a
:class:`~cmrtool.errors.CmrError` becomes ``error: …`` / ``hint: …`` on stderr with its exit code
(1 bad input, 2 usage, 3 verification failed); any other exception is reported the same way
without a traceback unless ``CMRTOOL_DEBUG=1``. SIGTERM stops a command the way Ctrl-C does
(exit 143 / 130, no output). :func:`run` is what the console script calls.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import typer

from cmrtool.cli.app import app
from cmrtool.errors import CmrError, Interrupted

__all__ = ["main", "run"]


def _print_error(message: str, hint: str) -> None:
    from cmrtool import distributed

    prefix = f"rank {distributed.rank()}: " if distributed.rank() else ""
    sys.stderr.write(f"error: {prefix}{' '.join(message.split())}\n")
    if hint:
        sys.stderr.write(f"hint: {' '.join(hint.split())}\n")
    sys.stderr.flush()


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (``kill``, a CI timeout, torchrun stopping its workers) stops the command the way
    Ctrl-C does: exception handlers remove partial outputs, then ``error: interrupted``."""

    def handler(signum: int, frame: Any) -> None:
        from cmrtool.io import interrupts

        if interrupts.committed() or not _ARMED[0]:
            return  # the output has its name, or the outcome is being reported: finish (cmrtool.io.interrupts)
        raise Interrupted(signal.Signals(signum).name)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (used by ``python -m cmrtool`` and the console script).

    Under torchrun every rank runs this; errors are agreed between ranks and printed once, by
    rank 0 (:mod:`cmrtool.distributed`).
    """
    from cmrtool import distributed
    from cmrtool.io import interrupts

    debug = os.environ.get("CMRTOOL_DEBUG", "") not in ("", "0")
    args = sys.argv[1:] if argv is None else argv
    if not debug:  # library warnings (tracer, deprecations) are noise for a CLI user
        warnings.filterwarnings("ignore")
    try:
        with _sigterm_interrupts(), interrupts.armed():
            _ARMED[0] = True
            distributed.init()  # joins torchrun's process group when WORLD_SIZE > 1
            rv = app(args=args, prog_name="cmrtool", standalone_mode=False)
            interrupts.disarm()
            if not rv:
                distributed.finish()
        if rv == 130:  # typer turns KeyboardInterrupt into exit code 130
            _print_error("interrupted", "no output was written")
        return rv if isinstance(rv, int) else 0
    except (KeyboardInterrupt, Interrupted, typer.Abort) as e:
        interrupts.disarm()
        if distributed.is_writer():
            _print_error("interrupted" + (f" ({e})" if isinstance(e, Interrupted) else ""), "no output was written")
        return 143 if isinstance(e, Interrupted) else 130
    except BrokenPipeError:
        return 0
    except Exception as e:
        interrupts.disarm()
        shown, here = distributed.fail(e)
        if debug:
            raise
        if isinstance(shown, CmrError):
            message, hint, code = shown.message, shown.hint, shown.exit_code
        elif isinstance(shown, OSError) and shown.errno in _OS_PROBLEMS:
            message, hint, code = f"{shown.strerror}: {shown.filename or ''}".rstrip(": "), _OS_PROBLEMS[shown.errno], 1
        elif isinstance(shown, typer.TyperException):  # usage errors raised by the argument parser
            cmd = next((a for a in args if not a.startswith("-")), "")
            message, hint, code = shown.format_message(), f"see 'cmrtool {cmd + ' ' if cmd else ''}--help'", getattr(shown, "exit_code", 2) or 2
        else:  # the last line of defence: no tracebacks for users
            message, hint, code = f"internal error: {type(shown).__name__}: {shown}", "set CMRTOOL_DEBUG=1 to see the traceback, and please report it", 1
        if here:
            _print_error(message, hint)
        return code


    finally:
        _ARMED[0] = False


_ARMED = [False]  # main() is running the command (SIGTERM raises; before and after it is recorded)
# Operating-system failures that are the user's environment, not a bug (the last line of defence:
# the writers map most of them to InputError already).
_OS_PROBLEMS = {
    errno.ENOSPC: "free some space on that filesystem, or write the output elsewhere",
    errno.EDQUOT: "free some space within your quota, or write the output elsewhere",
    errno.ENAMETOOLONG: "choose a shorter file name",
    errno.EACCES: "check the permissions of the file and its directory",
    errno.EROFS: "write the output to a writable filesystem",
}


def run() -> None:
    """Console-script entry point (``cmrtool.entry.run`` installs the signal handling first)."""
    from cmrtool.io import interrupts

    try:
        code = main()
    except KeyboardInterrupt:  # a signal between main()'s handlers: still a clean exit
        code = 130
    interrupts.ignore_from_now()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    # The outcome is decided and reported: exit with exactly that code. (A Ctrl-C that Python saw
    # during start-up would otherwise turn the exit into a death by SIGINT, exit -2, at shutdown.)
    os._exit(code)
