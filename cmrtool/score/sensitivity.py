"""Per-sample loss gradients and Gauss-Newton curvature with respect to site activations.

For a site value a and logits z, with p = softmax(z), the loss is cross-entropy on the data's
labels when it has them, else KL(p_original ‖ p) to the model's own prediction (whose gradient
at the original activations is 0). For each element a_j of a sample:

- gradient ``g = J_jᵀ (p − y)`` (0 for the KL loss), J_j = ∂z/∂a_j;
- Gauss-Newton curvature ``h = J_jᵀ (diag p − p pᵀ) J_j``, evaluated in the cancellation-free
  form ``h = Σ_c p_c (J_cj − J̄_j)²``, ``J̄_j = Σ_c p_c J_cj`` (the expanded form
  ``Σ p J² − J̄²`` loses all precision, and even goes negative, when p saturates).

Three ways to get J:
- **closed form** for a site whose consumer's output is the logits (``z = W a + b``): J_j is the
  consumer column ``W[:, j]`` for every sample, so nothing is differentiated;
- **exact**: one vector-Jacobian product per class through the network after the site (the
  graph is cut there, see :class:`cmrtool.backends.torchscript.downstream.Downstream`);
- **sampled**: one product with ``u = e_ŷ − p``, ŷ ~ Categorical(p) drawn from a seeded
  generator, gives ``(J_jᵀ u)²``, an unbiased estimate of h (the Monte-Carlo Fisher). Its cost
  does not grow with the number of classes; rescaling a unit by s scales it by exactly s⁻², so
  scores built on it keep their invariances.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from cmrtool.errors import UsageError
from cmrtool.sites import Site

__all__ = ["CURVATURE_MODES", "LOSSES", "Sensitivity", "site_generator", "closed_form_weight", "site_sensitivity", "check_curvature", "check_loss", "loss_labels"]

CURVATURE_MODES = ("auto", "exact", "sampled")
# The loss whose gradient and curvature are measured: cross-entropy on the data's labels when it
# has them (auto), always cross-entropy (ce: an error without labels), or KL to the model's own
# prediction (kl: zero gradient at the original activations, Fisher curvature).
LOSSES = ("auto", "ce", "kl")
_EXACT_MAX_CLASSES = 64


def site_generator(seed: int, site: str, salt: int) -> torch.Generator:
    """A draw stream for one site: it depends on the seed and the site's name only, so a site
    gets the same draws whichever other sites are scored with it (invariances stay exact)."""
    import zlib

    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(site.encode()) * 31 + salt) % (2**63))


def check_curvature(mode: str) -> None:
    if mode not in CURVATURE_MODES:
        raise UsageError(f"unknown curvature mode '{mode}'", f"choose one of: {', '.join(CURVATURE_MODES)}")


def check_loss(loss: str) -> None:
    if loss not in LOSSES:
        raise UsageError(f"unknown loss '{loss}'", f"choose one of: {', '.join(LOSSES)}")


def loss_labels(loss: str, labels: torch.Tensor | None) -> torch.Tensor | None:
    """The labels the loss uses: None selects the KL-to-self loss."""
    if loss == "kl":
        return None
    if loss == "ce" and labels is None:
        raise UsageError("--loss ce needs labels in the calibration data", "add 'labels' to the data file, or use --loss auto")
    return labels


@dataclass
class Sensitivity:
    """One batch of one site: the value and, element by element, g, h (and J for gndi)."""

    value: torch.Tensor
    grad: torch.Tensor | None
    curv: torch.Tensor | None
    jacobian: torch.Tensor | None = None  # (q, *value.shape), when asked for


def closed_form_weight(site: Site, tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The consumer weight ``W (q, width)`` when the site feeds the logits through one Linear
    that reads each unit once (no flattened positions); otherwise None."""
    if not site.feeds_logits or len(site.consumers) != 1:
        return None
    c = site.consumers[0]
    if c.op != "linear" or c.block != 1:
        return None
    return tensors[c.weight].to(torch.float64)


def _onehot(labels: torch.Tensor, q: int, like: torch.Tensor) -> torch.Tensor:
    return F.one_hot(labels.long(), q).to(like.dtype)


