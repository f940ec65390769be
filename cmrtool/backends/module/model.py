"""The nn.Module backend: safetensors weights with an architecture, or a Hugging Face directory.

Four verbs (DESIGN §2):

- **discover sites**: plain modules by torch.fx tracing (:mod:`cmrtool.backends.module.fxsites`), and the
  known transformer structures, FFNs and attention heads, by module layout
  (:mod:`cmrtool.backends.module.patterns`); Hugging Face models by layout only;
- **capture** a site's value with a forward pre-hook on its consumer (the value is the
  consumer's input, e.g. ``act(gate(x)) * up(x)`` entering ``down_proj``, or the attention output
  entering ``o_proj``);
- **run with site values overridden** by the same hook returning ``where(mask, fill, value)``;
  hooks are removed in ``finally``;
- **write** by module surgery on a deep copy (:mod:`cmrtool.backends.module.checkpoint`): the folded
  tensors are assigned to the copy and its layer and head counts updated, then saved as
  safetensors with the plan in the metadata, or as a Hugging Face directory
  (:mod:`cmrtool.backends.module.hf`).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cmrtool.backends.module.experts import tap_experts
from cmrtool.backends.module.familysites import eager_experts, family_structures, resize_family_heads, sync_family_shapes
from cmrtool.backends.module.fxsites import fx_sites
from cmrtool.backends.module.layouts import View, join_views, split_views
from cmrtool.backends.module.patterns import Tap, find_structures, resize_heads
from cmrtool.errors import UnsupportedModelError
from cmrtool.plan import Plan
from cmrtool.backends.swap import select
from cmrtool.sites import Rejection, Site

__all__ = ["ModuleModel", "HookDownstream"]

# Forward arguments that are not model inputs from a data file (HF signatures list them all).
_NOT_INPUTS = frozenset(
    {"labels", "past_key_values", "cache", "inputs_embeds", "use_cache", "output_attentions", "output_hidden_states",
     "return_dict", "cache_position", "logits_to_keep", "head_mask", "kwargs"}
)


class ModuleModel:
    """An nn.Module with its sites, capture/override by hooks, and surgery-based writing.

    Args:
        module: the model (put in eval mode; its parameters are frozen).
        path: where it came from (a ``.safetensors`` file or a Hugging Face directory).
        sha256: the checkpoint's hash (verify compares it with a reduced model's plan).
        arch: ``pkg.module:factory`` or ``hf:ClassName``: how to rebuild the architecture.
        plan: the plan of a reduced model.
        hf_config: the Hugging Face config, for models from a Hugging Face directory.
        fmt: ``safetensors`` or ``huggingface`` (reported by ``inspect``).

    Example:
        >>> m = load_model("samples/digits_transformer.safetensors", "cmrtool.testing.models:digits_transformer")
        >>> [s.name for s in m.sites]
        ['blocks.0.attn', 'blocks.0.fc1', 'blocks.1.attn', 'blocks.1.fc1']
    """

    def __init__(
        self, module: nn.Module, path: str | Path, sha256: str | Future[str], arch: str | None = None, plan: Plan | None = None,
        hf_config: Any = None, fmt: str = "safetensors",
    ) -> None:
        self.module = module.eval().requires_grad_(False)
        eager_experts(module)
        self.path, self.sha256, self.arch, self.plan, self.hf_config, self.format = str(path), sha256, arch, plan, hf_config, fmt
        self._params = dict(module.named_parameters())
        self.dtype = next((p.dtype for p in self._params.values() if p.is_floating_point()), torch.float32)
        self.arg_names, self.required_args, self.call_kwargs, self.by_name = _signature(module)
        self._rank = {name: i for i, (name, _) in enumerate(module.named_modules())}
        self.sites: list[Site] = []
        self.rejected: list[Rejection] = []
        self.unsupported: list[str] = []
        self.notes: list[str] = []
        self._taps: dict[str, Tap] = {}
        self.views: list[View] = []  # stock tensors seen in Linear layout (cmrtool.backends.module.layouts)
        self._discover()
        self._canonical_params = set(split_views(self._params, self.views))

    @property
    def sha256(self) -> str:
        """The checkpoint's hash; a large checkpoint's is computed in a background thread while
        the work starts (the block engine), and waited for here."""
        value = self._sha256
        return value if isinstance(value, str) else value.result()

    @sha256.setter
    def sha256(self, value: str | Future[str]) -> None:
        self._sha256 = value

    # -- discovery ------------------------------------------------------------------------------

    def _discover(self) -> None:
        found: list[Any] = []
        config = self.hf_config if self.hf_config is not None else _transformers_config(self.module)
        if config is None:  # Hugging Face forwards do not trace; their layouts are known
            traced, self.notes = fx_sites(self.module)
            found += traced
        for item in [*family_structures(self.module, config), *find_structures(self.module, config)]:
            if isinstance(item, str):
                self.unsupported.append(item)
            elif isinstance(item, View):
                self.views.append(item)
            else:
                found.append(item)
        tapped: set[tuple[str, int | None]] = set()
        for item in found:
            if isinstance(item, Rejection):
                if item not in self.rejected:
                    self.rejected.append(item)
                continue
            site, tap = item
            keys = {(m, tap.expert) for m in tap.modules}
            if site.name in self._taps or tapped & keys:
                continue
            self._taps[site.name] = tap
            tapped |= keys
            self.sites.append(site)
        self.sites.sort(key=lambda s: self._rank[self._taps[s.name].modules[0]])

    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(name)

    def require_sites(self) -> None:
        """Raise a clear error when nothing is reducible."""
        if self.sites:
            return
        from cmrtool.backends.torchscript.discover import no_sites_hint

        raise UnsupportedModelError(f"no reducible sites in {self.path}", no_sites_hint(self.rejected, self.unsupported))

    # -- tensors --------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """All parameters and buffers by fully qualified name (detached, not copies), in Linear
        layout: a viewed tensor appears as its canonical pieces (:mod:`cmrtool.backends.module.layouts`)."""
        stock = {k: v.detach() for k, v in {**self._params, **dict(self.module.named_buffers())}.items()}
        return split_views(stock, self.views)

    def stock(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Canonical tensors (from :meth:`tensors`, possibly folded) in the module's own layout."""
        return join_views(tensors, self.views)

    def fresh_module(self) -> nn.Module:
        """An independent copy of the module (bench converts it to another device or dtype)."""
        return copy.deepcopy(self.module)

    def twin(self, tensors: Mapping[str, torch.Tensor]) -> ModuleModel:
        """The same architecture with ``tensors`` assigned (same sites; the audit's rescaled copies)."""
        from cmrtool.backends.module.checkpoint import assign_tensors

        module = copy.deepcopy(self.module)
        assign_tensors(module, {k: v.detach().clone() for k, v in self.stock(tensors).items()})
        return ModuleModel(module, self.path, self.sha256, arch=self.arch, hf_config=self.hf_config, fmt=self.format)

    def num_params(self) -> int:
        return sum(p.numel() for p in self._params.values())

    def is_parameter(self, name: str) -> bool:
        return name in self._canonical_params

    # -- running --------------------------------------------------------------------------------
    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The model's logits (or first output tensor) for a batch."""
        return output_tensor(self._call(inputs))

    def _call(self, inputs: Sequence[torch.Tensor]) -> Any:
        if self.by_name:
            return self.module(**dict(zip(self.arg_names, inputs)), **self.call_kwargs)
        return self.module(*inputs, **self.call_kwargs)

    def run(
        self,
        inputs: Sequence[torch.Tensor],
        capture: Sequence[str] = (),
        edits: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
        submodule: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> tuple[Any, dict[str, torch.Tensor]]:
        """Run a batch, capturing site values and replacing them by ``where(mask, fill, value)``.

        ``submodule`` runs only that child (e.g. a language model's base ``model``, whose output
        is the final hidden states), the inputs passed by name with the keyword arguments
        ``extra`` (e.g. a KV cache); it then returns the child's whole output.

        Returns:
            ``(logits, {site: value})``; a captured value is taken after its edit.
        """
        edits = dict(edits or {})
        values: dict[str, torch.Tensor] = {}
        undo: list[Any] = []
        experts: dict[str, dict[int, Any]] = {}
        try:
            for name in dict.fromkeys([*capture, *edits]):
                tap = self._taps[name]
                axis = self.site(name).unit_axis if name in edits and len(edits[name]) == 3 else -1
                for i, (mod, split) in enumerate(zip(tap.modules, tap.splits)):
                    hook = _tap_hook(split, edits.get(name), values, name if i == 0 and name in capture else None, axis)
                    if tap.expert is not None:
                        experts.setdefault(mod, {})[tap.expert] = hook
                    else:
                        undo.append(self.module.get_submodule(mod).register_forward_pre_hook(hook).remove)
            for mod, hooks in experts.items():
                undo.append(tap_experts(self.module.get_submodule(mod), hooks))
            if submodule is None:
                out = self._call(inputs)
            else:
                sub = self.module.get_submodule(submodule)
                accepted = inspect.signature(sub.forward).parameters
                kwargs = {**{k: v for k, v in self.call_kwargs.items() if k in accepted}, **dict(extra or {})}
                out = sub(**dict(zip(self.arg_names, inputs)), **kwargs)
        finally:
            for u in undo:
                u()
        return (output_tensor(out) if submodule is None else out), values

    def per_sample(self, name: str) -> bool:
        """The site's value has a row per sample (not an expert's, which has one per routed token)."""
        return self._taps[name].expert is None

    def site_order(self, names: Sequence[str]) -> list[str]:
        """``names`` in forward order (the order their consumers are registered in)."""
        return sorted(names, key=lambda n: self._rank[self._taps[n].modules[0]])

    def downstream(self, names: Sequence[str], inputs: Sequence[torch.Tensor], after_linear: bool = False) -> HookDownstream:
        """The network after the first of ``names`` as a function of its value (a full re-run;
        ``after_linear`` is accepted for the TorchScript backend's signature and has no effect)."""
        return HookDownstream(self, self.site_order(names))

    def capture_for(
        self, downstreams: Sequence[HookDownstream], inputs: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[list[torch.Tensor]]]:
        """One pass: logits and the clean value of every site the downstreams use (no frontier)."""
        names = list(dict.fromkeys(n for ds in downstreams for n in ds.order))
        logits, values = self.run(inputs, capture=names)
        return logits, values, [[] for _ in downstreams]

    # -- writing --------------------------------------------------------------------------------
    def reduced_module(self, tensors: Mapping[str, torch.Tensor], plan: Plan, in_place: bool = False) -> nn.Module:
        """A copy of the module with ``tensors`` assigned (shapes may shrink) and head counts updated."""
        from cmrtool.backends.module.checkpoint import assign_tensors, sync_shapes

        module = self.module if in_place else copy.deepcopy(self.module)
        assign_tensors(module, self.stock(tensors))
        for sp in plan.sites:
            site = self.site(sp.name)
            if site.kind == "head" and not resize_family_heads(module, site, len(sp.kept)):
                resize_heads(module, site, len(sp.kept))
        sync_shapes(module)
        sync_family_shapes(module)
        return module.eval()

    def write(self, path: str | Path, tensors: Mapping[str, torch.Tensor], plan: Plan) -> None:
        """Save the reduced model as safetensors with the plan (and how to rebuild it) in the metadata."""
        from cmrtool.backends.module.checkpoint import save_reduced

        save_reduced(self, self.reduced_module(tensors, plan), path, plan)

    def write_dir(self, path: str | Path, tensors: Mapping[str, torch.Tensor], plan: Plan) -> None:
        """Save the reduced model as a Hugging Face directory (uniform widths per layer only)."""
        from cmrtool.backends.module.hf import write_dir

        write_dir(self, path, tensors, plan)

    def reopen(self, path: str | Path) -> ModuleModel:
        """Load what :meth:`write` or :meth:`write_dir` wrote."""
        if Path(path).is_dir():
            from cmrtool.backends.module.hf import load_dir

            return load_dir(path)
        from cmrtool.backends.module.checkpoint import load_reduced

        return load_reduced(path, self.arch)


class HookDownstream:
    """The network after a model's first site, as a function of that site's value.

    An nn.Module has no graph to cut, so ``run`` re-runs the whole forward with the first site's
    value replaced and the later sites edited by hooks; the frontier is empty. The result is the
    same as a cut network's, at the cost of a full forward pass per interchange batch.
    """

    frontier: tuple[str, ...] = ()
    axes: tuple[Any, ...] = ()
    reads_inputs = True  # the whole forward re-runs
    linear = None  # always cut at the site value

    def __init__(self, model: ModuleModel, order: list[str]) -> None:
        self.model = model
        self.order = order

    def capture(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor]]:
        logits, values, _ = self.model.capture_for([self], inputs)
        return logits, values, []

    def select(self, frontier: Sequence[torch.Tensor], index: torch.Tensor) -> list[torch.Tensor]:
        return []

    def concat(self, parts: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
        return []

    def run(
        self,
        inputs: Sequence[torch.Tensor],
        first: torch.Tensor,
        frontier: Sequence[torch.Tensor],
        edits: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Logits with the first site set to ``first`` and the later sites edited by ``edits``."""
        all_edits = {**dict(edits or {}), self.order[0]: (_ALL, first)}
        return self.model.run(inputs, edits=all_edits)[0]


_ALL = torch.ones((), dtype=torch.bool)


def _tap_hook(
    split: tuple[int, int, str] | None,
    edit: tuple[torch.Tensor, ...] | None,
    values: dict[str, torch.Tensor],
    capture_as: str | None,
    unit_axis: int = -1,
) -> Any:
    """A pre-hook on a consumer that captures and/or edits the site value it reads. An edit is
    ``(mask, fill)`` or ``("map", Mᵀ, c)``: the units become ``v·Mᵀ + c`` along ``unit_axis``
    (affine replacements; the axis of the unflattened value when a Linear reads it flattened)."""
    if split is not None:
        unit_axis = -2 if split[2] == "block" else -1

    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        x = args[0]
        v = x if split is None else x.unflatten(-1, split[:2] if split[2] == "block" else (split[1], split[0]))
        if edit is not None and len(edit) == 3:
            _, mt, c = edit
            v = (v.movedim(unit_axis, -1) @ mt.to(v.dtype) + c.reshape(-1).to(v.dtype)).movedim(-1, unit_axis)
        elif edit is not None:
            mask, fill = edit
            v = select(mask, fill, v)
        if capture_as is not None:
            values[capture_as] = v
        if edit is None:
            return None
        return (v if split is None else v.flatten(-2), *args[1:])

    return hook


def output_tensor(out: Any) -> torch.Tensor:
    """The logits of a forward's result: a tensor, a Hugging Face output's ``logits`` (else its
    first tensor), or the first element of a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    first = out[0] if isinstance(out, (tuple, list)) or hasattr(out, "to_tuple") else None
    if isinstance(first, torch.Tensor):
        return first
    raise UnsupportedModelError(
        f"the model returns {type(out).__name__}, not logits",
        "cmrtool needs a model whose forward returns a logits tensor (or a tuple starting with one)",
    )


def _transformers_config(module: nn.Module) -> Any:
    """The config of a ``transformers`` model built by a factory (None for other modules)."""
    is_hf = any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers") for c in type(module).__mro__)
    return getattr(module, "config", None) if is_hf else None


def _signature(module: nn.Module) -> tuple[list[str], int, dict[str, Any], bool]:
    """(input argument names, how many are required, keyword arguments every call passes, whether
    the inputs must be passed by name).

    Arguments that are not inputs (a KV cache, ``cache_position``, …) are skipped, not the end of
    the inputs: GPT-2's and Falcon's ``forward(input_ids, cache, attention_mask, …)``
    takes its attention mask after them, so such a model is called by name.
    """
    names: list[str] = []
    required = 0
    by_name = False
    params = inspect.signature(module.forward).parameters
    for p in params.values():
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            break
        if p.name in _NOT_INPUTS:
            if p.kind == p.POSITIONAL_ONLY:
                break
            by_name = True
            continue
        names.append(p.name)
        required += p.default is p.empty
    kwargs = {"use_cache": False} if "use_cache" in params else {}  # no KV cache objects in outputs
    return names, max(1, required) if names else 0, kwargs, by_name and len(names) > 1
