"""Cutting a Hugging Face stack down to the one piece the block engine runs, without copying it.

A layer block runs inside the model's own stack code (its ``forward`` makes the attention masks,
sliding windows, rotary or learned position embeddings exactly as a whole-model forward does),
with the stack's module tree edited on shallow copies:

- :func:`with_module` replaces the module at a dotted path (every module on the way is a shallow
  copy that owns its table of children; nothing else is copied);
- :class:`Skip` stands in for the layers before the one that runs, so a stack that indexes
  per-layer settings by position (``config.layer_types[i]``: Gemma-2, Qwen2-MoE) gives layer i
  its own mask; it returns its input unchanged;
- :class:`CompactTokens` is the token table read only at the ids of one calibration batch
  (``rows[searchsorted(ids, x)]`` in the stock module, so an embedding scale such as Gemma's
  ``sqrt(hidden)`` is applied by the model's own code);
- :func:`materialize` gives a meta-device module real tensors: the checkpoint's, and the
  non-persistent buffers (rotary frequencies, position ids, embedding scales) made by the
  model's own ``_init_weights``, as ``from_pretrained`` makes them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from cmrtool.errors import InputError

__all__ = ["shallow", "with_module", "Skip", "CompactTokens", "materialize"]


def shallow(module: nn.Module) -> nn.Module:
    """A copy of ``module`` that shares its attributes but owns its table of children."""
    new = object.__new__(type(module))
    new.__dict__ = module.__dict__.copy()
    new._modules = dict(module._modules)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    return new


def with_module(root: nn.Module, path: str, new: nn.Module | None) -> nn.Module:
    """A shallow copy of ``root`` with the module at ``path`` replaced by ``new``."""
    head, _, rest = path.partition(".")
    out = shallow(root)
    out._modules[head] = new if not rest else with_module(root._modules[head], rest, new)  # type: ignore[arg-type]
    return out


class Skip(nn.Module):
    """A layer before the one that runs: passes its input through (keeps the layer's plain
    attributes, e.g. ``attention_type``, for stacks that read them)."""

    def __init__(self, layer: nn.Module, tuple_out: bool) -> None:
        super().__init__()
        for k, v in vars(layer).items():
            if not k.startswith("_") and not isinstance(v, (nn.Module, torch.Tensor)) and k != "training":
                object.__setattr__(self, k, v)
        self.tuple_out = tuple_out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        h = args[0] if args else kwargs["hidden_states"]
        return (h,) if self.tuple_out else h


class CompactTokens(nn.Module):
    """The token table at the sorted ids ``ids`` only: ``tokens`` (the stock module, holding
    those rows) applied to each id's row index."""

    def __init__(self, tokens: nn.Module, ids: torch.Tensor) -> None:
        super().__init__()
        self.tokens, self.ids = tokens, ids

    def forward(self, input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.tokens(torch.searchsorted(self.ids, input_ids), *args, **kwargs)


def materialize(
    module: nn.Module, path: str, read: Callable[[str], torch.Tensor], has: Callable[[str], bool], init: Callable[[nn.Module], None],
    given: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """``module`` (meta device, small) with real tensors: ``given`` (names below ``path``) or the
    checkpoint's (``read(full name)``), and non-persistent buffers from ``init`` (the model's
    ``_init_weights``). Every persistent tensor must come from one of them."""
    module = module.to_empty(device="cpu")
    with torch.no_grad():
        for sub in module.modules():
            if sub._non_persistent_buffers_set:
                init(sub)
    state: dict[str, torch.Tensor] = dict(given or {})
    full = (lambda k: f"{path}.{k}") if path else (lambda k: k)
    for k in module.state_dict():
        if k not in state and has(full(k)):
            state[k] = read(full(k))
    missing = [k for k in module.state_dict() if k not in state]
    if missing:
        raise InputError(f"the checkpoint has no {full(missing[0])}", "check that config.json and the weights belong together")
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval().requires_grad_(False)

