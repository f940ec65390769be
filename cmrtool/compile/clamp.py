"""The clamped original ``O_clamped``: the original model with its replaced units fixed to their
replacements (DESIGN §3.5 step 1), and the fold error of a reduced model against it.

:func:`clamp_edits` turns a plan into the edits a backend applies while it runs (constants, or an
affine map ``β0 + β·a_P`` of kept units, CMR A.5); :func:`fold_error` measures
``max |R(x) − O_clamped(x)|`` in passes of bounded size. Compile checks every fold with it
(:mod:`cmrtool.compile.run`); verify and the block engine use the same edits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cmrtool.compile.fold import unit_rows
from cmrtool.plan import Plan, SitePlan
from cmrtool.sites import Site

__all__ = ["clamp_edits", "site_ranks", "FoldError", "fold_error"]


def _unit_shape(site: Site, rank: int) -> tuple[int, ...]:
    """Shape that broadcasts a per-unit vector over a site value of ``rank`` dims."""
    if site.kind == "channel":
        return (site.width,) + (1,) * max(rank - 2, 0)
    return (site.channels,)


def clamp_edits(
    model: Any, plan: Plan, ranks: Mapping[str, int], dtype: torch.dtype | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Edits that fix every replaced unit of ``plan`` to its constant (``O_clamped``).

    Args:
        model: the original model (its sites give the unit axes).
        plan: the plan.
        ranks: number of dims of each site value (from a capture).
        dtype: dtype of the fill values (the model's).
    """
    dtype = dtype or model.dtype
    edits: dict[str, tuple[torch.Tensor, ...]] = {}
    for sp in plan.sites:
        if not sp.replaced:
            continue
        site = model.site(sp.name)
        if sp.replacement.kind == "affine":
            edits[sp.name] = _affine_map(sp, ranks[sp.name], site.kind, dtype)
            continue
        mask = torch.zeros(site.channels, dtype=torch.bool)
        fill = torch.zeros(site.channels, dtype=dtype)
        idx = unit_rows(sp.replaced, site.group)
        mask[idx] = True
        fill[idx] = torch.tensor(sp.replacement.values, dtype=torch.float64).to(dtype)
        shape = _unit_shape(site, ranks[sp.name])
        edits[sp.name] = (mask.reshape(shape), fill.reshape(shape))
    return edits


def _affine_map(sp: SitePlan, rank: int, kind: str, dtype: torch.dtype) -> tuple[str, torch.Tensor, torch.Tensor]:
    """``("map", Mᵀ, c)``: kept units map to themselves, replaced unit j to ``β0 + β·a_P``
    (dense: the replaced values to ``β0 + B a_K``, over channels for grouped units)."""
    r = sp.replacement
    if r.matrix:
        w = sp.width * sp.group
        s_idx, k_idx = unit_rows(sp.replaced, sp.group), unit_rows(sp.kept, sp.group)
        m = torch.eye(w, dtype=torch.float64)
        m[s_idx] = 0.0
        m[s_idx[:, None], k_idx[None, :]] = r.dense(s_idx.numel())
        c = torch.zeros(w, dtype=torch.float64)
        c[s_idx] = torch.tensor(r.values, dtype=torch.float64)
        shape = (w,) + (1,) * max(rank - 2, 0) if kind == "channel" else (w,)
        return ("map", m.T.contiguous().to(dtype), c.reshape(shape).to(dtype))
    w = sp.width
    m = torch.eye(w, dtype=torch.float64)  # rows: output unit, columns: input unit
    c = torch.zeros(w, dtype=torch.float64)
    for j, b0, parents, coefs in zip(sp.replaced, r.values, r.parents, r.coefficients):
        m[j] = 0.0
        for p, beta in zip(parents, coefs):
            m[j, p] = beta
        c[j] = b0
    shape = (w,) + (1,) * max(rank - 2, 0) if kind == "channel" else (w,)
    return ("map", m.T.contiguous().to(dtype), c.reshape(shape).to(dtype))


def site_ranks(model: Any, inputs: Sequence[torch.Tensor], names: Sequence[str]) -> dict[str, int]:
    """Number of dims of each named site value, from one capture on the first sample."""
    with torch.no_grad():
        _, values = model.run([t[:1] for t in inputs], capture=list(names))
    return {k: v.dim() for k, v in values.items()}


@dataclass(frozen=True)
class FoldError:
    """``max |R(x) − O_clamped(x)|`` and the same relative to ``max |O_clamped(x)|``."""

    max_abs: float
    relative: float
    samples: int


_CHECK_BYTES = 64 << 20  # logits per fold-check pass (a language model's are tokens × vocab)


def fold_error(original: Any, reduced: Any, plan: Plan, inputs: Sequence[torch.Tensor]) -> FoldError:
    """Measure the fold error of ``reduced`` against ``original`` clamped by ``plan``, in passes
    whose logits take about ``_CHECK_BYTES`` (sized from the first sample's)."""
    ranks = site_ranks(original, inputs, [s.name for s in plan.sites])
    edits = clamp_edits(original, plan, ranks)
    n = int(inputs[0].shape[0])
    diff, scale, start, size = 0.0, 0.0, 0, 1
    with torch.no_grad():
        while start < n:
            chunk = [t[start : start + size] for t in inputs]
            clamped, _ = original.run(chunk, edits=edits)
            out = reduced.forward(chunk)
            diff = max(diff, (out.to(torch.float64) - clamped.to(torch.float64)).abs().max().item())
            scale = max(scale, clamped.to(torch.float64).abs().max().item())
            start += size
            per_sample = clamped.numel() * 8 // max(int(clamped.shape[0]) if clamped.dim() else 1, 1)
            size = max(1, _CHECK_BYTES // max(per_sample, 1))
    scale = max(scale, 1e-30)
    return FoldError(diff, diff / scale, n)
