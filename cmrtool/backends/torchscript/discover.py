"""Site discovery in TorchScript graphs: the ops a site chain is made of, and what a node says.

:class:`~cmrtool.backends.torchscript.model.TorchScriptModel` walks its prepared graph for
producer → [batch_norm] → activation(s) → [pooling] → [flatten] → consumer chains; the op
tables here say which node kinds play which part, the predicates read a node's constant
arguments (convolution groups and padding, pad modes, batch-keeping flattens), and
:func:`no_sites_hint` says in one line why a model has no sites (any backend).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from cmrtool.backends.torchscript.graph import const_value
from cmrtool.sites import Rejection

__all__ = ["no_sites_hint"]

_CONV_OPS = frozenset({"aten::conv1d", "aten::conv2d", "aten::conv3d", "aten::_convolution"})
_LINEAR_OPS = frozenset({"aten::linear"})
_ACTIVATIONS = frozenset(
    f"aten::{name}{suffix}"
    for name in (
        "relu", "gelu", "silu", "sigmoid", "tanh", "leaky_relu", "elu", "selu", "celu", "hardtanh",
        "relu6", "hardswish", "hardsigmoid", "softplus", "mish", "clamp", "clamp_min", "prelu",
    )
    for suffix in ("", "_")
)
_IDENTITY = frozenset(
    {
        "aten::dropout", "aten::dropout_", "aten::feature_dropout", "aten::alpha_dropout",
        "aten::feature_alpha_dropout", "aten::contiguous", "aten::clone", "aten::detach",
    }
)
# Spatial reductions: they keep the unit axis, and the site value is taken after them.
_POOLS = frozenset(
    f"aten::{p}{d}"
    for p in ("avg_pool", "max_pool", "adaptive_avg_pool", "adaptive_max_pool")
    for d in ("1d", "2d", "3d")
) | {"aten::mean"}
_FLATTEN = frozenset({"aten::flatten", "aten::view", "aten::reshape"})
_PADS = frozenset(
    {"aten::pad", "aten::constant_pad_nd"}
    | {f"aten::{k}_pad{d}" for k in ("reflection", "replication") for d in ("1d", "2d", "3d")}
)
# Layers with weights that cmrtool does not reduce; named when nothing reducible is found.
_KNOWN_PARAM_OPS = _CONV_OPS | _LINEAR_OPS | {
    "aten::batch_norm", "aten::layer_norm", "aten::group_norm", "aten::instance_norm", "aten::add",
    "aten::mul", "aten::embedding", "aten::prelu",
}


def _short(kind: str) -> str:
    return kind.split("::", 1)[-1]


def _holds_tensors(obj: Any) -> bool:
    """A weight: a tensor, or a list of tensors (e.g. an LSTM's ``_flat_weights``)."""
    if isinstance(obj, torch.Tensor):
        return True
    return isinstance(obj, (list, tuple)) and bool(obj) and all(isinstance(t, torch.Tensor) for t in obj)


def _conv_flags(node: torch._C.Node) -> tuple[bool, int]:
    """(transposed, groups) of a convolution node."""
    if node.kind() == "aten::_convolution":
        return bool(const_value(node.inputsAt(6))), int(const_value(node.inputsAt(8)))
    return False, int(const_value(node.inputsAt(6)))


def _conv_zero_padding(node: torch._C.Node, weight: torch.Tensor) -> bool:
    pad = const_value(node.inputsAt(4))
    if isinstance(pad, str):
        return pad == "same" and any(k > 1 for k in weight.shape[2:])
    pads = [pad] if isinstance(pad, int) else list(pad)
    return any(int(p) > 0 for p in pads)


def _pad_mode(node: torch._C.Node) -> str | None:
    kind = node.kind()
    if kind == "aten::constant_pad_nd":
        return "constant"
    if kind != "aten::pad":
        return "reflect"  # reflection/replication pads repeat the constant
    try:
        mode = const_value(node.inputsAt(2))
    except ValueError:
        return None
    return str(mode)


def _is_batch_flatten(node: torch._C.Node) -> bool:
    """flatten(x, 1, -1), or view/reshape to (n, -1): keeps the batch axis, merges the rest."""
    try:
        if node.kind() == "aten::flatten":
            return int(const_value(node.inputsAt(1))) == 1 and int(const_value(node.inputsAt(2))) == -1
        shape_node = node.inputsAt(1).node()
        if shape_node.kind() == "prim::ListConstruct":
            items = list(shape_node.inputs())
            return len(items) == 2 and items[1].node().kind() == "prim::Constant" and items[1].toIValue() == -1
        shape = const_value(node.inputsAt(1))
        return len(shape) == 2 and shape[1] == -1
    except (ValueError, RuntimeError, TypeError):
        return False


def no_sites_hint(rejected: Sequence[Rejection], unsupported: Sequence[str]) -> str:
    """One line explaining why a model has no sites."""
    parts: list[str] = []
    if rejected:
        parts.append("; ".join(f"{r.name}: {r.reason}" for r in rejected[:3]))
    if unsupported:
        parts.append("unsupported layers: " + ", ".join(unsupported[:5]))
    if not parts:
        parts.append("cmrtool reduces Linear/Conv → activation → Linear/Conv chains and found none")
    return "; ".join(parts)
