"""Human-readable renderings (Rich tables) of the reports; the JSON forms are the reports' own."""

from __future__ import annotations

import statistics
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cmrtool.cli.output import fmt_float, fmt_int
from cmrtool.cli.tables import fit

__all__ = ["inspect_table", "score_table", "compile_table", "verify_table", "bench_table", "audit_table", "sweep_table"]


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
            width = str(s.width) if s.group == 1 else f"{s.width}×{s.group}"  # heads: units × channels
            t.add_row(escape(s.name), s.kind, width, s.activation, escape(fold), escape(cons))
        console.print(fit(t, console))
    for r in report.rejected:
        console.print(f"not a site: {r.name}: {r.reason}", markup=False)
    if report.unsupported:
        console.print("unsupported layers: " + ", ".join(report.unsupported), markup=False)
    for n in report.notes:
        console.print(f"note: {n}", markup=False)


def score_table(doc: dict[str, Any], console: Console) -> None:
    console.print(f"criterion [bold]{doc['criterion']}[/] on {doc['samples']} samples (lower score = replaced first; values = samples × positions per sample)")
    t = Table(show_edge=False, header_style="bold")
    for col in ("site", "kind", "width", "values", "min", "median", "max", "kept"):
        t.add_column(col, justify="left" if col in ("site", "kind") else "right")
    for s in doc["sites"]:
        sc = [x for x in s["scores"] if x is not None]
        kept = f"{len(s['kept'])}/{s['width']}" if "kept" in s else "—"
        t.add_row(
            s["name"], s["kind"], str(s["width"]), str(s["samples"]),
            fmt_float(min(sc)) if sc else "—", fmt_float(statistics.median(sc)) if sc else "—",
            fmt_float(max(sc)) if sc else "—", kept,
        )
    console.print(fit(t, console))


def compile_table(report: Any, console: Console) -> None:
    doc = report.to_json()
    t = Table(show_edge=False, header_style="bold")
    for col in ("site", "kind", "width", "kept", "replaced", "fold"):
        t.add_column(col, justify="left" if col in ("site", "kind", "fold") else "right")
    for s in doc["sites"]:
        t.add_row(s["name"], s["kind"], str(s["width"]), str(s["kept"]), str(s["replaced"]), s["fold"])
    console.print(fit(t, console))
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
    console.print(f"wrote [bold]{escape(doc['output'])}[/]")
    if doc.get("onnx"):
        o = doc["onnx"]
        console.print(f"wrote [bold]{escape(o['path'])}[/] ({o['exporter']} exporter); ONNX parity: max |onnxruntime − torch| = {fmt_float(o['max_abs_diff'])} on {o['samples']} samples")


def verify_table(report: Any, console: Console) -> None:
    d = report.to_json()
    if d["passed"]:
        console.print("[bold green]PASSED[/]" + ("" if any(d["settings"][k] is not None for k in ("min_iia", "max_kl", "max_fold_error")) else " (no thresholds given)"))
    else:
        console.print("[bold red]FAILED[/]: " + escape("; ".join(d["failures"])))
    acc = ""
    if d["accuracy_original"] is not None:
        acc = f" · accuracy {d['accuracy_original']:.2%} → {d['accuracy_reduced']:.2%}"
    console.print(
        f"fold error {fmt_float(d['fold_error'])} (relative {fmt_float(d['fold_error_relative'])}) · agreement {d['agreement']:.2%}"
        f" · KL {fmt_float(d['kl'])} · |Δlogit| mean {fmt_float(d['dlogit_mean'])} max {fmt_float(d['dlogit_max'])}{acc}"
        f" · {d['samples']} {'tokens' if d.get('unit') == 'token' else 'samples'}",
        markup=False,
    )
    tok = d.get("tokens")
    if tok is not None:  # token models: the llama.cpp --kl-divergence set
        ppl = "" if tok["ppl_base"] is None else (
            f" · PPL {fmt_float(tok['ppl_base'])} → {fmt_float(tok['ppl_q'])} (ratio {tok['ppl_ratio']:.4f})")
        console.print(
            f"per token: KL median {fmt_float(tok['median_kld'])} · 99% {fmt_float(tok['kld_99'])} · max {fmt_float(tok['maximum_kld'])}{ppl}",
            markup=False,
        )
    t = Table(
        show_edge=False, header_style="bold",
        title=f"interchange, {d['settings']['swaps']} swaps per row, p = {d['settings']['p']}; changed = swaps that changed "
        "the original's prediction (IIA on those); full figures with --json",
    )
    t.add_column("site", no_wrap=True)
    for col in ("kept", "IIA", "95% CI", "KL", "D2", "cert", "changed"):
        t.add_column(col, justify="right", no_wrap=True)
    rows = d["sites"] + ([d["all_sites"]] if d["all_sites"] else [])
    for r in rows:
        cert = max(r["certificate"], r["certificate_linf"])
        changed = str(r["changed"]) + ("" if r["iia_changed"] is None else f" ({r['iia_changed']:.2f})")
        t.add_row(
            escape(r["name"]), str(r["retained"]), f"{r['iia']:.3f}", f"{r['iia_ci'][0]:.2f}–{r['iia_ci'][1]:.2f}",
            f"{r['kl']:.3f}", f"{r['d2']:.3g}", f"{cert:.2f}" + ("" if r["certificate_holds"] else "!"), changed,
        )
    console.print(fit(t, console))
    if d["onnx_max_abs_diff"] is not None:
        console.print(f"ONNX parity: max |onnxruntime − torch| = {fmt_float(d['onnx_max_abs_diff'])}", markup=False)
    for n in d["notes"]:
        console.print(f"note: {n}", markup=False)


