"""MAC counting with torch's FlopCounterMode (it sees the aten ops inside ScriptModules), per layer.

MACs = FLOPs / 2. FlopCounterMode counts matmuls, convolutions and the CUDA attention kernels
(flash, memory-efficient, cuDNN). Fused kernels it counts as zero get formulas here:

- ``_scaled_dot_product_flash_attention_for_cpu`` (``F.scaled_dot_product_attention`` on CPU)
  and ``_scaled_dot_product_fused_attention_overrideable``: for q ``(b, h, t, d)`` and k/v
  ``(b, h, s, d_v)``, ``QKᵀ`` costs ``b·h·t·s·d`` MACs and ``AV`` ``b·h·t·s·d_v``;
- ``_native_multi_head_attention`` (``nn.MultiheadAttention``'s inference fast path), for
  embedding ``e``, query length ``t`` and key length ``s``: ``b·(t·e² + 2·s·e²)`` for the q/k/v
  projections, ``2·b·t·s·e`` for ``QKᵀ`` and ``AV`` over all heads, ``b·t·e²`` for the output
  projection;
- ``_transformer_encoder_layer_fwd`` (``nn.TransformerEncoderLayer``'s fast path), FFN width
  ``f``: ``b·(4·t·e² + 2·t²·e + 2·t·e·f)``.

**Per-layer attribution.** Hooks do not fire inside ScriptModules, so a second dispatch mode runs
under FlopCounterMode, sees exactly the ops it counts, and credits each op's FLOPs to the module
that owns the parameters among the op's arguments (matched by storage pointer; an op reading
several modules' parameters goes to their common parent). This works the same for TorchScript and
plain ``nn.Module`` models. Ops that read no parameter (attention matmuls) stay unattributed.
A site's MACs are those of its producer and consumer layers: the layers whose size changes when
its units are removed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["MacCount", "count_macs", "profile_macs", "site_macs"]


@dataclass(frozen=True)
class MacCount:
    """MACs of one forward call: the total, per layer (module name) and per aten op."""

    total: int
    layers: tuple[tuple[str, int], ...]
    ops: tuple[tuple[str, int], ...]

    def layer(self, name: str) -> int:
        """MACs of the ops that read ``name``'s parameters (0 if none)."""
        return dict(self.layers).get(name, 0)

    @property
    def unattributed(self) -> int:
        """MACs of ops that read no parameter, e.g. ``QKᵀ`` and ``AV`` in attention."""
        return self.total - sum(m for _, m in self.layers)

    def to_json(self) -> dict[str, Any]:
        return {"total": self.total, "layers": dict(self.layers), "ops": dict(self.ops), "unattributed": self.unattributed}


def site_macs(count: MacCount, site: Any) -> int:
    """MACs of a site's producer layer (the site's own name) and consumer layers."""
    layers = dict.fromkeys([site.name, *(c.module for c in site.consumers)])
    return sum(count.layer(name) for name in layers)


def _sdpa_flops(query_shape: Sequence[int], key_shape: Sequence[int], value_shape: Sequence[int]) -> int:
    b, h, t, d = query_shape[0], query_shape[1], query_shape[-2], query_shape[-1]
    s, dv = key_shape[-2], value_shape[-1]
    return 2 * b * h * t * s * (d + dv)


def _sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):  # type: ignore[no-untyped-def]
    return _sdpa_flops(query_shape, key_shape, value_shape)


def _batch_len(shape: Sequence[int]) -> tuple[int, int]:
    """(batch, length) of a ``(b, t, e)`` or unbatched ``(t, e)`` sequence."""
    return (shape[0], shape[1]) if len(shape) == 3 else (1, shape[0])


def _native_mha(query_shape, key_shape, value_shape, embed_dim, num_head, *args, out_shape=None, **kwargs):  # type: ignore[no-untyped-def]
    (b, t), (_, s) = _batch_len(query_shape), _batch_len(key_shape)
    e = int(embed_dim)
    return 2 * b * (t * e * e + 2 * s * e * e + 2 * t * s * e + t * e * e)


def _encoder_layer(src_shape, embed_dim, *args, out_shape=None, **kwargs):  # type: ignore[no-untyped-def]
    b, t = _batch_len(src_shape)
    e = int(embed_dim)
    ffn_shape = kwargs.get("ffn_weight_1", args[12] if len(args) > 12 else None)
    f = int(ffn_shape[0]) if ffn_shape is not None else 0
    return 2 * b * (4 * t * e * e + 2 * t * t * e + 2 * t * e * f)


