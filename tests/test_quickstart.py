"""The README's quick start cannot go stale: its main-job command runs here, and .ci/run runs
its test command verbatim."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest
from helpers import ROOT

from cmrtool.backends.torchscript.model import TorchScriptModel


def _quickstart() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start.*?```sh\n(.*?)```", text, re.S)
    assert block, "README has a Quick start with a sh block"
    return [ln for ln in block.group(1).splitlines() if ln.strip()]


def test_quickstart_has_exactly_two_commands():
    cmds = _quickstart()
    assert len(cmds) == 2
    assert "pip install torch==2.13.0" in cmds[0] and "pip install torch==2.13.0" in cmds[1]
    assert "cmrtool " in cmds[0] and "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert _quickstart()[1] in ci


@pytest.mark.slow
def test_main_job_runs(tmp_path):
    main_job = _quickstart()[0].split("&& cmrtool ", 1)[1]
    args = shlex.split(main_job)
    (tmp_path / "samples").symlink_to(ROOT / "samples")
    r = subprocess.run(
        [sys.executable, "-m", "cmrtool", *args, "--threads", "2"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    out = tmp_path / args[args.index("-o") + 1]
    reduced = TorchScriptModel(out)
    assert reduced.plan is not None and [s.name for s in reduced.plan.sites] == ["body.0", "body.3"]
    assert '"fold_error"' in r.stdout  # stdout is a pipe here, so the report is JSON
