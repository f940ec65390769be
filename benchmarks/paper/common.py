"""Helpers shared by the paper-reproduction scripts: summaries over seeds, paired bootstrap
intervals, markdown cells, and the "ours beside the paper's" figure.

Only statistics and plotting live here; every reduction and measurement in the scripts goes
through :mod:`cmrtool.api`.
"""

from __future__ import annotations

import random
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SAMPLES = ROOT / "samples"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The paper's names for the criteria (CMR-Logit appears as Logit-MSE in its appendix tables,
# cwvar is the predecessor of CMR-Const).
PAPER_NAME = {"cmr-logit": "CMR-Logit (Logit-MSE)", "vbp": "VBP", "cmr-const": "CMR-Const (cwvar)", "random": "random",
              "magnitude": "magnitude"}


def mean_sd(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def fmt(xs: Sequence[float], digits: int = 3) -> str:
    m, sd = mean_sd(xs)
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def paired_bootstrap(deltas: Sequence[float], resamples: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of paired per-seed differences and its 95% percentile bootstrap interval."""
    rng = random.Random(seed)
    n = len(deltas)
    means = sorted(statistics.mean(rng.choices(deltas, k=n)) for _ in range(resamples))
    return statistics.mean(deltas), means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def new_cells(criteria: Sequence[str], keeps: Sequence[float]) -> dict[str, dict[float, dict[str, list[float]]]]:
    """``cells[criterion][keep][metric]``: per-seed lists of test accuracy (``acc``), ``iia`` and ``kl``."""
    return {c: {k: {"acc": [], "iia": [], "kl": []} for k in keeps} for c in criteria}


def record(cells: dict[str, dict[float, dict[str, list[float]]]], report: object, key: Callable[[float], float] = lambda k: k) -> None:
    """Append one seed's sweep rows (a :class:`cmrtool.studies.sweep.SweepReport`) to ``cells``; ``key`` maps a row's keep to the cell's."""
    for r in report.rows:  # type: ignore[attr-defined]
        cell = cells[r.criterion][key(r.keep)]
        cell["acc"].append(r.accuracy)
        cell["iia"].append(r.iia)
        cell["kl"].append(r.kl)


def print_table(cells: dict[str, dict[float, dict[str, list[float]]]], keeps: Sequence[float], paper: dict[float, dict[str, tuple[str, str, str]]],
                keep_label: Callable[[float], str] = str) -> None:
    """Markdown: per keep and criterion, our mean ± sd (test accuracy, IIA, KL) beside the paper's as printed."""
    print("| keep | criterion | test acc. | IIA | KL | paper test acc. | paper IIA | paper KL |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for k in keeps:
        for c, v in cells.items():
            theirs = paper[k].get(c, ("—", "—", "—"))
            print(f"| {keep_label(k)} | {c} | {fmt(v[k]['acc'])} | {fmt(v[k]['iia'])} | {fmt(v[k]['kl'])} | " + " | ".join(theirs) + " |")


def paper_means(paper: dict[float, dict[str, tuple[str, str, str]]], keeps: Sequence[float]) -> dict[str, dict[str, list[float]]]:
    """The paper's IIA and KL means per criterion (for :func:`ours_vs_paper`), from ``"mean ± sd"`` strings."""
    criteria = [c for c in paper[keeps[0]] if all(c in paper[k] for k in keeps)]
    return {c: {m: [float(paper[k][c][i].split(" ")[0]) for k in keeps] for i, m in ((1, "iia"), (2, "kl"))} for c in criteria}


def write_figure(path: Path, draw: Callable[[object], None], size: tuple[float, float] = (10, 4.2)) -> None:
    """Draw on a fresh Agg figure (``draw(fig)``) and save it as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    draw(fig)
    fig.savefig(path, format="png")
    print(f"\nwrote {path}")


def ours_vs_paper(
    path: Path,
    title: str,
    xs: Sequence[float],
    xlabel: str,
    ours: dict[str, dict[str, list[list[float]]]],
    paper: dict[str, dict[str, list[float]]],
) -> None:
    """Two panels (IIA, KL) against ``xs``: our mean ± sd per criterion as solid lines with error
    bars, the paper's values as hollow markers on dotted lines of the same colour.

    ``ours[criterion][metric]`` holds one list of per-seed values per x; ``paper[criterion][metric]``
    one value per x (metrics ``iia`` and ``kl``).
    """

    def draw(fig: object) -> None:
        axes = fig.subplots(1, 2)  # type: ignore[attr-defined]
        dx = 0.012 * (max(xs) - min(xs) or 1)  # small offsets keep the error bars apart
        for i, (criterion, metrics) in enumerate(ours.items()):
            colour = f"C{i}"
            shifted = [x + (i - (len(ours) - 1) / 2) * dx for x in xs]
            for ax, metric in zip(axes, ("iia", "kl")):
                ms = [mean_sd(v) for v in metrics[metric]]
                ax.errorbar(shifted, [m for m, _ in ms], yerr=[s for _, s in ms], color=colour, marker="o", capsize=3,
                            label=f"{criterion} (cmrtool)")
                if criterion in paper:
                    ax.plot(xs, paper[criterion][metric], color=colour, marker="s", markerfacecolor="none", linestyle=":",
                            label=f"{PAPER_NAME.get(criterion, criterion)} (paper)")
        axes[0].set_ylabel("IIA (higher is better)")
        axes[1].set_ylabel("interchange KL (lower is better)")
        for ax in axes:
            ax.set_xlabel(xlabel)
            ax.set_xticks(list(xs))
            ax.grid(True, alpha=0.3)
        axes[1].set_ylim(bottom=0)
        axes[0].legend(fontsize=7, loc="lower right")
        fig.suptitle(title, fontsize=10)  # type: ignore[attr-defined]

    write_figure(path, draw)
