"""A Hugging Face decoder or encoder as a sequence of blocks: embeddings, each layer of its
stack, and the final norm + head (DESIGN §8).

Where a family keeps its layers, token table and final modules is one entry of the family table
(:class:`cmrtool.backends.module.families.Stack`): ``model.layers`` (LLaMA, Mistral, Qwen2/3, Gemma,
Gemma-2, Gemma-3, Phi-3, Mixtral, Qwen-MoE), ``gpt_neox.layers``, ``transformer.h`` (GPT-2, Falcon),
``model.decoder.layers`` (OPT), ``bert.encoder.layer`` (BERT, RoBERTa).

The whole model is built once on the meta device (shapes only, no memory). A layer block is
materialized when it is processed: its tensors are read from the checkpoint
(:class:`~cmrtool.engine.weights.LazyWeights`), cast to the compute dtype (float32, or float64
for a float64 checkpoint) and assigned to a copy of the meta layer
(``load_state_dict(assign=True)``). Every block runs inside the model's own stack code, the
*runner* (:mod:`cmrtool.engine.surgery`), so attention masks (padding, causal, sliding windows
per layer type), rotary or learned position embeddings, embedding scales and projections are
made exactly as in a whole-model forward:

- the embedding block is the runner with no layers and the final modules made the identity; its
  token table is read only at the batch's ids;
- a layer block is the runner with the layers before it passed through, the final modules the
  identity and no token table; the stack's input ``inputs_embeds`` is a placeholder and the
  layer's input is replaced by the buffered hidden states (a forward pre-hook), so what the
  stack adds before its first layer (GPT-2's and OPT's position embeddings, an encoder's
  embeddings) never reaches the block.

A block is a :class:`BlockModel`: a :class:`~cmrtool.backends.module.model.ModuleModel` whose module
maps ``(hidden_states, attention_mask)`` to the layer's output, with the layer at its full path
(sites are named ``model.layers.3.mlp`` as in the whole model), so site discovery, scoring,
planning, affine fits and folding run on it unchanged. Its captures drop padding tokens: a site
value ``(sequences, tokens, width)`` becomes ``(kept tokens, width)``, and an expert's value (a
row per routed token) keeps the rows of kept tokens, so every statistic counts kept tokens only.
Tensors are exchanged in the canonical layout (:mod:`cmrtool.backends.module.layouts`: GPT-2's
``Conv1D`` transposed, fused projections and experts cut into pieces).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cmrtool.backends.module.families import FAMILIES, Stack, stack_of
from cmrtool.backends.module.layouts import View, join_views, split_views
from cmrtool.backends.module.model import ModuleModel
from cmrtool.engine.convert import Conversions
from cmrtool.engine.surgery import CompactTokens, Skip, materialize, with_module
from cmrtool.engine.weights import LazyWeights
from cmrtool.errors import InputError

__all__ = ["DECODERS", "ENCODERS", "supports", "BlockModel", "BlockStack"]

_ENGINE = [t for f in FAMILIES if f.stack is not None for t in f.model_types]
DECODERS = tuple(t for t in _ENGINE if not stack_of(t).encoder)  # type: ignore[union-attr]
ENCODERS = tuple(t for t in _ENGINE if stack_of(t).encoder)  # type: ignore[union-attr]
Recorder = Callable[[Sequence[torch.Tensor], torch.Tensor, Mapping[str, torch.Tensor]], None]


def _model_type(path: Path) -> str | None:
    try:
        return str(json.loads((path / "config.json").read_text()).get("model_type"))
    except (OSError, ValueError, AttributeError):
        return None


def supports(path: str | Path) -> bool:
    """Whether the engine processes this input block by block (a Hugging Face directory of a
    decoder or encoder family whose stack the family table describes, with safetensors weights)."""
    from cmrtool.engine.weights import weight_files

    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file() and _model_type(p) in DECODERS + ENCODERS and bool(weight_files(p))


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _feed(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Forward pre-hook of the layer a block runs: its input is the buffered hidden states."""
    h = module.__dict__["cmrtool_input"]
    if args:
        return (h, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


class _LayerRoot(nn.Module):
    """``(hidden_states, attention_mask) → layer output``, the layer at its full path.

    ``runner`` (the stack's module, cut down to this layer) is called with a placeholder
    ``inputs_embeds`` of the token table's width; the layer's input is replaced by
    ``hidden_states`` in a forward pre-hook (:func:`_feed`; the hook holds no reference to the
    root, so a block is freed by reference counting as soon as the loop drops it)."""

    def __init__(self, runner: nn.Module, path: str, layer: nn.Module, width: int) -> None:
        super().__init__()
        if path:
            node: nn.Module = self
            parts = path.split(".")
            for p in parts[:-1]:
                child = nn.Module()
                node.add_module(p, child)
                node = child
            node.add_module(parts[-1], runner)
        else:
            self._modules = runner._modules
        object.__setattr__(self, "_runner", runner)  # not registered again: named once, under path
        object.__setattr__(self, "_layer", layer)
        self._width = width
        layer.register_forward_pre_hook(_feed, with_kwargs=True)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = hidden_states
        if x.shape[-1] != self._width:  # OPT's project_in: the stack's input is narrower
            x = x.new_zeros(*x.shape[:-1], self._width)
        self._layer.__dict__["cmrtool_input"] = hidden_states
        try:
            out = self._runner(inputs_embeds=x, attention_mask=attention_mask, use_cache=False)
        finally:
            del self._layer.__dict__["cmrtool_input"]
        return out[0]


class BlockModel(ModuleModel):
    """One layer as a model (see the module docstring); ``recorder`` sees every run's inputs,
    output and (padding-free) captured values."""

    recorder: Recorder | None = None
    # What a block can do (cmrtool.backends.protocol): no loss gradients through later blocks.
    capabilities = frozenset({"capture", "override", "heads", "blocks", "write-dir", "write-file"})

    def run(
        self,
        inputs: Sequence[torch.Tensor],
        capture: Sequence[str] = (),
        edits: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out, values = super().run(inputs, capture, edits)
        mask = inputs[1] if len(inputs) > 1 else None
        if mask is not None and not bool(mask.all()):
            keep = mask.bool()
            values = {k: self._kept(k, v, keep) for k, v in values.items()}
        if self.recorder is not None and not edits:
            self.recorder(inputs, out, values)
        return out, values

    def _kept(self, name: str, v: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The rows of ``v`` (site ``name``'s value) that belong to kept tokens."""
        tap = self._taps[name]
        if tap.expert is not None:  # a row per token routed to this expert (cmrtool.backends.module.experts)
            routed = self.module.get_submodule(tap.modules[0]).cmrtool_routed[tap.expert]
            return v[keep.reshape(-1)[routed]]
        if v.dim() == 3:
            return v[keep]
        return v[keep.reshape(-1)] if v.dim() == 2 and v.shape[0] == keep.numel() else v  # OPT flattens tokens


class BlockStack:
    """The blocks of a Hugging Face directory: meta-device model, lazy weights, layer paths.

    Args:
        path: the directory (``config.json`` + safetensors weights).
    """

    def __init__(self, path: str | Path) -> None:
        from cmrtool.backends.module.hf import _sha256_dir, transformers_module

        self.path = Path(path)
        from cmrtool.backends.module.hfcheck import refuse_remote_code

        tf = transformers_module()
        refuse_remote_code(self.path)
        self.weights = LazyWeights(self.path)
        try:
            config = tf.AutoConfig.from_pretrained(str(self.path), local_files_only=True, trust_remote_code=False)
        except Exception as e:  # transformers raises many exception types for bad directories
            raise InputError(f"transformers could not read {self.path / 'config.json'}: {str(e).splitlines()[0][:200]}",
                             "check the directory's config.json") from e
        layout = stack_of(config.model_type)
        if layout is None:
            raise InputError(f"the block engine does not know the {config.model_type} stack", "see README: families of the block engine")
        self.layout: Stack = layout
        cls = next((getattr(tf, a) for a in (config.architectures or []) if hasattr(tf, a)), tf.AutoModel)
        self.checkpoint_dtype = self.weights.dtype
        self.dtype = torch.float64 if self.checkpoint_dtype == torch.float64 else torch.float32
        previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)  # as from_pretrained does: buffers made at init get this dtype
        try:
            with torch.device("meta"):
                self.top = cls(config)
        finally:
            torch.set_default_dtype(previous)
        self.config = self.top.config
        self.kind = "encoder" if layout.encoder else "decoder"
        ffn_last = layout.ffn_last(self.config) if callable(layout.ffn_last) else layout.ffn_last
        self.ffn_last = bool(ffn_last) and not layout.encoder  # the sequential fast path applies (engine.loop)
        prefix = getattr(self.top, "base_model_prefix", "")
        self.prefix = prefix if prefix and isinstance(getattr(self.top, prefix, None), nn.Module) else ""
        self.base = getattr(self.top, self.prefix) if self.prefix else self.top
        self.runner_path = _join(self.prefix, layout.runner)
        self.runner = self.base.get_submodule(layout.runner) if layout.runner else self.base
        self.layers = self.runner.get_submodule(layout.layers)
        self.layer_prefix = _join(self.runner_path, layout.layers)
        self.token_name = _join(self.runner_path, layout.tokens, "weight")
        # Hashing a large checkpoint takes seconds: it runs beside the work (file reads and
        # hashlib release the GIL) and is waited for where the hash is first needed.
        hashing = ThreadPoolExecutor(1, thread_name_prefix="cmrtool-sha256")
        self._digest = hashing.submit(_sha256_dir, self.path, self.weights.files)
        hashing.shutdown(wait=False)  # the thread ends when the hash is done
        self.meta = ModuleModel(self.top, self.path, self._digest, arch=f"hf:{type(self.top).__name__}",
                                hf_config=self.config, fmt="huggingface")
        self.conversions = Conversions(self.top)  # stored names and layouts ↔ the model's
        self._check_names()
        self._contexts: dict[torch.dtype, nn.Module] = {}
        self._tokens: nn.Module | None = None

    @property
    def sha256(self) -> str:
        """The checkpoint's hash (config.json and every weight file)."""
        return self._digest.result()

    def _check_names(self) -> None:
        """The checkpoint's tensors are exactly the ones the config's model has (names and shapes),
        as the whole-model loader requires (:func:`cmrtool.backends.module.hfcheck.check_loading_info`)."""
        import re

        from cmrtool.backends.module.hfcheck import check_loading_info

        want = dict(self.top.state_dict())
        have = {self.model_name(k): k for k in self.weights.names()}
        ignore = [re.compile(p) for p in (getattr(self.top, "_keys_to_ignore_on_load_unexpected", None) or [])]
        missing = [k for k in want if k not in have and not self._tied(k)]
        unexpected = [k for k in have if k not in want and not any(p.search(k) for p in ignore)]
        resized = [k for k in want if k in have and not self.conversions.merged(have[k]) and tuple(self.weights.info(have[k]).shape) != tuple(want[k].shape)]
        check_loading_info(self.path, {"missing_keys": missing, "unexpected_keys": unexpected, "mismatched_keys": resized})

    def model_name(self, name: str) -> str:
        """A stored tensor's name as the model calls it (:mod:`cmrtool.engine.convert`)."""
        return self.conversions.model_name(name)

    def _tied(self, name: str) -> bool:
        tied = getattr(self.top, "_tied_weights_keys", None) or {}
        return name in tied if isinstance(tied, (dict, list, tuple, set)) else False

    def __len__(self) -> int:
        return len(self.layers)

    def layer_path(self, i: int) -> str:
        return f"{self.layer_prefix}.{i}"

    def layer_names(self, i: int) -> list[str]:
        """Checkpoint tensor names of layer ``i``."""
        return self.weights.under(self.layer_path(i))

    def layer_sites(self, i: int) -> list[Any]:
        p = self.layer_path(i) + "."
        return [s for s in self.meta.sites if s.name.startswith(p)]

    def layer_views(self, i: int) -> list[View]:
        """The canonical views of layer ``i``'s stock tensors (:mod:`cmrtool.backends.module.layouts`)."""
        p = self.layer_path(i) + "."
        return [v for v in self.meta.views if v.source.startswith(p)]

    def calibration_data(self, path: str | Path) -> Any:
        """The calibration file's ``input_ids``, ``attention_mask`` and ``token_type_ids``, bound
        by name (a stack's forward may take other arguments between them, e.g. GPT-2's cache),
        checked against the model (:func:`cmrtool.datacheck.check_data`)."""
        from cmrtool.io.data import Dataset
        from cmrtool.io.datacheck import check_data

        ds = Dataset(path, ["input_ids", "attention_mask", "token_type_ids"], 1, self.meta.dtype)
        check_data(ds, self.meta)
        return ds

    # -- the runner around the blocks ---------------------------------------------------------
    def _materialize(self, module: nn.Module, path: str, dtype: torch.dtype, given: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
        return materialize(module, path, lambda k: self.weights.get(k, dtype), self.weights.__contains__, self.top._init_weights, given)

    def _context(self, dtype: torch.dtype) -> nn.Module:
        """The runner in ``dtype`` with real weights for everything but its layers (an empty
        list), its token table (absent) and the modules after the layers (the identity)."""
        if dtype not in self._contexts:
            runner = with_module(self.runner, self.layout.layers, nn.ModuleList())
            runner = with_module(runner, self.layout.tokens, None)
            for name in self.layout.after:
                if _has(runner, name):
                    runner = with_module(runner, name, nn.Identity())
            previous = torch.get_default_dtype()
            torch.set_default_dtype(dtype)
            try:
                skeleton = copy.deepcopy(runner).to(dtype)  # meta: no data copied
                self._contexts[dtype] = self._materialize(skeleton, self.runner_path, dtype)
            finally:
                torch.set_default_dtype(previous)
        return self._contexts[dtype]

    def _token_module(self) -> nn.Module:
        """The stock token module (with its buffers, e.g. Gemma's scale) holding one placeholder row."""
        if self._tokens is None:
            meta = copy.deepcopy(self.runner.get_submodule(self.layout.tokens))
            meta.weight = nn.Parameter(torch.empty(1, meta.weight.shape[1], device="meta", dtype=self.dtype), requires_grad=False)
            if hasattr(meta, "padding_idx"):
                meta.padding_idx = None  # only gradients use it, and rows are renumbered here
            self._tokens = self._materialize(meta, "", self.dtype, {"weight": torch.zeros(1, meta.weight.shape[1], dtype=self.dtype)})
        return self._tokens

    # -- embeddings ---------------------------------------------------------------------------
    def embed(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The embedding block's output ``(sequences, tokens, hidden)`` in the compute dtype: the
        stack's own code before its first layer, the token table read at the batch's ids only."""
        ids = inputs["input_ids"]
        extra = {k: inputs[k] for k in ("token_type_ids",) if k in inputs}
        # GPT-2 looks token types up in the token table too
        used = torch.unique(torch.cat([ids.reshape(-1)] + ([extra["token_type_ids"].reshape(-1)] if extra and self.kind == "decoder" else [])))
        tokens = copy.copy(self._token_module())
        tokens._parameters = {"weight": nn.Parameter(self.weights.gather(self.token_name, used, self.dtype), requires_grad=False)}
        runner = with_module(self._context(self.dtype), self.layout.tokens, CompactTokens(tokens, used))
        with torch.no_grad():
            out = runner(input_ids=ids, attention_mask=inputs["attention_mask"], use_cache=False, **extra)
        return out[0]

    # -- layers -------------------------------------------------------------------------------
    def block(self, i: int, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> BlockModel:
        """Layer ``i`` as a :class:`BlockModel` with ``tensors`` (full names, canonical layout as
        :meth:`read_layer` gives them) cast to ``dtype``."""
        dtype = dtype or self.dtype
        p = self.layer_path(i) + "."
        layer = copy.deepcopy(self.layers[i])
        stock = _unsplit({k: v for k, v in tensors.items() if k.startswith(p)}, self.layer_views(i))
        state = {k[len(p) :]: (v if v.dtype == dtype else v.to(dtype)) for k, v in stock.items()}
        del stock
        layer.load_state_dict(state, strict=True, assign=True)
        if any(b.is_meta for b in layer.buffers()):
            raise InputError(f"{type(layer).__name__} keeps buffers the block engine cannot make", "this layer type is not supported block by block; set CMRTOOL_DEBUG=1 and report it")
        holder = nn.ModuleList()
        holder._modules = {**{str(j): Skip(self.layers[j], self.layout.tuple_out) for j in range(i)}, str(i): layer}
        runner = with_module(self._context(dtype), self.layout.layers, holder)
        width = int(self.runner.get_submodule(self.layout.tokens).weight.shape[1])
        root = _LayerRoot(runner, self.runner_path, layer, width)
        return BlockModel(root, self.path, self._digest, arch=f"hf:{type(self.top).__name__}", hf_config=self.config, fmt="huggingface")

    def read_layer(self, i: int) -> dict[str, torch.Tensor]:
        """Layer ``i``'s tensors in the checkpoint's dtype (fresh memory, no mapping), as the model
        holds them (experts merged) in the canonical layout (the names folding and writing use)."""
        stored = {k: self.weights.get(k) for k in self.layer_names(i)}
        return split_views(self.conversions.to_model(stored), self.layer_views(i))


def _unsplit(tensors: Mapping[str, torch.Tensor], views: Sequence[View]) -> dict[str, torch.Tensor]:
    """:func:`~cmrtool.backends.module.layouts.join_views`, except that a view whose pieces are exactly
    the split of one tensor (as :meth:`BlockStack.read_layer` made them) gives that tensor back
    instead of a joined copy: a 60-expert layer is not copied once more in the checkpoint's dtype."""
    whole: dict[str, torch.Tensor] = {}
    for v in views:
        pieces = [tensors.get(n) for n in v.names()]
        base = pieces[0]._base if pieces[0] is not None else None
        if base is None or any(t is None for t in pieces):
            continue
        if base.dtype != pieces[0].dtype or base.dim() != pieces[0].dim() + bool(v.experts) or base.numel() != sum(t.numel() for t in pieces):  # type: ignore[union-attr]
            continue  # e.g. the raw bytes the tensor was read into
        again = v.split(base)
        if all(a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() for a, b in zip(again.values(), pieces)):  # type: ignore[union-attr]
            whole[v.source] = base
    rest = {k: t for k, t in tensors.items() if not any(k in v.names() for v in views if v.source in whole)}
    return {**join_views(rest, [v for v in views if v.source not in whole]), **whole}


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True
