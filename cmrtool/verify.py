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

Site activations of every base and source are computed once; each swap then re-runs only the
network after the site (:class:`cmrtool.backends.torchscript.Downstream`; an nn.Module re-runs
the whole forward with hooks, :class:`cmrtool.backends.module.HookDownstream`), in batches.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from cmrtool import __version__
from cmrtool.errors import InputError

__all__ = ["SiteResult", "VerifyReport", "Thresholds", "verify", "wilson", "margin_certificate", "interchange", "prepare_interchange"]

VERIFY_SCHEMA_VERSION = 1
ALL_SITES = "all"
_SWAP_BUDGET = 32 << 20  # bytes of cached activations gathered per interchange pass


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a proportion k/n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, center - half)
    hi = 1.0 if k == n else min(1.0, center + half)  # exact at the ends, where rounding would bite
    return (lo, hi)


def margin_certificate(margins: torch.Tensor, d2: float) -> tuple[float, float | None]:
    """Theorem 2's bound ``sup_ε [1 − P(m ≤ 2ε) − D2/ε²]``, clamped at 0, and its ε.

    Between jumps of the empirical CDF the bound rises with ε, so the supremum is approached
    just below each distinct margin m_(k): ``1 − #{m < m_(k)}/n − 4·D2/m_(k)²``.
    """
    m = margins.to(torch.float64).clamp_min(0)
    n = m.numel()
    if n == 0:
        return 0.0, None
    values, counts = torch.unique(m, sorted=True, return_counts=True)
    below = torch.cumsum(counts, 0) - counts  # #{m < value}
    positive = values > 0
    if d2 == 0:
        # No distortion: the bound is 1 − P(m = 0) (ties can always flip), approached as ε → 0.
        zero = int(counts[~positive].sum()) if (~positive).any() else 0
        return 1.0 - zero / n, 0.0
    if not positive.any():
        return 0.0, None
    bound = 1.0 - below[positive].to(torch.float64) / n - 4.0 * d2 / values[positive].square()
    best = int(torch.argmax(bound))
    value = float(bound[best])
    return (max(0.0, value), float(values[positive][best]) / 2 if value > 0 else None)


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
        }


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Per-row KL(softmax p ‖ softmax q), float64."""
    return _kl_logs(F.log_softmax(p_logits.to(torch.float64), dim=-1), F.log_softmax(q_logits.to(torch.float64), dim=-1))


def _kl_logs(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """Per-row KL from log-probabilities."""
    return (lp.exp() * (lp - lq)).sum(-1)


def _margin(z: torch.Tensor) -> torch.Tensor:
    top = torch.topk(z.to(torch.float64), 2, dim=-1).values
    return top[:, 0] - top[:, 1]


def _unit_mask(kind: str, mask: torch.Tensor, rank: int, group: int = 1) -> torch.Tensor:
    """A per-swap unit mask ``(b, width)`` shaped to broadcast over a site value of ``rank``
    (each unit of a grouped site, e.g. a head, covers ``group`` channels)."""
    if group != 1:
        mask = mask.repeat_interleave(group, dim=1)
    b, w = mask.shape
    if kind == "channel":
        return mask.reshape(b, w, *([1] * (rank - 2)))
    return mask.reshape(b, *([1] * (rank - 2)), w)


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


def _draw(n: int, swaps: int, width: int, p: float, seed: int, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bases, sources and retained-unit masks; the stream depends only on (seed, site name)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    base = torch.randint(n, (swaps,), generator=g)
    source = torch.randint(n, (swaps,), generator=g)
    mask = torch.rand(swaps, width, generator=g) < p
    return base, source, mask


@dataclass
class _Cache:
    """Clean activations of every held-out sample, for one model and one site set."""

    downstream: Any
    inputs: list[torch.Tensor]
    values: dict[str, torch.Tensor]
    frontier: list[torch.Tensor]


def prepare_interchange(original: Any, reduced: Any, names: Sequence[str], inputs: Sequence[torch.Tensor]) -> tuple[_Cache, _Cache]:
    """Clean activations of O and R on ``inputs`` (one batch) for interchange runs on ``names``."""
    caches = []
    with torch.no_grad():
        for model in (original, reduced):
            ds = _downstreams(model, [(list(names), "")], inputs)[0]
            _, vals, fronts = model.capture_for([ds], inputs)
            caches.append(_Cache(ds, list(inputs), vals, fronts[0]))
    return caches[0], caches[1]


def interchange(
    low: _Cache,
    high: _Cache,
    plan: Any,
    low_model: Any,
    high_model: Any,
    base: torch.Tensor,
    source: torch.Tensor,
    masks: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Low- and high-level logits of a batch of swaps.

    Args:
        low, high: clean activations of O and R for every sample (same site set).
        plan: the reduced model's plan (kept units per site).
        base, source: sample indices, ``(b,)``.
        masks: site → boolean ``(b, kept)`` over the site's retained units (1 = take the source).
    """
    z = []
    for cache, model, level in ((low, low_model, "low"), (high, high_model, "high")):
        ds = cache.downstream
        edits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        first_value = None
        for name in ds.order:
            site = model.site(name)
            src = cache.values[name].index_select(0, source)
            keep = masks[name]
            if level == "low":  # retained units of O's full-width site value
                full = torch.zeros(keep.shape[0], site.width, dtype=torch.bool)
                full[:, list(plan.site(name).kept)] = keep
                keep = full
            m = _unit_mask(site.kind, keep, src.dim(), site.group)
            if first_value is None:
                first_value = torch.where(m, src, cache.values[name].index_select(0, base))
            else:
                edits[name] = (m, src)
        inputs = [t.index_select(0, base) for t in cache.inputs]
        with torch.no_grad():
            z.append(ds.run(inputs, first_value, ds.select(cache.frontier, base), edits))
    return z[0], z[1]


