"""Interchange fidelity of digits-MLP reductions by criterion (the README's verify table).

    python benchmarks/verify_criteria.py [--keep 0.5] [--swaps 2000] [--seeds 5] [--threads 1]

For each criterion, compile ``samples/digits_mlp.pt`` at ``--keep`` (both hidden layers, scored
on ``samples/calib.safetensors``) and verify it on ``samples/eval.safetensors`` with R swaps per
site, p = 0.5. Swap seeds 0..N-1 (and, for ``random``, the selection seed too) give mean ± sd.
Uses only the public API.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cmrtool import api  # noqa: E402

SAMPLES = ROOT / "samples"


def fmt(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--swaps", type=int, default=2000)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--criteria", default="cmr-logit,vbp,magnitude,random")
    ap.add_argument("--site", action="append", help="reduce only these sites (default: body.0 and body.3)")
    args = ap.parse_args()
    api.configure(args.threads)
    sites = args.site or ["body.0", "body.3"]
    labels = sites + (["all"] if len(sites) > 1 else [])
    print(f"digits MLP, keep {args.keep} of {' and '.join(sites)}, R = {args.swaps} swaps per site, p = 0.5, seeds 0..{args.seeds - 1}")
    print()
    print("| criterion | accuracy | agreement | " + " | ".join(f"IIA {s}" for s in labels) + " | " + " | ".join(f"KL {s}" for s in labels) + " |")
    print("|---|" + "---:|" * (2 + 2 * len(labels)))
    with tempfile.TemporaryDirectory() as tmp:
        for criterion in args.criteria.split(","):
            rows: dict[str, list[float]] = {}
            for seed in range(args.seeds):
                out = Path(tmp) / f"{criterion}_{seed}.pt"
                if seed == 0 or criterion == "random":
                    api.compile(SAMPLES / "digits_mlp.pt", out, calib=SAMPLES / "calib.safetensors", keep=args.keep,
                                criterion=criterion, seed=seed, sites=sites, force=True)
                    current = out
                r = api.verify(SAMPLES / "digits_mlp.pt", current, SAMPLES / "eval.safetensors", swaps=args.swaps, seed=seed).to_json()
                values = {"acc": r["accuracy_reduced"], "agree": r["agreement"]}
                for s in r["sites"] + ([r["all_sites"]] if r["all_sites"] else []):
                    values[f"iia {s['name']}"] = s["iia"]
                    values[f"kl {s['name']}"] = s["kl"]
                for k, v in values.items():
                    rows.setdefault(k, []).append(v)
            cells = [fmt(rows[k]) for k in ["acc", "agree"] + [f"iia {s}" for s in labels] + [f"kl {s}" for s in labels]]
            print(f"| {criterion} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
