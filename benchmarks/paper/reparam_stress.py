"""Reparameterization stress test (CMR paper §5.1, Table 2) on the digits ConvNet and MLP.

    python benchmarks/paper/reparam_stress.py [--seeds 10] [--swaps 2000] [--threads 1]

1. **Kept-set Jaccard** (``cmrtool.api.audit``): every ReLU unit of a site is rescaled by
   s ~ LogUniform(range) with 1/s on its consumer columns (one site at a time), the function is
   checked unchanged, the twin is re-scored, and the kept sets at keep 0.5 are compared; ten
   seeds, scale ranges [0.01, 100] and [0.1, 10]. The paper scores the penultimate
   representation of a CIFAR-10 ConvNet (256 units) and a ResNet-56 (64 channels); the digits
   analogues are ConvNet ``conv3`` (32 pooled channels) and MLP ``body.3`` (256 units); the other
   sites are listed too.
2. **Downstream** (the paper's "not merely label instability" check): for each seed, a rescaled
   twin of the penultimate site at [0.01, 100] is built with plain torch from the samples'
   weights, reduced at that site to keep 0.5 with cmr-logit and vbp (``cmrtool.api.sweep``) and
   verified against the twin (R swaps, p = 0.5); the same reductions of the original model are
   the reference. The paper reports a CMR-Logit − VBP IIA gap of +0.131 and a KL gap of −0.362
   on its ConvNet at keep 128 of 256.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch
from common import HERE, SAMPLES, fmt, mean_sd, write_figure
from safetensors.torch import load_file

from cmrtool import api
from cmrtool.testing.models import digits_convnet, digits_mlp

CRITERIA = ["cmr-logit", "vbp", "magnitude", "random"]
RANGES = [(0.01, 100.0), (0.1, 10.0)]
MODELS = {"ConvNet": ("digits_convnet", "conv3"), "MLP": ("digits_mlp", "body.3")}
# Table 2 (mean, sd): model -> range -> criterion; random from the caption.
PAPER = {
    "CIFAR-10 ConvNet": {(0.01, 100.0): {"cmr-logit": (1.0, 0.0), "vbp": (0.346, 0.021), "magnitude": (0.359, 0.027), "random": (0.333, 0.030)},
                         (0.1, 10.0): {"cmr-logit": (1.0, 0.0), "vbp": (0.371, 0.024), "magnitude": (0.378, 0.027)}},
    "ResNet-56 / CIFAR-100": {(0.01, 100.0): {"cmr-logit": (1.0, 0.0), "vbp": (0.374, 0.037), "magnitude": (0.352, 0.049), "random": (0.356, 0.092)},
                              (0.1, 10.0): {"cmr-logit": (1.0, 0.0), "vbp": (0.389, 0.038), "magnitude": (0.361, 0.052)}},
}


def rescaled_twin(name: str, seed: int, lo: float, hi: float, path: Path) -> float:
    """Script-save a copy of sample ``name`` whose penultimate units are rescaled; returns max |Δlogit|."""
    factory = {"digits_mlp": digits_mlp, "digits_convnet": digits_convnet}[name]
    model = factory()
    model.load_state_dict(load_file(str(SAMPLES / f"{name}.safetensors")))
    model.eval()
    twin = factory()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    if name == "digits_mlp":  # body.3 rows (weight, bias) × s, consumer body.6 columns ÷ s
        s = torch.exp(torch.empty(256).uniform_(math.log(lo), math.log(hi), generator=g))
        state["body.3.weight"] *= s[:, None]
        state["body.3.bias"] *= s
        state["body.6.weight"] /= s[None, :]
    else:  # conv3 is normalized by bn3: scale bn3's γ and β, consumer head columns ÷ s
        s = torch.exp(torch.empty(32).uniform_(math.log(lo), math.log(hi), generator=g))
        state["bn3.weight"] *= s
        state["bn3.bias"] *= s
        state["head.weight"] /= s[None, :]
    twin.load_state_dict(state)
    twin.eval()
    x = load_file(str(SAMPLES / "eval.safetensors"))["input"]
    with torch.no_grad():
        change = float((twin(x) - model(x)).abs().max())
    torch.jit.script(twin).save(str(path))
    return change


def jaccard_table(seeds: int) -> dict[tuple[str, tuple[float, float]], dict[str, dict[str, tuple[float, float]]]]:
    results = {}
    print(f"Kept-set Jaccard at keep 0.5 under exact ReLU rescaling, mean ± sd over {seeds} seeds (cmrtool audit)")
    print()
    print("| model | site | scale range | " + " | ".join(CRITERIA) + " | max |Δlogit| |")
    print("|---|---|---|" + "---:|" * (len(CRITERIA) + 1))
    for label, (name, penultimate) in MODELS.items():
        for rng in RANGES:
            report = api.audit(SAMPLES / f"{name}.pt", SAMPLES / "calib.safetensors", criteria=CRITERIA, seeds=seeds, scale_range=rng)
            d = report.to_json()
            results[label, rng] = {s["name"]: {c: (v["jaccard_mean"], v["jaccard_sd"]) for c, v in s["criteria"].items()} for s in d["sites"]}
            for s in d["sites"]:
                cells = [f"{v['jaccard_mean']:.3f} ± {v['jaccard_sd']:.3f}" for v in s["criteria"].values()]
                site = f"**{s['name']}** (penultimate)" if s["name"] == penultimate else s["name"]
                print(f"| digits {label} | {site} | [{rng[0]:g}, {rng[1]:g}] | " + " | ".join(cells) + f" | {d['max_logit_change']:.1e} |")
    print()
    print("The paper's Table 2 (penultimate representation; random from its caption):")
    print()
    print("| model | scale range | " + " | ".join(CRITERIA) + " |")
    print("|---|---|" + "---:|" * len(CRITERIA))
    for model, rows in PAPER.items():
        for rng, cells in rows.items():
            print(f"| {model} | [{rng[0]:g}, {rng[1]:g}] | " + " | ".join(
                f"{cells[c][0]:.3f} ± {cells[c][1]:.3f}" if c in cells else "—" for c in CRITERIA) + " |")
    return results


def downstream(seeds: int, swaps: int) -> dict[str, dict[str, dict[str, list[float]]]]:
    """IIA / KL of cmr-logit and vbp reductions of the original and of rescaled twins."""
    out: dict[str, dict[str, dict[str, list[float]]]] = {}
    print()
    print(f"Downstream: keep 0.5 of the penultimate site, R = {swaps} swaps, p = 0.5; twins rescaled with s ~ LogUniform(0.01, 100), "
          f"{seeds} seeds; each reduction verified against the model it was made from")
    print()
    print("| model | criterion | IIA original | IIA twins | KL original | KL twins | kept-set Jaccard |")
    print("|---|---|---:|---:|---:|---:|---:|")
    calib, data = SAMPLES / "calib.safetensors", SAMPLES / "eval.safetensors"
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for label, (name, site) in MODELS.items():
            base = api.sweep(SAMPLES / f"{name}.pt", calib, data, keeps=[0.5], criteria=["cmr-logit", "vbp"], sites=[site],
                             swaps=swaps, seed=0, keep_models=Path(tmp) / "base", force=True)
            kept0 = {r.criterion: _kept(r.model, site) for r in base.rows}
            cells = {c: {"iia": [], "kl": [], "jac": []} for c in ("cmr-logit", "vbp")}
            for seed in range(seeds):
                twin = Path(tmp) / f"{name}_twin{seed}.pt"
                worst = max(worst, rescaled_twin(name, seed, 0.01, 100.0, twin))
                rep = api.sweep(twin, calib, data, keeps=[0.5], criteria=["cmr-logit", "vbp"], sites=[site], swaps=swaps, seed=0,
                                keep_models=Path(tmp) / f"twin{seed}", force=True)
                for r in rep.rows:
                    k = _kept(r.model, site)
                    cells[r.criterion]["iia"].append(r.iia)
                    cells[r.criterion]["kl"].append(r.kl)
                    cells[r.criterion]["jac"].append(len(k & kept0[r.criterion]) / len(k | kept0[r.criterion]))
            out[label] = cells
            for r in base.rows:
                cells[r.criterion]["original_iia"] = [r.iia]
                cells[r.criterion]["original_kl"] = [r.kl]
            for r in base.rows:
                c = cells[r.criterion]
                print(f"| digits {label} {site} | {r.criterion} | {r.iia:.3f} | {fmt(c['iia'])} | {r.kl:.3f} | {fmt(c['kl'])} | {fmt(c['jac'])} |")
            gap_iia = [a - b for a, b in zip(cells["cmr-logit"]["iia"], cells["vbp"]["iia"])]
            gap_kl = [a - b for a, b in zip(cells["cmr-logit"]["kl"], cells["vbp"]["kl"])]
            print(f"| digits {label} {site} | gap cmr-logit − vbp (twins) | | {fmt(gap_iia)} | | {fmt(gap_kl)} | |")
    print()
    print(f"Twins' max |Δlogit| vs the original: {worst:.1e}. Paper (CIFAR-10 ConvNet, keep 128/256, [0.01, 100]): IIA gap +0.131, KL gap −0.362.")
    return out


def _kept(model_path: str | None, site: str) -> set[int]:
    """The kept units of ``site`` in a reduced checkpoint (from the plan it carries)."""
    return set(api.open_model(str(model_path)).plan.site(site).kept)


def plot(path: Path, jac: dict, down: dict, seeds: int) -> None:
    def draw(fig: object) -> None:
        ax, ax2, ax3 = fig.subplots(1, 3, width_ratios=[3, 1.4, 1.4])  # type: ignore[attr-defined]
        groups = []
        for label, (_, site) in MODELS.items():
            for rng in RANGES:
                groups.append((f"digits {label}\n{site} [{rng[0]:g}, {rng[1]:g}]", {c: jac[label, rng][site][c] for c in CRITERIA}, False))
        for rng in RANGES:
            groups.append((f"paper CIFAR-10\nConvNet [{rng[0]:g}, {rng[1]:g}]", PAPER["CIFAR-10 ConvNet"][rng], True))
        width = 0.8 / len(CRITERIA)
        for i, c in enumerate(CRITERIA):
            xs = [g + (i - (len(CRITERIA) - 1) / 2) * width for g, (_, cells, _) in enumerate(groups) if c in cells]
            ms = [cells[c] for _, cells, _ in groups if c in cells]
            hatches = ["//" if paper else "" for _, cells, paper in groups if c in cells]
            bars = ax.bar(xs, [m for m, _ in ms], width, yerr=[s for _, s in ms], capsize=2, color=f"C{i}", label=c)
            for b, h in zip(bars, hatches):
                b.set_hatch(h)
        ax.axhline(1 / 3, color="gray", linestyle="--", linewidth=1, label="chance ≈ 1/3")
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([g for g, _, _ in groups], fontsize=7)
        ax.set_ylabel("kept-set Jaccard, original vs rescaled twin")
        ax.set_ylim(0, 1.1)
        ax.set_title(f"Kept-set stability at keep 0.5 (mean ± sd, {seeds} seeds; hatched: paper)", fontsize=9)
        ax.legend(fontsize=7, loc="upper right", ncols=5)
        labels = list(down)
        for axm, metric, ylabel in ((ax2, "iia", "IIA (higher is better)"), (ax3, "kl", "interchange KL (lower is better)")):
            for i, c in enumerate(("cmr-logit", "vbp")):
                ms = [mean_sd(down[m][c][metric]) for m in labels]
                xs = [j + (i - 0.5) * 0.35 for j in range(len(labels))]
                axm.bar(xs, [m for m, _ in ms], 0.35, yerr=[s for _, s in ms], capsize=3, color=f"C{i}", label=f"{c} (twins)")
                axm.scatter(xs, [down[m][c]["original_" + metric][0] for m in labels], marker="_", s=300, color="black",
                            label="same criterion on the original" if i == 0 else None, zorder=3)
            axm.set_xticks(range(len(labels)))
            axm.set_xticklabels([f"digits {m}\n{MODELS[m][1]}" for m in labels], fontsize=8)
            axm.set_ylabel(ylabel)
            axm.set_title(f"Downstream {metric.upper()}: keep 0.5 of twins", fontsize=9)
        ax2.set_ylim(0, 1)
        ax3.legend(fontsize=7, loc="lower right")

    write_figure(path, draw, size=(14, 4.6))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--swaps", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--plot", type=Path, default=HERE / "reparam_stress.png")
    args = ap.parse_args()
    api.configure(args.threads)
    start = time.perf_counter()
    jac = jaccard_table(args.seeds)
    down = downstream(args.seeds, args.swaps)
    print(f"\n{time.perf_counter() - start:.0f} s in all")
    plot(args.plot, jac, down, args.seeds)


if __name__ == "__main__":
    main()
