"""Criteria × replacements on the bundled samples: which reduction stays closest to the original?

    python benchmarks/replacements.py [--keep 0.5] [--swaps 1000] [--threads 1]

For each sample (MLP: both hidden layers; ConvNet: conv2 and conv3, its first layer is not
replaceable at this keep; transformer: both FFNs) and each configuration, compile at ``--keep``
on ``samples/calib.safetensors`` and verify on ``samples/eval.safetensors``: held-out accuracy,
agreement with the original, KL(original ‖ reduced), and the all-sites IIA. This is how the
default replacement of ``cmr-const`` (the mean, not its c*) and of joint refits (fitted to the
original's predictions) were chosen. Uses only the public API.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cmrtool import api  # noqa: E402

SAMPLES = ROOT / "samples"
MODELS = {"digits_mlp": None, "digits_convnet": ["conv2", "conv3"], "digits_transformer": None}
CONFIGS = [
    ("cmr-logit", {}),
    ("cmr-logit", {"joint_refit": True}),
    ("cmr-const", {}),
    ("cmr-const", {"replacement": "optimal"}),
    ("cmr-const", {"loss": "kl", "replacement": "optimal"}),
    ("cmr-const", {"joint_refit": True}),
    ("cmr-affine", {}),
    ("cmr-affine", {"parents": 8}),
    ("peer", {}),
    ("peer", {"parents": 8}),
    ("cmr-lsq", {}),
    ("vbp", {}),
    ("vbp", {"replacement": "affine"}),
    ("taylor", {}),
    ("gndi", {}),
    ("random", {}),
]


def label(criterion: str, opts: dict) -> str:
    extra = ", ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in opts.items())
    return criterion + (f" ({extra})" if extra else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--swaps", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default=None, help="comma-separated criteria: run only their configurations")
    args = ap.parse_args()
    only = set(args.only.split(",")) if args.only else None
    api.configure(args.threads)
    calib, held = SAMPLES / "calib.safetensors", SAMPLES / "eval.safetensors"
    with tempfile.TemporaryDirectory() as tmp:
        for name, sites in MODELS.items():
            print(f"\n{name} (keep {args.keep}{', sites ' + ', '.join(sites) if sites else ''}; R = {args.swaps})\n")
            print("| configuration | accuracy | agreement | KL | IIA (all sites) |")
            print("|---|---:|---:|---:|---:|")
            for criterion, opts in CONFIGS:
                if only is not None and criterion not in only:
                    continue
                out = Path(tmp) / "r.pt"
                api.compile(SAMPLES / f"{name}.pt", out, calib=calib, criterion=criterion, sites=sites, keep=args.keep, force=True, **opts)
                v = api.verify(SAMPLES / f"{name}.pt", out, held, swaps=args.swaps).to_json()
                iia = (v["all_sites"] or v["sites"][0])["iia"]
                print(f"| {label(criterion, opts)} | {v['accuracy_reduced']:.4f} | {v['agreement']:.4f} | {v['kl']:.4f} | {iia:.3f} |", flush=True)
            print(f"| (original) | {v['accuracy_original']:.4f} | 1 | 0 | 1 |")


if __name__ == "__main__":
    main()
