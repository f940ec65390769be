"""Folding the mean vs deleting the units, over several training seeds of the digits MLP.

    python benchmarks/fold_vs_delete_seeds.py [--seeds 5] [--threads 1]

Trains the sample MLP (``samples/generate.py``'s recipe) with seeds 0..N-1, scores the
penultimate layer ``body.3`` on the calibration split with ``cmr-logit``, keeps half the units,
and compares on the held-out split: replacement ``auto`` (the mean, folded into the bias) vs
``zero`` (deleted). Seed 0 is the bundled sample. Needs scikit-learn.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "samples"))

import generate  # noqa: E402

from cmrtool import api  # noqa: E402
from cmrtool.testing.models import digits_mlp  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    api.configure(args.threads)
    x, y = generate.load_digits()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(generate.SEED))
    x, y = x[perm], y[perm]
    xe, ye, xt, yt = x[: generate.N_EVAL], y[: generate.N_EVAL], x[generate.N_EVAL :], y[generate.N_EVAL :]
    calib = ROOT / "samples" / "calib.safetensors"
    print("| seed | original | folded acc / KL / D2 | deleted acc / KL / D2 |")
    print("|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            generate.SEED = seed
            torch.manual_seed(seed)
            model = generate.train("digits_mlp", digits_mlp(), xt, yt)
            src = Path(tmp) / f"mlp{seed}.pt"
            torch.jit.script(model).save(str(src))
            with torch.no_grad():
                z0 = model(xe).double()
            cells = []
            for repl in ("auto", "zero"):
                out = Path(tmp) / f"mlp{seed}_{repl}.pt"
                api.compile(src, out, calib=calib, sites=["body.3"], keep=0.5, replacement=repl)
                with torch.no_grad():
                    z = torch.jit.load(str(out))(xe).double()
                acc = (z.argmax(1) == ye).double().mean().item() * 100
                kl = F.kl_div(z.log_softmax(1), z0.log_softmax(1), log_target=True, reduction="batchmean").item()
                cells.append(f"{acc:.2f} / {kl:.4f} / {(z - z0).square().sum(1).mean().item():.1f}")
            orig = (z0.argmax(1) == ye).double().mean().item() * 100
            print(f"| {seed} | {orig:.2f} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
