"""Plots of sweep results (PNG), drawn with matplotlib, an optional dependency (``cmrtool[plot]``).

matplotlib is imported only here and only when a plot is asked for, and the figure is drawn on
an Agg canvas directly (no pyplot, so no global backend or figure state is touched).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cmrtool.errors import CmrError

__all__ = ["require_matplotlib", "sweep_figure", "plot_sweep"]

_STYLES = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", "-"), ("P", "--"), ("X", "-."), ("*", ":"), ("h", "-")]


def require_matplotlib() -> Any:
    """The ``matplotlib`` module, or a :class:`CmrError` that says how to install it."""
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError:
        raise CmrError("--plot needs matplotlib, which is not installed", "pip install 'cmrtool[plot]'") from None
    return matplotlib


def sweep_figure(report: Any) -> Any:
    """A matplotlib ``Figure`` of a :class:`~cmrtool.studies.sweep.SweepReport`: IIA (left) and
    interchange KL (right) against MACs kept, one line per criterion.

    The x-axis is reduced MACs / original MACs (the keep fraction when MACs are unknown); the top
    axis of each panel marks the keep fractions, the IIA points carry their 95% Wilson intervals.
    """
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = report.rows
    use_macs = all(r.macs_ratio is not None for r in rows)
    x_of = (lambda r: r.macs_ratio) if use_macs else (lambda r: r.keep)
    fig = Figure(figsize=(10, 4.4), dpi=150, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharex=True)
    criteria = list(dict.fromkeys(r.criterion for r in rows))
    for i, criterion in enumerate(criteria):
        pts = sorted((r for r in rows if r.criterion == criterion), key=x_of)
        xs = [x_of(r) for r in pts]
        marker, style = _STYLES[i % len(_STYLES)]
        lo = [r.iia - r.iia_ci[0] for r in pts]
        hi = [r.iia_ci[1] - r.iia for r in pts]
        axes[0].errorbar(xs, [r.iia for r in pts], yerr=[lo, hi], marker=marker, linestyle=style, capsize=3, label=criterion)
        axes[1].plot(xs, [r.kl for r in pts], marker=marker, linestyle=style, label=criterion)
    xlabel = "MACs kept (reduced / original)" if use_macs else "keep fraction (MACs unknown)"
    swaps, p = report.settings.get("swaps"), report.settings.get("p")
    axes[0].set_ylabel("IIA with 95% CI (higher is better)")
    axes[0].set_ylim(0.0, 1.02)
    axes[1].set_ylabel("interchange KL(original ‖ reduced) (lower is better)")
    axes[1].set_ylim(bottom=0.0)
    ticks = {x_of(r): r.keep for r in rows}
    for ax in axes:
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
        top = ax.twiny()
        top.set_xlim(ax.get_xlim())
        top.set_xticks(list(ticks))
        top.set_xticklabels([f"{k:g}" for k in ticks.values()], fontsize=7)
        top.set_xlabel("keep fraction per site", fontsize=8)
    axes[0].legend(title="criterion", loc="lower right")
    where = "all reduced sites at once" if rows[0].iia_of == "all" else f"site {rows[0].iia_of}"
    fig.suptitle(f"{Path(report.model).name}: interchange fidelity vs size ({where}; {swaps} swaps, p = {p})", fontsize=10)
    return fig


def plot_sweep(report: Any, path: str | Path) -> None:
    """Write :func:`sweep_figure` as a PNG to ``path`` (atomically)."""
    from cmrtool.io.files import write_with

    fig = sweep_figure(report)
    write_with(path, lambda tmp: fig.savefig(tmp, format="png"))
