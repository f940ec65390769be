"""Atomic outputs: nothing appears under the output's name until it is complete, and an
interrupted compile (exception, Ctrl-C, SIGTERM, even SIGKILL while writing) leaves no file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, SAMPLES

import cmrtool.io.files as cio
from cmrtool.io.files import atomic_write, atomic_write_bytes

MLP = SAMPLES / "digits_mlp.pt"
CALIB = SAMPLES / "calib.safetensors"
HAS_TMPFILE = cio._unnamed_file(Path(ROOT)) is not None


@pytest.fixture(params=["unnamed", "named"] if HAS_TMPFILE else ["named"])
def mode(request, monkeypatch):
    """Both strategies: O_TMPFILE where the filesystem has it, and the portable fallback."""
    if request.param == "named":
        monkeypatch.setattr(cio, "_unnamed_file", lambda directory: None)
    return request.param


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def test_output_appears_complete_or_not_at_all(tmp_path, mode):
    dest = tmp_path / "out.bin"
    with atomic_write(dest) as tmp:
        tmp.write_bytes(b"hello")
        assert tmp.read_bytes() == b"hello"  # the pending file can be read back (compile reloads it)
        assert not dest.exists()
        visible = [p.name for p in tmp_path.iterdir()]
        assert visible == ([] if mode == "unnamed" else [tmp.name]) and all(n.startswith(".out.bin.") for n in visible)
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"] and dest.read_bytes() == b"hello"
    assert dest.stat().st_mode & 0o777 == 0o666 & ~_umask()


def test_an_exception_leaves_nothing(tmp_path, mode):
    with pytest.raises(KeyboardInterrupt), atomic_write(tmp_path / "out.bin") as tmp:
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_is_replaced_atomically(tmp_path, mode):
    dest = tmp_path / "out.bin"
    dest.write_bytes(b"old")
    with atomic_write(dest, replace=True) as tmp:
        tmp.write_bytes(b"new")
        assert dest.read_bytes() == b"old"
    assert dest.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_a_file_that_appears_while_writing_is_never_replaced(tmp_path, mode):
    from cmrtool.errors import UsageError

    dest = tmp_path / "out.bin"
    with pytest.raises(UsageError, match="already exists"):
        with atomic_write(dest) as tmp:
            tmp.write_bytes(b"mine")
            dest.write_bytes(b"theirs")  # another process won the name meanwhile
    assert dest.read_bytes() == b"theirs" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_nested_writes_go_straight_into_the_pending_file(tmp_path, mode):
    with atomic_write(tmp_path / "out.bin") as tmp:
        atomic_write_bytes(tmp, b"inner")
        assert tmp.read_bytes() == b"inner"
    assert (tmp_path / "out.bin").read_bytes() == b"inner"


# A compile whose checkpoint writer pauses after its first chunk and says so on stderr, so that
# the test can kill it mid-write.
_SLOW_WRITER = r"""
import sys, time, io
import torch
import cmrtool.io.files
if sys.argv[1] == "named":
    cmrtool.io.files._unnamed_file = lambda directory: None
real_save = torch.jit.save
def slow_save(module, f, _extra_files=None):
    buf = io.BytesIO()
    real_save(module, buf, _extra_files=_extra_files)
    data = buf.getvalue()
    f.write(data[:1000]); f.flush()
    sys.stderr.write("WRITING\n"); sys.stderr.flush()
    time.sleep(60)
    f.write(data[1000:])
torch.jit.save = slow_save
from cmrtool.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


def _compile_mid_write(tmp_path: Path, mode: str) -> subprocess.Popen:
    args = ["compile", str(MLP), "--calib", str(CALIB), "--keep", "0.5", "-o", str(tmp_path / "r.pt"), "--threads", "1"]
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, mode, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if line == "WRITING\n":
            return proc
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"the compile never reached its write: {proc.stderr.read()}")


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TMPFILE, reason="SIGKILL safety needs O_TMPFILE (Linux)")
def test_sigkill_during_the_write_leaves_nothing(tmp_path):
    proc = _compile_mid_write(tmp_path, "unnamed")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["unnamed", "named"] if HAS_TMPFILE else ["named"])
def test_sigterm_during_the_write_is_a_clean_interrupt(tmp_path, mode):
    proc = _compile_mid_write(tmp_path, mode)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert [ln for ln in err.splitlines() if ln.startswith(("error:", "hint:"))] == ["error: interrupted (SIGTERM)", "hint: no output was written"]
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TMPFILE, reason="SIGKILL safety needs O_TMPFILE (Linux)")
def test_sigkill_at_any_time_leaves_nothing_or_the_whole_checkpoint(tmp_path):
    """Kill real compiles at spread-out moments: afterwards the directory holds either nothing or
    the complete checkpoint (byte-identical to an uninterrupted run), never anything else."""
    args = [sys.executable, "-m", "cmrtool", "compile", str(MLP), "--calib", str(CALIB), "--keep", "0.5", "--threads", "1", "-o"]
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    start = time.monotonic()
    subprocess.run([*args, str(ref_dir / "r.pt")], cwd=ROOT, check=True, capture_output=True, timeout=300)
    duration = time.monotonic() - start
    reference = (ref_dir / "r.pt").read_bytes()
    outcomes = set()
    for i, fraction in enumerate((0.6, 0.8, 0.9, 0.95, 1.05)):
        d = tmp_path / f"k{i}"
        d.mkdir()
        proc = subprocess.Popen([*args, str(d / "r.pt")], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(duration * fraction)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        names = [p.name for p in d.iterdir()]
        assert names in ([], ["r.pt"]), names
        if names:
            assert (d / "r.pt").read_bytes() == reference
        outcomes.add(bool(names))
    assert outcomes  # (timing decides which outcomes occur; both are correct)
