"""Sites of plain nn.Modules found by torch.fx symbolic tracing.

The traced graph is walked like the TorchScript graph (:mod:`cmrtool.backends.torchscript.model`):
producer (a ``Linear`` or ``Conv`` module) → [BatchNorm module] → activation(s) → [pooling, channel
sites only] → site value → [flatten] → consumer (a ``Linear`` or ``Conv`` module whose input it is).
The site is read and written at the consumer's input (:class:`~cmrtool.backends.module.patterns.Tap`),
which is the site value itself or its batch-flattened form. A consumer without a bias gets one
(an nn.Module can always gain a parameter). A module whose forward does not trace is searched
part by part: its children are traced instead, and the note says so.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from cmrtool.backends.module.patterns import Tap
from cmrtool.sites import Consumer, Rejection, Site, TensorSlice

__all__ = ["fx_sites"]

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = nn.modules.batchnorm._BatchNorm
_ACT_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU,
    nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Mish,
)
_ACT_FUNCS = {
    F.relu, torch.relu, F.relu6, F.gelu, F.silu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.leaky_relu,
    F.elu, F.selu, torch.selu, F.celu, F.hardtanh, F.hardswish, F.hardsigmoid, F.softplus, F.mish, torch.clamp,
}
_ACT_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_min"}
_ID_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)
_ID_FUNCS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout}
_ID_METHODS = {"contiguous", "clone", "detach"}
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_POOL_FUNCS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
}
_PAD_FUNCS = {F.pad}


class _Graph:
    """A traced (sub)module: its graph and its submodules under fully qualified names."""

    def __init__(self, gm: fx.GraphModule, prefix: str) -> None:
        self.graph = gm.graph
        self.prefix = prefix
        self.modules = dict(gm.named_modules())

    def name(self, node: fx.Node) -> str:
        return f"{self.prefix}.{node.target}" if self.prefix else str(node.target)

    def module(self, node: fx.Node) -> nn.Module | None:
        return self.modules.get(str(node.target)) if node.op == "call_module" else None

    def kind(self, node: fx.Node) -> str:
        """One of layer, bn, act, id, pool, mean, flatten, pad, output, other."""
        if node.op == "output":
            return "output"
        m = self.module(node)
        if m is not None:
            if isinstance(m, _LAYERS):
                return "layer"
            if isinstance(m, _BN):
                return "bn"
            if isinstance(m, _ACT_MODULES) or (isinstance(m, nn.PReLU) and m.num_parameters == 1):
                return "act"
            if isinstance(m, _ID_MODULES):
                return "id"
            if isinstance(m, _POOL_MODULES):
                return "pool" if not getattr(m, "return_indices", False) else "other"
            if isinstance(m, nn.Flatten):
                return "flatten" if (m.start_dim, m.end_dim) == (1, -1) else "other"
            return "other"
        target = node.target
        if node.op == "call_function":
            if target in _ACT_FUNCS:
                return "act"
            if target in _ID_FUNCS:
                return "id"
            if target in _POOL_FUNCS:
                return "pool" if not _arg(node, 5, "return_indices", False) else "other"
            if target is torch.mean:
                return "mean"
            if target is torch.flatten:
                return "flatten" if _is_batch_flatten(node) else "other"
            if target in _PAD_FUNCS:
                return "pad"
        if node.op == "call_method":
            if target in _ACT_METHODS:
                return "act"
            if target in _ID_METHODS:
                return "id"
            if target == "mean":
                return "mean"
            if target in ("flatten", "view", "reshape"):
                return "flatten" if _is_batch_flatten(node) else "other"
        return "other"


def _arg(node: fx.Node, i: int, key: str, default: Any) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(key, default)


def _is_batch_flatten(node: fx.Node) -> bool:
    """flatten(x, 1[, -1]) or view/reshape(x, n, -1): keeps the batch axis, merges the rest."""
    if node.target in (torch.flatten, "flatten"):
        return _arg(node, 1, "start_dim", 0) == 1 and _arg(node, 2, "end_dim", -1) == -1
    shape = node.args[1:]
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    return len(shape) == 2 and shape[1] == -1 and isinstance(shape[0], fx.Node) and _is_batch_size(shape[0])


def _is_batch_size(node: fx.Node) -> bool:
    """``x.size(0)`` or ``x.shape[0]``."""
    if node.op == "call_method" and node.target == "size":
        return _arg(node, 1, "dim", None) == 0
    if node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0:
        src = node.args[0]
        return isinstance(src, fx.Node) and (
            (src.op == "call_function" and src.target is getattr and src.args[1] == "shape")
            or (src.op == "call_method" and src.target == "size" and len(src.args) == 1)
        )
    return False


def _act_label(g: _Graph, node: fx.Node) -> str:
    m = g.module(node)
    if m is not None:
        return type(m).__name__.lower()
    return str(getattr(node.target, "__name__", node.target)).rstrip("_")


def _mean_keeps_channels(node: fx.Node, spatial: int) -> bool:
    """A mean over spatial axes only of an ``(n, C, *spatial)`` map."""
    dims = _arg(node, 1, "dim", None)
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    return bool(dims) and all(isinstance(d, int) and (2 <= d < 2 + spatial or -spatial <= d < 0) for d in dims)


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 and users[0].args and users[0].args[0] is node else None


def _site(g: _Graph, node: fx.Node) -> tuple[Site, Tap] | Rejection | None:
    prod = g.module(node)
    name = g.name(node)
    unit_kind = "neuron" if isinstance(prod, nn.Linear) else "channel"
    if unit_kind == "channel" and prod.groups != 1:  # type: ignore[union-attr]
        return Rejection(name, f"grouped convolution (groups={prod.groups}) cannot lose single channels")  # type: ignore[union-attr]
    width = int(prod.weight.shape[0])  # type: ignore[union-attr]
    producers = [TensorSlice(f"{name}.weight", 0), TensorSlice(f"{name}.bias", 0, optional=prod.bias is None)]  # type: ignore[union-attr]
    v = node
    user = _only_user(v)
    if user is not None and g.kind(user) == "bn":
        bn = g.module(user)
        bname = g.name(user)
        for t in ("weight", "bias", "running_mean", "running_var"):
            if getattr(bn, t, None) is not None:
                producers.append(TensorSlice(f"{bname}.{t}", 0))
        v, user = user, _only_user(user)
    acts: list[str] = []
    while user is not None and g.kind(user) in ("act", "id"):
        if g.kind(user) == "act":
            acts.append(_act_label(g, user))
        v, user = user, _only_user(user)
    if not acts:
        return None  # not a hidden layer (e.g. an attention projection)
    spatial = prod.weight.dim() - 2  # type: ignore[union-attr]
    while unit_kind == "channel" and user is not None and (
        g.kind(user) in ("pool", "id") or (g.kind(user) == "mean" and _mean_keeps_channels(user, spatial))
    ):
        v, user = user, _only_user(user)
    if not v.users:
        return Rejection(name, "its activation is not read by any layer")
    consumers: list[Consumer] = []
    modules: list[str] = []
    splits: list[tuple[int, int, str] | None] = []
    for u in v.users:
        found = _consumer(g, v, u, width, unit_kind)
        if isinstance(found, str):
            return Rejection(name, found)
        consumers.append(found[0])
        modules.append(found[0].module)
        splits.append(found[1])
    zero = [c.module for c in consumers if c.zero_padding]
    site = Site(
        name=name, kind=unit_kind, width=width, producers=tuple(producers), consumers=tuple(consumers),
        fold="interior-exact" if zero else "exact",
        reason="; ".join(f"consumer {m} pads with zeros: exact in the interior only" for m in zero),
        activation="+".join(acts), value=modules[0], feeds_logits=all(_feeds_output(g, c.module) for c in consumers),
    )
    return site, Tap(tuple(modules), tuple(splits))


def _consumer(g: _Graph, v: fx.Node, node: fx.Node, width: int, unit_kind: str) -> tuple[Consumer, tuple[int, int, str] | None] | str:
    flattened = False
    while g.kind(node) in ("flatten", "id"):
        if not node.args or node.args[0] is not v:
            return f"its activation is an argument of {node.target}, not its input"
        flattened = flattened or g.kind(node) == "flatten"
        if len(node.users) != 1:
            return f"the output of {node.target} is used {len(node.users)} times"
        v, node = node, next(iter(node.users))
    kind = g.kind(node)
    if kind == "pad":
        return "its activation is padded explicitly before its consumer, which the nn.Module backend cannot follow"
    if kind != "layer":
        where = "the model output" if kind == "output" else str(getattr(node.target, "__name__", node.target))
        return f"its activation feeds {where}, which cannot absorb a replacement (only Linear and Conv consumers can)"
    if not node.args or node.args[0] is not v:
        return f"its activation is not the input of {g.name(node)}"
    m = g.module(node)
    cname = g.name(node)
    w = m.weight  # type: ignore[union-attr]
    split = None
    block, layout, zero = 1, "block", False
    if isinstance(m, nn.Linear):
        cols = int(w.shape[1])
        if cols % width != 0 or (cols != width and not flattened):
            return f"consumer {cname} reads {cols} features, which does not match the site's {width} units"
        block, layout = cols // width, ("block" if unit_kind == "channel" else "strided")
        if flattened and block > 1:
            split = (width, block, layout)
    else:
        if unit_kind != "channel" or flattened:
            return f"consumer {cname} convolves over an axis that is not the site's units"
        if m.groups != 1 or int(w.shape[1]) != width:  # type: ignore[union-attr]
            return f"consumer {cname} is a grouped convolution or reads {int(w.shape[1])} channels, not {width}"
        pad = m.padding  # type: ignore[union-attr]
        padded = (pad == "same" and any(k > 1 for k in w.shape[2:])) if isinstance(pad, str) else any(int(p) > 0 for p in pad)
        zero = padded and m.padding_mode == "zeros"  # type: ignore[union-attr]
    has_bias = m.bias is not None  # type: ignore[union-attr]
    consumer = Consumer(
        module=cname, op="linear" if isinstance(m, nn.Linear) else "conv", weight=f"{cname}.weight",
        fold_target=f"{cname}.bias", fold_mode="bias" if has_bias else "new-bias", block=block, layout=layout, zero_padding=zero,
    )
    return consumer, split


def _feeds_output(g: _Graph, module: str) -> bool:
    for node in g.graph.nodes:
        if node.op == "call_module" and g.name(node) == module:
            return all(u.op == "output" for u in node.users)
    return False


def _has_layers(mod: nn.Module) -> bool:
    return any(isinstance(m, _LAYERS) for m in mod.modules())


def fx_sites(root: nn.Module) -> tuple[list[tuple[Site, Tap] | Rejection], list[str]]:
    """Sites (with taps) and rejections of ``root`` by symbolic tracing, and notes on what did not trace."""
    found: list[tuple[Site, Tap] | Rejection] = []
    notes: list[str] = []

    def visit(prefix: str, mod: nn.Module) -> None:
        if isinstance(mod, _LAYERS) or not _has_layers(mod):
            return
        try:
            gm = fx.symbolic_trace(mod)
        except Exception as e:  # tracing raises many kinds of errors on dynamic Python
            notes.append(f"{prefix or 'the model'} does not trace with torch.fx ({type(e).__name__}); searched its submodules")
            for child, sub in mod.named_children():
                visit(f"{prefix}.{child}" if prefix else child, sub)
            return
        g = _Graph(gm, prefix)
        for node in g.graph.nodes:
            if g.kind(node) == "layer":
                r = _site(g, node)
                if r is not None:
                    found.append(r)

    visit("", root)
    return found, notes
