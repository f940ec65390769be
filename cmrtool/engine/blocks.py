"""A Hugging Face decoder or encoder as a sequence of blocks: embeddings, each layer of its
stack, and the final norm + head (DESIGN §8).

The whole model is built once on the meta device (shapes only, no memory). A layer block is
materialized when it is processed: its tensors are read from the checkpoint
(:class:`~cmrtool.engine.weights.LazyWeights`), cast to the compute dtype (float32, or float64
for a float64 checkpoint) and assigned to a copy of the meta layer
(``load_state_dict(assign=True)``). It runs inside the model's own stack code with the stack
cut down to that one layer — ``base(inputs_embeds=h, attention_mask=m)`` with the embeddings
bypassed (an encoder's embedding module returns ``h``; a decoder takes ``inputs_embeds``), the
final norm made the identity and the pooler removed — so attention masks, rotary position
embeddings and sliding windows are made exactly as in a whole-model forward.

A block is a :class:`BlockModel`: a :class:`~cmrtool.backends.module.model.ModuleModel` whose module
maps ``(hidden_states, attention_mask)`` to the layer's output, with the layer at its full path
(sites are named ``model.layers.3.mlp`` as in the whole model), so site discovery, scoring,
planning, affine fits and folding run on it unchanged. Its captures drop padding tokens: a site
value ``(sequences, tokens, width)`` becomes ``(kept tokens, width)`` wherever the attention mask
has zeros, so every statistic counts kept tokens only.
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

from cmrtool.backends.module.model import ModuleModel
from cmrtool.engine.weights import LazyWeights
from cmrtool.errors import InputError

__all__ = ["DECODERS", "ENCODERS", "supports", "BlockModel", "BlockStack"]

DECODERS = ("llama", "mistral", "qwen2", "qwen3")
ENCODERS = ("bert", "roberta")
Recorder = Callable[[Sequence[torch.Tensor], torch.Tensor, Mapping[str, torch.Tensor]], None]


def _model_type(path: Path) -> str | None:
    try:
        return str(json.loads((path / "config.json").read_text()).get("model_type"))
    except (OSError, ValueError, AttributeError):
        return None


def supports(path: str | Path) -> bool:
    """Whether the engine processes this input block by block (a Hugging Face directory of a
    decoder or encoder family it knows, with safetensors weights)."""
    from cmrtool.engine.weights import weight_files

    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file() and _model_type(p) in DECODERS + ENCODERS and bool(weight_files(p))


class _Inject(nn.Module):
    """An encoder's embedding module replaced by the identity on ``inputs_embeds``."""

    def forward(self, inputs_embeds: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        assert inputs_embeds is not None
        return inputs_embeds


def _shallow(module: nn.Module) -> nn.Module:
    """A copy of ``module`` that shares its attributes but owns its table of children."""
    new = object.__new__(type(module))
    new.__dict__ = module.__dict__.copy()
    new._modules = dict(module._modules)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    return new


class _LayerRoot(nn.Module):
    """``(hidden_states, attention_mask) → layer output``, the layer at its full path."""

    def __init__(self, stack: nn.Module, prefix: str) -> None:
        super().__init__()
        if prefix:
            self.add_module(prefix, stack)
        else:
            self._modules = stack._modules
        object.__setattr__(self, "_stack", stack)  # not registered again: named once, under prefix

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self._stack(inputs_embeds=hidden_states, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state


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
            values = {k: v[keep] if v.dim() == 3 else v for k, v in values.items()}
        if self.recorder is not None and not edits:
            self.recorder(inputs, out, values)
        return out, values


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
        self.kind = "decoder" if config.model_type in DECODERS else "encoder"
        prefix = getattr(self.top, "base_model_prefix", "")
        self.prefix = prefix if prefix and isinstance(getattr(self.top, prefix, None), nn.Module) else ""
        self.base = getattr(self.top, self.prefix) if self.prefix else self.top
        self.layers = self.base.layers if self.kind == "decoder" else self.base.encoder.layer
        within = "layers" if self.kind == "decoder" else "encoder.layer"
        self.layer_prefix = f"{self.prefix}.{within}" if self.prefix else within
        # Hashing a large checkpoint takes seconds: it runs beside the work (file reads and
        # hashlib release the GIL) and is waited for where the hash is first needed.
        hashing = ThreadPoolExecutor(1, thread_name_prefix="cmrtool-sha256")
        self._digest = hashing.submit(_sha256_dir, self.path, self.weights.files)
        hashing.shutdown(wait=False)  # the thread ends when the hash is done
        self.meta = ModuleModel(self.top, self.path, self._digest, arch=f"hf:{type(self.top).__name__}",
                                hf_config=self.config, fmt="huggingface")
        self._check_names()
        self._rotary: nn.Module | None = None
        self._embeddings: nn.Module | None = None

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
        have = set(self.weights.names())
        ignore = [re.compile(p) for p in (getattr(self.top, "_keys_to_ignore_on_load_unexpected", None) or [])]
        missing = [k for k in want if k not in have and not self._tied(k)]
        unexpected = [k for k in have if k not in want and not any(p.search(k) for p in ignore)]
        resized = [k for k in want if k in have and tuple(self.weights.info(k).shape) != tuple(want[k].shape)]
        check_loading_info(self.path, {"missing_keys": missing, "unexpected_keys": unexpected, "mismatched_keys": resized})

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

    # -- embeddings ---------------------------------------------------------------------------
    def embed(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The embedding block's output ``(sequences, tokens, hidden)`` in the compute dtype."""
        ids = inputs["input_ids"]
        if self.kind == "decoder":
            name = f"{self.prefix}.embed_tokens.weight" if self.prefix else "embed_tokens.weight"
            return self.weights.gather(name, ids, self.dtype)
        emb = self._encoder_embeddings()
        extra = {k: inputs[k] for k in ("token_type_ids",) if k in inputs}
        with torch.no_grad():
            return emb(input_ids=ids, **extra)

    def _encoder_embeddings(self) -> nn.Module:
        if self._embeddings is None:
            meta = self.base.embeddings
            path = f"{self.prefix}.embeddings" if self.prefix else "embeddings"
            previous = torch.get_default_dtype()
            torch.set_default_dtype(self.dtype)
            try:
                emb = type(meta)(self.config)  # non-persistent buffers (position ids) are made here
            finally:
                torch.set_default_dtype(previous)
            state = {k[len(path) + 1 :]: self.weights.get(k, self.dtype) for k in self.weights.under(path)}
            emb.load_state_dict(state, strict=False, assign=True)
            self._embeddings = emb.eval().requires_grad_(False)
        return self._embeddings

    # -- layers -------------------------------------------------------------------------------
    def _stack_for(self, layer: nn.Module, i: int) -> nn.Module:
        holder = nn.ModuleList()
        holder._modules = {str(i): layer}
        stack = _shallow(self.base)
        if self.kind == "decoder":
            stack._modules["embed_tokens"] = None
            stack._modules["norm"] = nn.Identity()
            stack._modules["layers"] = holder
            if "rotary_emb" in stack._modules:
                stack._modules["rotary_emb"] = self._rotary_module()
        else:
            stack._modules["embeddings"] = _Inject()
            if "pooler" in stack._modules:
                stack._modules["pooler"] = None
            encoder = _shallow(self.base.encoder)
            encoder._modules["layer"] = holder
            stack._modules["encoder"] = encoder
        return stack

    def _rotary_module(self) -> nn.Module:
        if self._rotary is None:
            meta = self.base.rotary_emb
            previous = torch.get_default_dtype()
            torch.set_default_dtype(self.dtype)
            try:
                self._rotary = type(meta)(config=self.config)
            finally:
                torch.set_default_dtype(previous)
        return self._rotary

    def block(self, i: int, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> BlockModel:
        """Layer ``i`` as a :class:`BlockModel` with ``tensors`` (full names) cast to ``dtype``."""
        dtype = dtype or self.dtype
        p = self.layer_path(i) + "."
        layer = copy.deepcopy(self.layers[i])
        state = {k[len(p) :]: (v if v.dtype == dtype else v.to(dtype)) for k, v in tensors.items() if k.startswith(p)}
        layer.load_state_dict(state, strict=True, assign=True)
        root = _LayerRoot(self._stack_for(layer, i), self.prefix)
        return BlockModel(root, self.path, self._digest, arch=f"hf:{type(self.top).__name__}", hf_config=self.config, fmt="huggingface")

    def read_layer(self, i: int) -> dict[str, torch.Tensor]:
        """Layer ``i``'s tensors in the checkpoint's dtype (fresh memory, no mapping)."""
        return {k: self.weights.get(k) for k in self.layer_names(i)}
