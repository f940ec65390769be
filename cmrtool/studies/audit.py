"""Audits no other tool offers (DESIGN §3.6).

**Reparameterization audit.** A ReLU unit can be rescaled without changing the function: scale
its producer by s > 0 (its weight row and bias, or the BatchNorm's γ and β when a BatchNorm
normalizes the producer away) and its consumers' columns by 1/s (Proposition 2). For every seed
and every ReLU site, each unit of the site gets s ~ LogUniform(lo, hi); the audit checks the
function is unchanged (max logit change), re-scores the twin with each criterion, and reports
the Jaccard overlap of the site's kept sets (mean ± sd over seeds). Sites are rescaled one at a
time: rescaling a later site also rescales the rows of an earlier site's consumer, which is not
a change of the earlier site's own coordinates. The CMR paper's Table 2: ``cmr-logit`` 1.000,
``vbp`` near the chance floor (≈ 1/3 for half the units).

**Criterion validation** (``validate``): the true damage of replacing each of N sampled units
alone by its mean, ΔKL = mean KL(O ‖ O with the unit clamped) over the data, against each
criterion's score: Spearman and Kendall rank correlations (seed 003's causal-validity table).
Pooled over sites, because a criterion is only useful across sites if its scale is shared.
"""

from __future__ import annotations

import math
import tempfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cmrtool import __version__
from cmrtool.reduce.plans import make_plan
from cmrtool.errors import UnsupportedModelError
from cmrtool.score.scoring import score_model
from cmrtool.sites import Site

__all__ = ["AuditReport", "rescaled_tensors", "audit", "spearman", "kendall"]

AUDIT_SCHEMA_VERSION = 1
HOMOGENEOUS = ("relu", "leaky_relu", "prelu")  # act(s·x) = s·act(x) for s > 0


def _bn_module(site: Site) -> str | None:
    for p in site.producers:
        if p.name.endswith(".running_mean"):
            return p.name[: -len(".running_mean")]
    return None


def rescaled_tensors(
    tensors: dict[str, torch.Tensor], sites: Sequence[Site], scales: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A functionally identical parameterization: unit j of site s scaled by ``scales[s][j]``."""
    out = {k: v.clone() for k, v in tensors.items()}
    for site in sites:
        s = scales[site.name].to(torch.float64)
        bn = _bn_module(site)
        targets = [f"{bn}.weight", f"{bn}.bias"] if bn else [p.name for p in site.producers if p.name in out]
        for name in targets:
            if name in out:
                t = out[name]
                out[name] = (t.to(torch.float64) * s.reshape(-1, *([1] * (t.dim() - 1)))).to(t.dtype)
        for c in site.consumers:
            from cmrtool.compile.fold import unit_columns

            w = out[c.weight].to(torch.float64)
            for j in range(site.width):
                w[:, unit_columns(c, site.width, [j])] /= s[j]
            out[c.weight] = w.to(tensors[c.weight].dtype)
    return out


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks with ties averaged (1-based)."""
    x = x.to(torch.float64)
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=torch.float64)
    for v in torch.unique(x):
        tie = x == v
        if int(tie.sum()) > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float(ra @ rb) / den if den > 0 else float("nan")


def kendall(a: torch.Tensor, b: torch.Tensor) -> float:
    """Kendall's tau-b."""
    da = torch.sign(a[:, None] - a[None, :])
    db = torch.sign(b[:, None] - b[None, :])
    iu = torch.triu_indices(len(a), len(a), 1)
    da, db = da[iu[0], iu[1]], db[iu[0], iu[1]]
    num = float((da * db).sum())
    den = math.sqrt(float((da != 0).sum()) * float((db != 0).sum()))
    return num / den if den > 0 else float("nan")


@dataclass(frozen=True)
class AuditReport:
    sites: dict[str, dict[str, tuple[float, float]]]  # site → criterion → (jaccard mean, sd)
    max_logit_change: float
    seeds: int
    scale_range: tuple[float, float]
    keep: float
    skipped: dict[str, str] = field(default_factory=dict)
    validation: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": AUDIT_SCHEMA_VERSION,
            "tool_version": __version__,
            "keep": self.keep,
            "seeds": self.seeds,
            "scale_range": list(self.scale_range),
            "max_logit_change": self.max_logit_change,
            "sites": [
                {"name": n, "criteria": {c: {"jaccard_mean": m, "jaccard_sd": sd} for c, (m, sd) in crit.items()}}
                for n, crit in self.sites.items()
            ],
            "skipped": [{"name": n, "reason": r} for n, r in self.skipped.items()],
            "validation": self.validation,
        }


def _jaccard(a: set[int], b: set[int]) -> float:
    return len(a & b) / max(1, len(a | b))


def _kept(model: Any, data: Any, criterion: str, sites: Sequence[Site], keep: float, seed: int, batch_size: int) -> dict[str, set[int]]:
    report = score_model(model, data, criterion, sites, seed=seed, batch_size=batch_size)
    plan = make_plan(report, sites, keep=keep)
    return {sp.name: set(sp.kept) for sp in plan.sites}


