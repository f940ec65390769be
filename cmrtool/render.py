"""Human-readable renderings (Rich tables) of the reports; the JSON forms are the reports' own."""

from __future__ import annotations

import statistics
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cmrtool.output import fmt_float, fmt_int

__all__ = ["inspect_table", "score_table", "compile_table"]


def inspect_table(report: Any, console: Console) -> None:
    console.print(
        f"[bold]{report.path}[/]  {report.format}  params {fmt_int(report.params)}  MACs {fmt_int(report.macs)}"
    )
    if report.reduced:
        widths = ", ".join(f"{s['name']} {s['kept']}/{s['width']}" for s in report.reduced["sites"])
        console.print(f"reduced by cmrtool ({report.reduced['criterion']}): {widths}")
    if report.sites:
        t = Table(title=None, show_edge=False, header_style="bold")
        for col in ("site", "kind", "width", "activation", "fold", "consumers"):
            t.add_column(col, justify="right" if col == "width" else "left")
        for s in report.sites:
            fold = s.fold if not s.reason else f"{s.fold} ({s.reason})"
            cons = ", ".join(f"{c.module} [{c.fold_mode}]" for c in s.consumers)
            t.add_row(escape(s.name), s.kind, str(s.width), s.activation, escape(fold), escape(cons))
        console.print(t)
    for r in report.rejected:
        console.print(f"not a site: {r.name}: {r.reason}", markup=False)
    if report.unsupported:
        console.print("unsupported layers: " + ", ".join(report.unsupported), markup=False)
    for n in report.notes:
        console.print(f"note: {n}", markup=False)


def score_table(doc: dict[str, Any], console: Console) -> None:
    console.print(f"criterion [bold]{doc['criterion']}[/] on {doc['samples']} samples (lower score = replaced first)")
    t = Table(show_edge=False, header_style="bold")
    for col in ("site", "kind", "width", "samples", "min", "median", "max", "kept"):
        t.add_column(col, justify="left" if col in ("site", "kind") else "right")
    for s in doc["sites"]:
        sc = [x for x in s["scores"] if x is not None]
        kept = f"{len(s['kept'])}/{s['width']}" if "kept" in s else "—"
        t.add_row(
            s["name"], s["kind"], str(s["width"]), str(s["samples"]),
            fmt_float(min(sc)) if sc else "—", fmt_float(statistics.median(sc)) if sc else "—",
            fmt_float(max(sc)) if sc else "—", kept,
        )
    console.print(t)


def compile_table(report: Any, console: Console) -> None:
    doc = report.to_json()
    t = Table(show_edge=False, header_style="bold")
    for col in ("site", "kind", "width", "kept", "replaced", "fold"):
        t.add_column(col, justify="left" if col in ("site", "kind", "fold") else "right")
    for s in doc["sites"]:
        t.add_row(s["name"], s["kind"], str(s["width"]), str(s["kept"]), str(s["replaced"]), s["fold"])
    console.print(t)
    ratio = doc["param_ratio"]
    console.print(
        f"params {fmt_int(doc['params_before'])} → {fmt_int(doc['params_after'])} ({ratio:.1%})  "
        f"criterion {doc['criterion']}, replacement {doc['replacement']}"
    )
    fe = doc["fold_error"]
    if fe is None:
        console.print("fold error: not measured (pass --calib to check the compiled model)")
    else:
        console.print(f"fold error: max |Δlogit| {fmt_float(fe)} (relative {fmt_float(doc['fold_error_relative'])}) on {doc['fold_check_samples']} samples")
    for n in doc["notes"]:
        console.print(f"note: {n}", markup=False)
    console.print(f"wrote [bold]{doc['output']}[/]")