_FORMULAS: dict[str, Callable[..., int]] = {
    "_scaled_dot_product_flash_attention_for_cpu": _sdpa,
    "_scaled_dot_product_fused_attention_overrideable": _sdpa,
    "_native_multi_head_attention": _native_mha,
    "_transformer_encoder_layer_fwd": _encoder_layer,
}


def _custom_mapping() -> dict[Any, Any]:
    # FlopCounterMode looks formulas up by op packet (torch.ops.aten.x, not .default).
    return {getattr(torch.ops.aten, name): f for name, f in _FORMULAS.items() if hasattr(torch.ops.aten, name)}


def _module_of(param: str) -> str:
    return param.rpartition(".")[0]


def _common_module(params: Sequence[str]) -> str:
    paths = [_module_of(p).split(".") if _module_of(p) else [] for p in params]
    common: list[str] = []
    for parts in zip(*paths):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common)


class _Attribution(TorchDispatchMode):
    """Credits the FLOPs of every op FlopCounterMode counts to the module owning its parameters."""

    def __init__(self, registry: dict[Any, Any], names: dict[int, str]) -> None:
        super().__init__()
        self.registry = registry
        self.names = names
        self.layers: dict[str, int] = defaultdict(int)
        self.ops: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.registry.get(func._overloadpacket)
        if formula is None:
            return out
        flops = int(formula(*args, **kwargs, out_val=out))
        self.ops[str(func._overloadpacket).removeprefix("aten.")] += flops
        owners = []
        for t in tree_leaves((args, kwargs)):
            if not isinstance(t, torch.Tensor):
                continue
            try:
                name = self.names.get(t.data_ptr())
            except RuntimeError:  # tensors without storage (meta, nested) own no parameter
                continue
            if name is not None and name not in owners:
                owners.append(name)
        if owners:
            self.layers[_common_module(owners)] += flops
        return out


def _call(model: Any, inputs: Sequence[torch.Tensor]) -> tuple[Callable[[], Any], dict[int, str]]:
    """A no-argument call of ``model`` on ``inputs`` and its tensors by storage pointer."""
    module = model if isinstance(model, torch.nn.Module) else getattr(model, "module", None)
    names: dict[int, str] = {}
    if isinstance(module, torch.nn.Module):
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if t is not None and t.numel() > 0:
                names.setdefault(t.data_ptr(), name)
    if isinstance(model, torch.nn.Module):
        return (lambda: model(*inputs)), names
    if hasattr(model, "forward") and module is not None:  # a backend model: forward takes the list
        return (lambda: model.forward(list(inputs))), names
    return (lambda: model(list(inputs))), names  # a function of the input list


def profile_macs(model: Any, inputs: Sequence[torch.Tensor]) -> MacCount:
    """MACs of one forward call, in total and per layer.

    Args:
        model: an ``nn.Module`` (ScriptModules included), called as ``model(*inputs)``; a
            backend model (``.forward(inputs)`` and ``.module``); or a function of the input list.
        inputs: the forward arguments (MACs scale with their batch size).

    Returns:
        A :class:`MacCount`; its ``total`` is FlopCounterMode's total / 2.

    Example:
        >>> profile_macs(torch.jit.load("samples/digits_mlp.pt"), [torch.zeros(1, 1, 8, 8)]).layer("body.0")
        16384
    """
    from torch.utils.flop_counter import FlopCounterMode

    call, names = _call(model, inputs)
    counter = FlopCounterMode(display=False, custom_mapping=_custom_mapping())
    attribution = _Attribution(counter.flop_registry, names)
    # The attribution mode is entered first, so it sits below FlopCounterMode and sees exactly
    # the ops FlopCounterMode runs after its own decompositions.
    with torch.no_grad(), attribution, counter:
        call()
    total = int(counter.get_total_flops())
    return MacCount(
        total=total // 2,
        layers=tuple((k, v // 2) for k, v in attribution.layers.items()),
        ops=tuple((k, v // 2) for k, v in attribution.ops.items()),
    )


def count_macs(model: Any, inputs: Sequence[torch.Tensor]) -> int:
    """Multiply-accumulates of one forward call (see :func:`profile_macs` for what ``model`` can be).

    Example:
        >>> count_macs(load_model("samples/digits_mlp.pt"), [torch.rand(1, 1, 8, 8)])
        84480
    """
    return profile_macs(model, inputs).total