def audit(
    model: Any,
    data: Any,
    criteria: Sequence[str] = ("cmr-logit", "vbp", "magnitude", "random"),
    sites: Sequence[Site] | None = None,
    keep: float = 0.5,
    seeds: int = 10,
    scale_range: tuple[float, float] = (0.01, 100.0),
    validate: int = 0,
    batch_size: int = 256,
    progress: Callable[[int], None] | None = None,
) -> AuditReport:
    """Run the reparameterization audit (and, with ``validate > 0``, criterion validation)."""
    chosen = list(sites if sites is not None else model.sites)
    skipped = {s.name: f"activation {s.activation} is not positively homogeneous" for s in chosen if s.activation not in HOMOGENEOUS}
    ok = [s for s in chosen if s.activation in HOMOGENEOUS]
    if not ok:
        raise UnsupportedModelError(
            "no ReLU sites to rescale: the audit needs positively homogeneous activations",
            "the reparameterization audit applies to ReLU-family sites (relu, leaky_relu, prelu)",
        )
    lo, hi = math.log(scale_range[0]), math.log(scale_range[1])
    base = {c: _kept(model, data, c, ok, keep, 0, batch_size) for c in criteria}
    jac: dict[str, dict[str, list[float]]] = {s.name: {c: [] for c in criteria} for s in ok}
    worst = 0.0
    tensors = model.tensors()
    x = data.read(0, min(data.n, 256)).inputs
    with torch.no_grad():
        ref = model.forward(list(x)).to(torch.float64)
    with tempfile.TemporaryDirectory(prefix="cmrtool-audit-") as tmp:
        for seed in range(seeds):
            g = torch.Generator().manual_seed(seed * 7919 + 1)
            # One site at a time: rescaling a later site's units also rescales the rows of an
            # earlier site's consumer, which is not a change of the earlier site's coordinates.
            for site in ok:
                scales = {site.name: torch.exp(torch.empty(site.width, dtype=torch.float64).uniform_(lo, hi, generator=g))}
                rescaled = rescaled_tensors(tensors, [site], scales)
                path = Path(tmp) / f"twin{seed}_{len(jac[site.name][criteria[0]])}_{site.name}.pt"
                if hasattr(model, "twin"):  # nn.Module backend: an in-memory copy
                    twin = model.twin(rescaled)
                else:  # TorchScript: the rescaled graph written and loaded back, as a user would
                    model.write(path, rescaled, None)
                    twin = type(model)(str(path))
                with torch.no_grad():
                    worst = max(worst, float((twin.forward(list(x)).to(torch.float64) - ref).abs().max()))
                for c in criteria:
                    # random's draws follow the seed, as in the paper's random-selector control
                    kept = _kept(twin, data, c, [twin.site(site.name)], keep, seed + 1 if c == "random" else 0, batch_size)
                    jac[site.name][c].append(_jaccard(base[c][site.name], kept[site.name]))
                path.unlink(missing_ok=True)
            if progress is not None:
                progress(1)
    summary = {
        n: {c: (sum(v) / len(v), (sum((u - sum(v) / len(v)) ** 2 for u in v) / max(len(v) - 1, 1)) ** 0.5) for c, v in crit.items()}
        for n, crit in jac.items()
    }
    validation = _validate(model, data, criteria, chosen, validate, batch_size) if validate > 0 else None
    return AuditReport(summary, worst, seeds, scale_range, keep, skipped, validation)


def _validate(model: Any, data: Any, criteria: Sequence[str], sites: Sequence[Site], n_units: int, batch_size: int) -> dict[str, Any]:
    """ΔKL of replacing each sampled unit alone by its mean, vs each criterion's scores."""
    from cmrtool.compile.clamp import _unit_shape

    g = torch.Generator().manual_seed(zlib.crc32(b"validate"))
    pool = [(s, j) for s in sites for j in range(s.width)]
    pick = torch.randperm(len(pool), generator=g)[: min(n_units, len(pool))].tolist()
    units = [pool[i] for i in sorted(pick)]
    reports = {c: score_model(model, data, c, sites, batch_size=batch_size) for c in criteria}
    means = {s.name: reports[criteria[0]].site(s.name).mean for s in sites}
    x = data.read(0, min(data.n, 512)).inputs
    with torch.no_grad():
        ref = model.forward(list(x)).to(torch.float64)
        _, vals = model.run(list(x), capture=[s.name for s in sites])
        damage = []
        for s, j in units:
            mask = torch.zeros(s.width, dtype=torch.bool)
            mask[j] = True
            fill = torch.zeros(s.width, dtype=model.dtype)
            fill[j] = means[s.name][j]
            shape = _unit_shape(s, vals[s.name].dim())
            z, _ = model.run(list(x), edits={s.name: (mask.reshape(shape), fill.reshape(shape))})
            lp, lq = F.log_softmax(ref, -1), F.log_softmax(z.to(torch.float64), -1)
            damage.append(float((lp.exp() * (lp - lq)).sum(-1).mean()))
    dmg = torch.tensor(damage, dtype=torch.float64)
    out: dict[str, Any] = {"units": len(units), "damage": "mean KL(original ‖ original with the unit set to its mean)", "criteria": {}}
    for c in criteria:
        sc = torch.tensor([reports[c].site(s.name).scores[j] for s, j in units], dtype=torch.float64)
        out["criteria"][c] = {"spearman": spearman(sc, dmg), "kendall": kendall(sc, dmg)}
    return out
