"""Peak resident memory of ``cmrtool score`` as the calibration data grows.

    python benchmarks/memory.py [--scales 1,4,16,64,256] [--models digits_convnet.pt,digits_mlp.pt]

For each scale K the bundled ``samples/calib.safetensors`` is repeated K times into a temporary
safetensors file, and ``python -m cmrtool score MODEL --calib FILE --json --threads 1`` runs as
a child process; its peak RSS is the ``ru_maxrss`` that ``os.wait4`` reports for that child.
Target: growth ≤ 10% from 1× to 16× (and beyond: memory must not depend on the data size).

This script deliberately never imports torch. With ``vfork``, which ``subprocess`` uses on
Linux, the kernel charges the parent's peak RSS to the child's ``ru_maxrss`` when the child
execs, so a parent holding torch (or the repeated data) would hide the child's own figure. The
scaled files are written by streaming the raw tensor bytes K times.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CALIB = ROOT / "samples" / "calib.safetensors"


def write_scaled(src: Path, k: int, dest: Path) -> int:
    """Write ``src`` with every tensor's rows repeated ``k`` times; return the file size."""
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    data = raw[8 + n :]
    names = sorted(header, key=lambda name: header[name]["data_offsets"][0])
    new_header, offset = {}, 0
    for name in names:
        begin, end = header[name]["data_offsets"]
        size = (end - begin) * k
        new_header[name] = {**header[name], "shape": [header[name]["shape"][0] * k, *header[name]["shape"][1:]], "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(new_header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads its header to 8 bytes
    with open(dest, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name in names:
            begin, end = header[name]["data_offsets"]
            for _ in range(k):
                f.write(data[begin:end])
    return dest.stat().st_size


def peak_rss_mb(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of ``cmd`` run as a child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read().decode() if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err}")
    return usage.ru_maxrss / 1024, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scales", default="1,4,16,64,256")
    ap.add_argument("--models", default="digits_convnet.pt,digits_mlp.pt")
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()
    scales = [int(s) for s in args.scales.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for k in scales:
            path = Path(tmp) / f"calib_x{k}.safetensors"
            files[k] = (path, write_scaled(CALIB, k, path))
        for model in args.models.split(","):
            base = None
            for k in scales:
                path, size = files[k]
                cmd = [sys.executable, "-m", "cmrtool", "score", f"samples/{model}", "--calib", str(path), "--json", "--threads", "1", "--batch-size", str(args.batch_size)]
                rss, secs = peak_rss_mb(cmd)
                base = base or rss
                rows.append((model, k, 512 * k, size / 2**20, rss, rss / base - 1, secs))
    print("| model | scale | samples | data (MiB) | peak RSS (MiB) | growth vs 1× | wall (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for model, k, n, mib, rss, growth, secs in rows:
        print(f"| {model} | {k}× | {n} | {mib:.1f} | {rss:.0f} | {growth:+.1%} | {secs:.1f} |")
    worst16 = max(g for _, k, _, _, _, g, _ in rows if k <= 16)
    worst = max(g for *_, g, _ in rows)
    print(f"\nworst growth 1× → 16×: {worst16:+.1%} (target ≤ +10%); 1× → {max(scales)}×: {worst:+.1%}")
    if worst16 > 0.10:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
