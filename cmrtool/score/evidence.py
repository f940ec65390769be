"""Evidence: one streaming pass that gathers, per site, what a criterion needs.

- ``moments``: count, mean, M2 (:class:`~cmrtool.score.stats.Moments`);
- ``cov``: the co-moment matrix (:class:`~cmrtool.score.stats.Comoments`) for peer R² and affine fits;
- ``grad`` / ``curv``: loss gradients and Gauss-Newton curvature per element
  (:mod:`cmrtool.score.sensitivity`) folded into :class:`~cmrtool.score.stats.CurvatureSums`;
- ``gndi``: per unit ``Σ_s ‖Σ_positions J_j (a_j − b_j)‖_p`` and per site ``Σ_s ‖J(a − b)‖_p``,
  with b the mean from the first pass (seed 003's G-NDI; exact Jacobians, one backward pass per
  class).

When only moments are needed, :func:`cmrtool.score.scoring.collect_moments` is used: the backend
reduces inside its graph (:meth:`cmrtool.backends.torchscript.model.TorchScriptModel.batch_moments`)
and the pass can be sharded across torchrun ranks with bit-identical results. The other evidence
is gathered in one process. Otherwise one capture per
batch yields every site's value, the logits and each site's frontier, and each site's gradients
come from a backward pass through the network after that site only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from cmrtool.io.data import Dataset
from cmrtool.errors import InputError, UsageError
from cmrtool.score.sensitivity import closed_form_weight, loss_labels, site_generator, site_sensitivity
from cmrtool.sites import Site
from cmrtool.score.stats import Comoments, CurvatureSums, Moments

__all__ = ["SiteEvidence", "collect_evidence"]


@dataclass
class SiteEvidence:
    """Everything gathered for one site (unrequested parts stay None)."""

    moments: Moments
    comoments: Comoments | None = None
    curvature: CurvatureSums | None = None
    gndi_unit: torch.Tensor | None = None  # Σ_samples ‖Σ_positions J_j (a_j − b_j)‖_p per unit
    gndi_site: float | None = None  # Σ_samples ‖J (a − b)‖_p for the whole site
    gndi_count: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _check_width(site: Site, v: torch.Tensor) -> None:
    if v.dim() == 0 or v.shape[site.unit_axis] != site.width:
        raise InputError(
            f"site {site.name} produced a value of shape {tuple(v.shape)}, expected {site.width} units on axis {site.unit_axis}",
            "the model's graph does not match its weights; re-export it",
        )


def collect_evidence(
    model: Any,
    data: Dataset,
    sites: Sequence[Site],
    needs: frozenset[str],
    batch_size: int = 256,
    progress: Callable[[int], None] | None = None,
    limit: int | None = None,
    curvature: str = "auto",
    seed: int = 0,
    gndi_p: float = 2.0,
    loss: str = "auto",
) -> dict[str, SiteEvidence]:
    """Stream ``data`` through ``model`` and return per-site evidence for ``needs``."""
    if needs <= {"moments"}:
        # Moments only: the streaming pass that also runs sharded under torchrun, bit for bit.
        from cmrtool.score.scoring import collect_moments

        return {name: SiteEvidence(m) for name, m in collect_moments(model, data, sites, batch_size, progress, limit).items()}
    from cmrtool import distributed

    if distributed.enabled():
        raise UsageError(
            f"under torchrun cmrtool gathers moments only; this needs {', '.join(sorted(needs - {'moments'}))}",
            "run criteria based on gradients or covariances (and fitted replacements) in one process, "
            "or use a moments criterion (cmr-logit, vbp, magnitude, random) with torchrun",
        )
    ev = {s.name: SiteEvidence(Moments(s.width)) for s in sites}
    names = [s.name for s in sites]
    sens = needs & {"grad", "curv"}
    for s in sites:
        if "cov" in needs:
            ev[s.name].comoments = Comoments(s.width)
        if sens:
            ev[s.name].curvature = CurvatureSums(s.width)
    tensors = model.tensors()
    weights = {s.name: closed_form_weight(s, tensors) for s in sites}
    generators = {s.name: site_generator(seed, s.name, 17) for s in sites}
    downstreams: dict[str, Any] = {}
    gndi = "gndi" in needs
    for batch in data.batches(batch_size, limit, labels=bool(sens)):
        x = list(batch.inputs)
        if not downstreams and (sens or gndi):
            downstreams = {s.name: model.downstream([s.name], x) for s in sites}
        with torch.no_grad():
            if downstreams:
                logits, values, frontiers = model.capture_for([downstreams[n] for n in names], x)
            else:
                logits, values = model.run(x, capture=names)
                frontiers = [[] for _ in names]
        for i, s in enumerate(sites):
            v = values[s.name]
            _check_width(s, v)
            e = ev[s.name]
            e.moments.update_value(v, s.unit_axis)
            if e.comoments is not None:
                e.comoments.update_value(v, s.unit_axis)
            if sens:
                if "labels" in needs:  # taylor: CE on the labels, or on the model's own predictions
                    labels = batch.labels if batch.labels is not None else logits.argmax(-1)
                else:
                    labels = loss_labels(loss, batch.labels)
                r = site_sensitivity(
                    s, v, logits, labels, weights[s.name], downstreams[s.name], x, frontiers[i],
                    want_grad="grad" in needs, want_curv="curv" in needs, mode=curvature, generator=generators[s.name],
                )
                e.curvature.update(v, r.grad, r.curv, s.unit_axis)  # type: ignore[union-attr]
        if progress is not None:
            progress(len(batch))
    if gndi:
        _gndi_pass(model, data, sites, ev, downstreams, weights, batch_size, limit, gndi_p)
    return ev


def _gndi_pass(
    model: Any, data: Dataset, sites: Sequence[Site], ev: dict[str, SiteEvidence], downstreams: dict[str, Any],
    weights: dict[str, torch.Tensor | None], batch_size: int, limit: int | None, p: float,
) -> None:
    """G-NDI with baseline b = the mean: per unit E|a_j − b_j|·‖J_j‖_p, per site E‖J(a − b)‖_p."""
    names = [s.name for s in sites]
    for s in sites:
        ev[s.name].gndi_unit = torch.zeros(s.width, dtype=torch.float64)
        ev[s.name].gndi_site = 0.0
    for batch in data.batches(batch_size, limit, labels=False):
        x = list(batch.inputs)
        if not downstreams:
            downstreams.update({s.name: model.downstream([s.name], x) for s in sites})
        with torch.no_grad():
            logits, values, frontiers = model.capture_for([downstreams[n] for n in names], x)
        for i, s in enumerate(sites):
            v = values[s.name]
            r = site_sensitivity(s, v, logits, None, weights[s.name], downstreams[s.name], x, frontiers[i],
                                 want_grad=False, want_curv=False, want_jacobian=True, mode="exact")
            J = r.jacobian.to(torch.float64)  # (q, *v.shape)
            axis = s.unit_axis % v.dim()
            b = ev[s.name].moments.mean.reshape([-1 if d == axis else 1 for d in range(v.dim())])
            dev = v.to(torch.float64) - b  # (*v.shape)
            contrib = J * dev.unsqueeze(0)  # (q, *v.shape): per-class effect of each element
            # A unit is replaced at every position (token, pixel) of a sample at once: sum its
            # per-position effects on the sample's logits, then take the norm over classes.
            per_unit = contrib.movedim(axis + 1, -1).reshape(J.shape[0], v.shape[0], -1, s.width).sum(2)  # (q, batch, width)
            e = ev[s.name]
            e.gndi_unit += per_unit.abs().pow(p).sum(0).pow(1 / p).sum(0)
            site_effect = per_unit.sum(-1)  # (q, batch): every unit of the site at once
            e.gndi_site += float(site_effect.abs().pow(p).sum(0).pow(1 / p).sum())
            e.gndi_count += int(v.shape[0])
