"""Sites of nn.Modules found by module structure (the known transformer layouts).

Hugging Face models cannot be traced symbolically, so their sites are recognized by the modules
they are made of; every site is read and written at its consumer's input (a :class:`Tap`):

- ``X.intermediate.dense → act → X.output.dense`` (``*Intermediate`` / ``*Output`` modules: BERT,
  RoBERTa): neuron site ``X.intermediate.dense``;
- ``X.fc2(act(X.fc1(x)))`` with an ``act_fn``-like attribute (ViT, CLIP MLPs): neuron site ``X.fc1``;
- ``X.down_proj(act(X.gate_proj(x)) * X.up_proj(x))`` (LLaMA, Mistral, Qwen2, Gemma MLPs): neuron
  site named after the MLP module ``X``; unit j has two producers, gate row j and up row j;
- ``q_proj / k_proj / v_proj → o_proj`` (LLaMA family, ViT, the digits ``Attention``) and
  ``self.query / key / value → output.dense`` (BERT, RoBERTa): head site named after the
  attention module.

A head owns ``head_dim`` rows of q/k/v and the same block of o_proj columns. With grouped-query
attention (fewer key/value heads than query heads) a unit is a whole **key/value group**: one
k/v head and the query heads that share it, so the model keeps a valid GQA layout. GPT-2's
``Conv1D`` layers and other families' layouts are in the family table
(:mod:`cmrtool.backends.module.families`, sites by :mod:`cmrtool.backends.module.familysites`).

Structures are recognized by module names and types, not by reading forward code; a module
whose forward does something else is caught by compile's fold-error check, which requires an
exact site to match the clamped original to float rounding.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn

from cmrtool.backends.module.families import layer_of
from cmrtool.sites import Consumer, Rejection, Site, TensorSlice

__all__ = ["Tap", "find_structures", "resize_heads", "HEAD_COUNT_ATTRS"]

# Attributes that hold a module's number of query heads / key-value heads / all-heads width.
HEAD_COUNT_ATTRS = ("num_heads", "heads", "num_attention_heads", "n_heads")
_KV_COUNT_ATTRS = ("num_key_value_heads", "num_kv_heads")
_HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "head_size")
_O_NAMES = ("o_proj", "out_proj")
_NORM_WORDS = ("norm", "ln")
_ACT_ATTRS = ("activation_fn", "act_fn", "act", "activation")


@dataclass(frozen=True)
class Tap:
    """Where a site's value is read and written: the input of each consumer module.

    ``splits[i]`` is None when consumer i reads the site value as it is, or ``(width, block,
    layout)`` when a Linear reads it flattened (``(n, width*block)`` ↔ ``(n, width, block)`` for
    ``block`` layout, ``(n, block*width)`` ↔ ``(n, block, width)`` for ``strided``).
    """

    modules: tuple[str, ...]
    splits: tuple[tuple[int, int, str] | None, ...]
    expert: int | None = None  # a bank of fused experts: the value of this expert (cmrtool.backends.module.experts)


def _linear(m: Any) -> bool:
    return isinstance(m, nn.Linear)


def _slices(name: str, m: nn.Linear, group: int = 1) -> list[TensorSlice]:
    return [TensorSlice(f"{name}.weight", 0, group=group), TensorSlice(f"{name}.bias", 0, optional=m.bias is None, group=group)]


def _consumer(name: str, m: nn.Linear, block: int = 1) -> Consumer:
    return Consumer(
        module=name, op="linear", weight=f"{name}.weight", fold_target=f"{name}.bias",
        fold_mode="bias" if m.bias is not None else "new-bias", block=block,
    )


def _act_name(act: Any) -> str:
    return type(act).__name__.replace("Activation", "").lower() if act is not None else "act"


def _intermediate_pair(name: str, mod: nn.Module) -> tuple[Site, Tap] | Rejection | None:
    inter, out = getattr(mod, "intermediate", None), getattr(mod, "output", None)
    if not (type(inter).__name__.endswith("Intermediate") and type(out).__name__.endswith("Output")):
        return None
    dense, odense = getattr(inter, "dense", None), getattr(out, "dense", None)
    if not (_linear(dense) and _linear(odense)):
        return None
    pname, cname = f"{name}.intermediate.dense", f"{name}.output.dense"
    if odense.in_features != dense.out_features:
        return Rejection(pname, f"{cname} reads {odense.in_features} features, {pname} makes {dense.out_features}")
    site = Site(
        name=pname, kind="neuron", width=dense.out_features, producers=tuple(_slices(pname, dense)),
        consumers=(_consumer(cname, odense),), activation=_act_name(getattr(inter, "intermediate_act_fn", None)), value=cname,
    )
    return site, Tap((cname,), (None,))


def _fc_pair(name: str, mod: nn.Module) -> tuple[Site, Tap] | Rejection | None:
    """An MLP module ``fc2(act(fc1(x)))`` (ViT, CLIP, …): fc1, fc2 and an activation attribute."""
    fc1, fc2 = getattr(mod, "fc1", None), getattr(mod, "fc2", None)
    act = next((getattr(mod, a) for a in _ACT_ATTRS if getattr(mod, a, None) is not None), None)
    if not (_linear(fc1) and _linear(fc2)) or act is None or fc2.in_features != fc1.out_features:
        return None
    p = f"{name}." if name else ""
    site = Site(
        name=p + "fc1", kind="neuron", width=fc1.out_features, producers=tuple(_slices(p + "fc1", fc1)),
        consumers=(_consumer(p + "fc2", fc2),), activation=_act_name(act), value=p + "fc2",
    )
    return site, Tap((p + "fc2",), (None,))


def _gated(name: str, mod: nn.Module) -> tuple[Site, Tap] | Rejection | None:
    gate, up, down = (getattr(mod, k, None) for k in ("gate_proj", "up_proj", "down_proj"))
    if not (_linear(gate) and _linear(up) and _linear(down)):
        return None
    if not (gate.out_features == up.out_features == down.in_features) or getattr(mod, "act_fn", None) is None:
        return Rejection(name, "gate_proj/up_proj/down_proj do not form a gated FFN act(gate(x)) * up(x) → down")
    cname = f"{name}.down_proj"
    site = Site(
        name=name, kind="neuron", width=gate.out_features,
        producers=tuple(_slices(f"{name}.gate_proj", gate) + _slices(f"{name}.up_proj", up)),
        consumers=(_consumer(cname, down),), activation=f"{_act_name(mod.act_fn)}(gate)*up", value=cname,
    )
    return site, Tap((cname,), (None,))


def _head_dim(*mods: Any, config: Any = None) -> int | None:
    for m in mods:
        for attr in _HEAD_DIM_ATTRS:
            v = getattr(m, attr, None)
            if isinstance(v, int) and v > 0:
                return v
    v = getattr(config, "head_dim", None)
    return v if isinstance(v, int) and v > 0 else None


def _heads(
    name: str, q: tuple[str, nn.Linear], k: tuple[str, nn.Linear], v: tuple[str, nn.Linear], o: tuple[str, nn.Linear], hd: int | None
) -> tuple[Site, Tap] | Rejection:
    if hd is None:
        return Rejection(name, "attention module without a head_dim (or attention_head_size) attribute: its heads cannot be told apart")
    (qn, qm), (kn, km), (vn, vm), (on, om) = q, k, v, o
    if qm.out_features % hd or km.out_features % hd or vm.out_features != km.out_features or om.in_features != qm.out_features:
        return Rejection(name, f"q/k/v/o projection shapes do not split into heads of size {hd}")
    heads, kv = qm.out_features // hd, km.out_features // hd
    if heads % kv:
        return Rejection(name, f"{heads} query heads do not share {kv} key/value heads evenly")
    per_unit = heads // kv * hd  # q rows and o columns per unit: one head, or one key/value group under GQA
    site = Site(
        name=name, kind="head", width=kv,
        producers=tuple(_slices(qn, qm, per_unit) + _slices(kn, km, hd) + _slices(vn, vm, hd)),
        consumers=(_consumer(on, om, block=per_unit),), activation="attention", value=on, group=per_unit,
        notes=(f"grouped-query attention: a unit is a key/value group of {heads // kv} query heads",) if kv < heads else (),
    )
    return site, Tap((on,), (None,))


def _extra_params(mod: nn.Module, known: set[str]) -> list[str]:
    """Parameters of an attention module outside its projections and norms (e.g. per-head sinks)."""
    out = []
    for pname, _ in mod.named_parameters():
        head = pname.split(".", 1)[0]
        if head not in known and not any(w in head.lower() for w in _NORM_WORDS):
            out.append(pname)
    return out


def _qkvo(name: str, mod: nn.Module, config: Any) -> tuple[Site, Tap] | Rejection | None:
    q, k, v = (getattr(mod, f"{c}_proj", None) for c in "qkv")
    oname = next((n for n in _O_NAMES if _linear(getattr(mod, n, None))), None)
    if not (_linear(q) and _linear(k) and _linear(v) and oname):
        return None
    extra = _extra_params(mod, {"q_proj", "k_proj", "v_proj", oname})
    if extra:
        return Rejection(name, f"attention module has parameters cmrtool cannot slice per head: {', '.join(extra[:3])}")
    p = f"{name}." if name else ""
    return _heads(name, (p + "q_proj", q), (p + "k_proj", k), (p + "v_proj", v), (p + oname, getattr(mod, oname)), _head_dim(mod, config=config))


def _self_output(name: str, mod: nn.Module) -> tuple[Site, Tap] | Rejection | None:
    out = getattr(mod, "output", None)
    for sname in ("self", "attention"):
        s = getattr(mod, sname, None)
        q, k, v = (getattr(s, c, None) for c in ("query", "key", "value"))
        if _linear(q) and _linear(k) and _linear(v) and _linear(getattr(out, "dense", None)):
            p = f"{name}.{sname}"
            return _heads(name, (f"{p}.query", q), (f"{p}.key", k), (f"{p}.value", v), (f"{name}.output.dense", out.dense), _head_dim(s))
    return None


def find_structures(root: nn.Module, config: Any = None) -> Iterator[tuple[Site, Tap] | Rejection | str]:
    """Sites (with taps), rejections and unsupported-layer labels of the known structures."""
    conv1d_parents: set[str] = set()
    for name, mod in root.named_modules():
        for finder in (_intermediate_pair, _fc_pair, _gated):
            found = finder(name, mod)
            if found is not None:
                yield found
        found = _qkvo(name, mod, config) or _self_output(name, mod)
        if found is not None:
            yield found
        if type(mod).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D (GPT-2): weight (in, out)
            conv1d_parents.add(name.rsplit(".", 1)[0] if "." in name else name)
        elif isinstance(mod, (nn.MultiheadAttention, nn.RNNBase)):
            yield f"{type(mod).__name__} ({name})"
    for parent in sorted(conv1d_parents):
        if layer_of(root.get_submodule(parent)) is None:  # the family table's layouts are found there
            yield Rejection(parent, "Conv1D layers (transposed weights) of a layout the family table does not list")


def resize_heads(root: nn.Module, site: Site, kept: int) -> None:
    """Set the head-count attributes of a head site's modules after ``kept`` units remain."""
    q_weight = site.producers[0].name  # "<owner>.q_proj.weight": the module holding q_proj / query
    q_owner = q_weight.rsplit(".", 2)[0] if q_weight.count(".") >= 2 else ""
    q_rows = kept * site.group
    hd = site.producers[2].group  # producers: q weight, q bias, k weight (one head per group), ...
    for owner in dict.fromkeys([site.name, q_owner]):
        mod = root.get_submodule(owner)
        for attr in HEAD_COUNT_ATTRS:
            if isinstance(getattr(mod, attr, None), int):
                setattr(mod, attr, q_rows // hd)
        for attr in _KV_COUNT_ATTRS:
            if isinstance(getattr(mod, attr, None), int):
                setattr(mod, attr, kept)
        if isinstance(getattr(mod, "all_head_size", None), int):
            mod.all_head_size = q_rows
