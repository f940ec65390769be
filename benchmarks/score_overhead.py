"""Score time / time of one plain forward pass over the same calibration data, per sample.

    python benchmarks/score_overhead.py [--threads 2] [--repeats 7] [--criterion cmr-logit]

Both sides are measured in the same process, alternating, after a warm-up; the median of the
per-pair ratios is printed (robust to the machine's speed drifting during the run).

For criteria that need loss gradients and curvature (``cmr-const``, ``cmr-affine``, ``taylor``,
``gndi``), the reference is one forward+backward pass: the loaded module's forward over the same
batches and the backward of the cross-entropy loss into every parameter. Target for
``cmr-const``: ≤ 3. The plain pass runs the loaded TorchScript module on the calibration batches
already in memory; the score pass is ``cmrtool.score.scoring.score_model`` end to end (reading batches
from disk, capturing site values, float64 statistics, the criterion). Target for ``cmr-logit``:
≤ 2.0. ``--scale K`` repeats the calibration data K times to show the per-sample cost.
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
from cmrtool.score.scoring import score_model  # noqa: E402

SAMPLES = ROOT / "samples"
MODELS = [
    "digits_mlp.pt",
    "digits_mlp_traced.pt",
    "digits_convnet.pt",
    "digits_convnet_traced.pt",
    "digits_transformer.pt",
    "digits_transformer_traced.pt",
]


def _scaled_calib(k: int, tmp: Path) -> Path:
    if k == 1:
        return SAMPLES / "calib.safetensors"
    from safetensors.torch import load_file, save_file

    d = load_file(str(SAMPLES / "calib.safetensors"))
    path = tmp / f"calib_x{k}.safetensors"
    save_file({n: t.repeat(k, *([1] * (t.dim() - 1))).contiguous() for n, t in d.items()}, str(path))
    return path


GRADIENT_CRITERIA = ("cmr-const", "cmr-affine", "taylor", "gndi")


def measure(model_file: str, calib: Path, criterion: str, repeats: int, batch: int) -> tuple[float, float, float]:
    model = TorchScriptModel(SAMPLES / model_file)
    data = Dataset(calib, model.arg_names, 1, model.dtype)
    batches = [(b.inputs, b.labels) for b in data.batches(batch)]
    module = model.module
    backward = criterion in GRADIENT_CRITERIA

    def plain() -> None:
        if backward:
            for inputs, labels in batches:
                module.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(module(*inputs), labels).backward()
            return
        with torch.no_grad():
            for inputs, _ in batches:
                module(*inputs)

    def scored() -> None:
        score_model(model, data, criterion, model.sites, batch_size=batch)

    for _ in range(3):  # warm-up: the profiling executor specializes on the first calls
        plain()
        scored()
    tp, ts = [], []
    for _ in range(repeats):  # alternate, so drift in machine speed hits both sides alike
        t = time.perf_counter()
        plain()
        tp.append(time.perf_counter() - t)
        t = time.perf_counter()
        scored()
        ts.append(time.perf_counter() - t)
    ratios = [a / b for a, b in zip(ts, tp)]
    return statistics.median(ts), statistics.median(tp), statistics.median(ratios)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--criterion", default="cmr-logit")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--scale", type=int, nargs="+", default=[1, 16])
    args = ap.parse_args()
    api.configure(args.threads)  # what the CLI does: threads and malloc settings
    print(f"torch {torch.__version__}, {args.threads} threads, criterion {args.criterion}, batch {args.batch_size}")
    ref = "forward+backward" if args.criterion in GRADIENT_CRITERIA else "plain forward"
    print(f"| model | calib samples | score (ms) | {ref} (ms) | ratio (median of pairs) |")
    print("|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.scale:
            calib = _scaled_calib(k, Path(tmp))
            n = Dataset(calib, ["x"]).n
            for name in MODELS:
                s, p, r = measure(name, calib, args.criterion, args.repeats, args.batch_size)
                print(f"| {name} | {n} | {s * 1e3:.2f} | {p * 1e3:.2f} | {r:.2f} |", flush=True)


if __name__ == "__main__":
    main()
