"""Progress on stderr: a bar with an ETA on a terminal, one summary line otherwise; the counts
add up to the samples actually streamed."""

from __future__ import annotations

import contextlib
import io
import re

from helpers import SAMPLES
from rich.console import Console

import cmrtool.api as cmr
from cmrtool.cli.output import Output

MLP = SAMPLES / "digits_mlp.pt"
CALIB = SAMPLES / "calib.safetensors"


def _recorder(log: list[tuple[str, int, int]]):
    @contextlib.contextmanager
    def factory(description: str, total: int):
        done = [0]
        yield lambda n: done.__setitem__(0, done[0] + n)
        log.append((description, total, done[0]))

    return factory


def test_score_and_compile_report_every_sample(tmp_path):
    log: list[tuple[str, int, int]] = []
    cmr.score(MLP, CALIB, batch_size=100, progress=_recorder(log))
    cmr.score(MLP, CALIB, batch_size=100, limit=250, progress=_recorder(log))
    cmr.compile(MLP, tmp_path / "r.pt", calib=CALIB, keep=0.5, batch_size=64, progress=_recorder(log))
    assert log == [("scoring (cmr-logit)", 512, 512), ("scoring (cmr-logit)", 250, 250), ("scoring (cmr-logit)", 512, 512)]


def test_a_terminal_gets_a_bar_with_eta():
    out = Output(json_mode=True)
    buf = io.StringIO()
    out.err = Console(file=buf, force_terminal=True, width=100, highlight=False)
    with out.progress("scoring (vbp)", 512) as advance:
        for _ in range(4):
            advance(128)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.getvalue())  # drop the terminal's control codes
    assert "eta" in text and "512/512" in text  # the bar: count and time remaining
    assert re.search(r"scoring \(vbp\): 512 samples in [0-9.]+s\n$", text)  # the bar is replaced by the summary


def test_a_pipe_gets_one_summary_line(cli, tmp_path):
    for args in (("score", MLP, "--calib", CALIB), ("compile", MLP, "--calib", CALIB, "--keep", "0.5", "-o", tmp_path / "r.pt")):
        r = cli(*args)
        assert r.code == 0, r.err
        lines = [ln for ln in r.err.splitlines() if ln.startswith("scoring")]
        assert len(lines) == 1 and lines[0].startswith("scoring (cmr-logit): 512 samples in "), r.err
        assert cli(*args, "--quiet", *(["--force"] if args[0] == "compile" else [])).err == ""
