"""Boolean-circuit interchange table (CMR paper, appendix B.3, Table 6), reproduced with cmrtool.

    python benchmarks/paper/boolean_circuit.py [--seeds 6] [--swaps 2000] [--threads 1]

Protocol (as in the paper): y = XOR(AND(x1, x2), OR(x3, x4)) with x ∈ {0, 1}^8 uniform (x5..x8
are Bernoulli(1/2) noise); per seed a 4,096-point data set, an 80/20 train/test split, an MLP
8-64-64-2 (ReLU) trained on the training 80%, calibration on n = 2000 inputs drawn from the
training split, the 64-unit penultimate layer (``body.2``) reduced to keep 32 and 16, verified
on the held-out 20% with R = 2000 Bernoulli interchange swaps at p = 0.5. Each seed seeds the
data, the training, the swap draws and the random selector. Reduction and verification go
through ``cmrtool.api.sweep``; the table gives mean ± sd over seeds beside the paper's.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import HERE, fmt, new_cells, ours_vs_paper, paper_means, print_table, record
from safetensors.torch import save_file
from torch import nn

from cmrtool import api

N_POINTS, TRAIN_FRACTION, N_CALIB, WIDTH = 4096, 0.8, 2000, 64

# Table 6 of the paper: keep -> criterion -> (test accuracy, IIA, KL), mean ± sd as printed.
PAPER = {
    32: {"cmr-logit": ("1.000 ± 0.001", "0.927 ± 0.020", "0.172 ± 0.092"), "vbp": ("0.989 ± 0.024", "0.923 ± 0.025", "0.234 ± 0.149"),
         "cmr-const": ("0.981 ± 0.042", "0.864 ± 0.025", "0.527 ± 0.251"), "random": ("0.921 ± 0.075", "0.794 ± 0.058", "1.013 ± 0.354")},
    16: {"cmr-logit": ("0.987 ± 0.029", "0.814 ± 0.029", "0.806 ± 0.202"), "vbp": ("0.951 ± 0.050", "0.827 ± 0.033", "0.790 ± 0.212"),
         "cmr-const": ("0.928 ± 0.067", "0.752 ± 0.019", "1.234 ± 0.216"), "random": ("0.768 ± 0.114", "0.710 ± 0.067", "1.509 ± 0.559")},
}


class CircuitMLP(nn.Module):
    """8-64-64-2 ReLU MLP; its sites are ``body.0`` and ``body.2`` (the penultimate layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # (n, 8) -> (n, 2)


def circuit(x: torch.Tensor) -> torch.Tensor:
    """y = XOR(AND(x1, x2), OR(x3, x4)) on 0/1 inputs (n, 8) -> (n,) int64."""
    b = x.to(torch.bool)
    return ((b[:, 0] & b[:, 1]) ^ (b[:, 2] | b[:, 3])).to(torch.int64)


def make_run(seed: int, directory: Path) -> tuple[Path, Path, Path, float]:
    """Data, a trained model and its files for one seed: (model, calib, test, test accuracy)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 2, (N_POINTS, 8), generator=g).to(torch.float32)
    y = circuit(x)
    n_train = int(TRAIN_FRACTION * N_POINTS)
    x_train, y_train, x_test, y_test = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
    calib = torch.randperm(n_train, generator=g)[:N_CALIB]
    torch.manual_seed(seed)
    model = CircuitMLP()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        order = torch.randperm(n_train, generator=g)
        for i in range(0, n_train, 128):
            idx = order[i : i + 128]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(x_test).argmax(1) == y_test).float().mean())
    paths = (directory / f"circuit{seed}.pt", directory / f"calib{seed}.safetensors", directory / f"test{seed}.safetensors")
    torch.jit.script(model).save(str(paths[0]))
    save_file({"input": x_train[calib].contiguous(), "labels": y_train[calib].contiguous()}, str(paths[1]))
    save_file({"input": x_test.contiguous(), "labels": y_test.contiguous()}, str(paths[2]))
    return (*paths, acc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--swaps", type=int, default=2000)
    ap.add_argument("--p", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--criteria", default="cmr-logit,vbp,cmr-const,random")
    ap.add_argument("--plot", type=Path, default=HERE / "boolean_circuit.png")
    args = ap.parse_args()
    api.configure(args.threads)
    criteria = args.criteria.split(",")
    keeps = [32, 16]
    values = new_cells(criteria, keeps)
    base_acc = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            model, calib, test, acc = make_run(seed, Path(tmp))
            base_acc.append(acc)
            report = api.sweep(model, calib, test, keeps=[k / WIDTH for k in keeps], criteria=criteria, sites=["body.2"],
                               swaps=args.swaps, p=args.p, seed=seed)
            record(values, report, key=lambda keep: round(keep * WIDTH))
    print(f"Boolean circuit y = XOR(AND(x1,x2), OR(x3,x4)), MLP 8-64-64-2, penultimate layer body.2; {args.seeds} seeds, "
          f"R = {args.swaps} swaps, p = {args.p}; trained model test accuracy {fmt(base_acc)}; "
          f"{time.perf_counter() - start:.0f} s in all")
    print()
    print_table(values, keeps, PAPER)
    ours = {c: {m: [values[c][k][m] for k in keeps] for m in ("iia", "kl")} for c in criteria}
    ours_vs_paper(args.plot, f"Boolean circuit (paper Table 6): MLP 8-64-64-2, penultimate layer; mean ± sd over {args.seeds} seeds",
                  keeps, "units kept of 64", ours, paper_means(PAPER, keeps))


if __name__ == "__main__":
    main()
