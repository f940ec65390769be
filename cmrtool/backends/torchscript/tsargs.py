"""Non-tensor forward arguments of TorchScript models, and control flow that depends on them.

A scripted model may take an ``int``/``float``/``bool`` argument besides its tensors (a sample
rate, a flag) and choose between layers with it (``prim::If``). cmrtool *specializes* the
forward graph: each such argument becomes a constant, its value taken from the data file (a 0-d
tensor named after the argument, e.g. ``sample_rate = torch.tensor(16000)``) or else its
default, and constant propagation then removes the branches that value does not take. Sites in
the branch taken become ordinary sites; the saved reduced model keeps the argument and every
branch (only the weights of the taken branch change), so it runs exactly as before for that
value.

Sites that stay inside a branch (the condition depends on tensor data) are refused by
:func:`branch_reason`: interchange edits and cuts need a value that exists on every path.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cmrtool.errors import InputError

__all__ = ["scalar_args", "specialize", "branch_reason", "scalar_values_from_data"]

_KINDS = {"IntType": int, "FloatType": float, "BoolType": bool}


def scalar_args(schema: Any) -> dict[str, tuple[type, Any, bool]]:
    """Non-tensor arguments of a forward schema: name → (Python type, default, has default)."""
    out: dict[str, tuple[type, Any, bool]] = {}
    for a in schema.arguments:
        kind = a.type.kind()
        if a.name != "self" and kind in _KINDS:
            has = a.has_default_value()
            out[a.name] = (_KINDS[kind], a.default_value if has else None, has)
    return out


def specialize(graph: torch._C.Graph, schema: Any, values: Mapping[str, Any]) -> list[str]:
    """Replace the graph inputs of the scalar arguments in ``values`` by constants (in place);
    return the names replaced. Call constant propagation afterwards."""
    names = [a.name for a in schema.arguments]  # self first, like the graph's inputs
    inputs = list(graph.inputs())
    first = next(iter(graph.nodes()), None)
    done: list[str] = []
    for idx in reversed(range(1, len(inputs))):
        name = names[idx] if idx < len(names) else None
        if name not in values:
            continue
        node = graph.create("prim::Constant")
        value = values[name]
        if isinstance(value, bool):
            node.i_("value", int(value))
            node.output().setType(torch._C.BoolType.get())
        elif isinstance(value, int):
            node.i_("value", value)
            node.output().setType(torch._C.IntType.get())
        else:
            node.f_("value", float(value))
            node.output().setType(torch._C.FloatType.get())
        if first is not None:
            node.insertBefore(first)
        else:
            graph.insertNode(node)
        inputs[idx].replaceAllUsesWith(node.output())
        graph.eraseInput(idx)
        done.append(name)
    return done


def branch_reason(node: torch._C.Node) -> str | None:
    """Why a producer inside a ``prim::If``/``prim::Loop`` block cannot be a site (None at top level)."""
    block_owner = node.owningBlock().owningNode()
    if block_owner is None:
        return None
    kind = block_owner.kind()
    if kind == "prim::If":
        return ("it is inside data-dependent control flow (an if-branch, prim::If, whose condition depends on the "
                "input tensors); cmrtool reduces layers on the path every input takes")
    return f"it is inside control flow ({kind}); cmrtool reduces layers on the straight-line path only"


def scalar_values_from_data(path: str | Path | None, wanted: Mapping[str, tuple[type, Any, bool]]) -> dict[str, Any]:
    """Values of scalar arguments stored in a data file as 0-d tensors named after them."""
    if path is None or str(path) == "-" or not wanted or str(path).endswith(".onnx"):
        return {}
    p = Path(path)
    if not p.is_file():
        return {}
    found: dict[str, Any] = {}
    try:
        if p.suffix.lower() in (".safetensors", ".st"):
            from safetensors import safe_open

            with safe_open(str(p), framework="pt") as f:
                for name in f.keys():
                    if name in wanted:
                        found[name] = f.get_tensor(name)
        elif p.suffix.lower() == ".npz":
            import numpy as np

            with np.load(p, allow_pickle=False) as z:
                for name in z.files:
                    if name in wanted:
                        found[name] = torch.from_numpy(np.asarray(z[name]))
    except Exception:
        return {}  # the data reader reports a bad file precisely later
    values: dict[str, Any] = {}
    for name, t in found.items():
        typ = wanted[name][0]
        if t.dim() != 0:
            raise InputError(
                f"'{name}' in {path} has shape {tuple(t.shape)}; the model's argument {name} is one {typ.__name__} for all samples",
                f"store it as a 0-d tensor, e.g. torch.tensor({wanted[name][1] if wanted[name][2] else 0})",
            )
        values[name] = typ(t.item())
    return values
