"""Old vs new compile of one checkpoint in one run, alternated with the plain forward pass.

    git archive <old-commit> | tar -x -C /tmp/old
    python benchmarks/engine_ab.py DIR TOKENS /tmp/old [--rounds 1]

Timings on a shared machine drift by 3× within minutes, so a change to the engine is measured
by alternating: plain forward (``llm_scale.py _plain``), compile with the tree at OLD, compile
with this tree, per round. Prints wall seconds (process), the engine's loop seconds and the ratio
to that round's plain forward.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _compile(tree: Path, directory: str, tokens: str, out: Path) -> tuple[float, float]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "cmrtool", "compile", directory, "--calib", tokens, "--kind", "neuron", "--keep", "0.5",
           "-o", f"{out}/", "--threads", "2", "--json", "--batch-size", "16"]
    start = time.perf_counter()
    r = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=str(tree)), cwd=tree, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    return wall, json.loads(r.stdout)["engine"]["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("directory")
    ap.add_argument("tokens")
    ap.add_argument("old", help="a checkout of the old tree (git archive COMMIT | tar -x -C OLD)")
    ap.add_argument("--rounds", type=int, default=1)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cmrtool-ab-") as d:
        for _ in range(a.rounds):
            r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "llm_scale.py"), "_plain", a.directory, a.tokens, "2"],
                               capture_output=True, text=True, check=True)
            plain = json.loads(r.stdout.strip().splitlines()[-1])["seconds"]
            old = _compile(Path(a.old).resolve(), a.directory, a.tokens, Path(d) / "old")
            new = _compile(ROOT, a.directory, a.tokens, Path(d) / "new")
            print(f"plain {plain:.1f} s  old {old[0]:.1f} s (loop {old[1]:.1f}) ÷ plain {old[0] / plain:.2f}  "
                  f"new {new[0]:.1f} s (loop {new[1]:.1f}) ÷ plain {new[0] / plain:.2f}", flush=True)


if __name__ == "__main__":
    main()
