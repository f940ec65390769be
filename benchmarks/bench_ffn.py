"""Measured speedup vs the MAC-ideal speedup on a transformer-sized FFN, reduced at keep 0.5.

    python benchmarks/bench_ffn.py [--threads 2] [--repeats 30] [--device auto] [--dtype fp16] [--onnx]

The model is one BERT-base-sized feed-forward block, ``fc2(gelu(fc1(x)))`` with 768 → 3072 → 768,
scripted, run on 256 tokens (input ``(256, 768)``). It is reduced with cmrtool's public API
(``cmrtool.api.compile`` at ``--keep``, scored with ``cmr-logit`` on 512 random calibration tokens
written to a temporary safetensors file), then both are timed with ``cmrtool.api.bench``: warm-up,
alternating rounds, median and p10/p90 of the per-round latency ratio. Printed: the measured
speedup, the MAC ratio (the MAC-ideal speedup) and measured / ideal. ``--onnx`` also exports both
models with the legacy exporter and times them with onnxruntime in the same run.

On a CPU without native fp16 the benchmark times fp32 and says so; the fp16 figures need a GPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cmrtool import api  # noqa: E402
from cmrtool.measure.timing import paired_speedup  # noqa: E402


class FFN(nn.Module):
    """A transformer feed-forward block: fc2(gelu(fc1(x))), d → 4d → d."""

    def __init__(self, d: int = 768, hidden: int = 3072) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (tokens, d)
        return self.fc2(F.gelu(self.fc1(x)))


def _export_onnx(path: Path, d: int) -> Path:
    out = path.with_suffix(".onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            torch.jit.load(str(path)), (torch.zeros(2, d),), str(out), dynamo=False,
            input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "tokens"}, "y": {0: "tokens"}},
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="fp16")
    ap.add_argument("--onnx", action="store_true", help="also time ONNX exports with onnxruntime")
    args = ap.parse_args()
    api.configure(args.threads)
    d, hidden = 768, 3072
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        torch.manual_seed(0)
        original = tmpdir / "ffn.pt"
        torch.jit.script(FFN(d, hidden).eval()).save(str(original))
        calib = tmpdir / "calib.safetensors"
        save_file({"input": torch.randn(512, d, generator=torch.Generator().manual_seed(1))}, str(calib))
        reduced = tmpdir / "ffn_reduced.pt"
        c = api.compile(original, reduced, calib=calib, keep=args.keep, check_samples=64)
        paths = [original, reduced]
        if args.onnx:
            paths += [_export_onnx(original, d), _export_onnx(reduced, d)]
        r = api.bench(
            paths, input_shapes=[[1, d]], batch=args.tokens, device=args.device, dtype=args.dtype,
            warmup=args.warmup, repeats=args.repeats, warn=lambda m: print(f"warning: {m}", file=sys.stderr),
        )
    print(
        f"torch {torch.__version__}; {r.device} ({r.device_name}); {r.dtype} (requested {r.requested_dtype}); "
        f"{r.threads} threads; {r.batch} tokens x {d}; keep {args.keep}; "
        f"{r.repeats} alternating rounds after {r.warmup} warm-up; fold error {c.fold_error.max_abs:.2e}"
    )
    print()
    print("| model | runtime | params | MACs per token | latency ms (p10–p90) | tokens/s | speedup (p10–p90) | MAC ratio | measured / ideal |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    names = ["FFN 768-3072-768", f"reduced (keep {args.keep})", "FFN (ONNX)", f"reduced (ONNX, keep {args.keep})"]
    for name, m in zip(names, r.models):
        lat = m.latency
        sp = "—" if m.speedup is None else f"{m.speedup.median:.2f} ({m.speedup.p10:.2f}–{m.speedup.p90:.2f})"
        ratio = "—" if m.mac_ratio is None else f"{m.mac_ratio:.2f}"
        realized = "—" if m.speedup_realized is None else f"{m.speedup_realized:.2f}"
        macs = "—" if m.macs is None else f"{m.macs.total:,}"
        print(
            f"| {name} | {m.runtime} {m.dtype} | {m.params:,} | {macs} | {lat.median * 1e3:.2f} ({lat.p10 * 1e3:.2f}–{lat.p90 * 1e3:.2f}) "
            f"| {m.throughput:,.0f} | {sp} | {ratio} | {realized} |"
        )
    if args.onnx:
        sp = paired_speedup(r.models[2].latencies, r.models[3].latencies)
        print(f"\nonnxruntime, reduced vs original: speedup {sp.median:.2f} ({sp.p10:.2f}–{sp.p90:.2f}), MAC ratio {r.models[1].mac_ratio:.2f}")
    for n in r.notes:
        print(f"note: {n}")


if __name__ == "__main__":
    main()
