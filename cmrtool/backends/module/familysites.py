"""Sites of the layer types in the family table (:mod:`cmrtool.backends.module.families`).

Each table entry becomes sites over canonical tensors (:mod:`cmrtool.backends.module.layouts`), so
folding sees every producer as rows and every consumer as columns, whatever the stock layout:

- an FFN ``consumer(act(producer(x)))`` (GPT-2 ``Conv1D``, GPT-NeoX, Falcon): a neuron site named
  after the producer; a gated FFN with a fused ``gate_up_proj`` (Phi-3): unit j has two producer
  rows, gate row j and up row j (pieces ``#gate`` and ``#up``), and the site is named after the MLP;
- a bank of experts: one site per expert, ``<experts>.<e>``, read at expert e's value
  (:mod:`cmrtool.backends.module.experts`); its down projection has no bias, so its replaced units can
  only be deleted (zero replacement) in a stock checkpoint;
- attention with a fused q/k/v producer: q, k, v blocks (GPT-2 ``c_attn`` in thirds, Phi-3
  ``qkv_proj`` in the proportions g : 1 : 1 of grouped-query attention; pieces ``#q/#k/#v``; a unit
  is a key/value head with its g query heads) or per-head blocks (GPT-NeoX ``query_key_value``, viewed as
  ``(heads, 3·head_dim)``: head h owns rows ``3·hd·h … 3·hd·h+3·hd−1``); the output projection's
  ``head_dim`` columns per head are the consumer block (CMR A.6, Proposition 10).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from cmrtool.backends.module.families import Layer, layer_of
from cmrtool.backends.module.layouts import View, piece
from cmrtool.backends.module.patterns import Tap
from cmrtool.sites import Consumer, Rejection, Site, TensorSlice

__all__ = ["family_structures", "resize_family_heads", "sync_family_shapes", "eager_experts"]

Found = tuple[Site, Tap] | Rejection | View


def _weight(m: Any) -> Any:
    return getattr(m, "weight", None)


def _views(name: str, m: nn.Module, layer: Layer, labels: tuple[str, ...] = (), ratio: tuple[int, ...] = ()) -> list[View]:
    """Views of a producer/consumer module's weight and bias (transposed, cut into ``labels``)."""
    out = []
    for leaf in ("weight", "bias"):
        t = getattr(m, leaf, None)
        if t is None:
            continue
        transposed = layer.transposed and leaf == "weight"
        if transposed or labels:
            out.append(View(f"{name}.{leaf}", transpose=transposed, labels=labels, ratio=ratio))
    return out


def _producer_slices(name: str, m: nn.Module, label: str = "", group: int = 1) -> list[TensorSlice]:
    w = f"{name}.weight" if not label else piece(f"{name}.weight", label)
    b = f"{name}.bias" if not label else piece(f"{name}.bias", label)
    return [TensorSlice(w, 0, group=group), TensorSlice(b, 0, optional=getattr(m, "bias", None) is None, group=group)]


def _consumer(name: str, m: nn.Module, block: int = 1) -> Consumer:
    has_bias = getattr(m, "bias", None) is not None
    return Consumer(module=name, op="linear", weight=f"{name}.weight", fold_target=f"{name}.bias", fold_mode="bias" if has_bias else "new-bias", block=block)


def _act(mod: nn.Module, layer: Layer) -> str:
    act = getattr(mod, layer.act, None)
    return type(act).__name__.replace("Activation", "").lower() if act is not None else "act"


def _ffn(name: str, mod: nn.Module, layer: Layer) -> Iterator[Found]:
    p, c = getattr(mod, layer.producer, None), getattr(mod, layer.consumer, None)
    if _weight(p) is None or _weight(c) is None:
        yield Rejection(name, f"{type(mod).__name__} without the {layer.producer}/{layer.consumer} layers cmrtool expects")
        return
    pn, cn = f"{name}.{layer.producer}", f"{name}.{layer.consumer}"
    labels = layer.fused
    yield from _views(pn, p, layer, labels)
    yield from _views(cn, c, layer)
    rows = p.weight.shape[-1 if layer.transposed else 0] // max(len(labels), 1)
    cols = c.weight.shape[0 if layer.transposed else 1]
    if rows != cols:
        yield Rejection(name, f"{cn} reads {cols} features, {pn} makes {rows}")
        return
    producers = [s for lb in labels for s in _producer_slices(pn, p, lb)] if labels else _producer_slices(pn, p)
    act = _act(mod, layer) + ("(gate)*up" if layer.gated else "")
    site = Site(name=name if layer.gated else pn, kind="neuron", width=rows, producers=tuple(producers),
                consumers=(_consumer(cn, c),), activation=act, value=cn)
    yield site, Tap((cn,), (None,))


