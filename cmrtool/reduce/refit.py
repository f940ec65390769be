"""Joint refit: the constants of a site's replaced units, fitted together (``--joint-refit``).

Per-unit constants (eq. (7)) ignore that the replaced units act on the logits together
(CMR paper §5.3, appendix A.3). Replacing the set S by c changes a sample's logits by
``Δz_s = G_s c − r_s``, where ``G_s = Σ_positions J_s[:, S]`` (q × |S|) and
``r_s = Σ_{S, positions} J_s a_s``. The second-order loss proxy with the Gauss-Newton curvature
``H_s = diag(p_s) − p_s p_sᵀ`` of the logits is minimized by

    (Σ_s G_sᵀ H_s G_s) c = Σ_s G_sᵀ (H_s r_s − (p_s − y_s))

(the gradient term vanishes for the KL-to-self loss used without labels). The system is usually
rank-deficient: the logits see only a q-dimensional image of the |S| constants (rank ≤ q − 1
through ``H_s``), so the solve is damped towards the per-unit constants c₀,
``(A + λI) c = b + λ c₀``, and c moves only along directions the curvature constrains. It is
accumulated in one pass over the calibration data, with the same three ways to get J as the per-unit curvature
(:mod:`cmrtool.score.sensitivity`): closed form for sites feeding the logits, one backward pass per
class (exact), or one Monte-Carlo draw ``u = e_ŷ − p`` per sample (``H_s ≈ u uᵀ``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from cmrtool.io.data import Dataset
from cmrtool.score.sensitivity import check_curvature, closed_form_weight, loss_labels, site_generator
from cmrtool.sites import Site

__all__ = ["joint_constants"]


def joint_constants(
    model: Any,
    data: Dataset,
    site: Site,
    replaced: Sequence[int],
    curvature: str = "auto",
    seed: int = 0,
    batch_size: int = 256,
    limit: int | None = None,
    progress: Callable[[int], None] | None = None,
    loss: str = "auto",
    start: Sequence[float] | None = None,
    damping: float = 0.1,
) -> list[float]:
    """Constants for ``replaced`` units of ``site`` minimizing the joint quadratic proxy, damped
    towards ``start`` (the per-unit constants): ``(A + λI) c = b + λ c₀`` with
    ``λ = damping · tr(A)/|S|``."""
    check_curvature(curvature)
    if not replaced:
        return []
    units = torch.as_tensor(list(replaced), dtype=torch.long)
    k = units.numel()
    A = torch.zeros(k, k, dtype=torch.float64)
    b = torch.zeros(k, dtype=torch.float64)
    weight = closed_form_weight(site, model.tensors())
    generator = site_generator(seed, site.name, 43)
    downstream = None
    axis = site.unit_axis
    for batch in data.batches(batch_size, limit, labels=True):
        x = list(batch.inputs)
        if downstream is None:
            downstream = model.downstream([site.name], x)
        with torch.no_grad():
            logits, values, frontiers = model.capture_for([downstream], x)
        a_model = values[site.name].detach()  # the model's dtype, for re-running the graph
        a = a_model.to(torch.float64)
        z = logits.detach().to(torch.float64)
        p = F.softmax(z, dim=-1)  # (n, q)
        q = p.shape[-1]
        labels = loss_labels(loss, batch.labels)
        y = None if labels is None else F.one_hot(labels.long(), q).to(torch.float64)
        n = a.shape[0]
        if weight is not None and a.dim() == 2:  # closed form: exact and cheap, whatever the mode
            G = weight[:, units].unsqueeze(0).expand(n, q, k)  # (n, q, |S|)
            r = a[:, units] @ weight[:, units].T  # (n, q)
            _accumulate_exact(A, b, G, r, p, y)
        elif curvature == "exact":
            G, r = _jacobian_terms(downstream, x, a_model, frontiers[0], axis, units, q)
            _accumulate_exact(A, b, G, r, p, y)
        else:
            _accumulate_sampled(A, b, downstream, x, a_model, frontiers[0], axis, units, p, y, generator)
        if progress is not None:
            progress(len(batch))
    c0 = torch.zeros(k, dtype=torch.float64) if start is None else torch.tensor(list(start), dtype=torch.float64)
    lam = damping * float(A.diagonal().sum().clamp_min(1e-300)) / k
    c = torch.linalg.solve(A + lam * torch.eye(k, dtype=torch.float64), b + lam * c0)
    return [float(v) for v in c]


def _sum_positions(t: torch.Tensor, axis: int, units: torch.Tensor) -> torch.Tensor:
    """Element values ``(batch, …)`` → per sample and replaced unit, summed over positions."""
    moved = t.movedim(axis % t.dim(), -1)[..., units]  # (batch, …, |S|)
    return moved.reshape(moved.shape[0], -1, units.numel()).sum(1)  # (batch, |S|)


def _accumulate_exact(A: torch.Tensor, b: torch.Tensor, G: torch.Tensor, r: torch.Tensor, p: torch.Tensor, y: torch.Tensor | None) -> None:
    """A += Σ_c p_c (G_c − Ḡ)(G_c − Ḡ)ᵀ, b += Σ_c p_c (G_c − Ḡ)(r_c − r̄) − Gᵀ(p − y): the
    cancellation-free form of Gᵀ(diag p − ppᵀ)G and Gᵀ(diag p − ppᵀ)r per sample."""
    gbar = torch.einsum("nc,ncs->ns", p, G)
    rbar = (p * r).sum(-1)
    dg = G - gbar.unsqueeze(1)  # (n, q, |S|)
    dr = r - rbar.unsqueeze(1)  # (n, q)
    A += torch.einsum("nc,ncs,nct->st", p, dg, dg)
    b += torch.einsum("nc,ncs,nc->s", p, dg, dr)
    if y is not None:
        b -= torch.einsum("ncs,nc->s", G, p - y)


def _jacobian_terms(downstream: Any, x: list[torch.Tensor], a: torch.Tensor, frontier: list[torch.Tensor], axis: int, units: torch.Tensor, q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """G (n, q, |S|) and r (n, q) from one backward pass per class."""
    leaf = a.clone().requires_grad_(True)
    a64 = a.to(torch.float64)
    with torch.enable_grad():
        out = downstream.run(x, leaf, frontier)
        Gs, rs = [], []
        for c in range(q):
            v = torch.zeros_like(out)
            v[..., c] = 1.0
            (jc,) = torch.autograd.grad(out, leaf, v, retain_graph=True)
            jc = jc.to(torch.float64)
            Gs.append(_sum_positions(jc, axis, units))
            rs.append(_sum_positions(jc * a64, axis, units).sum(-1))
    return torch.stack(Gs, 1), torch.stack(rs, 1)


def _accumulate_sampled(
    A: torch.Tensor, b: torch.Tensor, downstream: Any, x: list[torch.Tensor], a: torch.Tensor, frontier: list[torch.Tensor],
    axis: int, units: torch.Tensor, p: torch.Tensor, y: torch.Tensor | None, generator: torch.Generator,
) -> None:
    """H_s ≈ u uᵀ with u = e_ŷ − p: v = G_sᵀu from one backward pass, A += v vᵀ, b += v (uᵀr)."""
    q = p.shape[-1]
    draw = torch.multinomial(p, 1, generator=generator).squeeze(1)
    u = F.one_hot(draw, q).to(torch.float64) - p
    leaf = a.clone().requires_grad_(True)
    with torch.enable_grad():
        out = downstream.run(x, leaf, frontier)
        (w,) = torch.autograd.grad(out, leaf, u.to(out.dtype), retain_graph=y is not None)
        w = w.to(torch.float64)
        v = _sum_positions(w, axis, units)  # (n, |S|)
        t = _sum_positions(w * a.to(torch.float64), axis, units).sum(-1)  # (n,) = uᵀ r
        A += v.T @ v
        b += v.T @ t
        if y is not None:
            (g,) = torch.autograd.grad(out, leaf, (p - y).to(out.dtype))
            b -= _sum_positions(g.to(torch.float64), axis, units).sum(0)