def _fmt_bytes(n: int) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def _fmt_ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}×"


def bench_table(report: Any, console: Console) -> None:
    """Models (size, MACs), their speed (speedup beside the MAC ratio), then MACs per site."""
    dtype = report.dtype if report.dtype == report.requested_dtype else f"{report.dtype} (requested {report.requested_dtype})"
    console.print(
        f"[bold]{escape(report.device)}[/] ({escape(report.device_name)})  {dtype}  {report.threads} threads  "
        f"batch {report.batch}  {report.repeats} alternating rounds after {report.warmup} warm-up  inputs: {escape(report.inputs)}"
    )
    size = Table(show_edge=False, header_style="bold")
    for col in ("#", "model", "runtime", "params", "size", "MACs"):
        size.add_column(col, justify="left" if col in ("model", "runtime") else "right")
    speed = Table(show_edge=False, header_style="bold")
    for col in ("#", "ms/batch (p10–p90)", "samples/s", "speedup (p10–p90)", "MAC ratio", "realized"):
        speed.add_column(col, justify="right")
    for i, m in enumerate(report.models, 1):
        size.add_row(
            str(i), escape(m.path), f"{m.runtime} {m.dtype}", fmt_int(m.params), _fmt_bytes(m.file_bytes),
            fmt_int(None if m.macs is None else m.macs.total),
        )
        lat, sp = m.latency, m.speedup
        speed.add_row(
            str(i), f"{fmt_float(lat.median * 1e3)} ({fmt_float(lat.p10 * 1e3)}–{fmt_float(lat.p90 * 1e3)})",
            fmt_int(round(m.throughput)), "—" if sp is None else f"{sp.median:.2f}× ({sp.p10:.2f}–{sp.p90:.2f})",
            _fmt_ratio(m.mac_ratio),
            "—" if m.speedup_realized is None else f"{m.speedup_realized:.0%}",
        )
    console.print(fit(size, console))
    console.print(fit(speed, console))
    if report.generation:
        gen = Table(show_edge=False, header_style="bold", title=f"generation: {report.prompt_tokens}-token prompts, {report.decode_tokens} greedy steps")
        for col in ("model", "batch", "prefill tok/s", "speedup", "decode tok/s", "speedup"):
            gen.add_column(col, justify="left" if col == "model" else "right")
        for g in report.generation:
            gen.add_row(
                escape(g.path), str(g.batch), fmt_int(round(g.prefill_tokens_per_s)), _fmt_ratio(g.prefill_speedup),
                fmt_int(round(g.decode_tokens_per_s)), _fmt_ratio(g.decode_speedup),
            )
        console.print(fit(gen, console))
    with_sites = [(i, m) for i, m in enumerate(report.models, 1) if m.sites]
    if with_sites:
        names = list(dict.fromkeys(s.name for _, m in with_sites for s in m.sites))
        st = Table(show_edge=False, header_style="bold")
        st.add_column("site")
        for i, _ in with_sites:
            st.add_column(f"#{i} width", justify="right")
            st.add_column(f"#{i} MACs", justify="right")
        for name in names:
            row = [escape(name)]
            for _, m in with_sites:
                site = next((s for s in m.sites if s.name == name), None)
                row += ["—", "—"] if site is None else [str(site.width), fmt_int(site.macs)]
            st.add_row(*row)
        console.print(fit(st, console))
    console.print(
        "speedup: median over rounds of latency #1 / latency #i; MAC ratio: MACs #1 / MACs #i (the MAC-ideal "
        "speedup); realized: speedup / MAC ratio. MACs per sample; a site's MACs are its producer and consumer layers'.",
        markup=False,
    )
    # report.notes were each printed as a warning on stderr while benchmarking; they are in --json.


