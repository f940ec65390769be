"""MAC counting with torch's FlopCounterMode (it sees the aten ops inside ScriptModules).

MACs = FLOPs / 2. FlopCounterMode counts matmuls and convolutions; fused attention kernels
that it does not know (``_scaled_dot_product_flash_attention_for_cpu``, the CPU kernel behind
``F.scaled_dot_product_attention``) are given the standard formula here: for q ``(b, h, t, d)``
and k/v ``(b, h, s, d_v)``, ``QKᵀ`` costs ``b·h·t·s·d`` MACs and ``AV`` ``b·h·t·s·d_v``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["count_macs"]


def _sdpa_flops(query_shape: Sequence[int], key_shape: Sequence[int], value_shape: Sequence[int]) -> int:
    b, h, t, d = query_shape[0], query_shape[1], query_shape[-2], query_shape[-1]
    s, dv = key_shape[-2], value_shape[-1]
    return 2 * b * h * t * s * (d + dv)


def _custom_mapping() -> dict[Any, Any]:
    mapping: dict[Any, Any] = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:

        def flash_cpu(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):  # type: ignore[no-untyped-def]
            return _sdpa_flops(query_shape, key_shape, value_shape)

        mapping[op] = flash_cpu  # FlopCounterMode looks formulas up by op packet
    return mapping


def count_macs(fn: Any, inputs: Sequence[torch.Tensor]) -> int:
    """Multiply-accumulates of one call ``fn(*inputs)``.

    Example:
        >>> count_macs(model.forward, [torch.rand(1, 1, 8, 8)])
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_custom_mapping()) as counter, torch.no_grad():
        fn(inputs)
    return int(counter.get_total_flops()) // 2
