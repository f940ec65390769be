"""Head-to-head: Torch-Pruning vs cmrtool at the same widths, no fine-tuning.

    pip install -c constraints.txt torch-pruning   # benchmark-only dependency
    python benchmarks/paper/torch_pruning_comparison.py [--repeats 5] [--threads 1]

The digits MLP (both hidden layers 256 → 128) and the digits ConvNet (conv2 and conv3 32 → 16
channels) are reduced to the same widths by

- Torch-Pruning (``MetaPruner``, ``pruning_ratio=0.5`` on the same layers, everything else
  ignored) with its default group L2-magnitude importance, its random importance and, on the
  ConvNet, its BatchNorm-scale importance; pruned channels are deleted;
- cmrtool ``compile --keep 0.5`` of the same sites with ``cmr-logit`` (replaced units folded into
  the next layer's bias as their means), ``peer`` (affine replacements on kept peers), and
  ``cmr-logit --replacement zero`` (the same kept set deleted without folding, as pruning does)
  and ``cmr-logit --joint-refit`` (each site's constants refit jointly under the logits' curvature).

Every reduced model is evaluated by the same code on ``samples/eval.safetensors``: accuracy,
top-1 agreement with the original and mean KL(original ‖ reduced); parameters and MACs come
from ``cmrtool.api.inspect`` of the saved model. Time is the reduction step alone (median of
``--repeats``): Torch-Pruning's dependency graph + importance + pruning on an nn.Module already
in memory; cmrtool's ``api.compile`` from the checkpoint file, including loading, scoring the
512 calibration samples, folding, writing and the fold check.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import HERE, SAMPLES, write_figure
from safetensors.torch import load_file

from cmrtool import api
from cmrtool.testing.models import digits_convnet, digits_mlp

MODELS = {
    "MLP": ("digits_mlp", digits_mlp, ["body.0", "body.3"], lambda m: [m.body[6]]),
    "ConvNet": ("digits_convnet", digits_convnet, ["conv2", "conv3"], lambda m: [m.conv1, m.head]),
}

CMRTOOL = [
    ("cmrtool cmr-logit (mean, folded)", {"criterion": "cmr-logit"}),
    ("cmrtool cmr-logit --joint-refit", {"criterion": "cmr-logit", "joint_refit": True}),
    ("cmrtool peer (affine, folded)", {"criterion": "peer"}),
    ("cmrtool cmr-logit, deleted (--replacement zero)", {"criterion": "cmr-logit", "replacement": "zero"}),
]


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        z = model(x).to(torch.float64)
    lp, lq = F.log_softmax(ref, -1), F.log_softmax(z, -1)
    return {
        "accuracy": float((z.argmax(1) == y).double().mean()),
        "agreement": float((z.argmax(1) == ref.argmax(1)).double().mean()),
        "kl": float((lp.exp() * (lp - lq)).sum(-1).mean()),
    }


def tp_reduce(copies: list[torch.nn.Module], importance: object, ignored_of) -> torch.nn.Module:  # noqa: ANN001
    """Prune the next copy in place: MetaPruner at ratio 0.5 on every layer but ``ignored_of(module)``."""
    import torch_pruning as tp

    module = copies.pop()
    torch.manual_seed(0)  # RandomImportance draws from torch's generator: the same draw every repeat
    pruner = tp.pruner.MetaPruner(module, torch.zeros(1, 1, 8, 8), importance=importance, pruning_ratio=0.5,
                                  ignored_layers=ignored_of(module))
    pruner.step()
    return module


def timed(fn, repeats: int) -> tuple[object, float]:  # noqa: ANN001
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return result, statistics.median(times)


def main() -> None:
    import torch_pruning as tp

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--plot", type=Path, default=HERE / "torch_pruning_comparison.png")
    args = ap.parse_args()
    api.configure(args.threads)
    ev = load_file(str(SAMPLES / "eval.safetensors"))
    x, y = ev["input"], ev["labels"]
    calib = SAMPLES / "calib.safetensors"
    print(f"Torch-Pruning {tp.__version__}, torch {torch.__version__}, {args.threads} thread(s); no fine-tuning; "
          f"held-out: {len(y)} digits images; time = median of {args.repeats} reductions")
    print()
    print("| model | method | widths | params | MACs | accuracy | agreement | KL(orig ‖ red.) | time (ms) |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    results: dict[str, list[tuple[str, dict[str, float]]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, (name, factory, sites, ignored_of) in MODELS.items():
            original = factory()
            original.load_state_dict(load_file(str(SAMPLES / f"{name}.safetensors")))
            original.eval()
            with torch.no_grad():
                ref = original(x).to(torch.float64)
            info = api.inspect(SAMPLES / f"{name}.pt", calib=calib)
            base = evaluate(original, x, y, ref)
            print(f"| {label} | original | {' / '.join(str(s.width) for s in info.sites if s.name in sites)} | {info.params:,} | "
                  f"{info.macs:,} | {base['accuracy']:.4f} | — | — | — |")
            rows = results.setdefault(label, [])
            methods: list[tuple[str, object]] = [("Torch-Pruning magnitude (L2, group)", tp.importance.GroupMagnitudeImportance(p=2)),
                                                 ("Torch-Pruning random", tp.importance.RandomImportance())]
            if label == "ConvNet":
                methods.append(("Torch-Pruning BN scale", tp.importance.BNScaleImportance()))
            for method, importance in methods:
                copies = [copy.deepcopy(original) for _ in range(args.repeats)]
                pruned, seconds = timed(lambda c=copies, imp=importance, ig=ignored_of: tp_reduce(c, imp, ig), args.repeats)
                path = Path(tmp) / f"{name}-tp.pt"
                torch.jit.script(pruned).save(str(path))
                rows.append((method, _report(label, method, pruned, path, x, y, ref, seconds, sites)))
            for i, (method, options) in enumerate(CMRTOOL):
                path = Path(tmp) / f"{name}-cmrtool{i}.pt"
                _, seconds = timed(lambda p=path, o=options: api.compile(
                    SAMPLES / f"{name}.pt", p, calib=calib, sites=sites, keep=0.5, force=True, **o), args.repeats)
                reduced = torch.jit.load(str(path))
                rows.append((method, _report(label, method, reduced, path, x, y, ref, seconds, sites)))
    plot(args.plot, results)


def _report(label: str, method: str, model: torch.nn.Module, path: Path, x: torch.Tensor, y: torch.Tensor, ref: torch.Tensor,
            seconds: float, sites: list[str]) -> dict[str, float]:
    info = api.inspect(path, calib=SAMPLES / "calib.safetensors")
    widths = " / ".join(str(s.width) for s in info.sites if s.name in sites)
    m = evaluate(model, x, y, ref)
    print(f"| {label} | {method} | {widths} | {info.params:,} | {info.macs:,} | {m['accuracy']:.4f} | {m['agreement']:.4f} | "
          f"{m['kl']:.4f} | {seconds * 1e3:.1f} |")
    return {**m, "seconds": seconds}


def plot(path: Path, results: dict[str, list[tuple[str, dict[str, float]]]]) -> None:
    def draw(fig: object) -> None:
        axes = fig.subplots(1, 2)  # type: ignore[attr-defined]
        for ax, metric, ylabel in zip(axes, ("accuracy", "kl"), ("held-out accuracy (higher is better)", "KL(original ‖ reduced) (lower is better)")):
            labels = list(results)
            every = list(dict.fromkeys(m for model in labels for m, _ in results[model]))
            methods = sorted(every, key=lambda m: m.startswith("cmrtool"))  # Torch-Pruning first, order kept
            width = 0.8 / len(methods)
            for i, method in enumerate(methods):
                xs, vals = [], []
                for j, model in enumerate(labels):
                    row = dict(results[model]).get(method)
                    if row is not None:
                        xs.append(j + (i - (len(methods) - 1) / 2) * width)
                        vals.append(row[metric])
                ax.bar(xs, vals, width, color=f"C{i}", label=method, hatch="" if method.startswith("cmrtool") else "//")
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels([f"digits {m}" for m in labels])
            ax.set_ylabel(ylabel)
            ax.grid(True, axis="y", alpha=0.3)
        axes[0].set_ylim(0, 1)
        axes[1].set_yscale("log")
        axes[1].set_ylabel("KL(original ‖ reduced), log scale (lower is better)")
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=4, fontsize=8)  # type: ignore[attr-defined]
        fig.suptitle("Same widths, no fine-tuning: Torch-Pruning (hatched) vs cmrtool (MLP 256→128 ×2, ConvNet conv2/conv3 32→16)", fontsize=10)  # type: ignore[attr-defined]

    write_figure(path, draw, size=(11, 5.0))


if __name__ == "__main__":
    main()
