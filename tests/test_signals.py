"""Ctrl-C at any moment ends in one of two states, never a third: exit 130 with ``error:
interrupted`` and no output, or exit 0 with the complete output (the signal came after the output
got its name). Never a traceback, a death by signal (exit -2, -6), or an output beside an error.

A bounded harness: a few compiles are interrupted at seeded moments spread over the run (during
``import torch``, scoring, writing); the partial-directory cleanup after a SIGKILL is checked
without killing anything, by leaving the state a killed run leaves.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, SAMPLES

from cmrtool.io.partials import MARKER, remove_stale_partials

CALIB = SAMPLES / "calib.safetensors"


def _interrupted_compile(tmp: Path, delay: float) -> tuple[int, str, bool]:
    out = tmp / "r.pt"
    argv = [sys.executable, "-m", "cmrtool", "compile", str(SAMPLES / "digits_mlp.pt"), "--calib", str(CALIB),
            "--keep", "0.5", "-o", str(out), "--threads", "1", "-q", "--json"]
    proc = subprocess.Popen(argv, cwd=tmp, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err, out.exists()


@pytest.mark.slow
def test_sigint_at_random_moments_is_always_clean(tmp_path):
    rng = random.Random(15)
    # importing torch, starting, working. Not before ~0.3 s: during Python's own start-up (the
    # site module, before any cmrtool code runs) the interpreter's default handling applies.
    delays = [0.4, 0.9] + [rng.uniform(1.2, 4.0) for _ in range(2)]
    outcomes = []
    for i, delay in enumerate(delays):
        run = tmp_path / str(i)
        run.mkdir()
        code, err, written = _interrupted_compile(run, delay)
        outcomes.append((delay, code, written))
        assert "Traceback" not in err, err
        if code == 130:
            assert [ln for ln in err.splitlines() if ln.startswith(("error:", "hint:"))] == ["error: interrupted", "hint: no output was written"], err
            assert list(run.iterdir()) == []  # no output, no partial file
        else:
            assert code == 0 and written, (delay, code, err)  # the signal came after the commit
            assert sorted(p.name for p in run.iterdir()) == ["r.pt"]
    assert any(code == 130 for _, code, _ in outcomes), outcomes


def test_a_signal_after_the_commit_lets_the_command_finish(tmp_path, cli, monkeypatch):
    """The output got its name, then Ctrl-C: the command completes with exit 0 (not 130 with an
    output on disk)."""
    import cmrtool.io.files as cio

    real = cio._link_into_place

    def link_then_interrupt(*args, **kwargs):
        real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)  # arrives while the link is being committed

    monkeypatch.setattr(cio, "_link_into_place", link_then_interrupt)
    r = cli("compile", SAMPLES / "digits_mlp.pt", "--calib", CALIB, "--keep", "0.5", "-o", tmp_path / "r.pt")
    assert r.code == 0 and (tmp_path / "r.pt").exists(), r.err


def test_a_signal_before_the_commit_writes_nothing(tmp_path, cli, monkeypatch):
    import cmrtool.io.files as cio

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cio, "_link_into_place", interrupted)
    r = cli("compile", SAMPLES / "digits_mlp.pt", "--calib", CALIB, "--keep", "0.5", "-o", tmp_path / "r.pt")
    assert r.code == 130 and "error: interrupted" in r.err and list(tmp_path.iterdir()) == []


def test_stale_partial_directories_of_a_killed_run_are_removed(tmp_path):
    import fcntl

    stale = tmp_path / ".reduced.1a2b3c4d.partial"  # what a SIGKILLed directory write leaves
    stale.mkdir()
    (stale / MARKER).write_text("12345\n")
    (stale / "model.safetensors").write_bytes(b"x" * 100)
    live = tmp_path / ".other.9f8e7d6c.partial"  # another process is still writing it
    live.mkdir()
    held = os.open(live / MARKER, os.O_RDWR | os.O_CREAT)
    fcntl.flock(held, fcntl.LOCK_EX)
    foreign = tmp_path / ".mine.partial"  # not ours: no marker
    foreign.mkdir()
    try:
        assert remove_stale_partials(tmp_path) == [stale]
        assert not stale.exists() and live.exists() and foreign.exists()
    finally:
        os.close(held)
    from cmrtool.io.files import atomic_dir

    stale.mkdir()
    (stale / MARKER).write_text("1\n")
    with atomic_dir(tmp_path / "reduced") as d:  # the next run into the directory cleans up
        (d / "f").write_text("x")
    assert not stale.exists() and not (tmp_path / "reduced" / MARKER).exists()
