"""TorchScript graphs as programs: prepared once, then copied and edited into small functions.

A ScriptModule refuses forward hooks, so cmrtool works on its ``inlined_graph`` instead:

1. **Prepare** (once): inline every submodule, replace non-tensor attributes (``training``,
   config flags) by their current values, then constant-propagate and remove dead code. This
   resolves ``prim::If`` blocks that depend on module attributes (e.g. ``if self.use_bn``), so
   producers inside them become visible, and drops training-only branches.
2. **Derive** functions from copies of the prepared graph:

   - *capture*: extra graph outputs for site values;
   - *edit*: ``v' = where(mask, fill, v)`` inserted right after a site value, used by every
     later use of ``v``; this clamps replaced units (fold-error checks) or swaps in source
     activations (interchange interventions) inside one batched call;
   - *cut*: a site value replaced by a new graph input, then dead code removed (including
     checks with side effects), so the function computes only what the rest of the network
     needs from that point on.

   ``torch._C._create_function_from_graph`` turns each edited graph into a callable taking the
   module's ``_c`` object as its first argument. Functions are cached by their edit signature.

Values are addressed by their debug names, which ``Graph.copy`` preserves except for purely
numeric ones; :meth:`GraphProgram.handle` gives such values an explicit name first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from cmrtool.errors import InputError

__all__ = [
    "GraphProgram",
    "attr_path",
    "iter_nodes",
    "const_value",
    "real_uses",
    "SHAPE_ONLY_OPS",
    "input_problem",
]

# Uses that read only metadata (shape, rank, dtype), never the values: they do not consume units.
SHAPE_ONLY_OPS = frozenset(
    {
        "aten::size",
        "aten::dim",
        "aten::len",
        "aten::numel",
        "prim::shape",
        "prim::device",
        "prim::dtype",
        "prim::layout",
        "aten::is_floating_point",
        "prim::is_cuda",
    }
)

_SCALAR_KINDS = frozenset({"BoolType", "IntType", "FloatType", "StringType", "NoneType"})
OPTIMIZE = False


def iter_nodes(block: Any) -> Iterator[torch._C.Node]:
    """All nodes of a graph or block, depth first through sub-blocks."""
    for node in block.nodes():
        yield node
        for sub in node.blocks():
            yield from iter_nodes(sub)


def input_problem(e: RuntimeError, inputs: Sequence[torch.Tensor]) -> InputError:
    shapes = ", ".join(f"{tuple(t.shape[1:])} {str(t.dtype).removeprefix('torch.')}" for t in inputs)
    first = str(e).strip().splitlines()
    detail = next((ln.strip() for ln in reversed(first) if ln.strip() and not ln.startswith(" ")), "")
    return InputError(
        f"the model rejected inputs with per-sample shape {shapes}: {detail[:200]}",
        "check that the data was prepared for this model (shape, dtype, tensor names)",
    )


def _reads(node: torch._C.Node) -> list[torch._C.Value]:
    """Values a node reads: its inputs and what its sub-blocks use from outside them."""
    values = list(node.inputs())
    for block in node.blocks():
        inner = {o.unique() for n in iter_nodes(block) for o in n.outputs()}
        inner.update(p.unique() for p in block.inputs())
        for n in iter_nodes(block):
            values.extend(i for i in n.inputs() if i.unique() not in inner)
        values.extend(o for o in block.outputs() if o.unique() not in inner)
    return values


def attr_path(value: torch._C.Value, self_value: torch._C.Value) -> tuple[str, ...] | None:
    """The attribute path of ``value`` from ``self`` (e.g. ``('body', '0', 'weight')``), or None."""
    path: list[str] = []
    v = value
    while v.node().kind() == "prim::GetAttr":
        path.append(v.node().s("name"))
        v = v.node().input()
    if v.unique() != self_value.unique():
        return None
    return tuple(reversed(path))


def const_value(value: torch._C.Value) -> Any:
    """The Python value of a ``prim::Constant`` (or a list of constants); raises if not constant."""
    node = value.node()
    if node.kind() == "prim::Constant":
        return value.toIValue()
    if node.kind() == "prim::ListConstruct":
        return [const_value(v) for v in node.inputs()]
    raise ValueError(f"{value.debugName()} is not a constant")


def is_none(value: torch._C.Value) -> bool:
    return value.node().kind() == "prim::Constant" and value.type().kind() == "NoneType"


def real_uses(value: torch._C.Value) -> list[Any]:
    """Uses of ``value`` that read its data (shape queries excluded)."""
    return [u for u in value.uses() if u.user.kind() not in SHAPE_ONLY_OPS]


def _resolve_attr(module: Any, path: Sequence[str]) -> Any:
    obj = module
    for name in path:
        obj = getattr(obj, name)
    return obj


def _fold_scalar_attributes(module: Any, graph: torch._C.Graph) -> None:
    """Replace GetAttr of bool/int/float/str/None attributes by constants of their value."""
    self_value = next(iter(graph.inputs()))
    for node in list(iter_nodes(graph)):
        if node.kind() != "prim::GetAttr" or node.output().type().kind() not in _SCALAR_KINDS:
            continue
        path = attr_path(node.output(), self_value)
        if path is None:
            continue
        try:
            val = _resolve_attr(module, path)
        except AttributeError:
            continue
        if val is not None and not isinstance(val, (bool, int, float, str)):
            continue
        with graph.insert_point_guard(node):
            c = graph.insertConstant(val)
        node.output().replaceAllUsesWith(c)
        node.destroy()


class GraphProgram:
    """The prepared forward graph of a ScriptModule and the functions derived from it.

    Args:
        module: a loaded ``torch.jit.ScriptModule`` in eval mode.
    """

    def __init__(self, module: Any, prepare: Callable[[torch._C.Graph], Any] | None = None) -> None:
        self.module = module
        graph = module.inlined_graph  # a fresh graph on every access
        if prepare is not None:  # e.g. scalar arguments made constants (cmrtool.backends.torchscript.tsargs)
            prepare(graph)
        _fold_scalar_attributes(module, graph)
        torch._C._jit_pass_constant_propagation(graph)
        torch._C._jit_pass_dce(graph)
        self.graph = graph
        self.self_value = next(iter(graph.inputs()))
        self._cache: dict[tuple[Any, ...], Callable[..., Any]] = {}
        self._frontiers: dict[str, list[str]] = {}
        self._positions: dict[str, int] = {}
        self._locations: dict[str, tuple[int, int]] = {}
        self._index: dict[int, dict[str, torch._C.Value]] = {}
        self._counter = 0

    # -- addressing ---------------------------------------------------------------------------
    def find(self, graph: torch._C.Graph, name: str) -> torch._C.Value:
        """The value called ``name`` in ``graph`` (the prepared graph or a copy of it)."""
        index = self._index.get(id(graph)) if graph is self.graph else None
        if index is None:
            index = {v.debugName(): v for v in graph.inputs()}
            for node in iter_nodes(graph):
                for v in node.outputs():
                    index.setdefault(v.debugName(), v)
            if graph is self.graph:
                self._index = {id(graph): index}
        try:
            return index[name]
        except KeyError:
            raise KeyError(name) from None

    def _finder(self, graph: torch._C.Graph) -> Callable[[str], torch._C.Value]:
        """A name → value lookup over a copy of the prepared graph.

        Copies keep node order, so a top-level value is found by its (node index, output index)
        in the prepared graph without walking the copy; anything else falls back to a search.
        """
        if not self._locations:
            self._locations = {v.debugName(): (-1, i) for i, v in enumerate(self.graph.inputs())}
            for n, node in enumerate(self.graph.nodes()):
                for k, v in enumerate(node.outputs()):
                    self._locations.setdefault(v.debugName(), (n, k))
        nodes: list[torch._C.Node] = []

        def find(name: str) -> torch._C.Value:
            loc = self._locations.get(name)
            if loc is None:
                return self.find(graph, name)
            n, k = loc
            if n < 0:
                return list(graph.inputs())[k]
            if not nodes:
                nodes.extend(graph.nodes())
            return nodes[n].outputsAt(k)

        return find

    def position(self, name: str) -> int:
        """Index of the top-level node that computes value ``name`` (graph order)."""
        if not self._positions:
            for i, node in enumerate(self.graph.nodes()):
                for o in node.outputs():
                    self._positions[o.debugName()] = i
        return self._positions.get(name, 0)

    def handle(self, value: torch._C.Value) -> str:
        """A name for ``value`` that survives ``Graph.copy`` (numeric debug names are renumbered)."""
        name = value.debugName()
        if name.isdigit() or not name:
            self._counter += 1
            name = f"cmrtool_v{self._counter}"
            value.setDebugName(name)
            self._index.clear()
            self._positions.clear()
            self._locations.clear()
        return name

    def frontier(self, name: str) -> list[str]:
        """Upstream tensors the part of the graph after value ``name`` reads (besides ``name``).

        The downstream part D is every top-level node that uses ``name`` or a value of D
        (also inside its sub-blocks). Its frontier is every tensor D reads that D does not
        produce, other than graph inputs, constants and module attributes: for a residual
        block, the residual stream. Cutting at ``[name, *frontier]`` leaves only D to run.
        """
        if name in self._frontiers:
            return list(self._frontiers[name])
        g = self.graph
        v = self.find(g, name)
        down = {v.unique()}
        nodes = []
        for node in g.nodes():
            if any(i.unique() in down for i in _reads(node)):
                nodes.append(node)
                down.update(o.unique() for o in node.outputs())
        inputs = {i.unique() for i in g.inputs()}
        found: list[str] = []
        seen: set[int] = set()
        for node in nodes:
            for i in _reads(node):
                u = i.unique()
                if u in down or u in seen or u in inputs or i.type().kind() != "TensorType":
                    continue
                if i.node().kind() in ("prim::Constant", "prim::GetAttr"):
                    continue
                seen.add(u)
                found.append(self.handle(i))
        self._frontiers[name] = found
        return list(found)

    def path_of(self, value: torch._C.Value) -> tuple[str, ...] | None:
        return attr_path(value, self.self_value)

    # -- derived functions --------------------------------------------------------------------
    def function(
        self,
        outputs: Sequence[str] = (),
        edits: Sequence[str] = (),
        cuts: Sequence[str] = (),
        moments: Sequence[tuple[str, tuple[int, ...]]] = (),
        maps: Sequence[tuple[str, int]] = (),
        blend_edits: Sequence[bool] = (),
    ) -> Callable[..., Any]:
        """A callable ``f(*inputs, *cut_values, *[mask, fill per edit], *[matrix_t, bias per map])``.

        Returns the model's output when nothing else is asked for, else a tuple
        ``(model_output, *values, *[mean, m2, numel per moments request])``.

        Args:
            outputs: value names to return besides the model output (after their edit, if any).
            edits: value names ``v`` to replace by ``where(mask, fill, v)``.
            blend_edits: per edit, True to take that edit's mask as 0/1 weights of ``v``'s
                dtype and compute ``lerp(v, fill, mask)`` = ``mask·fill + (1 − mask)·v``: the same
                values as ``where`` for finite ones, several times faster on CPU.
            cuts: value names replaced by new inputs; upstream work they made dead is removed.
            maps: ``(value name, unit axis)``: replace the value by the affine map of its units
                ``movedim(movedim(v, axis, -1) @ matrix_t, -1, axis) + bias`` (affine clamps).
            moments: ``(value name, dims)``: return the value's mean over ``dims`` (kept as
                size-1 dims), the sum of squared deviations from it over ``dims`` (the
                two-pass form), and its element count, computed inside the graph so the
                activation never leaves the executor.
        """
        blends = tuple(bool(b) for b in blend_edits) if any(blend_edits) else ()
        key = (tuple(outputs), tuple(edits), tuple(cuts), tuple((n, tuple(d)) for n, d in moments), tuple(maps), blends)
        fn = self._cache.get(key)
        if fn is None:
            fn = self._build(*key)
            self._cache[key] = fn
        return fn

    def _build(
        self,
        outputs: tuple[str, ...],
        edits: tuple[str, ...],
        cuts: tuple[str, ...],
        moments: tuple[tuple[str, tuple[int, ...]], ...] = (),
        maps: tuple[tuple[str, int], ...] = (),
        blend_edits: tuple[bool, ...] = (),
    ) -> Callable[..., Any]:
        g = self.graph.copy()
        find = self._finder(g)
        replaced: dict[str, torch._C.Value] = {}
        for name in cuts:
            v = find(name)
            new = g.addInput(f"cut_{len(replaced)}")
            new.setType(v.type())
            v.replaceAllUsesWith(new)
            replaced[name] = new
        for i, name in enumerate(edits):
            v = replaced.get(name) or find(name)
            mask = g.addInput(f"mask_{i}")
            fill = g.addInput(f"fill_{i}")
            # where(mask, fill, v), or lerp(v, fill, mask) for 0/1 weights
            op, args = ("aten::lerp", [v, fill, mask]) if i < len(blend_edits) and blend_edits[i] else ("aten::where", [mask, fill, v])
            anchor = v.node() if v.node().kind() != "prim::Param" else None
            if anchor is None:  # an input (e.g. a cut): insert at the top of the graph
                first = next(iter(g.nodes()))
                with g.insert_point_guard(first):
                    w = g.insert(op, args)
                w.node().moveBefore(first)
            else:
                with g.insert_point_guard(anchor):
                    w = g.insert(op, args)
                w.node().moveAfter(anchor)
            v.replaceAllUsesAfterNodeWith(w.node(), w)
            replaced[name] = w
        for i, (name, axis) in enumerate(maps):
            v = replaced.get(name) or find(name)
            mt = g.addInput(f"map_{i}")
            bias = g.addInput(f"map_bias_{i}")
            anchor = v.node()
            with g.insert_point_guard(anchor):
                moved = g.insert("aten::movedim", [v, g.insertConstant(axis), g.insertConstant(-1)])
                mixed = g.insert("aten::matmul", [moved, mt])
                back = g.insert("aten::movedim", [mixed, g.insertConstant(-1), g.insertConstant(axis)])
                out = g.insert("aten::add", [back, bias])
            for n in (out, back, mixed, moved):  # after the anchor, in order
                n.node().moveAfter(anchor)
            v.replaceAllUsesAfterNodeWith(out.node(), out)
            replaced[name] = out
        extra_stats: list[torch._C.Value] = []
        for name, dims in moments:
            v = replaced.get(name) or find(name)
            with g.insert_point_guard(g.return_node()):
                dim_list = g.insertConstant(list(dims))
                mean = g.insert("aten::mean", [v, dim_list, g.insertConstant(True)])
                dev = g.insert("aten::sub", [v, mean])
                m2 = g.insert("aten::sum", [g.insert("aten::mul", [dev, dev]), dim_list, g.insertConstant(False)])
                numel = g.insert("aten::numel", [v])
            extra_stats += [mean, m2, numel]
        if outputs or extra_stats:
            extra = [replaced.get(name) or find(name) for name in outputs] + extra_stats
            n_orig = len(list(g.outputs()))
            for v in extra:
                g.registerOutput(v)
            if n_orig + len(extra) > 1:
                g.makeMultiOutputIntoTuple()
        if cuts:
            torch._C._jit_pass_dce_allow_deleting_nodes_with_side_effects(g)
        else:
            torch._C._jit_pass_dce(g)
        self._counter += 1
        fn = torch._C._create_function_from_graph(f"cmrtool_fn_{self._counter}", g)
        owner = self.module._c

        n_inputs = len(list(self.graph.inputs())) - 1  # the model's own arguments (minus self)
        reads_inputs = any(i.uses() for i in list(g.inputs())[1 : 1 + n_inputs])

        def call(*args: Any) -> Any:
            try:
                with torch.jit.optimized_execution(OPTIMIZE):
                    return fn(owner, *args)
            except RuntimeError as e:  # the interpreter rejected these tensors
                raise input_problem(e, [a for a in args[:n_inputs] if isinstance(a, torch.Tensor)]) from e

        call.reads_inputs = reads_inputs  # type: ignore[attr-defined]  # False when a cut made them dead
        return call
