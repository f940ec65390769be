"""The nn.Module backend on the bundled samples: fidelity of FFN and head reduction, fold versus
delete for heads, ONNX parity for every backend, and the score overhead of hook-based capture.

    python benchmarks/module_backend.py [--threads 2] [--swaps 2000]

Uses only the public API (``cmrtool.api``) with ``--arch cmrtool.testing.models:<sample>`` and
``samples/<sample>.safetensors``; the README's "Hugging Face and safetensors models" table comes
from the first part.
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
from cmrtool.backends import load_model  # noqa: E402
from cmrtool.io.data import open_data  # noqa: E402

SAMPLES = ROOT / "samples"
CALIB, EVAL = SAMPLES / "calib.safetensors", SAMPLES / "eval.safetensors"
NAMES = ("digits_mlp", "digits_convnet", "digits_transformer")


def arch(name: str) -> str:
    return f"cmrtool.testing.models:{name}"


def fidelity(tmp: Path, swaps: int) -> None:
    name = "digits_transformer"
    model = SAMPLES / f"{name}.safetensors"
    print("| sites (kept/width) | replacement | params | fold error (rel.) | ONNX parity | accuracy | agreement | KL | IIA per site | IIA all |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, kinds, replacement in (
        ("FFNs", None, "auto"), ("heads", ["head"], "auto"), ("heads", ["head"], "zero"), ("both", ["head", "neuron"], "auto"),
    ):
        out = tmp / f"{label}-{replacement}.safetensors"
        onnx = tmp / f"{label}-{replacement}.onnx"
        c = api.compile(model, out, calib=CALIB, keep=0.5, kinds=kinds, replacement=replacement, arch=arch(name), onnx=onnx, force=True)
        v = api.verify(model, out, EVAL, swaps=swaps, arch=arch(name))
        widths = ", ".join(f"{s['name']} {s['kept']}/{s['width']}" for s in c.sites)
        iia = ", ".join(f"{s.iia:.3f}" for s in v.sites)
        print(
            f"| {widths} | {replacement} | {c.params_before:,} → {c.params_after:,} | {c.fold_error.relative:.1e} | {c.onnx.max_abs_diff:.1e} "
            f"| {v.accuracy_original * 100:.2f} → {v.accuracy_reduced * 100:.2f} | {v.agreement * 100:.2f} | {v.kl:.3f} | {iia} "
            f"| {v.all_sites.iia if v.all_sites else v.sites[0].iia:.3f} |"
        )


def onnx_parity(tmp: Path) -> None:
    print("| sample | backend | exporter | sites | ONNX max abs diff (256 samples) |")
    print("|---|---|---|---|---:|")
    for name in NAMES:
        sites = ["conv2", "conv3"] if name == "digits_convnet" else None  # conv1 is interior-exact
        for backend, path, a, kinds in (
            ("torchscript", SAMPLES / f"{name}.pt", None, None),
            ("nn.Module", SAMPLES / f"{name}.safetensors", arch(name), ["head", "neuron"] if name == "digits_transformer" else None),
        ):
            c = api.compile(path, tmp / f"{name}-{backend}.onnx", calib=CALIB, keep=0.5, sites=sites, kinds=kinds, arch=a, force=True)
            print(f"| {name} | {backend} | {c.onnx.exporter} | {', '.join(s['name'] for s in c.sites)} | {c.onnx.max_abs_diff:.1e} |")


def score_overhead(repeats: int = 7) -> None:
    """Score time / plain forward time over the calibration data, hooks capturing every site."""
    from cmrtool.score.scoring import score_model

    print("| sample | sites | score (ms) | plain forward (ms) | ratio (median of pairs) |")
    print("|---|---|---:|---:|---:|")
    for name in NAMES:
        m = load_model(SAMPLES / f"{name}.safetensors", arch(name))
        data = open_data(CALIB, m)
        batches = [b.inputs for b in data.batches(256)]
        ratios, st, ft = [], [], []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            with torch.no_grad():
                for x in batches:
                    m.forward(x)
            t1 = time.perf_counter()
            score_model(m, data, "cmr-logit", m.sites, batch_size=256)
            t2 = time.perf_counter()
            ratios.append((t2 - t1) / (t1 - t0))
            ft.append(t1 - t0)
            st.append(t2 - t1)
        print(f"| {name} | {len(m.sites)} | {statistics.median(st[1:]) * 1e3:.2f} | {statistics.median(ft[1:]) * 1e3:.2f} | {statistics.median(ratios[1:]):.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--swaps", type=int, default=2000)
    args = ap.parse_args()
    api.configure(args.threads)
    print(f"torch {torch.__version__}; threads {args.threads}; keep 0.5; cmr-logit")
    print("\nScore overhead (nn.Module backend, hooks):\n")
    score_overhead()
    with tempfile.TemporaryDirectory() as d:
        print("\nFidelity on the digits transformer (held-out data):\n")
        fidelity(Path(d), args.swaps)
        print("\nONNX parity:\n")
        onnx_parity(Path(d))


if __name__ == "__main__":
    main()
