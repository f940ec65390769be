"""Verify: is the reduced model a faithful causal abstraction of the original? (DESIGN §3.5)

Given the original O, the reduced R (whose plan travels inside it) and held-out data:

1. **Fold error** ``max |R(x) − O_clamped(x)|``, O_clamped = O with replaced units fixed to
   their replacements. Float rounding means the compile is right; anything larger is a bug
   (or the measured border effect of an ``interior-exact`` site).
2. **Plain fidelity**: top-1 agreement, mean KL(softmax O ‖ softmax R), mean and max |Δlogit|,
   and both accuracies when the data has labels.
3. **Interchange interventions** (CMR paper §4.2, §5.3): per swap, a base x_b and a source x_s
   (uniform, seeded) and a mask m over the site's retained units (each 1 with probability p).
   Low level: O with retained units set to ``m⊙a_O(x_s) + (1−m)⊙a_O(x_b)`` (replaced units keep
   their own value); high level: R with its units set to ``m⊙a_R(x_s) + (1−m)⊙a_R(x_b)``.
   Reported: IIA = P[argmax z_L = argmax z_H] with a 95% Wilson interval, KL(z_L‖z_H) and the
   reverse, D2 = E‖z_H − z_L‖², the margin certificate of Theorem 2,
   ``IIA ≥ max_ε [1 − P(m_L ≤ 2ε) − D2/ε²]`` (m_L the top-1 margin of z_L), and the tighter
   form the proof also gives with D∞² = E‖z_H − z_L‖∞² ≤ D2 in place of D2, both checked
   against the measured IIA, and how many swaps changed O's prediction with the IIA on those. One site at a
   time, then all sites at once (later sites then take ``m⊙a(x_s)`` and keep whatever the
   intervened run computes elsewhere).

Token models (Hugging Face LMs and encoders: per-token logits) take their own path, with every
figure a per-token mean in bounded memory: :mod:`cmrtool.verify.lm` (base + head in chunks),
:mod:`cmrtool.verify.token_metrics` (streaming figures), :mod:`cmrtool.verify.token_swaps` (swaps
between tokens).

Site activations of every base and source are computed once, by the same passes that measure
the fold error; each swap then re-runs only the network after the site
(:class:`cmrtool.backends.torchscript.downstream.Downstream`; an nn.Module re-runs the whole forward with
hooks, :class:`cmrtool.backends.module.model.HookDownstream`), in batches. What makes that cheap:

- masks are drawn from packed random bits (one bit per unit at p = 0.5, :func:`cmrtool.verify.interchange._bernoulli`);
- values are mixed by ``lerp`` on 0/1 weights (the same values as a selection while they are
  finite, and torch's CPU ``where`` is ~10× slower; non-finite values are selected exactly,
  :mod:`cmrtool.backends.swap`), and O's value only over its retained units;
- when O's site is read by a single Linear ``(W, b)`` (an MLP layer, a transformer FFN), O's run
  starts after it: ``W·(a_b + m⊙(a_s − a_b)) + b`` is the base's cached clean output plus
  ``W[:, K]`` applied to the change of the retained units K, so that product costs
  ``kept/width`` of the Linear's (equal up to float rounding);
- the summary statistics of all runs are computed together in numpy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cmrtool import __version__
from cmrtool.errors import InputError, UsageError
from cmrtool.backends.swap import select, weights
from cmrtool.verify.interchange import _Cache, _all_finite, _downstreams, _draw, interchange
from cmrtool.verify.metrics import _kl_logs, _log_softmax, _logits64, _margin, margin_certificate, wilson

__all__ = ["SiteResult", "VerifyReport", "Thresholds", "verify"]

VERIFY_SCHEMA_VERSION = 1
ALL_SITES = "all"
_SWAP_BUDGET = 32 << 20  # bytes of cached activations gathered per interchange pass


@dataclass(frozen=True)
class SiteResult:
    """Interchange results for one site (or ``all``)."""

    name: str
    swaps: int
    retained: int
    iia: float
    iia_ci: tuple[float, float]
    kl: float
    kl_reverse: float
    d2: float
    certificate: float
    certificate_epsilon: float | None
    dinf2: float
    certificate_linf: float
    changed: int
    iia_changed: float | None

    @property
    def certificate_holds(self) -> bool:
        return max(self.certificate, self.certificate_linf) <= self.iia + 1e-12

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "swaps": self.swaps,
            "retained": self.retained,
            "iia": self.iia,
            "iia_ci": list(self.iia_ci),
            "kl": self.kl,
            "kl_reverse": self.kl_reverse,
            "d2": self.d2,
            "certificate": self.certificate,
            "certificate_epsilon": self.certificate_epsilon,
            "dinf2": self.dinf2,
            "certificate_linf": self.certificate_linf,
            "certificate_holds": self.certificate_holds,
            "changed": self.changed,
            "iia_changed": self.iia_changed,
        }


@dataclass(frozen=True)
class Thresholds:
    """Verification passes when every given bound holds (None = not checked)."""

    min_iia: float | None = None
    max_kl: float | None = None
    max_fold_error: float | None = None


@dataclass(frozen=True)
class VerifyReport:
    fold_error: float
    fold_error_relative: float
    agreement: float
    kl: float
    dlogit_mean: float
    dlogit_max: float
    accuracy_original: float | None
    accuracy_reduced: float | None
    samples: int
    sites: tuple[SiteResult, ...]
    all_sites: SiteResult | None
    onnx_max_abs_diff: float | None
    failures: tuple[str, ...]
    settings: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    unit: str = "sample"  # what a sample is: "sample" (a row of the data) or "token"
    tokens: Any = None  # per-token figures of a token model (cmrtool.verify.token_metrics.TokenFigures)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": VERIFY_SCHEMA_VERSION,
            "tool_version": __version__,
            "passed": self.passed,
            "failures": list(self.failures),
            "fold_error": self.fold_error,
            "fold_error_relative": self.fold_error_relative,
            "agreement": self.agreement,
            "kl": self.kl,
            "dlogit_mean": self.dlogit_mean,
            "dlogit_max": self.dlogit_max,
            "accuracy_original": self.accuracy_original,
            "accuracy_reduced": self.accuracy_reduced,
            "samples": self.samples,
            "sites": [s.to_json() for s in self.sites],
            "all_sites": None if self.all_sites is None else self.all_sites.to_json(),
            "onnx_max_abs_diff": self.onnx_max_abs_diff,
            "settings": self.settings,
            "inputs": self.inputs,
            "notes": list(self.notes),
            "unit": self.unit,
            "kl_p99": None if self.tokens is None else self.tokens.kl_p99,
            "kl_max": None if self.tokens is None else self.tokens.kl_max,
            "perplexity_original": None if self.tokens is None else self.tokens.ppl_base,
            "perplexity_reduced": None if self.tokens is None else self.tokens.ppl_q,
            "perplexity_ratio": None if self.tokens is None else self.tokens.ppl_ratio,
            "tokens": None if self.tokens is None else self.tokens.to_json(),
        }


def _check_pair(original: Any, reduced: Any) -> Any:
    plan = reduced.plan
    if plan is None:
        raise InputError(
            f"{reduced.path} has no cmrtool plan: it was not written by cmrtool compile",
            "pass the checkpoint that cmrtool compile wrote (the plan travels inside it)",
        )
    if plan.source_sha256 and plan.source_sha256 != original.sha256:
        raise InputError(
            f"{reduced.path} was reduced from another model (sha256 {plan.source_sha256[:12]}…, {original.path} is {original.sha256[:12]}…)",
            "pass the original checkpoint that the reduced one was compiled from",
        )
    for sp in plan.sites:
        try:
            o, r = original.site(sp.name), reduced.site(sp.name)
        except KeyError:
            raise InputError(f"site {sp.name} of the plan is missing from one of the models", "pass the original and the checkpoint compiled from it") from None
        if o.width != sp.width or r.width != len(sp.kept):
            raise InputError(
                f"site {sp.name}: the plan says {len(sp.kept)}/{sp.width} units, the models have {r.width}/{o.width}",
                "pass the original and the checkpoint compiled from it",
            )
    return plan


@dataclass
class _Swaps:
    """The raw outcome of one interchange run: both levels' logits and O's clean predictions
    on the bases."""

    name: str
    retained: int
    zl: torch.Tensor
    zh: torch.Tensor
    base_pred: torch.Tensor


def _site_results(runs: Sequence[_Swaps]) -> list[SiteResult]:
    """Summary statistics of interchange runs (one :class:`SiteResult` each), computed over all
    runs' logits side by side: one vectorised numpy pass per statistic, then per-run means."""
    if not runs:
        return []
    low = np.concatenate([_logits64(r.zl) for r in runs], axis=1)
    high = np.concatenate([_logits64(r.zh) for r in runs], axis=1)
    lp, lq = _log_softmax(low), _log_softmax(high)
    pred = low.argmax(axis=0)  # first maximum, as torch.argmax
    agree = pred == high.argmax(axis=0)
    diff = high - low
    sq = np.square(diff).sum(axis=0)
    inf2 = np.square(np.abs(diff).max(axis=0))
    kl, kl_reverse = _kl_logs(lp, lq), _kl_logs(lq, lp)
    margins = _margin(low)
    changed = pred != np.concatenate([r.base_pred.reshape(-1).numpy() for r in runs])
    out = []
    start = 0
    for r in runs:
        part = slice(start, start + r.zl.numel() // r.zl.shape[-1])  # predictions compared (= swaps for per-sample logits)
        start = part.stop
        figures = {"agree": agree[part], "sq": sq[part], "inf2": inf2[part], "kl": kl[part], "kl_reverse": kl_reverse[part], "margin": margins[part]}
        out.append(summarize_swaps(r.name, r.zl.shape[0], r.retained, figures, changed[part]))
    return out


def summarize_swaps(name: str, swaps: int, retained: int, figures: dict[str, np.ndarray], changed: np.ndarray) -> SiteResult:
    """A :class:`SiteResult` from per-swap figures (``agree``, ``sq``, ``inf2``, ``kl``,
    ``kl_reverse``, ``margin``: one entry per compared prediction) and whether each swap changed
    O's prediction."""
    agree = np.asarray(figures["agree"], dtype=bool)
    n = agree.size
    k = int(agree.sum())
    d2, dinf2 = float(np.mean(figures["sq"])), float(np.mean(figures["inf2"]))
    cert, eps = margin_certificate(figures["margin"], d2)
    nc = int(changed.sum())
    return SiteResult(
        name=name,
        swaps=swaps,
        retained=retained,
        iia=k / n,
        iia_ci=wilson(k, n),
        kl=float(np.mean(figures["kl"])),
        kl_reverse=float(np.mean(figures["kl_reverse"])),
        d2=d2,
        certificate=cert,
        certificate_epsilon=eps,
        dinf2=dinf2,
        certificate_linf=margin_certificate(figures["margin"], dinf2)[0],
        changed=nc,
        iia_changed=float(agree[changed].mean()) if nc else None,
    )


def _run_swaps(
    original: Any, reduced: Any, plan: Any, names: list[str], low: _Cache, high: _Cache, base_pred: torch.Tensor,
    label: str, swaps: int, p: float, seed: int, batch_size: int, advance: Callable[[int], None],
) -> _Swaps:
    n = base_pred.shape[0]
    kept = {s: len(plan.site(s).kept) for s in names}
    base, source, masks = _draw(n, swaps, p, seed, label, kept)
    # Swaps per pass: as many as fit a fixed activation budget, at least a data batch. The
    # results do not depend on it (each swap is computed independently).
    per_swap = sum(t[:1].numel() * t.element_size() for t in low.values.values()) + sum(
        t[:1].numel() * t.element_size() for t in low.frontier
    )
    chunk = max(batch_size, min(swaps, _SWAP_BUDGET // max(per_swap, 1)))
    zl, zh = [], []
    for i in range(0, swaps, chunk):
        sl = slice(i, min(swaps, i + chunk))
        a, b = interchange(low, high, plan, original, reduced, base[sl], source[sl], {s: m[sl] for s, m in masks.items()})
        zl.append(a)
        zh.append(b)
        advance(sl.stop - sl.start)
    return _Swaps(label, sum(kept.values()), torch.cat(zl), torch.cat(zh), base_pred.index_select(0, base))


def _cat(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Batches joined along dim 0 (no copy for one)."""
    return parts[0] if len(parts) == 1 else torch.cat(list(parts))


def _clamped(
    original: Any, ds: Any, x: list[torch.Tensor], values: dict[str, torch.Tensor], frontier: list[torch.Tensor],
    edits: dict[str, tuple[torch.Tensor, ...]], blends: dict[str, tuple[torch.Tensor, ...]],
) -> torch.Tensor:
    """Logits of O_clamped on a batch. When every clamped site is one of the downstream's, the
    run starts from the first site's clamped clean value (same values: the network before it
    is unchanged) instead of the inputs. Clamps are lerps on 0/1 weights, re-run with where
    if anything comes out non-finite."""
    def run(chosen: dict[str, tuple[torch.Tensor, ...]]) -> torch.Tensor:
        if set(chosen) <= set(ds.order) and all(len(e) == 2 for e in chosen.values()):
            first = ds.order[0]
            v = values[first]
            if first in chosen:
                mask, fill = chosen[first]
                v = select(mask, fill.expand_as(v), v)
            later = {k: e for k, e in chosen.items() if k != first}
            if ds.linear is not None:  # the same op the graph runs there
                return ds.run(x, F.linear(v, *ds.linear), frontier[1:], later)
            return ds.run(x, v, frontier, later)
        return original.run(x, edits=chosen)[0]

    z = run(blends)
    return z if _all_finite(z) else run(edits)


def _per_sample_sites(model: Any, names: list[str]) -> tuple[list[str], list[str]]:
    """``names`` split into sites whose value has a row per sample, and the others (MoE experts:
    one row per routed token), which interchange between samples cannot swap."""
    per_sample = getattr(model, "per_sample", None)
    routed = [n for n in names if per_sample is not None and not per_sample(n)]
    if routed and len(routed) == len(names):
        raise UsageError(
            f"site {routed[0]} is an expert FFN: its value exists for routed tokens only, so interchange between samples is undefined",
            "verify the plan's other sites with --site (compile's fold check already proved the experts' fold exact)",
        )
    return [n for n in names if n not in routed], routed


def verify(
    original: Any,
    reduced: Any,
    data: Any,
    swaps: int = 2000,
    p: float = 0.5,
    seed: int = 0,
    sites: Sequence[str] | None = None,
    batch_size: int = 256,
    thresholds: Thresholds = Thresholds(),
    onnx: str | None = None,
    progress: Callable[[str, int], Any] | None = None,
) -> VerifyReport:
    """Run the verification protocol of DESIGN §3.5.

    Args:
        original: the original model (a backend model).
        reduced: the compiled model, with its plan.
        data: held-out data (a :class:`cmrtool.io.data.Dataset`).
        swaps: interchange interventions per site (and for all sites together).
        p: probability that a retained unit takes the source's value.
        seed: seed of the swap and mask draws.
        sites: verify only these plan sites (default: every site of the plan).
        batch_size: samples or swaps per pass, at least: passes grow up to ``_SWAP_BUDGET``
            bytes of cached activations (results do not depend on it).
        thresholds: bounds that decide ``passed``.
        onnx: an ONNX export of ``reduced`` to compare with it.
        progress: ``progress(description, total, unit)`` context manager yielding ``advance(n)``.
    """
    import contextlib

    from cmrtool.compile.clamp import clamp_edits, site_ranks
    from cmrtool.errors import UsageError
    from cmrtool.compile.export import onnx_parity

    plan = _check_pair(original, reduced)
    planned = [s.name for s in plan.sites]
    if sites:
        unknown = [s for s in sites if s not in planned]
        if unknown:
            raise UsageError(f"site {unknown[0]} is not in the reduced model's plan", f"planned sites: {', '.join(planned)}")
    chosen = original.site_order([s for s in planned if not sites or s in set(sites)])
    chosen, routed = _per_sample_sites(original, chosen)
    routed_notes = [f"{len(routed)} expert site(s) are clamped in the fidelity checks but not interchanged: their values exist for routed tokens only"] if routed else []
    if swaps < 1 or not (0.0 <= p <= 1.0):
        raise UsageError(f"need --swaps ≥ 1 and --p in [0, 1], got {swaps} and {p}", "e.g. --swaps 2000 --p 0.5")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}", "e.g. --batch-size 256")
    groups = [([s], s) for s in chosen] + ([(chosen, ALL_SITES)] if len(chosen) > 1 else [])

    def prog(desc: str, total: int, unit: str = "samples") -> Any:
        return progress(desc, total, unit) if progress is not None else contextlib.nullcontext(lambda k: None)

    settings = {"swaps": swaps, "p": p, "seed": seed, "sites": chosen, "batch_size": batch_size, "criterion": plan.criterion,
                "min_iia": thresholds.min_iia, "max_kl": thresholds.max_kl, "max_fold_error": thresholds.max_fold_error}
    from cmrtool.verify.lm import token_models

    pair = token_models(original, reduced, data)
    if pair is not None:  # per-token figures, bounded memory (cmrtool.verify.lm)
        from cmrtool.verify.token_swaps import verify_token_model

        def clamp_for(x: list[torch.Tensor]) -> dict[str, Any]:
            return clamp_edits(original, plan, site_ranks(original, [t[:1] for t in x], planned))

        acc, summaries, token_notes = verify_token_model(*pair, plan, data, groups, swaps, p, seed, batch_size, clamp_for, prog)
        figures = acc.result()
        return _report(
            original, reduced, plan, summaries, len(chosen), thresholds, settings, figures.fold_error, figures.scale,
            figures.agreement, figures.kl, figures.dlogit_mean, figures.dlogit_max, figures.accuracy_base, figures.accuracy_q,
            figures.tokens, None, routed_notes + token_notes, figures,
        )

    # 1-2. Fold error and plain fidelity, streaming over the data; the same passes cache the
    # clean site activations and frontiers that the interchange runs start from.
    inputs: list[list[torch.Tensor]] = []
    values: dict[str, dict[str, list[torch.Tensor]]] = {"low": {}, "high": {}}
    frontiers: dict[str, list[list[list[torch.Tensor]]]] = {"low": [], "high": []}
    preds: list[torch.Tensor] = []
    fe = scale = kl_sum = dl_sum = dl_max = 0.0
    agree = n = predictions = correct_o = correct_r = 0
    has_labels = False
    ds_low = ds_high = None
    edits = blends = None
    with prog("fidelity", data.n) as advance, torch.no_grad():
        # The first pass: --batch-size, or more when the inputs are small (activations rarely
        # exceed 64× the input); later passes are sized from the measured activations.
        input_bytes = sum(math.prod(data.input_shapes()[k][1:]) * 8 for k in data.keys)
        start, size = 0, max(batch_size, _SWAP_BUDGET // max(64 * input_bytes, 1))
        while start < data.n:
            batch = data.read(start, min(data.n, start + size))
            start += len(batch)
            x = list(batch.inputs)
            if ds_low is None:
                # O's runs start after the Linear that reads the first site, where there is one
                # (see _through_linear); R's at the site.
                ds_low, ds_high = _downstreams(original, groups, x, after_linear=True), _downstreams(reduced, groups, x)
                edits = clamp_edits(original, plan, site_ranks(original, x, planned))
                # Clamps by lerp on 0/1 weights (several times faster than where on CPU; the
                # same values while everything is finite, and re-run with where otherwise).
                blends = {k: (weights(e[0], e[1].dtype), e[1]) if len(e) == 2 and e[1].is_floating_point() else e for k, e in edits.items()}
            zo, vo, fo = original.capture_for(ds_low, x)
            zr, vr, fr = reduced.capture_for(ds_high, x)
            zc = _clamped(original, ds_low[-1], x, vo, fo[-1], edits, blends)
            inputs.append(x)
            for level, vals, fronts in (("low", vo, fo), ("high", vr, fr)):
                for k, v in vals.items():
                    values[level].setdefault(k, []).append(v)
                frontiers[level].append(fronts)
            zo, zr, zc = zo.to(torch.float64), zr.to(torch.float64), zc.to(torch.float64)
            fe = max(fe, float((zr - zc).abs().max()))
            scale = max(scale, float(zc.abs().max()))
            po, pr = zo.argmax(-1), zr.argmax(-1)
            preds.append(po)
            agree += int((po == pr).sum())
            kl_sum += float(_kl_logs(_log_softmax(_logits64(zo)), _log_softmax(_logits64(zr))).sum())
            d = (zr - zo).abs()
            dl_sum += float(d.mean(-1).sum())
            dl_max = max(dl_max, float(d.max()))
            if batch.labels is not None:
                has_labels = True
                correct_o += int((po == batch.labels).sum())
                correct_r += int((pr == batch.labels).sum())
            n += len(batch)
            predictions += po.numel()  # per position when a model's logits are per token
            advance(len(batch))
            # Later batches as large as the activation budget allows (at least --batch-size):
            # fewer, larger passes; every activation is cached for the interchange runs anyway.
            per_sample = sum(t[:1].numel() * t.element_size() for t in (*vo.values(), *vr.values(), *(u for f in (*fo, *fr) for u in f)))
            size = max(batch_size, _SWAP_BUDGET // max(per_sample, 1))
    base_pred = _cat(preds)
    all_inputs = [_cat(parts) for parts in zip(*inputs)]

    joined = {level: {k: _cat(v) for k, v in values[level].items()} for level in values}
    finite: dict[str, dict[str, bool]] = {"low": {}, "high": {}}
    memo: dict[str, dict[str, Any]] = {"low": {}, "high": {}}

    def cache(level: str, i: int, ds: Any) -> _Cache:
        parts = [f[i] for f in frontiers[level]]
        return _Cache(ds, all_inputs, joined[level], ds.concat(parts) if parts[0] else [], finite[level], memo[level])

    # 3. Interchange interventions: each site, then all of them.
    runs: list[_Swaps] = []
    with prog("interchange", swaps * len(groups), "swaps") as advance:
        for i, (names, label) in enumerate(groups):
            low, high = cache("low", i, ds_low[i]), cache("high", i, ds_high[i])
            runs.append(_run_swaps(original, reduced, plan, names, low, high, base_pred, label, swaps, p, seed, batch_size, advance))
    summaries = _site_results(runs)
    # 4. ONNX parity.
    onnx_diff = onnx_parity(onnx, reduced, inputs) if onnx else None
    return _report(
        original, reduced, plan, summaries, len(chosen), thresholds, settings, fe, scale, agree / predictions, kl_sum / predictions, dl_sum / predictions, dl_max,
        correct_o / n if has_labels else None, correct_r / n if has_labels else None, n, onnx_diff, routed_notes, None,
    )


def _report(
    original: Any, reduced: Any, plan: Any, summaries: list[SiteResult], n_sites: int, thresholds: Thresholds, settings: dict[str, Any],
    fe: float, scale: float, agreement: float, kl: float, dl_mean: float, dl_max: float, acc_o: float | None, acc_r: float | None,
    samples: int, onnx_diff: float | None, extra_notes: list[str], tokens: Any,
) -> VerifyReport:
    """The report: thresholds checked, notes added (``summaries``: one per site, then all sites)."""
    results = summaries[:n_sites]
    all_result = summaries[n_sites] if len(summaries) > n_sites else None
    failures: list[str] = []
    checked = results + ([all_result] if all_result is not None else [])
    if thresholds.min_iia is not None:
        failures += [f"IIA {r.iia:.4f} < {thresholds.min_iia} at {r.name}" for r in checked if r.iia < thresholds.min_iia]
    if thresholds.max_kl is not None:
        failures += [f"KL {r.kl:.4f} > {thresholds.max_kl} at {r.name}" for r in checked if r.kl > thresholds.max_kl]
    if thresholds.max_fold_error is not None and fe > thresholds.max_fold_error:
        failures.append(f"fold error {fe:.3g} > {thresholds.max_fold_error}")
    notes = list(extra_notes)
    if any(original.site(s.name).fold == "interior-exact" for s in plan.sites if s.replaced):
        notes.append("interior-exact sites: the fold error includes the zero-padding border effect")
    if not all(r.certificate_holds for r in checked):
        notes.append("the margin certificate exceeded the measured IIA: please report this")
    return VerifyReport(
        fold_error=fe,
        fold_error_relative=fe / max(scale, 1e-30),
        agreement=agreement,
        kl=kl,
        dlogit_mean=dl_mean,
        dlogit_max=dl_max,
        accuracy_original=acc_o,
        accuracy_reduced=acc_r,
        samples=samples,
        sites=tuple(results),
        all_sites=all_result,
        onnx_max_abs_diff=onnx_diff,
        failures=tuple(failures),
        settings=settings,
        inputs={"original": original.sha256, "reduced": reduced.sha256},
        notes=tuple(notes),
        unit="sample" if tokens is None else "token",
        tokens=tokens,
    )