def site_sensitivity(
    site: Site,
    value: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    weight: torch.Tensor | None,
    downstream: Any,
    inputs: Sequence[torch.Tensor],
    frontier: Sequence[torch.Tensor],
    want_grad: bool,
    want_curv: bool,
    want_jacobian: bool = False,
    mode: str = "auto",
    generator: torch.Generator | None = None,
) -> Sensitivity:
    """g and h of one batch at one site (see the module docstring).

    Args:
        site: the site.
        value: its clean value for the batch.
        logits: the model's clean logits ``(batch, q)``.
        labels: class indices, or None for the KL-to-self loss.
        weight: :func:`closed_form_weight` for this site (None: differentiate).
        downstream: the backend's cut at this site (its ``run(inputs, value, frontier)``).
        inputs, frontier: what ``downstream.run`` needs besides the value.
        want_grad, want_curv, want_jacobian: what to compute.
        mode: ``auto`` (closed form where possible, else sampled), ``exact`` or ``sampled``.
        generator: draws for the sampled mode.
    """
    check_curvature(mode)
    z = logits.detach().to(torch.float64)
    p = F.softmax(z, dim=-1)
    q = p.shape[-1]
    y = None if labels is None else _onehot(labels, q, p)
    a = value.detach()
    if weight is not None and a.dim() == 2 and z.dim() == 2:
        return _closed_form(a, p, y, weight, want_grad, want_curv, want_jacobian)
    exact = mode == "exact" or want_jacobian
    if exact and q > _EXACT_MAX_CLASSES:
        raise UsageError(
            f"exact Jacobians need one backward pass per class; this model has {q} classes",
            "use --curvature sampled (or a criterion that needs no Jacobian)",
        )
    leaf = a.clone().requires_grad_(True)
    with torch.enable_grad():
        out = downstream.run(list(inputs), leaf, list(frontier)).to(torch.float64)
        if exact:
            jac = []
            for c in range(q):
                v = torch.zeros_like(out)
                v[..., c] = 1.0
                (jc,) = torch.autograd.grad(out, leaf, v, retain_graph=True)
                jac.append(jc.to(torch.float64))
            J = torch.stack(jac)  # (q, *a.shape)
            pc = _classes_first(p, a.dim())  # (q, batch[, tokens], 1...)
            jbar = (pc * J).sum(0)
            grad = (jbar - (_classes_first(y, a.dim()) * J).sum(0)) if (want_grad and y is not None) else None
            curv = (pc * (J - jbar).square()).sum(0) if want_curv else None
            return Sensitivity(a, grad if want_grad else None, curv, J if want_jacobian else None)
        grad = None
        if want_grad and y is not None:
            (grad,) = torch.autograd.grad(out, leaf, (p - y).to(out.dtype), retain_graph=want_curv)
            grad = grad.to(torch.float64)
        curv = None
        if want_curv:
            draw = torch.multinomial(p.reshape(-1, q), 1, generator=generator).reshape(p.shape[:-1])
            u = _onehot(draw, q, p) - p
            (w,) = torch.autograd.grad(out, leaf, u.to(out.dtype))
            curv = w.to(torch.float64).square()
    if want_grad and grad is None:
        grad = torch.zeros_like(a, dtype=torch.float64)
    return Sensitivity(a, grad, curv)


def _closed_form(
    a: torch.Tensor, p: torch.Tensor, y: torch.Tensor | None, w: torch.Tensor, want_grad: bool, want_curv: bool, want_jacobian: bool
) -> Sensitivity:
    """J_j = W[:, j] for every sample: h = Σ_c p_c (W_cj − J̄_j)², J̄ = p W, g = J̄ − W_y."""
    jbar = p @ w  # (batch, width)
    grad = None
    if want_grad:
        grad = jbar - y @ w if y is not None else torch.zeros_like(jbar)
    curv = None
    if want_curv:
        curv = torch.empty_like(jbar)
        step = max(1, (1 << 24) // max(1, w.numel()))  # bound the (rows, q, width) temporary
        for i in range(0, p.shape[0], step):
            dev = w.unsqueeze(0) - jbar[i : i + step].unsqueeze(1)  # (rows, q, width)
            curv[i : i + step] = (p[i : i + step].unsqueeze(-1) * dev.square()).sum(1)
    jac = w.unsqueeze(1).expand(w.shape[0], a.shape[0], w.shape[1]) if want_jacobian else None  # (q, batch, width)
    return Sensitivity(a, grad, curv, jac)


def _classes_first(t: torch.Tensor, rank: int) -> torch.Tensor:
    """``(batch[, tokens], q)`` → ``(q, batch[, tokens], 1, ...)`` broadcasting over a value of ``rank``."""
    moved = t.movedim(-1, 0)
    return moved.reshape(*moved.shape, *([1] * (rank - (t.dim() - 1))))