def _site_result(name: str, retained: int, zl: torch.Tensor, zh: torch.Tensor, base_pred: torch.Tensor) -> SiteResult:
    n = zl.shape[0]
    lp, lq = F.log_softmax(zl.to(torch.float64), dim=-1), F.log_softmax(zh.to(torch.float64), dim=-1)
    agree = zl.argmax(-1) == zh.argmax(-1)
    k = int(agree.sum())
    diff = zh.to(torch.float64) - zl.to(torch.float64)
    d2 = float(diff.square().sum(-1).mean())
    dinf2 = float(diff.abs().amax(-1).square().mean())
    margins = _margin(zl)
    cert, eps = margin_certificate(margins, d2)
    changed = zl.argmax(-1) != base_pred
    nc = int(changed.sum())
    return SiteResult(
        name=name,
        swaps=n,
        retained=retained,
        iia=k / n,
        iia_ci=wilson(k, n),
        kl=float(_kl_logs(lp, lq).mean()),
        kl_reverse=float(_kl_logs(lq, lp).mean()),
        d2=d2,
        certificate=cert,
        certificate_epsilon=eps,
        dinf2=dinf2,
        certificate_linf=margin_certificate(margins, dinf2)[0],
        changed=nc,
        iia_changed=float(agree[changed].double().mean()) if nc else None,
    )


def _run_swaps(
    original: Any, reduced: Any, plan: Any, names: list[str], low: _Cache, high: _Cache, base_pred: torch.Tensor,
    label: str, swaps: int, p: float, seed: int, batch_size: int, advance: Callable[[int], None],
) -> SiteResult:
    n = base_pred.shape[0]
    kept = {s: len(plan.site(s).kept) for s in names}
    base, source, _ = _draw(n, swaps, 1, p, seed, label)
    masks = {s: _draw(n, swaps, kept[s], p, seed, f"{label}/{s}")[2] for s in names}
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
    return _site_result(label, sum(kept.values()), torch.cat(zl), torch.cat(zh), base_pred.index_select(0, base))


