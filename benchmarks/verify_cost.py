"""Verify time at R = 2000 / time of one plain batched forward pass over 2R inputs, per sample.

    python benchmarks/verify_cost.py [--swaps 2000] [--repeats 5] [--threads 1] [--warmup 10]

The verify side is ``cmrtool.verify.report.verify`` on the loaded models and data (fold error, plain
fidelity, interchange for every site and for all sites: everything the protocol computes); the
plain side runs the original TorchScript module over 2R held-out inputs (the data tiled) in
batches of 256. After ``--warmup`` unmeasured pairs (steady state: the first calls in a process
run slower), the two alternate within one run; the median of per-pair ratios is printed.
Target: ≤ 3. The last column is the cold end-to-end time of ``cmrtool.api.verify`` (loading and
analysing both checkpoints, building the graph functions), for reference.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cmrtool import api  # noqa: E402
from cmrtool.backends.torchscript.model import TorchScriptModel  # noqa: E402
from cmrtool.io.data import Dataset  # noqa: E402
from cmrtool.verify.report import verify  # noqa: E402

SAMPLES = ROOT / "samples"
MODELS = ["digits_mlp", "digits_mlp_traced", "digits_convnet", "digits_convnet_traced", "digits_transformer", "digits_transformer_traced"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--swaps", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--warmup", type=int, default=10, help="unmeasured verify/plain pairs per model first")
    args = ap.parse_args()
    api.configure(args.threads)
    from safetensors.torch import load_file

    x = load_file(str(SAMPLES / "eval.safetensors"))["input"]
    reps = -(-2 * args.swaps // len(x))
    plain_inputs = x.repeat(reps, 1, 1, 1)[: 2 * args.swaps].split(256)
    print(f"torch {torch.__version__}, {args.threads} thread(s), R = {args.swaps}, keep {args.keep}, cmr-logit")
    print("| model | sites | verify (s) | plain forward over 2R (s) | ratio (median of pairs) | cold api.verify (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            src, out = SAMPLES / f"{name}.pt", Path(tmp) / f"{name}.pt"
            api.compile(src, out, calib=SAMPLES / "calib.safetensors", keep=args.keep)
            module = torch.jit.load(str(src)).eval()

            def plain() -> None:
                with torch.no_grad():
                    for b in plain_inputs:
                        module(b)

            t = time.perf_counter()
            api.verify(src, out, SAMPLES / "eval.safetensors", swaps=args.swaps)
            cold = time.perf_counter() - t
            original, reduced = TorchScriptModel(src), TorchScriptModel(out)
            data = Dataset(SAMPLES / "eval.safetensors", original.arg_names, 1, original.dtype)

            def run() -> None:
                verify(original, reduced, data, swaps=args.swaps)

            for _ in range(args.warmup):  # unmeasured: allocator pools, the derived graph functions, caches
                plain()
                run()
            pairs = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                plain()
                a = time.perf_counter() - t
                t = time.perf_counter()
                run()
                b = time.perf_counter() - t
                pairs.append((b, a))
            sites = len(api.inspect(out).reduced["sites"])
            v, p = statistics.median(b for b, _ in pairs), statistics.median(a for _, a in pairs)
            r = statistics.median(b / a for b, a in pairs)
            print(f"| {name} | {sites} | {v:.3f} | {p:.3f} | {r:.2f} | {cold:.3f} |", flush=True)


if __name__ == "__main__":
    main()
