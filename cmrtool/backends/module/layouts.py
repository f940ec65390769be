"""Canonical views of stock parameters whose layout is not ``Linear``'s ``(out, in)``.

Folding, scoring and auditing read every weight as a Linear does: rows are outputs, columns are
inputs (``u = W a + b``). Some families store weights otherwise; each such parameter gets a
:class:`View` that shows it as canonical pieces, and the reverse that writes the pieces back:

- ``transpose``: GPT-2's ``Conv1D`` stores ``W`` as ``(in, out)``, so the canonical tensor is ``Wᵀ``;
- ``labels``: a fused parameter is cut along its rows into named pieces, e.g. Phi-3's
  ``gate_up_proj`` into ``gate`` (the first half) and ``up`` (the second), GPT-2's ``c_attn`` into
  ``q``, ``k`` and ``v`` thirds, Phi-3's ``qkv_proj`` into q, k, v in the proportions of
  query heads to key/value heads;
- ``experts``: a 3-D parameter ``(E, out, in)`` (Mixtral, Qwen-MoE in transformers 5) is one
  ``(out, in)`` piece per expert, each cut further by ``sizes``.

A piece is named ``<source>#<label>`` (``…experts.gate_up_proj#3.gate``). Joining concatenates the
pieces' rows (whatever their reduced sizes), stacks the experts — which must then have equal
shapes — and transposes back, so ``join(split(t)) == t`` and a folded piece set becomes a stock
tensor. A name with ``#`` that no view owns (a bias that folding would add to an expert's down
projection, which the stock layer does not have) can only be dropped when it is all zeros.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from cmrtool.errors import UsageError

__all__ = ["View", "split_views", "join_views", "piece"]


def piece(source: str, label: str) -> str:
    """The canonical name of one piece of ``source``."""
    return f"{source}#{label}"


@dataclass(frozen=True)
class View:
    """How one stock tensor ``source`` appears as canonical pieces.

    ``labels`` name row blocks in the proportions ``ratio`` (equal blocks when empty), so a
    tensor reduced by whole units splits the same way (one unnamed piece without labels);
    ``experts`` > 0 splits the leading axis first (piece ``<e>.<label>``, or ``<e>``).
    """

    source: str
    transpose: bool = False
    labels: tuple[str, ...] = ()
    experts: int = 0
    ratio: tuple[int, ...] = ()

    def _blocks(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self.labels:
            return (t,)
        ratio = self.ratio or (1,) * len(self.labels)
        unit = t.shape[0] // sum(ratio)
        return t.split([r * unit for r in ratio], 0)

    def names(self) -> list[str]:
        """The canonical names, in join order."""
        if not self.experts:
            return [piece(self.source, lb) for lb in self.labels] if self.labels else [self.source]
        return [piece(self.source, f"{e}.{lb}" if lb else str(e)) for e in range(self.experts) for lb in (self.labels or ("",))]

    def split(self, t: torch.Tensor) -> dict[str, torch.Tensor]:
        t = t.T if self.transpose else t
        blocks = list(t.unbind(0)) if self.experts else [t]
        parts = [c for b in blocks for c in self._blocks(b)]
        return dict(zip(self.names(), parts))

    def join(self, pieces: Mapping[str, torch.Tensor]) -> torch.Tensor:
        per = len(self.labels) or 1
        names = self.names()
        blocks = [torch.cat([pieces[n] for n in names[i:i + per]], 0) for i in range(0, len(names), per)]
        if self.experts:
            shapes = {tuple(b.shape) for b in blocks}
            if len(shapes) > 1:
                raise UsageError(
                    f"the experts of {self.source.rsplit('.', 1)[0]} keep different widths, and one tensor holds them all",
                    "keep the same number of units in every expert (--keep or --keep-count with --allocation site)",
                )
            t = torch.stack(blocks, 0)
        else:
            t = blocks[0]
        return (t.T if self.transpose else t).contiguous()


def split_views(tensors: Mapping[str, torch.Tensor], views: Sequence[View]) -> dict[str, torch.Tensor]:
    """Stock tensors → canonical: every viewed tensor replaced by its pieces (order kept)."""
    by_source = {v.source: v for v in views}
    out: dict[str, torch.Tensor] = {}
    for k, t in tensors.items():
        v = by_source.get(k)
        if v is None:
            out[k] = t
        else:
            out.update(v.split(t))
    return out


def join_views(tensors: Mapping[str, torch.Tensor], views: Sequence[View]) -> dict[str, torch.Tensor]:
    """Canonical tensors → stock; an unowned ``#`` name must be all zeros (it is dropped)."""
    owned = {n: v for v in views for n in v.names()}
    out: dict[str, torch.Tensor] = {}
    for k, t in tensors.items():
        v = owned.get(k)
        if v is not None:
            if v.source not in out:
                out[v.source] = v.join(tensors)
        elif "#" not in k:
            out[k] = t
        elif bool(t.any()):
            layer, label = k.split("#", 1)
            raise UsageError(
                f"{layer} has no bias to hold the folded constants of expert {label.split('.', 1)[0]} (expert layers are bias-free)",
                "use --replacement zero to fold nothing there, or write a Hugging Face directory (-o reduced/), which does so automatically",
            )
    return out