def _experts(name: str, mod: nn.Module, layer: Layer) -> Iterator[Found]:
    gu, down = getattr(mod, layer.producer, None), getattr(mod, layer.consumer, None)
    odd = [a for a, bad in (("is_transposed", True), ("is_concatenated", False), ("has_bias", True)) if getattr(mod, a, not bad) == bad]
    if gu is None or down is None or gu.dim() != 3 or down.dim() != 3 or odd or getattr(mod, layer.act, None) is None:
        yield Rejection(name, f"{type(mod).__name__} is not a bank of concatenated, bias-free gate_up/down experts{': ' + odd[0] if odd else ''}")
        return
    experts, width = gu.shape[0], down.shape[2]
    gname, dname = f"{name}.{layer.producer}", f"{name}.{layer.consumer}"
    yield View(gname, labels=layer.fused, experts=experts)
    yield View(dname, experts=experts)
    act = _act(mod, layer) + "(gate)*up"
    for e in range(experts):
        producers = tuple(TensorSlice(piece(gname, f"{e}.{lb}"), 0) for lb in layer.fused)
        consumer = Consumer(module=name, op="linear", weight=piece(dname, str(e)), fold_target=piece(dname, f"{e}.bias"), fold_mode="new-bias")
        site = Site(name=f"{name}.{e}", kind="neuron", width=width, producers=producers, consumers=(consumer,), activation=act,
                    value=f"{name}[{e}]", notes=("expert FFN: the router is untouched; the down projection has no bias",))
        yield site, Tap((name,), (None,), expert=e)


def _fused_heads(name: str, mod: nn.Module, layer: Layer, config: Any) -> Iterator[Found]:
    qkv, out = getattr(mod, layer.producer, None), getattr(mod, layer.consumer, None)
    hd = next((v for v in (getattr(mod, a, None) for a in ("head_dim", "head_size")) if isinstance(v, int) and v > 0), None)
    if _weight(qkv) is None or _weight(out) is None or hd is None or getattr(mod, "is_cross_attention", False):
        yield Rejection(name, f"{type(mod).__name__}: no fused q/k/v projection with a known head size (cross-attention is not supported)")
        return
    qn, on = f"{name}.{layer.producer}", f"{name}.{layer.consumer}"
    rows = qkv.weight.shape[-1 if layer.transposed else 0] // hd  # q, k and v heads together
    kv = getattr(mod, "num_key_value_heads", None)
    kv = kv if isinstance(kv, int) and kv > 0 else rows // 3
    g = (rows - 2 * kv) // kv  # query heads per key/value head (1 without grouped-query attention)
    if rows % hd or g < 1 or (g + 2) * kv != rows:
        yield Rejection(name, f"{qn} does not split into q, k and v heads of size {hd}")
        return
    yield from _views(qn, qkv, layer, layer.fused, (g, 1, 1) if layer.fused else ())
    yield from _views(on, out, layer)
    if layer.per_head:  # [q_h; k_h; v_h] per head: one block of 3·hd rows per unit
        producers = _producer_slices(qn, qkv, group=3 * hd)
    else:  # a unit is a key/value head and its g query heads
        producers = [s for lb, n in zip(layer.fused, (g, 1, 1)) for s in _producer_slices(qn, qkv, lb, group=n * hd)]
    notes = (f"grouped-query attention: a unit is a key/value group of {g} query heads",) if g > 1 else ()
    site = Site(name=name, kind="head", width=kv, producers=tuple(producers), consumers=(_consumer(on, out, block=g * hd),),
                activation="attention", value=on, group=g * hd, notes=notes)
    yield site, Tap((on,), (None,))


def family_structures(root: nn.Module, config: Any = None) -> Iterator[Found]:
    """Sites (with taps), views and rejections of the table's layer types."""
    for name, mod in root.named_modules():
        layer = layer_of(mod)
        if layer is None:
            continue
        if layer.experts:
            yield from _experts(name, mod, layer)
        elif layer.kind == "head":
            yield from _fused_heads(name, mod, layer, config)
        else:
            yield from _ffn(name, mod, layer)


def resize_family_heads(root: nn.Module, site: Site, kept: int) -> bool:
    """Set a table head site's head counts (False when the site is not one of the table's)."""
    mod = root.get_submodule(site.name)
    layer = layer_of(mod)
    if layer is None or layer.kind != "head":
        return False
    groups = getattr(mod, "num_key_value_groups", 1)
    for attr in ("num_heads", "num_attention_heads"):
        if isinstance(getattr(mod, attr, None), int):
            setattr(mod, attr, kept * groups)
    if isinstance(getattr(mod, "num_key_value_heads", None), int):
        mod.num_key_value_heads = kept
    if isinstance(getattr(getattr(mod, "config", None), "num_attention_heads", None), int):
        mod.config.num_attention_heads = kept * groups  # Phi-3 reads the query width from its config
    if isinstance(getattr(mod, "split_size", None), int):  # GPT-2 splits c_attn's output by this
        mod.split_size = kept * site.group
    return True


def sync_family_shapes(root: nn.Module) -> None:
    """Width attributes that forwards read, after surgery: ``Conv1D.nf``, experts' ``intermediate_dim``."""
    for m in root.modules():
        if type(m).__name__ == "Conv1D" and isinstance(getattr(m, "nf", None), int):
            m.nf = int(m.weight.shape[1])
        layer = layer_of(m)
        if layer is not None and layer.experts and isinstance(getattr(m, "intermediate_dim", None), int):
            m.intermediate_dim = int(getattr(m, layer.consumer).shape[2])


def eager_experts(root: nn.Module) -> None:
    """Run fused experts with transformers' eager loop when the dtype is float64: the default
    ``grouped_mm`` kernel takes float32/16 only, and cmrtool checks folds in float64."""
    for m in root.modules():
        layer = layer_of(m)
        config = getattr(m, "config", None)
        weight = getattr(m, layer.producer, None) if layer is not None and layer.experts else None
        if weight is not None and weight.dtype == torch.float64 and hasattr(config, "_experts_implementation"):
            config._experts_implementation = "eager"
