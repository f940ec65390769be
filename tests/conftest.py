"""Shared fixtures. Tests run on a small, fixed number of threads: torch's default thread
count makes tiny models many times slower on small machines."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)
sys.path.insert(0, str(Path(__file__).resolve().parent))


class CliResult:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def json(self):  # noqa: ANN201
        return json.loads(self.out)


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run ``cmrtool ARGS`` in-process through the real error boundary; stdout is not a TTY."""
    from cmrtool.cli.main import main

    def run(*args: str, stdin: bytes | None = None) -> CliResult:
        if stdin is not None:
            import io

            monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
            import cmrtool.io.files as cio

            monkeypatch.setattr(cio, "_stdin_cache", None)
        capsys.readouterr()
        code = main([str(a) for a in args] + ["--threads", "2"] if args and args[0] in ("inspect", "score", "compile", "verify", "bench", "audit", "sweep") else [str(a) for a in args])
        cap = capsys.readouterr()
        return CliResult(code, cap.out, cap.err)

    return run
