"""The output layer: results on stdout (a Rich table for a person, one JSON document for a
program), logs, warnings and progress on stderr.

JSON is chosen by ``--json`` or automatically when stdout is not a terminal, so
``cmrtool score … | jq`` and ``cmrtool score … > scores.json`` get JSON without a flag.
Progress bars (with an ETA) are drawn only when stderr is a terminal and ``--quiet`` is not
given; otherwise one summary line is logged when the pass ends. Under torchrun only rank 0
prints (results, logs, warnings, progress); errors are the error boundary's business.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console

__all__ = ["Output", "fmt_int", "fmt_float"]


def _clean(obj: Any) -> Any:
    """Replace non-finite floats (invalid in JSON) by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def fmt_int(n: int | None) -> str:
    if n is None:
        return "—"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def fmt_float(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "—"
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}f}"


class Output:
    """Where a command's output goes.

    Args:
        json_mode: force JSON (True) or tables (False); None picks JSON when stdout is not a TTY.
        quiet: suppress logs and progress (warnings and errors still print).
    """

    def __init__(self, json_mode: bool | None = None, quiet: bool = False) -> None:
        from cmrtool.distributed import is_writer

        self.json = (not sys.stdout.isatty()) if json_mode is None else json_mode
        self.silent = not is_writer()  # another torchrun rank: rank 0 speaks for the job
        self.quiet = quiet or self.silent
        self.out = Console(highlight=False, soft_wrap=False)
        self.err = Console(stderr=True, highlight=False)

    def log(self, message: str) -> None:
        if not self.quiet:
            self.err.print(message, markup=False)

    def warn(self, message: str) -> None:
        if not self.silent:
            self.err.print(f"warning: {message}", markup=False)

    def result(self, doc: dict[str, Any], human: Callable[[Console], None]) -> None:
        """Emit the command's result: ``doc`` as JSON, or ``human(console)`` for a person."""
        if self.silent:
            return
        if self.json:
            sys.stdout.write(json.dumps(_clean(doc), indent=2, allow_nan=False) + "\n")
            sys.stdout.flush()
        else:
            human(self.out)

    @contextlib.contextmanager
    def progress(self, description: str, total: int, unit: str = "samples") -> Iterator[Callable[[int], None]]:
        """Yield ``advance(n)``; draws a bar with ETA on a terminal, a summary line otherwise."""
        start = time.perf_counter()
        if self.quiet or not self.err.is_terminal:
            done = [0]

            def advance(n: int) -> None:
                done[0] += n

            yield advance
            if not self.quiet:
                self.log(f"{description}: {done[0]} {unit} in {time.perf_counter() - start:.2f}s")
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.err,
            transient=True,
        ) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n: bar.advance(task, n)
        self.log(f"{description}: {total} {unit} in {time.perf_counter() - start:.2f}s")