def audit_table(report: Any, console: Console) -> None:
    d = report.to_json()
    lo, hi = d["scale_range"]
    console.print(
        f"reparameterization audit: every ReLU unit rescaled by s ~ LogUniform({lo:g}, {hi:g}) with the inverse on its "
        f"consumers; kept-set Jaccard at keep {d['keep']} over {d['seeds']} seeds (1 = invariant; two random halves ≈ 1/3)",
        markup=False,
    )
    console.print(f"function unchanged: max |Δlogit| = {fmt_float(d['max_logit_change'])}", markup=False)
    t = Table(show_edge=False, header_style="bold")
    for col in ("site", "criterion", "Jaccard (mean ± sd)"):
        t.add_column(col, justify="right" if col.startswith("Jaccard") else "left", no_wrap=True)
    for s in d["sites"]:
        for i, (c, r) in enumerate(s["criteria"].items()):
            t.add_row(escape(s["name"]) if i == 0 else "", c, f"{r['jaccard_mean']:.3f} ± {r['jaccard_sd']:.3f}")
    console.print(fit(t, console))
    for sk in d["skipped"]:
        console.print(f"skipped {sk['name']}: {sk['reason']}", markup=False)
    v = d["validation"]
    if v:
        console.print(f"criterion validation on {v['units']} sampled units: rank correlation with the true damage ({v['damage']})", markup=False)
        vt = Table(show_edge=False, header_style="bold")
        for col in ("criterion", "Spearman", "Kendall"):
            vt.add_column(col, justify="left" if col == "criterion" else "right")
        for c, r in v["criteria"].items():
            vt.add_row(c, fmt_float(r["spearman"]), fmt_float(r["kendall"]))
        console.print(fit(vt, console))


def _fmt_opt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def sweep_table(report: Any, console: Console) -> None:
    """One row per (criterion, keep): size, plain fidelity, interchange IIA and KL."""
    d = report.to_json()
    o, st = d["original"], d["settings"]
    acc = "" if o["accuracy"] is None else f"  accuracy {o['accuracy']:.1%}"
    console.print(f"[bold]{escape(d['model'])}[/]  params {fmt_int(o['params'])}  MACs {fmt_int(o['macs'])}{acc}")
    t = Table(show_edge=False, pad_edge=False, header_style="bold")
    for col in ("keep", "criterion", "params", "MACs", "kept", "accuracy", "agreement", "IIA", "KL"):
        t.add_column(col, justify="left" if col == "criterion" else "right", no_wrap=True)
    for r in d["rows"]:
        t.add_row(
            f"{r['keep']:g}", escape(r["criterion"]), fmt_int(r["params"]), fmt_int(r["macs"]), _fmt_opt(r["macs_ratio"], ".0%"),
            _fmt_opt(r["accuracy"], ".1%"), f"{r['agreement']:.1%}", f"{r['iia']:.3f}", f"{r['kl']:.3f}",
        )
    console.print(fit(t, console))
    where = "all reduced sites at once" if d["rows"] and d["rows"][0]["iia_of"] == "all" else "the reduced site"
    console.print(
        f"sites {', '.join(st['sites'])}; kept = MACs kept (reduced / original); IIA and KL(low‖high) of {where}, "
        f"{st['swaps']} swaps, p = {st['p']}; plain-input KL and per-site figures with --json",
        markup=False,
    )
    kept = [r["model"] for r in d["rows"] if r["model"]]
    if kept:
        console.print(f"kept {len(kept)} reduced checkpoints in {st['keep_models']}", markup=False)
