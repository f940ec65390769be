"""The backend protocol (DESIGN §2, §8): what the stages may ask of a loaded model, written down
as :class:`typing.Protocol` classes instead of ``Any`` and ``hasattr`` probes.

A backend declares what it can do in ``capabilities`` (names from :data:`CAPABILITIES`); a stage
that needs one calls :func:`require` and gets a clear error when it is missing. The four verbs of
DESIGN §2 are *discover sites* (``sites``), *capture* and *override* site values (``run``) and
*write* the reduced checkpoint (``write`` / ``write_dir``). A :class:`Block` is one block of a
block model (:mod:`cmrtool.engine`): a small model from the hidden states at its input to those
at its output, with the same verbs, so the whole-model planner runs on it unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from cmrtool.errors import UnsupportedModelError
from cmrtool.plan import Plan
from cmrtool.sites import Site

__all__ = ["CAPABILITIES", "Backend", "Block", "capabilities_of", "require"]

CAPABILITIES = frozenset({
    "capture",      # run(…, capture=names) returns site values
    "override",     # run(…, edits=…) replaces site values (constants or affine maps)
    "gradients",    # downstream(…) gives the network after a site, for loss gradients and curvature
    "heads",        # attention-head sites
    "blocks",       # processed block by block (cmrtool.engine)
    "write-file",   # write(path, tensors, plan): the backend's own checkpoint format
    "write-dir",    # write_dir(path, tensors, plan): a Hugging Face directory
})


@runtime_checkable
class Backend(Protocol):
    """A loaded model: sites, tensors, running with captures and edits, writing."""

    path: str
    sha256: str
    dtype: torch.dtype
    format: str
    sites: list[Site]

    def site(self, name: str) -> Site: ...
    def require_sites(self) -> None: ...
    def tensors(self) -> dict[str, torch.Tensor]: ...
    def num_params(self) -> int: ...
    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor: ...

    def run(
        self, inputs: Sequence[torch.Tensor], capture: Sequence[str] = (),
        edits: Mapping[str, tuple[torch.Tensor, ...]] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def write(self, path: str | Path, tensors: Mapping[str, torch.Tensor], plan: Plan) -> None: ...


@runtime_checkable
class Block(Backend, Protocol):
    """One block of a block model: inputs ``(hidden_states, attention_mask)``, output the
    block's hidden states; captured values hold kept (non-padding) tokens only."""

    def reduced_module(self, tensors: Mapping[str, torch.Tensor], plan: Plan, in_place: bool = False) -> Any: ...


_KNOWN: dict[str, frozenset[str]] = {
    "torchscript": frozenset({"capture", "override", "gradients", "heads", "write-file"}),
    "safetensors": frozenset({"capture", "override", "gradients", "heads", "write-file"}),
    "huggingface": frozenset({"capture", "override", "gradients", "heads", "write-file", "write-dir"}),
}


def capabilities_of(model: Any) -> frozenset[str]:
    """The capabilities a model declares (``capabilities``), else those of its format."""
    declared = getattr(model, "capabilities", None)
    if declared is not None:
        return frozenset(declared)
    return _KNOWN.get(str(getattr(model, "format", "")), frozenset())


def require(model: Any, capability: str, what: str) -> None:
    """Raise :class:`~cmrtool.errors.UnsupportedModelError` unless ``model`` can do ``capability``.

    Example:
        >>> require(model, "gradients", "cmr-const")
    """
    if capability not in CAPABILITIES:
        raise ValueError(f"unknown capability {capability!r}")
    if capability not in capabilities_of(model):
        raise UnsupportedModelError(
            f"{what} needs '{capability}', which {getattr(model, 'format', type(model).__name__)} models processed this way cannot do",
            f"this model can: {', '.join(sorted(capabilities_of(model))) or 'nothing listed'}",
        )
