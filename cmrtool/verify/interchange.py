"""Interchange interventions between samples (CMR paper §4.2, §5.3; DESIGN §3.5).

Per swap, a base x_b and a source x_s and a mask m over a site's retained units: the low level
is O with its retained units set to ``m⊙a_O(x_s) + (1−m)⊙a_O(x_b)``, the high level R with its
units set to ``m⊙a_R(x_s) + (1−m)⊙a_R(x_b)``. Clean site values are cached once
(:func:`prepare_interchange`, a :class:`_Cache` per model); :func:`interchange` then re-runs only
the network after the first site (the backend's downstream) for a batch of swaps. Masks come
from packed random bits (:func:`_bernoulli`), seeded per run and site, so batching and site
order do not change them. The verify run that summarizes the swaps is :mod:`cmrtool.verify.report`.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cmrtool.backends.swap import select, weights
from cmrtool.errors import InputError

__all__ = ["interchange", "prepare_interchange"]


def _unit_mask(kind: str, mask: torch.Tensor, rank: int) -> torch.Tensor:
    """A per-swap unit mask ``(b, width)`` shaped to broadcast over a site value of ``rank``."""
    b, w = mask.shape
    if kind == "channel":
        return mask.reshape(b, w, *([1] * (rank - 2)))
    return mask.reshape(b, *([1] * (rank - 2)), w)


def _generator(seed: int, name: str) -> torch.Generator:
    """The draw stream of one interchange run (``name``: a site, ``all``, or ``run/site``)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def _bernoulli(g: torch.Generator, rows: int, width: int, p: float) -> torch.Tensor:
    """``(rows, width)`` booleans, each True with probability ``p``, independent.

    Drawn from uniform 32-bit words of ``g``: when ``p·2^b`` is an integer for some b in 1, 2,
    4, 8, 16, each draw takes the smallest such b bits (``p = 0.5``: one bit), so ``P[True]`` is
    exactly ``p``; otherwise 32 bits, ``p`` rounded to a multiple of 2⁻³². Far fewer generator
    calls than one uniform float per unit, which dominated mask drawing. The bits are read
    little-endian, so the masks are the same on every machine.
    """
    bits = next((b for b in (1, 2, 4, 8, 16) if float(p * (1 << b)).is_integer()), 32)
    threshold = round(p * (1 << bits))
    per = 32 // bits
    words = torch.randint(0, 1 << 32, (rows, -(-width // per)), generator=g).numpy().astype("<u4")
    if bits == 1:
        chunks = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")
    elif bits == 32:
        chunks = words
    else:
        shifts = np.arange(0, 32, bits, dtype=np.uint32)
        chunks = ((words[:, :, None] >> shifts) & np.uint32((1 << bits) - 1)).reshape(rows, -1)
    return torch.from_numpy(np.ascontiguousarray(chunks[:, :width] < threshold))


def _draw(n: int, swaps: int, p: float, seed: int, label: str, widths: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Bases, sources and per-site retained-unit masks of one interchange run; each stream
    depends only on (seed, run label[, site]), so batching and site order do not change them."""
    g = _generator(seed, label)
    base = torch.randint(n, (swaps,), generator=g)
    source = torch.randint(n, (swaps,), generator=g)
    masks = {s: _bernoulli(_generator(seed, f"{label}/{s}"), swaps, w, p) for s, w in widths.items()}
    return base, source, masks


@dataclass
class _Cache:
    """Clean activations of every held-out sample, for one model and one site set."""

    downstream: Any
    inputs: list[torch.Tensor]
    values: dict[str, torch.Tensor]
    frontier: list[torch.Tensor]
    finite: dict[str, bool] = field(default_factory=dict)
    memo: dict[str, Any] = field(default_factory=dict)

    def kept(self, name: str, plan: Any) -> torch.Tensor:
        """Indices of the retained units of site ``name`` (made once)."""
        key = f"kept:{name}"
        if key not in self.memo:
            self.memo[key] = torch.tensor(plan.site(name).kept, dtype=torch.int64)
        return self.memo[key]

    def retained(self, name: str, plan: Any) -> torch.Tensor:
        """The retained units' columns of every sample's value of site ``name`` (made once)."""
        key = f"retained:{name}"
        if key not in self.memo:
            self.memo[key] = self.values[name].index_select(-1, self.kept(name, plan)).contiguous()
        return self.memo[key]

    def is_finite(self, name: str) -> bool:
        """Whether every cached value of site ``name`` is finite (checked once)."""
        if name not in self.finite:
            self.finite[name] = _all_finite(self.values[name])
        return self.finite[name]


def _all_finite(t: torch.Tensor) -> bool:
    """True only if every value is finite: one summing pass (any inf or NaN makes the sum
    non-finite; an overflowing sum of finite values answers False, which is safe here)."""
    if not t.is_floating_point():
        return True
    t = t.detach()
    return math.isfinite(float(t.sum(dtype=torch.float32) if t.element_size() < 4 else t.sum()))


def prepare_interchange(original: Any, reduced: Any, names: Sequence[str], inputs: Sequence[torch.Tensor]) -> tuple[_Cache, _Cache]:
    """Clean activations of O and R on ``inputs`` (one batch) for interchange runs on ``names``."""
    caches = []
    with torch.no_grad():
        for model in (original, reduced):
            ds = _downstreams(model, [(list(names), "")], inputs, after_linear=model is original)[0]
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
    as_weights: dict[tuple[str, torch.dtype], torch.Tensor] = {}  # shared by both levels
    for cache, model, level in ((low, low_model, "low"), (high, high_model, "high")):
        z.append(_intervene(cache, model, plan if level == "low" else None, base, source, masks, as_weights))
    return z[0], z[1]


def _intervene(
    cache: _Cache, model: Any, plan: Any, base: torch.Tensor, source: torch.Tensor, masks: dict[str, torch.Tensor],
    as_weights: dict[tuple[str, torch.dtype], torch.Tensor],
) -> torch.Tensor:
    """Logits of one level for a batch of swaps (``plan``: given for O, whose site values are
    full width, None for R; ``as_weights``: the masks already made 0/1 weights)."""
    ds = cache.downstream
    first: torch.Tensor | None = None
    frontier = ds.select(cache.frontier, base)
    edits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in ds.order:
        site = model.site(name)
        values = cache.values[name]
        keep = masks[name]
        # Mix by lerp on 0/1 weights where the cached values are finite: the same values as a
        # selection, in one vectorised pass (torch's CPU where is ~10× slower).
        finite = cache.is_finite(name) and values.is_floating_point()
        if finite:
            if (name, values.dtype) not in as_weights:
                as_weights[name, values.dtype] = weights(keep, values.dtype)
            keep = as_weights[name, values.dtype]
        if first is None and ds.linear is not None:  # O cut after the Linear reading the site
            clean = frontier[0] if ds.axes[0] is not None else frontier[0].clone()  # gathered, or the cached tensor itself
            first, frontier = _through_linear(cache, name, plan, ds.linear, keep, base, source, clean, finite, site.width), frontier[1:]
            continue
        if finite and first is None and plan is not None and site.group == 1 and site.kind != "channel":
            first = _mix_retained(cache, name, plan, keep, base, source)
            continue
        if plan is not None:
            keep = _full_width(cache, name, plan, keep, site.width)
        if site.group != 1:
            keep = keep.repeat_interleave(site.group, dim=1)
        if first is None:
            first = _mix(site.kind, keep, values, base, source)
        else:  # later sites are edited inside the downstream run
            edits[name] = (_unit_mask(site.kind, keep, values.dim()), values.index_select(0, source))
    inputs = [t.index_select(0, base) for t in cache.inputs] if ds.reads_inputs else list(cache.inputs)
    assert first is not None
    with torch.no_grad():
        out = ds.run(inputs, first, frontier, edits)
        if any(m.is_floating_point() for m, _ in edits.values()) and not _all_finite(out):
            # A non-finite value inside the run met a blend: select exactly instead.
            out = ds.run(inputs, first, frontier, {k: (m.ne(0) if m.is_floating_point() else m, f) for k, (m, f) in edits.items()})
    return out


def _full_width(cache: _Cache, name: str, plan: Any, keep: torch.Tensor, width: int) -> torch.Tensor:
    """A mask over the retained units (booleans or 0/1 weights) spread over all ``width`` units
    of O's site value; the replaced units are never taken from the source."""
    if keep.dtype == torch.bool:
        full = torch.zeros(keep.shape[0], width, dtype=torch.uint8)
        return full.index_copy_(1, cache.kept(name, plan), keep.view(torch.uint8)).view(torch.bool)
    return torch.zeros(keep.shape[0], width, dtype=keep.dtype).index_copy_(1, cache.kept(name, plan), keep)


def _through_linear(
    cache: _Cache, name: str, plan: Any, linear: tuple[torch.Tensor, torch.Tensor | None], keep: torch.Tensor,
    base: torch.Tensor, source: torch.Tensor, clean: torch.Tensor, finite: bool, width: int,
) -> torch.Tensor:
    """The output of the Linear ``(W, b)`` that reads O's site ``name``, for a batch of swaps.

    By linearity, ``W·(a_b + m⊙(a_s − a_b)) + b = (W·a_b + b) + W_K·(m⊙(a_s − a_b))_K``: the
    clean output of the base (``clean``, cached) plus the retained columns ``K`` of ``W``
    applied to the change of the retained units. The matrix product then runs over the
    retained units only (half the work at keep 0.5) and no full-width value is mixed. Equal to
    running the Linear on the mixed value up to float rounding. With non-finite values
    (``finite`` False), or every unit retained, the Linear runs on the mixed value itself.
    """
    weight, bias = linear
    if not finite or plan is None or len(plan.site(name).kept) == width:  # (nothing to save when all are retained)
        full = keep if plan is None else _full_width(cache, name, plan, keep, width)
        return F.linear(_mix("unit", full, cache.values[name], base, source), weight, bias)
    retained = cache.retained(name, plan)
    key = f"linear:{name}"
    if key not in cache.memo:  # W's retained columns, once
        cache.memo[key] = weight.index_select(1, cache.kept(name, plan)).t().contiguous()
    w_kept = cache.memo[key]
    change = retained.index_select(0, source).sub_(retained.index_select(0, base)).mul_(_unit_mask("unit", keep, retained.dim()))
    if clean.is_contiguous():  # clean is this call's own gather: accumulate into it
        clean.view(-1, clean.shape[-1]).addmm_(change.view(-1, change.shape[-1]), w_kept)
        return clean
    return clean + change @ w_kept


def _mix_retained(cache: _Cache, name: str, plan: Any, w: torch.Tensor, base: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """:func:`_mix` for O's full-width value of a unit-last site, mixing only the retained
    units: the base's rows, with the retained columns lerped towards the source's (``w``: 0/1
    weights over the retained units). Less memory traffic than a full-width mask."""
    values, retained = cache.values[name], cache.retained(name, plan)
    mixed = retained.index_select(0, base).lerp_(retained.index_select(0, source), _unit_mask("unit", w, values.dim()))
    return values.index_select(0, base).index_copy_(-1, cache.kept(name, plan), mixed)


def _mix(kind: str, keep: torch.Tensor, values: torch.Tensor, base: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """The site values of a batch of swaps: unit u of swap i from sample ``source[i]`` where
    ``keep[i, u]`` is set, else from ``base[i]`` (``values``: every sample's clean site value;
    ``keep``: booleans, or 0/1 weights of ``values``' dtype when they are all finite).

    Channels of a feature map are whole rows of ``values`` viewed as ``(samples · channels,
    rest)``, so one row gather mixes them. Other sites gather both samples and mix them: by
    lerp on weights (exact for finite values), else by :func:`cmrtool.backends.swap.select`.
    """
    b, w = keep.shape
    if kind == "channel" and values.dim() > 2 and values.is_contiguous():
        sel = base.unsqueeze(1) + keep.to(torch.int64) * (source - base).unsqueeze(1)
        rows = (sel * w + torch.arange(w)).view(-1)
        return values.view(values.shape[0] * w, -1).index_select(0, rows).view(b, *values.shape[1:])
    src, dst = values.index_select(0, source), values.index_select(0, base)
    m = _unit_mask(kind, keep, values.dim())
    if m.is_floating_point():
        return dst.lerp_(src, m)  # dst is this call's own gather
    return select(m, src, dst)


def _downstreams(model: Any, groups: Sequence[tuple[list[str], str]], example: Sequence[torch.Tensor], after_linear: bool = False) -> list[Any]:
    out = []
    for names, _ in groups:
        ds = model.downstream(names, example, after_linear=after_linear)
        if ds is None:
            raise InputError(
                f"cannot separate the network after site {names[0]} of {model.path} for interchange runs",
                "verify needs the tensors read after the site to have a batch axis; use --site to skip this site",
            )
        out.append(ds)
    return out
