"""MNIST-style baseline with paired tests (CMR paper, appendix B.2, Table 5) on the digits MLP.

    python benchmarks/paper/mnist_style.py [--seeds 10] [--swaps 2000] [--threads 1]

The paper prunes the 512-unit penultimate layer of a 784-512-512-10 MNIST MLP to keep 384 and
256 and verifies with R = 2000 interchange swaps at p = 0.5 over seeds 0-9. Here: the digits MLP
(64-256-256-10, ``samples/generate.py``'s recipe), its 256-unit penultimate layer ``body.3`` at
keep 0.75 and 0.5 (the same fractions). Each seed s retrains the MLP (weights initialised with
seed s, batches ordered by seed s; seed 0 reproduces ``samples/digits_mlp.pt``) and seeds the
swap draws and the random selector. Calibration: ``samples/calib.safetensors``; held-out:
``samples/eval.safetensors`` (the samples' split). Reduction and verification go through
``cmrtool.api.sweep``. Reported: mean ± sd over seeds beside Table 5, and paired bootstrap 95%
intervals of ΔIIA and ΔKL (cmr-logit − vbp) over the seeds, as in the paper's text.
Needs scikit-learn (the ``samples`` or ``test`` extra).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import HERE, ROOT, SAMPLES, fmt, new_cells, ours_vs_paper, paired_bootstrap, paper_means, print_table, record

from cmrtool import api

# Table 5: keep (of 512) -> criterion -> (test acc., IIA, KL) as printed.
PAPER = {
    384: {"cmr-logit": ("0.981 ± 0.002", "0.952 ± 0.006", "0.035 ± 0.007"), "vbp": ("0.981 ± 0.002", "0.951 ± 0.004", "0.038 ± 0.007"),
          "cmr-const": ("0.981 ± 0.002", "0.930 ± 0.011", "0.084 ± 0.023")},
    256: {"cmr-logit": ("0.980 ± 0.001", "0.782 ± 0.006", "0.578 ± 0.020"), "vbp": ("0.979 ± 0.002", "0.776 ± 0.010", "0.609 ± 0.026"),
          "cmr-const": ("0.980 ± 0.002", "0.732 ± 0.012", "0.861 ± 0.087")},
}
PAPER_DELTA = {384: ("+0.0007 [−0.0037, +0.0052]", "—"), 256: ("+0.0056 [−0.00085, +0.0123]", "−0.031 [−0.042, −0.019]")}
KEEPS = {0.75: 384, 0.5: 256}  # our fraction -> the paper's keep count of 512


def train_mlp(seed: int, directory: Path) -> tuple[Path, float]:
    """Retrain the digits MLP with the samples' recipe under ``seed``; returns (checkpoint, held-out accuracy)."""
    import sys

    sys.path.insert(0, str(ROOT / "samples"))
    import generate
    from cmrtool.testing.models import digits_mlp

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the recipe is deterministic on one thread
    try:
        x_train, y_train, x_eval, y_eval = generate.split_digits()
        torch.manual_seed(seed)
        model = generate.train("digits_mlp", digits_mlp(), x_train, y_train, seed=seed)
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        acc = float((model(x_eval).argmax(1) == y_eval).float().mean())
    if seed == 0:
        from safetensors.torch import load_file

        sample = load_file(str(SAMPLES / "digits_mlp.safetensors"))
        same = all(torch.equal(v, sample[k]) for k, v in model.state_dict().items())
        print(f"seed 0 weights identical to samples/digits_mlp.safetensors: {same}")
    path = directory / f"digits_mlp_seed{seed}.pt"
    torch.jit.script(model).save(str(path))
    return path, acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--swaps", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--criteria", default="cmr-logit,vbp,cmr-const,random")
    ap.add_argument("--plot", type=Path, default=HERE / "mnist_style.png")
    args = ap.parse_args()
    api.configure(args.threads)
    criteria = args.criteria.split(",")
    keeps = list(KEEPS)
    values = new_cells(criteria, keeps)
    base_acc = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            model, acc = train_mlp(seed, Path(tmp))
            base_acc.append(acc)
            report = api.sweep(model, SAMPLES / "calib.safetensors", SAMPLES / "eval.safetensors", keeps=keeps, criteria=criteria,
                               sites=["body.3"], swaps=args.swaps, seed=seed)
            record(values, report)
    print(f"digits MLP 64-256-256-10, penultimate layer body.3, {args.seeds} retrained checkpoints (seeds 0..{args.seeds - 1}), "
          f"R = {args.swaps} swaps, p = 0.5; original held-out accuracy {fmt(base_acc)}; {time.perf_counter() - start:.0f} s in all")
    print()
    print_table(values, keeps, {k: PAPER[KEEPS[k]] for k in keeps}, keep_label=lambda k: f"{k:g} ({KEEPS[k]}/512)")
    if "cmr-logit" in criteria and "vbp" in criteria:
        print()
        print("Paired bootstrap (10,000 resamples of seeds), cmr-logit − vbp, mean [95% CI]:")
        print()
        print("| keep | ΔIIA | ΔKL | cmr-logit better (IIA / KL) | paper ΔIIA | paper ΔKL |")
        print("|---|---:|---:|---:|---:|---:|")
        for k in keeps:
            cells = []
            wins = []
            for metric, sign in (("iia", 1), ("kl", -1)):
                d = [a - b for a, b in zip(values["cmr-logit"][k][metric], values["vbp"][k][metric])]
                m, lo, hi = paired_bootstrap(d)
                cells.append(f"{m:+.4f} [{lo:+.4f}, {hi:+.4f}]")
                wins.append(sum(1 for x in d if sign * x > 0))
            print(f"| {k:g} | {cells[0]} | {cells[1]} | {wins[0]}/{args.seeds} / {wins[1]}/{args.seeds} | "
                  f"{PAPER_DELTA[KEEPS[k]][0]} | {PAPER_DELTA[KEEPS[k]][1]} |")
    ours = {c: {m: [values[c][k][m] for k in keeps] for m in ("iia", "kl")} for c in criteria}
    ours_vs_paper(args.plot, f"MNIST-style (paper Table 5) on the digits MLP, penultimate layer; mean ± sd over {args.seeds} checkpoints",
                  keeps, "keep fraction (paper: 384/512 = 0.75, 256/512 = 0.5)", ours,
                  paper_means({k: PAPER[KEEPS[k]] for k in keeps}, keeps))


if __name__ == "__main__":
    main()