def _downstreams(model: Any, groups: Sequence[tuple[list[str], str]], example: Sequence[torch.Tensor]) -> list[Any]:
    out = []
    for names, _ in groups:
        ds = model.downstream(names, example)
        if ds is None:
            raise InputError(
                f"cannot separate the network after site {names[0]} of {model.path} for interchange runs",
                "verify needs the tensors read after the site to have a batch axis; use --site to skip this site",
            )
        out.append(ds)
    return out


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
        data: held-out data (a :class:`cmrtool.data.Dataset`).
        swaps: interchange interventions per site (and for all sites together).
        p: probability that a retained unit takes the source's value.
        seed: seed of the swap and mask draws.
        sites: verify only these plan sites (default: every site of the plan).
        batch_size: samples or swaps per pass.
        thresholds: bounds that decide ``passed``.
        onnx: an ONNX export of ``reduced`` to compare with it.
        progress: ``progress(description, total, unit)`` context manager yielding ``advance(n)``.
    """
    import contextlib

    from cmrtool.compile import clamp_edits, site_ranks
    from cmrtool.errors import UsageError
    from cmrtool.export import onnx_parity

    plan = _check_pair(original, reduced)
    planned = [s.name for s in plan.sites]
    if sites:
        unknown = [s for s in sites if s not in planned]
        if unknown:
            raise InputError(f"site {unknown[0]} is not in the reduced model's plan", f"planned sites: {', '.join(planned)}")
    chosen = original.site_order([s for s in planned if not sites or s in set(sites)])
    if swaps < 1 or not (0.0 <= p <= 1.0):
        raise UsageError(f"need --swaps ≥ 1 and --p in [0, 1], got {swaps} and {p}", "e.g. --swaps 2000 --p 0.5")
    groups = [([s], s) for s in chosen] + ([(chosen, ALL_SITES)] if len(chosen) > 1 else [])

    def prog(desc: str, total: int, unit: str = "samples") -> Any:
        return progress(desc, total, unit) if progress is not None else contextlib.nullcontext(lambda k: None)

    # 1-2. Fold error and plain fidelity, streaming over the data; the same passes cache the
    # clean site activations and frontiers that the interchange runs start from.
    inputs: list[list[torch.Tensor]] = []
    values: dict[str, dict[str, list[torch.Tensor]]] = {"low": {}, "high": {}}
    frontiers: dict[str, list[list[list[torch.Tensor]]]] = {"low": [], "high": []}
    preds: list[torch.Tensor] = []
    fe = scale = kl_sum = dl_sum = dl_max = 0.0
    agree = n = correct_o = correct_r = 0
    has_labels = False
    ds_low = ds_high = None
    edits = None
    with prog("fidelity", data.n) as advance, torch.no_grad():
        for batch in data.batches(batch_size):
            x = list(batch.inputs)
            if ds_low is None:
                ds_low, ds_high = _downstreams(original, groups, x), _downstreams(reduced, groups, x)
                edits = clamp_edits(original, plan, site_ranks(original, x, planned))
            zo, vo, fo = original.capture_for(ds_low, x)
            zr, vr, fr = reduced.capture_for(ds_high, x)
            zc, _ = original.run(x, edits=edits)
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
            kl_sum += float(_kl(zo, zr).sum())
            d = (zr - zo).abs()
            dl_sum += float(d.mean(-1).sum())
            dl_max = max(dl_max, float(d.max()))
            if batch.labels is not None:
                has_labels = True
                correct_o += int((po == batch.labels).sum())
                correct_r += int((pr == batch.labels).sum())
            n += len(batch)
            advance(len(batch))
    base_pred = torch.cat(preds)
    all_inputs = [torch.cat(parts) for parts in zip(*inputs)]

    def cache(level: str, i: int, ds: Any) -> _Cache:
        parts = [f[i] for f in frontiers[level]]
        return _Cache(ds, all_inputs, {k: torch.cat(v) for k, v in values[level].items()}, ds.concat(parts) if parts[0] else [])

    # 3. Interchange interventions: each site, then all of them.
    results: list[SiteResult] = []
    all_result = None
    with prog("interchange", swaps * len(groups), "swaps") as advance:
        for i, (names, label) in enumerate(groups):
            low, high = cache("low", i, ds_low[i]), cache("high", i, ds_high[i])
            r = _run_swaps(original, reduced, plan, names, low, high, base_pred, label, swaps, p, seed, batch_size, advance)
            if label == ALL_SITES:
                all_result = r
            else:
                results.append(r)

    # 4. ONNX parity.
    onnx_diff = onnx_parity(onnx, reduced, inputs) if onnx else None

    failures: list[str] = []
    checked = results + ([all_result] if all_result is not None else [])
    if thresholds.min_iia is not None:
        failures += [f"IIA {r.iia:.4f} < {thresholds.min_iia} at {r.name}" for r in checked if r.iia < thresholds.min_iia]
    if thresholds.max_kl is not None:
        failures += [f"KL {r.kl:.4f} > {thresholds.max_kl} at {r.name}" for r in checked if r.kl > thresholds.max_kl]
    if thresholds.max_fold_error is not None and fe > thresholds.max_fold_error:
        failures.append(f"fold error {fe:.3g} > {thresholds.max_fold_error}")
    notes = []
    if any(original.site(s.name).fold == "interior-exact" for s in plan.sites if s.replaced):
        notes.append("interior-exact sites: the fold error includes the zero-padding border effect")
    if not all(r.certificate_holds for r in checked):
        notes.append("the margin certificate exceeded the measured IIA: please report this")
    return VerifyReport(
        fold_error=fe,
        fold_error_relative=fe / max(scale, 1e-30),
        agreement=agree / n,
        kl=kl_sum / n,
        dlogit_mean=dl_sum / n,
        dlogit_max=dl_max,
        accuracy_original=correct_o / n if has_labels else None,
        accuracy_reduced=correct_r / n if has_labels else None,
        samples=n,
        sites=tuple(results),
        all_sites=all_result,
        onnx_max_abs_diff=onnx_diff,
        failures=tuple(failures),
        settings={"swaps": swaps, "p": p, "seed": seed, "sites": chosen, "batch_size": batch_size, "criterion": plan.criterion,
                  "min_iia": thresholds.min_iia, "max_kl": thresholds.max_kl, "max_fold_error": thresholds.max_fold_error},
        inputs={"original": original.sha256, "reduced": reduced.sha256},
        notes=tuple(notes),
    )
