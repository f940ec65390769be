"""The TorchScript backend: ``.pt``/``.ts`` files saved by ``torch.jit.save``, no Python class needed.

Four verbs (DESIGN §2):

- **discover sites** by walking the prepared graph (:mod:`cmrtool.backends.torchscript.graph`) for
  producer → [batch_norm] → activation(s) → [pooling] → [flatten] → consumer chains, where the
  producer and consumer are ``aten::linear`` or a convolution (``aten::conv2d`` when scripted,
  ``aten::_convolution`` when traced) whose weights are ``prim::GetAttr`` paths from ``self``;
- **capture** site values by adding graph outputs;
- **run with site values overridden** by inserting ``where(mask, fill, v)`` after them (or
  ``lerp(v, fill, mask)`` for 0/1 float weights, the same for finite values and faster on CPU);
- **write** a reduced checkpoint: load a fresh copy, assign smaller tensors to the submodules
  (``nn.Parameter`` for parameters), embed the plan as the extra file ``cmrtool/plan.json``, and
  ``torch.jit.save`` it atomically.

A consumer without a bias gets one when the graph reads its bias as an ``Optional[Tensor]``
attribute (scripted convolutions). A traced graph holds a constant ``None`` there, and a scripted
``nn.Linear(bias=False)`` types its bias as ``NoneType``; neither can gain a bias, so the term is
folded into the ``running_mean`` of a BatchNorm right after the consumer instead, and if there
is none the site is reported with ``fold: none``.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cmrtool.backends.torchscript.graph import GraphProgram, const_value, is_none, iter_nodes, real_uses
from cmrtool.errors import InputError, UnsupportedModelError
from cmrtool.backends.torchscript.tsargs import branch_reason, scalar_args, scalar_values_from_data, specialize
from cmrtool.io.integrity import check_zip_crc
from cmrtool.io.files import STDIO, read_bytes, require_file, sha256_bytes, sha256_file, write_with
from cmrtool.plan import Plan
from cmrtool.io.planstore import TS_TENSORS_FILE, tensors_from_bytes, tensors_to_bytes
from cmrtool.io.planstore import split as split_plan
from cmrtool.sites import Consumer, Rejection, Site, TensorSlice
from cmrtool.backends.torchscript.discover import (
    _ACTIVATIONS, _CONV_OPS, _FLATTEN, _IDENTITY, _KNOWN_PARAM_OPS, _LINEAR_OPS, _PADS, _POOLS,
    _conv_flags, _conv_zero_padding, _holds_tensors, _is_batch_flatten, _pad_mode, _short, no_sites_hint,
)
from cmrtool.backends.torchscript.downstream import Downstream, _logits

__all__ = ["TorchScriptModel", "PLAN_FILE"]

PLAN_FILE = "cmrtool/plan.json"


class TorchScriptModel:
    """A TorchScript checkpoint with its sites.

    Args:
        path: file saved by ``torch.jit.save`` (``-`` reads it from stdin).

    Attributes:
        sites: reducible sites, in graph order.
        rejected: candidates that are not sites, with reasons.
        unsupported: weighted layers cmrtool does not reduce (op kind and module name).
        plan: the plan embedded by ``cmrtool compile``, if this is a reduced model.

    Example:
        >>> m = TorchScriptModel("samples/digits_mlp.pt")
        >>> [s.name for s in m.sites]
        ['body.0', 'body.2']
    """

    format = "torchscript"

    def __init__(self, path: str | Path, data: str | Path | None = None) -> None:
        self.path = str(path)
        self.data = data  # scalar forward arguments come from it (cmrtool.backends.torchscript.tsargs)
        if self.path == STDIO:
            self._bytes: bytes | None = read_bytes(self.path)
            self.sha256 = sha256_bytes(self._bytes)
        else:
            require_file(self.path, "model file")
            self._bytes = None
            self.sha256 = sha256_file(self.path)
        self.module, plan_text, side = self._load()
        self.plan = Plan.loads(plan_text, side, f"{self.path} (extra file {TS_TENSORS_FILE})") if plan_text else None
        schema = self.module.forward.schema
        scalars = scalar_args(schema)
        self.arg_values = {k: d for k, (_, d, has) in scalars.items() if has}
        self.arg_values.update(scalar_values_from_data(data, scalars))
        self.program = GraphProgram(self.module, lambda g: specialize(g, schema, self.arg_values))
        self._params = dict(self.module.named_parameters())
        self._buffers = dict(self.module.named_buffers())
        self._tensors = {k: v.detach() for k, v in {**self._params, **self._buffers}.items() if v is not None}
        self.dtype = next((p.dtype for p in self._params.values() if p.is_floating_point()), torch.float32)
        args = [a for a in schema.arguments if a.name != "self" and a.name not in self.arg_values]
        self.arg_names = [a.name for a in args]
        self.required_args = sum(1 for a in args if not a.has_default_value())
        self._check_eval_graph()
        self._ranks: dict[tuple[str, tuple[int, ...]], int] = {}
        self._downstreams: dict[Any, Downstream | None] = {}  # by site names and per-sample input shapes
        self.sites: list[Site] = []
        self.rejected: list[Rejection] = []
        self.unsupported: list[str] = []
        self._discover()

    # -- loading --------------------------------------------------------------------------------
    def _load(self) -> tuple[Any, str, dict[str, torch.Tensor] | None]:
        """The module, its plan's JSON text and the plan's tensors (None when it has none)."""
        extra = {PLAN_FILE: "", TS_TENSORS_FILE: ""}
        check_zip_crc(self.path, self._bytes)  # torch.jit.load does not check it
        src: Any = io.BytesIO(self._bytes) if self._bytes is not None else self.path
        try:
            module = torch.jit.load(src, map_location="cpu", _extra_files=extra)
        except Exception as e:
            raise InputError(
                f"{self.path} is not a readable TorchScript archive ({_load_problem(self.path, self._bytes, e)})",
                "cmrtool reads files saved by torch.jit.save: load the model in Python and run torch.jit.script(model).save(PATH)",
            ) from e
        if not module._c._has_method("forward"):
            raise InputError(f"{self.path} has no forward method", "save the model with torch.jit.script(model).save(PATH)")
        module.eval()
        text, data = extra[PLAN_FILE], extra[TS_TENSORS_FILE]
        side = tensors_from_bytes(bytes(data), f"{self.path} (extra file {TS_TENSORS_FILE})") if data else None
        return module, text.decode() if isinstance(text, bytes) else text, side

    def reopen(self, path: str | Path) -> TorchScriptModel:
        """Load what :meth:`write` wrote."""
        return TorchScriptModel(path, self.data)

    def fresh_module(self) -> Any:
        """A new, independent copy of the checkpoint's module (eval mode)."""
        src: Any = io.BytesIO(self._bytes) if self._bytes is not None else self.path
        m = torch.jit.load(src, map_location="cpu")
        return m.eval()

    def _check_eval_graph(self) -> None:
        for node in iter_nodes(self.program.graph):
            kind = node.kind()
            flag = None
            if kind == "aten::batch_norm":
                flag = node.inputsAt(5)
            elif kind in ("aten::dropout", "aten::feature_dropout"):
                flag = node.inputsAt(2)
            if flag is not None and flag.node().kind() == "prim::Constant" and flag.toIValue() is True:
                raise InputError(
                    f"{self.path} was traced in training mode ({_short(kind)} runs in training mode)",
                    "trace the model after calling model.eval()",
                )

    # -- tensors --------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """All parameters and buffers by fully qualified name (detached views, not copies)."""
        return dict(self._tensors)

    def num_params(self) -> int:
        return sum(p.numel() for p in self._params.values())

    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(name)

    # -- discovery ------------------------------------------------------------------------------
    def _module_attr(self, path: tuple[str, ...]) -> Any:
        obj = self.module
        for p in path:
            obj = getattr(obj, p, None)
            if obj is None:
                return None
        return obj

    def _param_name(self, value: torch._C.Value) -> str | None:
        path = self.program.path_of(value)
        return ".".join(path) if path else None

    def _discover(self) -> None:
        graph = self.program.graph
        outputs = set()
        for v in graph.outputs():
            outputs.add(v.unique())
            if v.node().kind() == "prim::TupleConstruct":
                outputs.add(v.node().inputsAt(0).unique())
        seen_sites: set[str] = set()
        for node in iter_nodes(graph):
            kind = node.kind()
            if kind in _CONV_OPS or kind in _LINEAR_OPS:
                why = branch_reason(node)
                prod = self._producer(node) if why is not None else None
                if isinstance(prod, tuple):  # a layer inside control flow that specialization kept
                    self.rejected.append(Rejection(prod[0], why))
                    continue
                result = self._walk(node, outputs)
                if isinstance(result, Site):
                    if result.name not in seen_sites:
                        seen_sites.add(result.name)
                        self.sites.append(result)
                elif isinstance(result, Rejection):
                    self.rejected.append(result)
            elif kind.startswith("aten::") and kind not in _KNOWN_PARAM_OPS:
                # A weighted layer we do not know (LSTM, embedding bag, ...): remember its name.
                for inp in node.inputs():
                    name = self._param_name(inp)
                    if name is not None and _holds_tensors(self._module_attr(tuple(name.split(".")))):
                        module = name.rsplit(".", 1)[0] if "." in name else name
                        label = f"{_short(kind)} ({module})"
                        if label not in self.unsupported:
                            self.unsupported.append(label)
                        break

    def _producer(self, node: torch._C.Node) -> tuple[str, str, list[TensorSlice]] | str | None:
        """(module, unit kind, slices) for a producer op, a rejection reason, or None."""
        weight = self._param_name(node.inputsAt(1))
        if weight is None or not weight.endswith("weight") or weight not in self._tensors:
            return None  # not a layer with a weight parameter (e.g. a plain tensor attribute)
        module = weight[: -len(".weight")] if weight != "weight" else ""
        kind = "neuron" if node.kind() in _LINEAR_OPS else "channel"
        if kind == "channel":
            transposed, groups = _conv_flags(node)
            if transposed:
                return f"{module}: transposed convolutions are not supported as producers"
            if groups != 1:
                return f"{module}: grouped convolution (groups={groups}) cannot lose single channels"
        slices = [TensorSlice(weight, 0)]
        bias = node.inputsAt(2)
        if not is_none(bias):
            bname = self._param_name(bias)
            if bname is None:
                return f"{module}: its bias is computed in the graph, not a parameter"
            exists = self._module_attr(tuple(bname.split("."))) is not None
            slices.append(TensorSlice(bname, 0, optional=not exists))
        return module, kind, slices

    def _walk(self, node: torch._C.Node, graph_outputs: set[int]) -> Site | Rejection | None:
        prod = self._producer(node)
        if prod is None:
            return None
        if isinstance(prod, str):
            return Rejection(prod.split(":", 1)[0], prod.split(": ", 1)[1])
        module, unit_kind, slices = prod
        width = int(self._tensors[slices[0].name].shape[0])
        v = node.output()
        uses = real_uses(v)
        # Optional BatchNorm right after the producer: its per-unit entries are producers too.
        if len(uses) == 1 and uses[0].user.kind() == "aten::batch_norm" and uses[0].offset == 0:
            bn = uses[0].user
            for idx in (1, 2, 3, 4):  # weight, bias, running_mean, running_var
                val = bn.inputsAt(idx)
                if is_none(val):
                    continue
                name = self._param_name(val)
                if name is None or name not in self._tensors:
                    return Rejection(module, "its BatchNorm reads statistics that are not module tensors")
                slices.append(TensorSlice(name, 0))
            v = bn.output()
            uses = real_uses(v)
        acts: list[str] = []
        while len(uses) == 1 and uses[0].offset == 0 and (
            uses[0].user.kind() in _ACTIVATIONS or uses[0].user.kind() in _IDENTITY
        ):
            user = uses[0].user
            if user.kind() in _ACTIVATIONS:
                acts.append(_short(user.kind()).rstrip("_"))
            v = user.output()
            uses = real_uses(v)
        if not acts:
            return None  # not a hidden layer (e.g. an attention projection): not a candidate
        if len(uses) == 1 and uses[0].user.kind() in _POOLS and uses[0].offset == 0:
            pooled = self._through_pools(v)
            if isinstance(pooled, str):
                return Rejection(module, pooled)
            v = pooled
            uses = real_uses(v)
        site_value = v
        if not uses:
            return Rejection(module, "its activation is not read by any layer")
        consumers: list[Consumer] = []
        for use in uses:
            c = self._consumer(use, width, unit_kind, graph_outputs)
            if isinstance(c, str):
                return Rejection(module, c)
            consumers.append(c[0])
        fold = "exact"
        reasons: list[str] = []
        if any(c.fold_mode == "none" for c in consumers):
            fold = "none"
            reasons = [
                f"consumer {c.module} has no bias, its TorchScript type cannot gain one, and no BatchNorm follows it"
                for c in consumers
                if c.fold_mode == "none"
            ]
        elif any(c.zero_padding for c in consumers):
            fold = "interior-exact"
            reasons = [f"consumer {c.module} pads with zeros: exact in the interior only" for c in consumers if c.zero_padding]
        feeds_logits = all(self._feeds_output(c.module, graph_outputs) for c in consumers)
        return Site(
            name=module,
            kind=unit_kind,
            width=width,
            producers=tuple(slices),
            consumers=tuple(consumers),
            fold=fold,
            reason="; ".join(reasons),
            activation="+".join(acts),
            value=self.program.handle(site_value),
            feeds_logits=feeds_logits,
        )

    def _through_pools(self, v: torch._C.Value) -> torch._C.Value | str:
        uses = real_uses(v)
        while len(uses) == 1 and uses[0].offset == 0 and (uses[0].user.kind() in _POOLS or uses[0].user.kind() in _IDENTITY):
            user = uses[0].user
            if user.kind() == "aten::mean":
                try:
                    dims = const_value(user.inputsAt(1))
                except ValueError:
                    return "its activation is averaged over dimensions that are not constant"
                dims = [dims] if isinstance(dims, int) else list(dims or [])
                if not dims or 0 in dims:
                    return "its activation is averaged over the batch or all dimensions"
            outs = list(user.outputs())
            if len(outs) > 1 and any(real_uses(o) for o in outs[1:]):
                return f"the pooling indices of {_short(user.kind())} are used"
            v = outs[0]
            uses = real_uses(v)
        return v

    def _consumer(
        self, use: Any, width: int, unit_kind: str, graph_outputs: set[int]
    ) -> tuple[Consumer] | str:
        node = use.user
        flattened = False
        zero_pad = False
        # Layout-only and constant-preserving ops between the site value and its consumer.
        while node.kind() in _FLATTEN or node.kind() in _PADS or node.kind() in _IDENTITY:
            if use.offset != 0:
                return f"its activation is an argument of {_short(node.kind())}, not its input"
            if node.kind() in _FLATTEN:
                ok = _is_batch_flatten(node)
                if not ok:
                    return f"its activation is reshaped by {_short(node.kind())} in a way cmrtool cannot follow"
                flattened = True
            elif node.kind() in _PADS:
                mode = _pad_mode(node)
                if mode is None:
                    return "its activation is padded in a mode cmrtool cannot read"
                if mode == "constant":
                    zero_pad = True
            nxt = real_uses(node.output())
            if len(nxt) != 1:
                return f"the output of {_short(node.kind())} is used {len(nxt)} times"
            use = nxt[0]
            node = use.user
        kind = node.kind()
        if kind == "prim::Return" and node.owningBlock().owningNode() is not None:
            owner = node.owningBlock().owningNode().kind()
            return f"its activation leaves a {owner} block: cmrtool cannot follow data-dependent control flow"
        if kind not in _LINEAR_OPS and kind not in _CONV_OPS:
            where = "the model output" if kind in ("prim::Return", "prim::TupleConstruct") else _short(kind)
            return f"its activation feeds {where}, which cannot absorb a replacement (only Linear and Conv consumers can)"
        if use.offset != 0:
            return f"its activation is used as the weight of {_short(kind)}"
        weight = self._param_name(node.inputsAt(1))
        if weight is None or weight not in self._tensors:
            return f"its consumer {_short(kind)} does not read a module weight"
        module = weight.rsplit(".", 1)[0] if "." in weight else ""
        w = self._tensors[weight]
        op = "linear" if kind in _LINEAR_OPS else "conv"
        block, layout = 1, "block"
        if op == "conv":
            if unit_kind != "channel" or flattened:
                return f"consumer {module} convolves over an axis that is not the site's units"
            transposed, groups = _conv_flags(node)
            if transposed or groups != 1:
                return f"consumer {module} is a {'transposed' if transposed else f'grouped (groups={groups})'} convolution"
            if int(w.shape[1]) != width:
                return f"consumer {module} reads {int(w.shape[1])} channels, the site has {width}"
            zero_pad = zero_pad or _conv_zero_padding(node, w)
        else:
            cols = int(w.shape[1])
            if cols % width != 0 or (cols != width and not flattened):
                return f"consumer {module} reads {cols} features, which does not match the site's {width} units"
            block = cols // width
            layout = "block" if unit_kind == "channel" else "strided"
        fold_target, fold_mode = self._fold_target(node, module)
        return (
            Consumer(
                module=module,
                op=op,
                weight=weight,
                fold_target=fold_target,
                fold_mode=fold_mode,
                block=block,
                layout=layout,
                zero_padding=zero_pad,
            ),
        )

    def _fold_target(self, node: torch._C.Node, module: str) -> tuple[str | None, str]:
        bias = node.inputsAt(2)
        if not is_none(bias):
            name = self._param_name(bias)
            if name in self._tensors:
                return name, "bias"
            if name is not None and self._module_attr(tuple(name.split("."))) is None:
                return name, "new-bias"
        # No bias and none can be added: fold into the next BatchNorm's running_mean (exact in eval).
        uses = real_uses(node.output())
        if len(uses) == 1 and uses[0].user.kind() == "aten::batch_norm" and uses[0].offset == 0:
            rm = uses[0].user.inputsAt(3)
            if not is_none(rm):
                name = self._param_name(rm)
                if name in self._tensors:
                    return name, "bn-mean"
        return None, "none"

    def _feeds_output(self, module: str, graph_outputs: set[int]) -> bool:
        for node in iter_nodes(self.program.graph):
            if node.kind() in _LINEAR_OPS or node.kind() in _CONV_OPS:
                w = self._param_name(node.inputsAt(1))
                if w is not None and w.rsplit(".", 1)[0] == module:
                    return node.output().unique() in graph_outputs
        return False

    def require_sites(self) -> None:
        """Raise a clear error when nothing is reducible."""
        if self.sites:
            return
        raise UnsupportedModelError(
            f"no reducible sites in {self.path}",
            no_sites_hint(self.rejected, self.unsupported),
        )

    # -- running --------------------------------------------------------------------------------
    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The model's logits for a batch (the derived function turns the interpreter's
        rejections of bad inputs into an InputError)."""
        return _logits(self.program.function()(*inputs))

    def run(
        self,
        inputs: Sequence[torch.Tensor],
        capture: Sequence[str] = (),
        edits: Mapping[str, tuple[torch.Tensor, ...]] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Run a batch, optionally editing and capturing site values.

        Args:
            inputs: the forward arguments.
            capture: names of sites whose values to return (after their edit, if any).
            edits: site name → ``(mask, fill)``: the site value becomes ``where(mask, fill, v)``
                (``lerp(v, fill, mask)`` when the mask holds 0/1 float weights: the same for finite values);
                or → ``("map", matrix_t, bias)``: it becomes the affine map of its units
                ``v·matrix_t + bias`` along the unit axis (affine replacements).

        Returns:
            ``(logits, {site: value})``.
        """
        edits = dict(edits or {})
        cap_values = tuple(self.site(s).value for s in capture)
        edit_names = tuple(sorted(n for n, e in edits.items() if len(e) == 2))
        map_names = tuple(sorted(n for n, e in edits.items() if len(e) == 3))
        edit_values = tuple(self.site(s).value for s in edit_names)
        map_specs = tuple((self.site(s).value, 1 if self.site(s).kind == "channel" else -1) for s in map_names)
        blends = tuple(edits[s][0].is_floating_point() for s in edit_names)
        fn = self.program.function(outputs=cap_values, edits=edit_values, maps=map_specs, blend_edits=blends)
        args: list[Any] = list(inputs)
        for s in edit_names:
            args.extend(edits[s])
        for s in map_names:
            args.extend(edits[s][1:])
        out = fn(*args)
        if not capture:
            return _logits(out), {}
        head, *values = out
        return _logits(head), dict(zip(capture, values))

    def site_rank(self, name: str, inputs: Sequence[torch.Tensor]) -> int:
        """Number of dims of a site's value for inputs like ``inputs`` (probed once, cached)."""
        key = (name, tuple(t.dim() for t in inputs))
        rank = self._ranks.get(key)
        if rank is None:
            _, values = self.run([t[:1] for t in inputs], capture=[name])
            rank = self._ranks[key] = values[name].dim()
        return rank

    def batch_moments(
        self, inputs: Sequence[torch.Tensor], sites: Sequence[str]
    ) -> dict[str, tuple[int, torch.Tensor, torch.Tensor]]:
        """Per-site ``(samples, mean, M2)`` of one batch, computed inside the graph.

        The two-pass moments ride on the forward pass as extra graph ops, so activations never
        leave the TorchScript executor (cheaper than capturing them and reducing in Python).
        """
        requests = []
        for name in sites:
            site = self.site(name)
            rank = self.site_rank(name, inputs)
            axis = site.unit_axis % rank
            requests.append((site.value, tuple(d for d in range(rank) if d != axis)))
        fn = self.program.function(moments=requests)
        out = fn(*inputs)
        stats = out[1:]
        result = {}
        for i, name in enumerate(sites):
            mean, m2, numel = stats[3 * i : 3 * i + 3]
            width = self.site(name).width
            if m2.numel() != width:
                raise InputError(
                    f"site {name} produced {m2.numel()} units, expected {width}",
                    "the model's graph does not match its weights; re-export it",
                )
            result[name] = (int(numel) // width, mean.reshape(-1), m2.reshape(-1))
        return result

    def site_order(self, names: Sequence[str]) -> list[str]:
        """``names`` sorted by where their values are computed in the graph."""
        return sorted(names, key=lambda n: self.program.position(self.site(n).value))

    def downstream(self, names: Sequence[str], inputs: Sequence[torch.Tensor], after_linear: bool = False) -> Downstream | None:
        """The network after the first of ``names`` as a function of its value (see
        :class:`Downstream`), or None when the frontier's batch layout cannot be determined.

        Args:
            names: sites; the first in graph order is cut, the others are edited in-graph.
            inputs: an example batch (its first two samples probe the frontier's layout).
            after_linear: when the first site's only reader is a Linear, cut after that Linear
                instead (its clean output leads the frontier, and :attr:`Downstream.linear`
                gives its weight and bias), so a caller can apply it to a change of the site
                value by linearity.
        """
        key = (tuple(names), tuple((t.dtype, tuple(t.shape[1:])) for t in inputs), after_linear)
        if key in self._downstreams:
            return self._downstreams[key]
        ds = self._downstreams[key] = self._downstream(names, inputs, after_linear)
        return ds

    def _linear_reader(self, site: Site) -> tuple[str, str, str | None] | None:
        """``(output value, weight, bias or None)`` of the Linear that alone reads a unit-last
        site's value (through value-preserving ops only), at the top level of the graph."""
        if site.kind == "channel" or site.group != 1 or len(site.consumers) != 1:
            return None
        c = site.consumers[0]
        if c.op != "linear" or c.block != 1:
            return None
        v = self.program.find(self.program.graph, site.value)
        while True:
            uses = v.uses()
            if len(uses) != 1 or uses[0].offset != 0:
                return None
            node = uses[0].user
            if node.owningBlock().owningNode() is not None:
                return None
            if node.kind() in _LINEAR_OPS:
                break
            if node.kind() not in _IDENTITY or len(list(node.outputs())) != 1:
                return None
            v = node.output()
        weight = self._param_name(node.inputsAt(1))
        bias_value = node.inputsAt(2)
        bias = None if is_none(bias_value) else self._param_name(bias_value)
        if weight != c.weight or weight not in self._tensors or (not is_none(bias_value) and (bias is None or bias not in self._tensors)):
            return None
        return self.program.handle(node.output()), weight, bias

    def _downstream(self, names: Sequence[str], inputs: Sequence[torch.Tensor], after_linear: bool = False) -> Downstream | None:
        order = self.site_order(names)
        first = self.site(order[0])
        reader = self._linear_reader(first) if after_linear else None
        if reader:
            frontier = [reader[0], *self.program.frontier(reader[0])]
            axes = self._batch_axes(frontier, inputs)
            if axes is not None:
                _, weight, bias = reader
                linear = (self._tensors[weight], self._tensors[bias] if bias else None)
                return Downstream(self, order, tuple(frontier), axes, linear)
        frontier = self.program.frontier(first.value)  # cut at the site itself
        axes = self._batch_axes(frontier, inputs)
        return None if axes is None else Downstream(self, order, tuple(frontier), axes)

    def _batch_axes(self, values: Sequence[str], inputs: Sequence[torch.Tensor]) -> tuple[tuple[int, int] | None, ...] | None:
        """Per value, ``(axis, rows per sample)`` of its batch axis, or None for a batch-independent
        one, probed by running one sample and the same sample twice; None when a value's layout
        cannot be told."""
        probe = [torch.cat([t[:1], t[:1]]) for t in inputs]
        capture = self.program.function(outputs=tuple(values))
        with torch.no_grad():
            one = capture(*[t[:1] for t in inputs])[1:]
            two = capture(*probe)[1:]
        axes: list[tuple[int, int] | None] = []
        for a, b in zip(one, two):
            if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.dim() != b.dim():
                return None
            diff = [d for d in range(a.dim()) if a.shape[d] != b.shape[d]]
            if not diff:
                if not torch.equal(a, b[: a.shape[0]] if a.shape == b.shape else b):
                    return None
                axes.append(None)  # batch-independent: passed as it is
            elif len(diff) == 1 and b.shape[diff[0]] == 2 * a.shape[diff[0]]:
                axes.append((diff[0], a.shape[diff[0]]))  # (axis, rows per sample)
            else:
                return None
        return tuple(axes)

    def capture_for(
        self, downstreams: Sequence[Downstream], inputs: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[list[torch.Tensor]]]:
        """One pass: logits, the clean value of every site the downstreams use, and each
        downstream's frontier (what interchange interventions need cached per sample)."""
        names = list(dict.fromkeys(n for ds in downstreams for n in ds.order))
        handles = [self.site(n).value for n in names]
        offsets = []
        for ds in downstreams:
            offsets.append(len(handles))
            handles.extend(ds.frontier)
        fn = self.program.function(outputs=tuple(handles))
        head, *rest = fn(*inputs)
        values = dict(zip(names, rest[: len(names)]))
        frontiers = [list(rest[o : o + len(ds.frontier)]) for o, ds in zip(offsets, downstreams)]
        return _logits(head), values, frontiers

    # -- writing --------------------------------------------------------------------------------
    def is_parameter(self, name: str) -> bool:
        return name in self._params

    def write(self, path: str | Path, tensors: Mapping[str, torch.Tensor], plan: Plan | None) -> None:
        """Save a copy of this model with ``tensors`` assigned and ``plan`` embedded, atomically."""
        module = self.fresh_module()
        current = {**dict(module.named_parameters()), **dict(module.named_buffers())}
        for name, t in tensors.items():
            old = current.get(name)
            if old is not None and old.shape == t.shape and torch.equal(old, t):
                continue
            owner_path, _, leaf = name.rpartition(".")
            owner = module
            for p in owner_path.split(".") if owner_path else []:
                owner = getattr(owner, p)
            is_param = name in self._params or (old is None and name not in self._buffers)
            value = nn.Parameter(t.detach().clone(), requires_grad=False) if is_param else t.detach().clone()
            setattr(owner, leaf, value)
        extra: dict[str, Any] = {}
        if plan is not None:  # a large plan's matrices: safetensors bytes in a second extra file
            text, side = split_plan(plan)
            extra = {PLAN_FILE: text, **({TS_TENSORS_FILE: tensors_to_bytes(side)} if side else {})}

        def save(tmp: Path) -> None:
            # Through a file object: the archive's root folder is then always "archive" (a path
            # would name it after the temporary file), so equal models give equal bytes.
            with open(tmp, "wb") as f:
                torch.jit.save(module, f, _extra_files=extra)

        write_with(path, save)


def _load_problem(path: str, data: bytes | None, e: Exception) -> str:
    try:
        src: Any = io.BytesIO(data) if data is not None else path
        if zipfile.is_zipfile(src):
            src = io.BytesIO(data) if data is not None else path
            with zipfile.ZipFile(src) as z:
                names = z.namelist()
            if any(n.endswith("data.pkl") for n in names) and not any("/code/" in n for n in names):
                return "it is a torch.save pickle, not TorchScript"
            return "the archive is incomplete or corrupt"
        return "not a zip archive: truncated or not a PyTorch file"
    except Exception:
        return type(e).__name__
