"""Affine replacements: a replaced unit becomes ``β0 + β·a_P`` of r kept parent units.

Parents are the r kept units most correlated (in absolute value) with the replaced unit over the
calibration data. The coefficients solve the curvature-weighted ridge problem of the CMR paper
(appendix A.5, "Affine WLS"), per replaced unit j with design ``Φ = [1, a_P]``::

    min_θ  Σ_s g_s (Φ_s θ − a_s) + ½ Σ_s h_s (Φ_s θ − a_s)² + ½ λ ‖θ_P‖²
    ⇒  (Φᵀ D Φ + λ I_P) θ = Φᵀ D a − Φᵀ g,      D = diag(h)

with g, h the per-sample loss gradient and Gauss-Newton curvature of the unit
(:mod:`cmrtool.score.sensitivity`). cmrtool fits with the curvature weights but leaves the gradient
term out (g = 0, the mean-stationarity condition of Lemma 1): on calibration data that the model
fits, g is tiny wherever h is, and the term then dominates the solution (measured on the digits
MLP at keep 0.5: 25% accuracy with it, 96.7% without). Unweighted (h = 1) it is ordinary ridge
regression, which is what ``peer`` uses and what the scores of ``peer``/``cmr-affine`` are
computed from (the covariance matrix alone). λ is ``ridge`` times the mean curvature-weighted unit variance, so
the setting does not depend on the activations' scale. Folding: ``W'[:, P] += W[:, j] β_Pᵀ``,
``b' += W[:, j] β0`` (Theorem 1's affine case).

With ``parents=None`` (the default, ``--parents all``) every kept unit of the site is a parent:
one unweighted ridge fit per site from its streamed covariance, solved for all replaced units
at once (:func:`cmrtool.reduce.lsq.dense_fit`; per-unit curvature weights would need one |K|×|K|
system per replaced unit). Sites are gathered a few at a time so that at most
``gram_budget`` bytes of float64 covariance are held (one site at a time when a site's alone
exceeds it). Heads are fitted over their channels: a replaced head's (or key/value group's)
output channels on the kept heads' channels, folded into o_proj.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from cmrtool.io.data import Dataset
from cmrtool.plan import Replacement
from cmrtool.score.sensitivity import closed_form_weight, site_generator, site_sensitivity
from cmrtool.sites import Site
from cmrtool.score.stats import Comoments, as_samples

__all__ = [
    "conditional_variance",
    "peer_residual_variance",
    "choose_parents",
    "fit_from_covariance",
    "fit_affine",
    "fit_dense",
    "check_parents",
    "check_ridge",
]

GRAM_BUDGET = 1 << 30  # bytes of float64 covariance held at once by fit_dense


def check_ridge(ridge: float) -> None:
    """``--ridge``: a finite number ≥ 0 (0 is allowed: the fit then damps only if it must)."""
    import math

    from cmrtool.errors import UsageError

    if not (isinstance(ridge, (int, float)) and math.isfinite(ridge) and ridge >= 0):
        raise UsageError(f"--ridge must be a finite number ≥ 0, got {ridge}", "e.g. --ridge 1e-3 (relative to the mean kept-unit variance)")


def check_parents(parents: int | str | None) -> int | None:
    """``--parents``: ``all`` (None: every kept unit) or a positive number of parents per unit."""
    from cmrtool.errors import UsageError

    if parents is None or (isinstance(parents, str) and parents.strip().lower() == "all"):
        return None
    try:
        r = int(parents)
    except (TypeError, ValueError):
        raise UsageError(f"--parents must be 'all' or a positive integer, got {parents!r}", "e.g. --parents all (every kept unit) or --parents 16") from None
    if isinstance(parents, float) or r < 1:
        raise UsageError(f"--parents must be 'all' or a positive integer, got {parents!r}", "e.g. --parents all (every kept unit) or --parents 16")
    return r


def _lam(cov: torch.Tensor, ridge: float) -> float:
    return float(ridge * cov.diagonal().mean().clamp_min(1e-30))


def conditional_variance(cov: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """Variance of each unit left after ridge-regressing it on all its peers: ``(1 − R²_j) Var_j``.

    R² comes from the correlation matrix with a ridge λ on it (``1 − R²_j = 1/[(C + λI)⁻¹]_jj − λ``
    up to the ridge), so rescaling units changes nothing but the variance factor, and the score
    ``(1 − R²) Var ‖W_c‖²`` keeps Proposition 2's invariance.
    """
    var = cov.diagonal().clamp_min(0)
    corr = _corr(cov)
    eye = torch.eye(cov.shape[0], dtype=cov.dtype)
    prec = torch.linalg.inv(corr + ridge * eye)
    unexplained = (1.0 / prec.diagonal() - ridge).clamp(0.0, 1.0)
    return unexplained * var


def _corr(cov: torch.Tensor) -> torch.Tensor:
    sd = cov.diagonal().clamp_min(1e-30).sqrt()
    return cov / sd[:, None] / sd[None, :]


def choose_parents(cov: torch.Tensor, units: Sequence[int], candidates: Sequence[int], r: int) -> dict[int, tuple[int, ...]]:
    """For each unit, the ``r`` candidates most correlated with it (ties: lower index), sorted."""
    corr = _corr(cov).abs()
    cand = torch.as_tensor(list(candidates), dtype=torch.long)
    out: dict[int, tuple[int, ...]] = {}
    for j in units:
        c = cand[cand != j]
        if r <= 0 or c.numel() == 0:
            out[j] = ()
            continue
        order = torch.sort(corr[j, c], descending=True, stable=True).indices[: min(r, c.numel())]
        out[j] = tuple(sorted(int(i) for i in c[order]))
    return out


def _solve(cov_pp: torch.Tensor, cov_pj: torch.Tensor, lam: float) -> torch.Tensor:
    eye = torch.eye(cov_pp.shape[0], dtype=cov_pp.dtype)
    return torch.linalg.solve(cov_pp + lam * eye, cov_pj)


def fit_from_covariance(mean: torch.Tensor, cov: torch.Tensor, j: int, parents: Sequence[int], ridge: float) -> tuple[float, list[float]]:
    """Ridge regression of unit j on ``parents`` from the mean and covariance: (β0, β)."""
    if not parents:
        return float(mean[j]), []
    p = torch.as_tensor(list(parents), dtype=torch.long)
    beta = _solve(cov[p][:, p], cov[p, j], _lam(cov, ridge))
    return float(mean[j] - beta @ mean[p]), [float(b) for b in beta]


def peer_residual_variance(cov: torch.Tensor, r: int, ridge: float = 1e-3) -> torch.Tensor:
    """Per unit: variance left by the ridge fit on its r most correlated peers (all other units).

    Fitted on standardized units (ridge on the correlation matrix) and scaled back by the unit's
    variance, so the result is invariant to rescaling the parents and scales as Var_j.
    """
    width = cov.shape[0]
    parents = choose_parents(cov, range(width), range(width), r)
    corr = _corr(cov)
    var = cov.diagonal().clamp_min(0)
    out = torch.empty(width, dtype=torch.float64)
    for j in range(width):
        p = torch.as_tensor(parents[j], dtype=torch.long)
        if p.numel() == 0:
            out[j] = var[j]
            continue
        beta = _solve(corr[p][:, p], corr[p, j], ridge)
        unexplained = 1.0 - 2 * beta @ corr[p, j] + beta @ corr[p][:, p] @ beta
        out[j] = unexplained.clamp(0.0, 1.0) * var[j]
    return out


def fit_affine(
    model: Any,
    data: Dataset,
    sites: Sequence[Site],
    replaced: dict[str, Sequence[int]],
    kept: dict[str, Sequence[int]],
    parents: int | None = None,
    ridge: float = 1e-3,
    weighted: bool = True,
    curvature: str = "auto",
    seed: int = 0,
    batch_size: int = 256,
    limit: int | None = None,
    progress: Callable[[int], None] | None = None,
    intercept: bool = True,
) -> dict[str, Any]:
    """Affine replacements for the replaced units of each site.

    ``parents=None``: the dense fit on every kept unit (:func:`fit_dense`, unweighted), with or
    without ``intercept``. Otherwise pass 1 gathers each site's covariance and picks every
    replaced unit's ``parents`` among the kept units; unweighted, the ridge fits come from the
    covariance; weighted, pass 2 accumulates the curvature-weighted normal equations of every
    replaced unit and solves them.

    Returns:
        site → a dense :class:`~cmrtool.plan.Replacement`, or (intercepts, parents,
        coefficients) aligned with ``replaced[site]``.
    """
    if parents is None:
        return fit_dense(model, data, sites, replaced, kept, ridge, intercept, batch_size, limit, progress)
    if not intercept:
        from cmrtool.errors import UsageError

        raise UsageError("--replacement affine-nobias fits on every kept unit", "drop --parents (or pass --parents all)")
    grouped = [s.name for s in sites if s.group != 1]
    if grouped:
        from cmrtool.errors import UsageError

        raise UsageError(f"site {grouped[0]} is grouped (attention heads): its affine fit uses every kept head", "drop --parents (or pass --parents all)")
    com = _comoments(model, data, sites, batch_size, limit, progress)
    chosen = {s.name: choose_parents(com[s.name].cov, replaced[s.name], kept[s.name], parents) for s in sites}
    if not weighted:
        out = {}
        for s in sites:
            fits = [fit_from_covariance(com[s.name].mean, com[s.name].cov, j, chosen[s.name][j], ridge) for j in replaced[s.name]]
            out[s.name] = ([f[0] for f in fits], [chosen[s.name][j] for j in replaced[s.name]], [f[1] for f in fits])
        return out
    return _weighted_fits(model, data, sites, replaced, chosen, com, ridge, curvature, seed, batch_size, limit, progress)


def _comoments(
    model: Any, data: Dataset, sites: Sequence[Site], batch_size: int, limit: int | None, progress: Callable[[int], None] | None,
) -> dict[str, Comoments]:
    """One pass over the data: each site's mean and co-moments over its channels."""
    com = {s.name: Comoments(s.channels) for s in sites}
    names = [s.name for s in sites]
    with torch.no_grad():
        for batch in data.batches(batch_size, limit, labels=False):
            _, values = model.run(list(batch.inputs), capture=names)
            for s in sites:
                com[s.name].update_value(values[s.name], s.unit_axis)
            del values
            if progress is not None:
                progress(len(batch))
    return com


