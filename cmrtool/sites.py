"""Sites: hidden activations whose units can be replaced, described as data over tensor names.

A site records names and axes only (DESIGN §2): the **producers** whose slice along an axis
creates unit j (Linear rows, Conv out-channels, BatchNorm entries), the **consumers** that read
unit j (Linear columns, Conv in-channels) with their **fold target** (a bias, a bias to be added,
or the next BatchNorm's ``running_mean``), and how exact folding is:

- ``exact``: the compiled model equals the original with replaced units clamped (Proposition 1);
- ``interior-exact``: a zero-padded conv consumer sees zeros, not the constant, at the border, so
  folding is exact in the interior only (DESIGN §3.4); ``verify`` measures the border error;
- ``none``: the replacement cannot be folded (the reason says why); such a site is not compiled.

Sites are named after their producer module, e.g. ``body.2`` or ``blocks.0.fc1``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["TensorSlice", "Consumer", "Site", "Rejection", "UNIT_KINDS", "FOLD_KINDS"]

UNIT_KINDS = ("neuron", "channel", "head")
FOLD_KINDS = ("exact", "interior-exact", "none")


@dataclass(frozen=True)
class TensorSlice:
    """A parameter or buffer whose entries along ``axis`` belong one-to-one to the site's units.

    ``optional`` marks a tensor that may be absent (a producer bias that is None); it is sliced
    only if it exists after folding (another site's fold may have added it). ``group`` is the
    number of consecutive entries per unit (unit j owns ``j*group .. j*group+group-1``), e.g. the
    ``head_dim`` rows of a q/k/v projection that belong to one attention head.
    """

    name: str
    axis: int
    optional: bool = False
    group: int = 1

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "axis": self.axis, **({"optional": True} if self.optional else {})}
        if self.group != 1:
            d["group"] = self.group
        return d


@dataclass(frozen=True)
class Consumer:
    """A linear map that reads the site: ``u = W a + b`` (Linear) or ``conv(a, W) + b`` (Conv).

    Attributes:
        module: the consumer module's name.
        op: ``linear`` or ``conv``.
        weight: the weight's name; unit j is read by input axis 1.
        fold_target: the tensor that absorbs the replaced units' contribution.
        fold_mode: ``bias`` (add to an existing bias), ``new-bias`` (create the bias, which is
            absent), ``bn-mean`` (subtract from the following BatchNorm's running_mean), or
            ``none``.
        block: consumer input columns per unit (> 1 when a ``(n, C, H, W)`` map is flattened
            into a Linear: unit j owns columns ``j*block .. j*block+block-1``).
        layout: ``block`` (channel-major, as above) or ``strided`` (unit-last: unit j owns
            columns ``t*width + j``).
        zero_padding: the consumer pads with zeros, so folding is exact only in the interior.
    """

    module: str
    op: str
    weight: str
    fold_target: str | None
    fold_mode: str
    block: int = 1
    layout: str = "block"
    zero_padding: bool = False

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "module": self.module,
            "op": self.op,
            "weight": self.weight,
            "fold_target": self.fold_target,
            "fold_mode": self.fold_mode,
        }
        if self.block != 1:
            d["block"] = self.block
            d["layout"] = self.layout
        if self.zero_padding:
            d["zero_padding"] = True
        return d


@dataclass(frozen=True)
class Site:
    """One reducible hidden activation.

    Attributes:
        name: the producer module, e.g. ``body.0``.
        kind: ``neuron`` (unit axis last) or ``channel`` (unit axis 1); ``head`` for attention.
        width: number of units.
        producers: tensors sliced along their unit axis when units are removed.
        consumers: linear maps that read the units and absorb the replacement.
        fold: ``exact`` | ``interior-exact`` | ``none``.
        reason: why ``fold`` is not ``exact``.
        activation: the elementwise op(s) between producer and site value, e.g. ``relu``.
        value: the backend's handle for the site's activation (a graph value name).
        feeds_logits: the consumers' outputs are the model's logits (no op in between).
        group: channels of the site value per unit (``head_dim`` for a head; 1 otherwise). A
            grouped unit's replacement is a vector of ``group`` values, and its channels are
            ``j*group .. j*group+group-1`` of the value's last axis.
    """

    name: str
    kind: str
    width: int
    producers: tuple[TensorSlice, ...]
    consumers: tuple[Consumer, ...]
    fold: str = "exact"
    reason: str = ""
    activation: str = ""
    value: str = ""
    feeds_logits: bool = False
    notes: tuple[str, ...] = field(default=())
    group: int = 1

    @property
    def channels(self) -> int:
        """Entries of the site value along its unit axis: ``width * group``."""
        return self.width * self.group

    @property
    def unit_axis(self) -> int:
        """Axis of the site value that indexes units: 1 for channels, -1 for neurons."""
        return 1 if self.kind == "channel" else -1

    @property
    def foldable(self) -> bool:
        return self.fold != "none"

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "width": self.width,
            "fold": self.fold,
            "activation": self.activation,
            "producers": [p.to_json() for p in self.producers],
            "consumers": [c.to_json() for c in self.consumers],
        }
        if self.reason:
            d["reason"] = self.reason
        if self.group != 1:
            d["group"] = self.group
        return d


@dataclass(frozen=True)
class Rejection:
    """A candidate that is not a site, with the reason (reported by ``inspect``)."""

    name: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "reason": self.reason}
