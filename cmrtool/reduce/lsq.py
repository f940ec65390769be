"""Least-squares compensation: replaced units refit on ALL kept units of their site (CMR A.5).

Pure functions of a site's streamed statistics (count, mean, covariance in float64) and its
consumer weights, so a per-block engine inherits them. For kept units K and replaced units S
with mean μ and covariance Σ (second moments ``G = Σ + μμᵀ`` for the intercept-free fit):

**Dense ridge fit** (:func:`dense_fit`), every replaced unit at once::

    B = Σ_SK (Σ_KK + λI)⁻¹,   β0 = μ_S − B μ_K,   λ = ridge · mean_k Σ_kk

solved by one Cholesky factorisation of the |K|×|K| block and one triangular solve with |S|
right-hand sides. Intercept-free (``intercept=False``, for consumers whose format holds no
bias): ``B = G_SK (G_KK + λI)⁻¹`` with λ relative to the mean second moment, ``β0 = 0``.

**Fold** (A.5, Theorem 1's affine case): a linear consumer ``u = W a + b`` becomes
``W'[:, K] = W[:, K] + W[:, S] B``ᵀ-wise, i.e. ``W'_K = W_K + W_S B`` and ``b' = b + W_S β0``
(:mod:`cmrtool.compile.fold`).

**Residual** (:func:`residual_covariance`): the covariance left in ``a_S − (β0 + B a_K)``,
``Σ_SS − B Σ_KS − Σ_SK Bᵀ + B Σ_KK Bᵀ``; at λ = 0 it is the Schur complement
``Σ_SS − Σ_SK Σ_KK⁻¹ Σ_KS``. A linear consumer's output distortion is ``tr(W_S R W_Sᵀ)``.

**Greedy OBS removal** (:func:`greedy_removal`): the distortion after refitting S on K is
``tr(W_S (P_SS)⁻¹ W_Sᵀ)`` with ``P = (Σ + λI)⁻¹``. Removing one more unit j from the kept set
(the others refit) adds ``‖W'_{:,j}‖² / P_jj``, where W' are the consumer weights with the
earlier removals already folded in; then ``W' ← W' − W'_{:,j} P_{j,:} / P_jj`` and
``P ← P − P_{:,j} P_{j,:} / P_jj`` (rank-one updates, Optimal Brain Surgeon for a linear
layer). The first step's cost is ``‖W_{:,j}‖² · Var[a_j | all other units]``: the local
replaceability of ``two-axis-local-replaceability`` (residual variance given the peers) times
the consumer column norm². Running to the end gives one nested removal order, so any keep
fraction's kept set is a suffix of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["damping", "dense_fit", "fit_blocks", "residual_covariance", "greedy_removal", "removal_scores"]


def damping(diag: torch.Tensor, ridge: float) -> float:
    """λ = ridge · mean of ``diag`` (the kept units' variances): scale-free ridge."""
    return float(ridge * diag.mean().clamp_min(1e-30)) if diag.numel() else 0.0


def _cholesky(a: torch.Tensor, lam: float) -> torch.Tensor:
    """Cholesky factor of ``a + λI`` (``a``'s diagonal is shifted in place and restored); more
    damping (×10 at a time) if it is not positive definite in float64 (e.g. duplicated units
    with ridge 0)."""
    diag = a.diagonal()
    extra = lam if lam > 0 else 1e-12 * float(diag.abs().mean().clamp_min(1e-30))
    lam_try = lam
    for _ in range(12):
        diag.add_(lam_try)
        factor, info = torch.linalg.cholesky_ex(a)
        diag.sub_(lam_try)
        if int(info) == 0:
            return factor
        extra *= 10
        lam_try = lam + extra
    raise ValueError("the kept units' covariance is not positive definite even with damping")


def _block(cov: Any, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``cov[rows][:, cols]`` in float64, gathered directly (a tensor, or an accumulator with
    ``block(rows, cols)`` such as :class:`cmrtool.score.stats.Comoments`)."""
    if isinstance(cov, torch.Tensor):
        return cov[rows[:, None], cols[None, :]].to(torch.float64)
    return cov.block(rows, cols)


def dense_fit(
    mean: torch.Tensor, cov: Any, kept: Sequence[int], replaced: Sequence[int], ridge: float, intercept: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """β0 ``(|S|,)`` and B ``(|S|, |K|)`` of the ridge fit ``a_S ≈ β0 + B a_K`` (float64).

    ``cov`` is the covariance matrix or an accumulator with ``block``; only its K×K and S×K
    blocks are read (the S×S block is never formed).
    """
    k = torch.as_tensor(list(kept), dtype=torch.long)
    s = torch.as_tensor(list(replaced), dtype=torch.long)
    mean = mean.to(torch.float64)
    return fit_blocks(mean[k], mean[s], _block(cov, k, k), _block(cov, s, k), ridge, intercept)


def fit_blocks(
    mean_k: torch.Tensor, mean_s: torch.Tensor, g_kk: torch.Tensor, g_sk: torch.Tensor, ridge: float, intercept: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`dense_fit` from the covariance blocks Σ_KK and Σ_SK (overwritten: the caller's
    copies, so no further |K|² buffers are made besides the Cholesky factor)."""
    if not intercept:  # uncentered second moments: the fit through the origin
        g_kk.add_(torch.outer(mean_k, mean_k))
        g_sk.add_(torch.outer(mean_s, mean_k))
    if mean_k.numel() == 0:
        return (mean_s.clone() if intercept else torch.zeros_like(mean_s)), g_sk
    factor = _cholesky(g_kk, damping(g_kk.diagonal(), ridge))
    del g_kk
    coef = torch.cholesky_solve(g_sk.T.contiguous(), factor).T.contiguous()  # one solve, |S| right-hand sides
    b0 = mean_s - coef @ mean_k if intercept else torch.zeros_like(mean_s)
    return b0, coef


def residual_covariance(
    mean: torch.Tensor, cov: torch.Tensor, kept: Sequence[int], replaced: Sequence[int], b0: torch.Tensor, coef: torch.Tensor
) -> torch.Tensor:
    """Second moments of the fit's residual ``r = a_S − β0 − B a_K`` (|S|×|S|), from μ and Σ.

    ``E[r rᵀ] = (Σ_SS − BΣ_KS − Σ_SK Bᵀ + BΣ_KK Bᵀ) + m mᵀ`` with ``m = μ_S − β0 − Bμ_K`` (zero
    for the fit with intercept).
    """
    k = torch.as_tensor(list(kept), dtype=torch.long)
    s = torch.as_tensor(list(replaced), dtype=torch.long)
    c = cov.to(torch.float64)
    c_ss, c_sk, c_kk = c[s][:, s], c[s][:, k], c[k][:, k]
    r = c_ss - coef @ c_sk.T - c_sk @ coef.T + coef @ c_kk @ coef.T
    m = mean[s].to(torch.float64) - b0 - coef @ mean[k].to(torch.float64)
    return r + torch.outer(m, m)


def greedy_removal(cov: torch.Tensor, weights: torch.Tensor, ridge: float, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy OBS removal order of every unit and the distortion each removal adds.

    Args:
        cov: the site's covariance ``(width, width)``.
        weights: the consumer weights as ``(rows, width)``: column j is everything unit j feeds.
        ridge: λ = ridge · mean unit variance, added to the diagonal of Σ.
        block: rank-one updates deferred and applied together (one matrix product) every
            ``block`` removals; the step itself reads one column of P and W and ``Wᵀv``.

    Returns:
        ``order`` (long, width): unit removed at each step; ``added`` (float64): the output
        distortion ``‖W'_{:,j}‖²/P_jj`` that step adds (W' with earlier removals folded in).
        Ties go to the lower index, so the order is deterministic.
    """
    n = cov.shape[0]
    c = cov.to(torch.float64)
    p0 = torch.cholesky_inverse(_cholesky(c.clone(), damping(c.diagonal(), ridge)))
    w0 = weights.to(torch.float64).clone()
    # Current P = p0 − U Uᵀ and W' = w0 − V Uᵀ, with u = P_{:,j}/√P_jj, v = W'_{:,j}/√P_jj per
    # removal since the last flush; diag(P) and the column norms of W' are kept up to date.
    u_buf = torch.zeros(n, block, dtype=torch.float64)
    v_buf = torch.zeros(w0.shape[0], block, dtype=torch.float64)
    t = 0
    diag, norms = p0.diagonal().clone(), w0.square().sum(0)
    alive = torch.ones(n, dtype=torch.bool)
    order = torch.empty(n, dtype=torch.long)
    added = torch.empty(n, dtype=torch.float64)
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    for step in range(n):
        ok = alive & (diag > 1e-300)
        if not bool(ok.any()):  # numerically exhausted: the rest cost their own column
            cost = torch.where(alive, norms * c.diagonal(), inf)
        else:
            cost = torch.where(ok, norms.clamp_min(0.0) / diag.clamp_min(1e-300), inf)
        j = int(torch.argmin(cost))  # first minimum: the lower index on ties
        order[step], added[step] = j, cost[j]
        alive[j] = False
        uj = u_buf[j, :t]
        pj = p0[:, j] - u_buf[:, :t] @ uj
        if float(pj[j]) <= 1e-300:
            continue
        root = float(pj[j]) ** 0.5
        u = pj / root
        v = (w0[:, j] - v_buf[:, :t] @ uj) / root
        wv = w0.T @ v - u_buf[:, :t] @ (v_buf[:, :t].T @ v)  # W'ᵀ v
        norms.add_(u * u * float(v @ v) - 2 * u * wv)
        diag.sub_(u * u)
        u_buf[:, t], v_buf[:, t] = u, v
        t += 1
        if t == block:  # apply the deferred updates, and resync the running diagonal and norms
            p0.sub_(u_buf @ u_buf.T)
            w0.sub_(v_buf @ u_buf.T)
            u_buf.zero_()
            v_buf.zero_()
            t = 0
            diag, norms = p0.diagonal().clone(), w0.square().sum(0)
    return order, added


def removal_scores(order: torch.Tensor, added: torch.Tensor) -> torch.Tensor:
    """Per-unit scores from a removal order: the cumulative distortion when the unit goes,
    made strictly increasing along the order, so keeping the k highest scores keeps exactly the
    last k units of the order (the greedy's nested kept sets)."""
    total = torch.cumsum(added.clamp_min(0.0), 0)
    for t in range(1, total.numel()):
        if total[t] <= total[t - 1]:
            total[t] = torch.nextafter(total[t - 1], torch.tensor(float("inf"), dtype=torch.float64))
    scores = torch.empty_like(total)
    scores[order] = total
    return scores
