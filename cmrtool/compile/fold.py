"""Folding: compile a plan into smaller tensors. A pure function of (tensors, sites, plan).

For each site with kept units K and replaced units S with constants c_S (DESIGN §3.4):

- every **consumer** loses the columns of S, and the replaced units' constant contribution moves
  into its fold target (Proposition 1)::

      Linear:  W' = W[:, K],   d = W[:, S] c_S            (all columns of a unit's block)
      Conv:    W' = W[:, K],   d = Σ_{j∈S} c_j Σ_{kh,kw} W[:, j, kh, kw]
      bias:    b' = b + d      new-bias: b' = d      bn-mean: running_mean' = running_mean − d

  (BatchNorm in eval computes (y − μ)/σ·γ + β, so y + d is absorbed by μ' = μ − d.)
- an **affine** replacement ``a_j = β0 + β·a_P`` (P kept) also moves unit j's columns onto its
  parents' columns, ``W'[:, P] += W[:, j] β_Pᵀ``, and folds β0 like a constant; a **dense**
  one (every kept unit a parent, :mod:`cmrtool.reduce.lsq`) is one product, ``W'_K = W_K + W_S B``
  (CMR A.5), per kernel tap / flattened position, with heads' channels as the units;
- every **producer** keeps only the rows/out-channels/BatchNorm entries of K.
- **grouped units** (attention heads, DESIGN §3.4): unit j owns ``group`` consecutive producer
  rows and consumer columns, and its replacement is a vector c_j of ``group`` values (the
  head's position-constant mean output), so ``d = Σ_{j∈S} W[:, block_j] c_j`` (CMR paper A.6,
  Proposition 10).

All folds are computed in the original index space first (so a bias that is both a fold target
and another site's producer is updated before it is sliced), in float64, then cast back to each
tensor's dtype. Inputs are never modified.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cmrtool.errors import InputError, UnsupportedModelError
from cmrtool.plan import Plan
from cmrtool.sites import Consumer, Site

__all__ = ["fold", "FoldResult", "unit_columns", "unit_rows"]


@dataclass(frozen=True)
class FoldResult:
    """The reduced tensors (all of them, changed or not) and the names that were added."""

    tensors: dict[str, torch.Tensor]
    added: tuple[str, ...]
    changed: tuple[str, ...]


def unit_columns(consumer: Consumer, width: int, units: Sequence[int]) -> torch.Tensor:
    """Consumer input columns owned by ``units`` (in unit order)."""
    u = torch.as_tensor(list(units), dtype=torch.long)
    if consumer.op == "conv" or consumer.block == 1:
        return u
    b = torch.arange(consumer.block)
    if consumer.layout == "strided":  # cols t*width + j
        return (b[None, :] * width + u[:, None]).T.reshape(-1).sort().values
    return (u[:, None] * consumer.block + b[None, :]).reshape(-1)  # cols j*block + b


def unit_rows(units: Sequence[int], group: int = 1) -> torch.Tensor:
    """Entries owned by ``units`` along an axis with ``group`` consecutive entries per unit."""
    u = torch.as_tensor(list(units), dtype=torch.long)
    if group == 1:
        return u
    return (u[:, None] * group + torch.arange(group)[None, :]).reshape(-1)


def _contribution(
    weight: torch.Tensor, consumer: Consumer, width: int, replaced: Sequence[int], values: torch.Tensor, group: int = 1
) -> torch.Tensor:
    """``d = Σ_{j∈S} c_j · (everything unit j feeds into each output)`` in float64, shape (out,)."""
    w = weight.to(torch.float64)
    if consumer.op == "conv":
        per_unit = w[:, list(replaced)].reshape(w.shape[0], len(replaced), -1).sum(-1)  # (out, |S|)
        return per_unit @ values
    cols = unit_columns(consumer, width, replaced)
    if group != 1:  # one value per column of the unit's block (checked by fold)
        per_col = values
    elif consumer.layout == "strided" and consumer.block > 1:
        per_col = _strided_values(cols, width, replaced, values)
    else:
        per_col = values.repeat_interleave(consumer.block)
    # W c over all columns, zero at the kept ones: one matrix-vector product, several times
    # faster than gathering the replaced columns of a large consumer first.
    full = torch.zeros(w.shape[1], dtype=torch.float64)
    full[cols] = per_col
    return w @ full


def _strided_values(cols: torch.Tensor, width: int, replaced: Sequence[int], values: torch.Tensor) -> torch.Tensor:
    lookup = {int(j): float(v) for j, v in zip(replaced, values.tolist())}
    return torch.tensor([lookup[int(c) % width] for c in cols], dtype=torch.float64)


def _fold_affine_columns(current: torch.Tensor, original: torch.Tensor, consumer: Consumer, width: int, replaced: Sequence[int], repl: Any) -> torch.Tensor:
    """``W'[:, cols(p)] += β_{j,p} · W[:, cols(j)]`` for every replaced unit j and parent p.

    Columns pair up position by position (the same kernel tap, the same flattened position), so
    a replacement that holds at every position folds exactly. Uses the original columns of the
    replaced units (never updated: parents are kept units).
    """
    w = current.to(torch.float64).clone()
    src = original.to(torch.float64)
    for j, parents, coefs in zip(replaced, repl.parents, repl.coefficients):
        cols_j = unit_columns(consumer, width, [j])
        for p, beta in zip(parents, coefs):
            w[:, unit_columns(consumer, width, [p])] += beta * src[:, cols_j]
    return w  # float64: the caller casts once


def _fold_dense_columns(current: torch.Tensor, original: torch.Tensor, consumer: Consumer, width: int, sp: Any) -> torch.Tensor:
    """``W'_K = W_K + W_S B`` for a dense affine replacement (B: replaced × kept values).

    The consumer weight is viewed as ``(out, width, rest)`` (rest: kernel taps or the flattened
    positions of a unit's block), so the product runs per tap/position. Grouped units (heads)
    have one column per value, and B is over their channels.
    """
    w = current.to(torch.float64).clone()
    src = original.to(torch.float64)
    coef = sp.replacement.dense(len(sp.replaced) * sp.group)
    if sp.group != 1:
        cols_s, cols_k = unit_columns(consumer, width, sp.replaced), unit_columns(consumer, width, sp.kept)
        w[:, cols_k] += src[:, cols_s] @ coef
        return w  # float64: the caller casts once
    kept, rep = torch.as_tensor(sp.kept, dtype=torch.long), torch.as_tensor(sp.replaced, dtype=torch.long)
    strided = consumer.op == "linear" and consumer.layout == "strided" and consumer.block > 1
    shape = (w.shape[0], consumer.block, width) if strided else (w.shape[0], width, -1)
    view, sview = w.reshape(shape), src.reshape(shape)
    if strided:  # (out, block, width): unit j is column t*width + j
        view[:, :, kept] += torch.einsum("obs,sk->obk", sview[:, :, rep], coef)
    else:
        view[:, kept] += torch.einsum("osr,sk->okr", sview[:, rep], coef)
    return view.reshape(current.shape)  # float64: the caller casts once


def fold(tensors: Mapping[str, torch.Tensor], sites: Sequence[Site], plan: Plan, dtype: torch.dtype | None = None) -> FoldResult:
    """Apply ``plan`` to ``tensors``; return the reduced tensors.

    Args:
        tensors: every parameter and buffer of the model by name (not modified).
        sites: the model's sites (those named by the plan must be among them).
        plan: kept/replaced units and constants per site.
        dtype: the dtype of the changed and added tensors (default: each tensor's own). The
            fold is computed in float64 either way; ``float64`` here returns it unrounded, with
            rows and columns selected before they are widened (the unchanged tensors are
            returned as they are).

    Raises:
        InputError: the plan names a site the model does not have, or widths differ.
        UnsupportedModelError: a planned site cannot be folded (``fold: none``).
    """
    by_name = {s.name: s for s in sites}
    out: dict[str, torch.Tensor] = dict(tensors)
    added: list[str] = []
    changed: set[str] = set()
    slices: dict[str, list[tuple[int, torch.Tensor]]] = {}

    def add_slice(name: str, axis: int, index: torch.Tensor) -> None:
        slices.setdefault(name, []).append((axis, index))

    for sp in plan.sites:
        site = by_name.get(sp.name)
        if site is None:
            raise InputError(
                f"the plan names site {sp.name}, which this model does not have",
                "the plan was made for a different model; run compile on the matching model",
            )
        if site.width != sp.width:
            raise InputError(
                f"site {sp.name} has width {site.width} but the plan says {sp.width}",
                "the plan was made for a different model; run compile on the matching model",
            )
        if not site.foldable:
            raise UnsupportedModelError(f"site {sp.name} cannot be folded: {site.reason}", "choose other sites with --site")
        _check_group(site, sp.group)
        if not sp.replaced:
            continue
        values = torch.tensor(sp.replacement.values, dtype=torch.float64)
        for c in site.consumers:
            w = tensors[c.weight]
            d = _contribution(w, c, site.width, sp.replaced, values, site.group)
            if sp.replacement.matrix:
                out[c.weight] = _fold_dense_columns(out[c.weight], w, c, site.width, sp).to(dtype or w.dtype)
            elif sp.replacement.kind == "affine":
                out[c.weight] = _fold_affine_columns(out[c.weight], w, c, site.width, sp.replaced, sp.replacement).to(dtype or w.dtype)
            target = c.fold_target
            assert target is not None
            if c.fold_mode == "bias":
                cur = out[target]
                out[target] = (cur.to(torch.float64) + d).to(dtype or cur.dtype)
            elif c.fold_mode == "new-bias":
                cur = out.get(target)
                base = cur.to(torch.float64) if cur is not None else torch.zeros_like(d)
                out[target] = (base + d).to(dtype or w.dtype)
                if cur is None:
                    added.append(target)
            elif c.fold_mode == "bn-mean":
                cur = out[target]
                out[target] = (cur.to(torch.float64) - d).to(dtype or cur.dtype)
            changed.add(target)
            add_slice(c.weight, 1, unit_columns(c, site.width, sp.kept))
        for p in site.producers:
            add_slice(p.name, p.axis, unit_rows(sp.kept, p.group))

    for name, ops in slices.items():
        t = out.get(name)
        if t is None:
            continue  # an optional producer bias that nobody created
        for axis, index in ops:
            t = t.index_select(axis, index)
        out[name] = t.contiguous() if dtype is None else t.to(dtype).contiguous()
        changed.add(name)
    return FoldResult(out, tuple(added), tuple(sorted(changed)))


def _check_group(site: Site, group: int) -> None:
    """A grouped site's plan and consumers agree on its group size (one value per column)."""
    if group != site.group:
        raise InputError(
            f"site {site.name} has {site.group} values per unit but the plan says {group}",
            "the plan was made for a different model; run compile on the matching model",
        )
    if site.group != 1 and any(c.op != "linear" or c.block != site.group or c.layout != "block" for c in site.consumers):
        raise UnsupportedModelError(f"site {site.name}: grouped units need Linear consumers with one column per value", "choose other sites with --site")
