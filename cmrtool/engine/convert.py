"""Checkpoint names and layouts ↔ the model's, as transformers converts them on loading and saving.

transformers 5 keeps some families' checkpoints in a stored format that differs from its modules:
a renaming (GPT-NeoX's ``embed_out`` is ``lm_head``; Mixtral's ``block_sparse_moe`` is ``mlp``) or
a merge (a bank of experts, stored one tensor per expert ``experts.<e>.w1/w3/w2`` or
``experts.<e>.gate_proj/up_proj/down_proj``, is the 3-D ``experts.gate_up_proj (E, 2I, H)`` and
``experts.down_proj (E, H, I)``). The block engine reads a layer's stored tensors and converts them
to the model's (:meth:`Conversions.to_model`, what ``from_pretrained`` does), and writes a
directory's layers back in the stored format (:meth:`Conversions.to_checkpoint`, what
``save_pretrained`` does), so its output has the names and layout the whole-model path writes.
transformers' own conversion objects do the work; without them (another transformers version)
names are taken as they are.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["Conversions"]


class Conversions:
    """The renamings and merges ``from_pretrained`` applies to ``model``'s checkpoints."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self._renamings: list[Any] = []
        self._converters: list[Any] = []
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightConverter, WeightRenaming

            transforms = get_model_conversion_mapping(model)
        except (ImportError, AttributeError, TypeError):  # another transformers version: names as they are
            return
        self._renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        self._converters = [t for t in transforms if isinstance(t, WeightConverter)]
        self._by_pattern = {p: c for c in self._converters for p in c.source_patterns}

    def _rename(self, key: str) -> tuple[str, str | None]:
        if not self._renamings and not self._converters:
            return key, None
        from transformers.core_model_loading import rename_source_key

        return rename_source_key(key, self._renamings, self._converters)

    def model_name(self, key: str) -> str:
        """The model's name for stored tensor ``key`` (a merged tensor's name for one of its parts)."""
        return self._rename(key)[0]

    def merged(self, key: str) -> bool:
        """Stored tensor ``key`` is one part of a merged model tensor (e.g. one expert's)."""
        return self._rename(key)[1] is not None

    def to_model(self, stored: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Stored tensors (all parts of every merged tensor among them) → the model's tensors."""
        from transformers.core_model_loading import dot_natural_key

        out: dict[str, torch.Tensor] = {}
        pending: dict[str, Any] = {}
        for key in sorted(stored, key=dot_natural_key):  # experts in index order, as from_pretrained stacks them
            name, pattern = self._rename(key)
            if pattern is None:
                out[name] = stored[key]
                continue
            pending.setdefault(name, copy.deepcopy(self._by_pattern[pattern])).add_tensor(name, key, pattern, stored[key])
        for name, converter in pending.items():
            for k, v in converter.convert(name, model=self.model, config=self.model.config).items():
                out[k] = v[0] if isinstance(v, list) else v
        return out

    def to_checkpoint(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's tensors → the stored format ``save_pretrained`` writes."""
        if not self._renamings and not self._converters:
            return dict(tensors)
        from transformers.core_model_loading import revert_weight_conversion

        return {k: v.contiguous() for k, v in revert_weight_conversion(self.model, dict(tensors)).items()}