def _site_chunks(sites: Sequence[Site], budget: int) -> list[list[Site]]:
    """Consecutive sites whose float64 covariances fit ``budget`` together (at least one each)."""
    chunks: list[list[Site]] = []
    used = budget + 1
    for s in sites:
        need = 8 * s.channels * s.channels
        if used + need > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(s)
        used += need
    return chunks


def fit_dense(
    model: Any, data: Dataset, sites: Sequence[Site], replaced: dict[str, Sequence[int]], kept: dict[str, Sequence[int]],
    ridge: float = 1e-3, intercept: bool = True, batch_size: int = 256, limit: int | None = None,
    progress: Callable[[int], None] | None = None, gram_budget: int = GRAM_BUDGET,
) -> dict[str, Replacement]:
    """Dense affine replacements (every kept unit a parent) from each site's streamed covariance.

    One pass over the data per chunk of sites (:func:`_site_chunks`); each site's covariance is
    freed as soon as its fit is made. ``progress`` counts ``data.n`` in total.
    """
    from cmrtool.compile.fold import unit_rows
    from cmrtool.reduce.lsq import fit_blocks

    todo = [s for s in sites if replaced[s.name]]
    out: dict[str, Replacement] = {}
    chunks = _site_chunks(todo, gram_budget)
    for i, chunk in enumerate(chunks):
        # Every pass advances 1/len(chunks) of each batch: data.n in all.
        share = None if progress is None else (lambda n, i=i: progress(n * (i + 1) // len(chunks) - n * i // len(chunks)))
        com = _comoments(model, data, chunk, batch_size, limit, share)
        for s in chunk:
            # Gather the K×K and S×K blocks, then free the accumulator before factorising: a
            # 14,336-unit FFN at keep 0.5 holds 1.6 GB, then 2 × 0.4 GB blocks and the factor.
            c = com.pop(s.name)
            k_ch, s_ch = unit_rows(kept[s.name], s.group), unit_rows(replaced[s.name], s.group)
            mean, g_kk, g_sk = c.mean, c.block(k_ch, k_ch), c.block(s_ch, k_ch)
            del c
            b0, coef = fit_blocks(mean[k_ch], mean[s_ch], g_kk, g_sk, ridge, intercept)
            out[s.name] = Replacement.dense_affine(b0, coef)
    return out


def _weighted_fits(
    model: Any, data: Dataset, sites: Sequence[Site], replaced: dict[str, Sequence[int]], chosen: dict[str, dict[int, tuple[int, ...]]],
    com: dict[str, Comoments], ridge: float, curvature: str, seed: int, batch_size: int, limit: int | None,
    progress: Callable[[int], None] | None,
) -> dict[str, tuple[list[float], list[tuple[int, ...]], list[list[float]]]]:
    names = [s.name for s in sites]
    tensors = model.tensors()
    weights = {s.name: closed_form_weight(s, tensors) for s in sites}
    generators = {s.name: site_generator(seed, s.name, 29) for s in sites}
    # Per replaced unit j: A_j = Σ h φφᵀ, b_j = Σ (h a − g) φ, with φ = [1, a_P] (padded to r).
    systems: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for s in sites:
        rep = list(replaced[s.name])
        r = max((len(chosen[s.name][j]) for j in rep), default=0)
        idx = torch.zeros(len(rep), r, dtype=torch.long)
        valid = torch.zeros(len(rep), r + 1, dtype=torch.bool)
        valid[:, 0] = True
        for i, j in enumerate(rep):
            ps = chosen[s.name][j]
            idx[i, : len(ps)] = torch.as_tensor(ps, dtype=torch.long)
            valid[i, 1 : len(ps) + 1] = True
        systems[s.name] = (idx, valid, torch.zeros(len(rep), r + 1, r + 1, dtype=torch.float64), torch.zeros(len(rep), r + 1, dtype=torch.float64))
    downstreams: dict[str, Any] = {}
    for batch in data.batches(batch_size, limit, labels=False):
        x = list(batch.inputs)
        if not downstreams:
            downstreams = {n: model.downstream([n], x) for n in names}
        with torch.no_grad():
            logits, values, frontiers = model.capture_for([downstreams[n] for n in names], x)
        for k, s in enumerate(sites):
            rep = list(replaced[s.name])
            if not rep:
                continue
            v = values[s.name]
            sens = site_sensitivity(s, v, logits, None, weights[s.name], downstreams[s.name], x, frontiers[k],
                                    want_grad=False, want_curv=True, mode=curvature, generator=generators[s.name])
            a = as_samples(v, s.unit_axis).to(torch.float64)  # (n, width)
            h = as_samples(sens.curv, s.unit_axis)[:, rep]  # (n, |S|)
            g = torch.zeros_like(h)  # the gradient term is left out (module docstring)
            idx, valid, A, b = systems[s.name]
            phi = torch.cat([torch.ones(a.shape[0], len(rep), 1, dtype=torch.float64), a[:, idx]], dim=2)  # (n, |S|, r+1)
            phi = phi * valid.unsqueeze(0)
            A += torch.einsum("nsi,ns,nsk->sik", phi, h, phi)
            b += torch.einsum("nsi,ns->si", phi, h * a[:, rep] - g)
        if progress is not None:
            progress(len(batch))
    out = {}
    for s in sites:
        rep = list(replaced[s.name])
        idx, valid, A, b = systems[s.name]
        intercepts, coefs = [], []
        scale = float(com[s.name].cov.diagonal().mean().clamp_min(1e-30))
        for i, j in enumerate(rep):
            k = int(valid[i].sum())
            Ai, bi = A[i, :k, :k].clone(), b[i, :k]
            hsum = float(Ai[0, 0]) if float(Ai[0, 0]) > 0 else 1.0
            Ai[1:, 1:] += ridge * scale * hsum * torch.eye(k - 1, dtype=torch.float64)  # ridge on β_P only
            if float(A[i, 0, 0]) <= 0:  # no curvature: fall back to the unweighted fit
                b0, beta = fit_from_covariance(com[s.name].mean, com[s.name].cov, j, chosen[s.name][j], ridge)
            else:
                theta = torch.linalg.lstsq(Ai, bi.unsqueeze(1)).solution.squeeze(1)
                b0, beta = float(theta[0]), [float(t) for t in theta[1:]]
            intercepts.append(b0)
            coefs.append(beta)
        out[s.name] = (intercepts, [chosen[s.name][j] for j in rep], coefs)
    return out
