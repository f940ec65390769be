"""Reading and writing one expert's FFN value inside a bank of fused experts (transformers 5).

Mixtral, Qwen2-MoE and Qwen3-MoE keep their experts as 3-D parameters ``gate_up_proj (E, 2I, H)``
and ``down_proj (E, H, I)`` and loop over experts inside one module, so there is no module whose
input is expert e's value ``a_e = act(x Gᵀ_e) ⊙ (x Uᵀ_e)`` (G_e = the first I rows of
``gate_up_proj[e]``, U_e the last I). While a capture or an edit is active, :func:`tap_experts`
runs the module with the stock eager loop written out here, calling a hook on ``a_e`` before the
down projection ``y = Σ_e w_e(x) · a_e D_eᵀ`` (w_e the router's weight). Every expert is visited,
also one that no token chose (its value then has zero rows), so statistics see each expert.

Each tapped run leaves the rows of every expert's value, as indices into the flattened tokens, in
``module.cmrtool_routed[e]``, so a caller can drop the rows of padding tokens (the block engine).

The stock forward itself is never changed; compile's fold check compares the stock forward of the
reduced model with this loop's clamped original, so a difference would be caught.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["tap_experts"]

Hook = Callable[[Any, tuple[Any, ...]], Any]


def tap_experts(module: nn.Module, hooks: Mapping[int, Hook]) -> Callable[[], None]:
    """Run ``module`` (a fused experts bank) with ``hooks[e]`` on expert e's value; returns the undo."""

    routed: dict[int, torch.Tensor] = {}
    module.cmrtool_routed = routed

    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        gate_up, down = module.gate_up_proj, module.down_proj
        for e in range(gate_up.shape[0]):
            token, pos = torch.where(top_k_index == e)
            routed[e] = token
            x = hidden_states[token]
            gate, up = nn.functional.linear(x, gate_up[e]).chunk(2, dim=-1)
            a = module.act_fn(gate) * up
            hook = hooks.get(e)
            if hook is not None:
                edited = hook(module, (a,))
                a = a if edited is None else edited[0]
            y = nn.functional.linear(a, down[e]) * top_k_weights[token, pos, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    module.forward = forward  # an instance attribute shadows the class's forward

    def undo() -> None:
        del module.forward

    return undo
