"""The network after a model's first site, as a function of that site's value (TorchScript).

An interchange intervention (DESIGN §3.5) then costs a downstream pass, not a full forward pass:
:class:`Downstream` re-runs only the graph after the cut, with later sites edited in-graph.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from cmrtool.errors import UnsupportedModelError

if TYPE_CHECKING:
    from cmrtool.backends.torchscript.model import TorchScriptModel

__all__ = ["Downstream"]


class Downstream:
    """The part of a model after its first site, as a function of that site's value.

    ``capture(inputs)`` returns the clean values of every site and the *frontier* (the upstream
    tensors the rest of the network reads, e.g. a residual stream); ``run`` re-runs only the
    network after the first site, from a (possibly edited) first-site value and a frontier,
    with the later sites edited in-graph by ``where(mask, fill, v)`` (or ``lerp``). So an
    interchange intervention costs a downstream pass, not a full forward pass. With
    :attr:`linear` set, the cut is after the Linear that alone reads the first site, and
    ``run`` takes that Linear's output instead of the site value.
    """

    def __init__(
        self,
        model: TorchScriptModel,
        order: list[str],
        frontier: tuple[str, ...],
        axes: tuple[tuple[int, int] | None, ...],
        linear: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    ) -> None:
        self.model = model
        self.order = order
        self.frontier = frontier
        self.axes = axes
        #: ``(weight, bias)`` when the cut is after the Linear that reads the first site (see
        #: :meth:`TorchScriptModel.downstream`): ``run`` then takes that Linear's output, and the
        #: frontier starts with its clean value.
        self.linear = linear
        values = tuple(model.site(n).value for n in order)
        self._cuts = frontier if linear is not None else (values[0],) + frontier
        self._edits = values[1:]
        #: whether the network after the cut reads the model's inputs (else callers may pass
        #: any tensors of the right kind instead of gathering them per swap)
        self.reads_inputs: bool = model.program.function(cuts=self._cuts, edits=self._edits).reads_inputs

    def capture(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor]]:
        """``(logits, {site: clean value}, frontier)`` for a batch."""
        logits, values, frontiers = self.model.capture_for([self], inputs)
        return logits, values, frontiers[0]

    def select(self, frontier: Sequence[torch.Tensor], index: torch.Tensor) -> list[torch.Tensor]:
        """The frontier of the samples ``index`` (per-sample rows gathered along each batch axis)."""
        out = []
        for t, ax in zip(frontier, self.axes):
            if ax is None:
                out.append(t)
                continue
            axis, rows = ax
            per = t.unflatten(axis, (-1, rows)).index_select(axis, index)
            out.append(per.flatten(axis, axis + 1))
        return out

    def concat(self, parts: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
        """Frontiers of consecutive batches joined along their batch axes."""
        return [
            part[0] if ax is None else torch.cat(list(part), dim=ax[0])
            for part, ax in zip(zip(*parts), self.axes)
        ]

    def run(
        self,
        inputs: Sequence[torch.Tensor],
        first: torch.Tensor,
        frontier: Sequence[torch.Tensor],
        edits: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Logits from the first site's value on (from its Linear's output for a
        :attr:`linear` cut, whose ``frontier`` then leaves out that output): later sites edited by ``edits`` (site →
        ``(mask, fill)``: ``where(mask, fill, v)`` for a boolean mask, ``lerp(v, fill, mask)``
        for 0/1 float weights; see :func:`cmrtool.backends.swap.select`)."""
        args: list[Any] = [*inputs, first, *frontier]
        blends = []
        for name in self.order[1:]:
            mask, fill = (edits or {}).get(name, (_NO_EDIT, _NO_EDIT_FILL))
            args.extend((mask, fill))
            blends.append(mask.is_floating_point())
        fn = self.model.program.function(cuts=self._cuts, edits=self._edits, blend_edits=blends)
        return _logits(fn(*args))


_NO_EDIT = torch.zeros((), dtype=torch.bool)
_NO_EDIT_FILL = torch.zeros(())


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, dict) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"]
    raise UnsupportedModelError(
        f"the model returns {type(out).__name__}, not logits",
        "cmrtool needs a model whose forward returns a logits tensor (or a tuple starting with one)",
    )
