"""Token models in verify: a Hugging Face language model or encoder as a base plus a head.

A model whose logits are per token (``(batch, sequence, V)``: a causal LM, a masked LM, a token
classifier) is verified token by token (DESIGN §3.5, "Token models"). Its forward is split in
two: the **base** (the child named by ``base_model_prefix``, e.g. ``model`` of a
``LlamaForCausalLM``, whose output is the final hidden states after the final norm) and the
**head** (the one other child: ``lm_head``, ``cls``, ``classifier``). verify runs the base over
a few sequences at a time, keeps the hidden states of the sample tokens only, and applies the
head to at most ``_LOGIT_ELEMENTS / V`` tokens at once, folding each chunk of logits straight
into :class:`cmrtool.verify.token_metrics.TokenFidelity`. Memory is bounded by the models, one pass of
hidden states and one chunk of logits, never eval tokens × V.

Samples: an encoder's are the tokens its attention mask keeps; a causal LM's are the kept
positions t whose next position t+1 is kept too (the position predicts token t+1, which is then
its label: a language-model corpus is its own labels).

The split is checked on the first sequence: ``head(base(x))`` must equal the model's logits,
else the model is verified per sample as before.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cmrtool.backends.module.model import output_tensor
from cmrtool.verify.token_metrics import TokenFidelity

__all__ = ["TokenModel", "token_models", "sample_mask", "Stores", "stream_fidelity"]

_LOGIT_ELEMENTS = 8 << 20  # logits per head chunk (tokens × V): 32 MB in fp32
_PASS_BYTES = 256 << 20  # hidden states and captured site values of one base pass (larger passes: faster GEMMs)


@dataclass(frozen=True)
class TokenModel:
    """A backend model split into base and head (module docstring)."""

    model: Any
    base: str
    head: nn.Module
    causal: bool

    def hidden(self, x: Sequence[torch.Tensor], capture: Sequence[str] = (), edits: dict[str, Any] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Final hidden states ``(b, T, H)`` and captured site values of a pass of the base."""
        out, values = self.model.run(x, capture=capture, edits=edits, submodule=self.base)
        return output_tensor(out), values

    def hidden_and_cache(self, x: Sequence[torch.Tensor], capture: Sequence[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
        """:meth:`hidden` of a causal base, with its KV cache as per-layer ``(keys, values)``."""
        out, values = self.model.run(x, capture=capture, submodule=self.base, extra={"use_cache": True})
        cache = getattr(out, "past_key_values", None)
        cache = getattr(out, "cache", None) if cache is None else cache
        return output_tensor(out), values, [(layer.keys, layer.values) for layer in cache.layers]

    def step(self, token: torch.Tensor, t: torch.Tensor, kv: list[tuple[torch.Tensor, torch.Tensor]], edits: dict[str, Any]) -> torch.Tensor:
        """Final hidden state ``(b, H)`` of one token per row at position ``t`` (``(b,)``),
        attending to the first ``t`` positions of the clean cache ``kv`` (per layer ``(b, heads,
        T, d)``): the same value as a run of the sequence cut after t, for one token's work."""
        from transformers import DynamicCache

        length = kv[0][0].shape[2]
        mask = torch.cat([(torch.arange(length) < t.unsqueeze(1)).long(), torch.ones(t.numel(), 1, dtype=torch.long)], 1)
        accepted = inspect.signature(self.model.module.get_submodule(self.base).forward).parameters
        cache_arg = "cache" if "cache" in accepted else "past_key_values"  # transformers renamed it
        extra = {"position_ids": t.unsqueeze(1), cache_arg: DynamicCache(ddp_cache_data=kv), "use_cache": True}
        out, _ = self.model.run([token.unsqueeze(1), mask], edits=edits, submodule=self.base, extra=extra)
        return output_tensor(out)[:, 0]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(h)


def _split(model: Any) -> tuple[str, str] | None:
    """(base child, head child) of a Hugging Face model, or None."""
    module = getattr(model, "module", None)
    if module is None or getattr(model, "hf_config", None) is None:
        return None
    base = getattr(module, "base_model_prefix", "")
    if not base or not isinstance(getattr(module, base, None), nn.Module):
        return None
    heads = [n for n, c in module.named_children() if n != base and not isinstance(c, nn.Dropout)]
    return (base, heads[0]) if len(heads) == 1 else None


def token_models(original: Any, reduced: Any, data: Any) -> tuple[TokenModel, TokenModel] | None:
    """Both models as base + head when they produce per-token logits of the data's
    ``input_ids`` and the split reproduces the original's logits; else None."""
    split = _split(original)
    if split is None or not data.keys or data.keys[0] != "input_ids" or _split(reduced) != split:
        return None
    base, head = split
    x = [t[:1] for t in data.read(0, 1, labels=False).inputs]
    with torch.no_grad():
        full = original.forward(x)
        if full.dim() != 3 or tuple(full.shape[:2]) != tuple(x[0].shape[:2]):
            return None
        h, _ = original.run(x, submodule=base)
        z = original.module.get_submodule(head)(output_tensor(h))
    tol = 1e-4 * max(1.0, float(full.abs().max()))
    if z.shape != full.shape or not bool(((z - full).abs() <= tol).all()):
        return None
    cfg = original.hf_config
    causal = type(original.module).__name__.endswith("CausalLM") or bool(getattr(cfg, "is_decoder", False))
    return tuple(TokenModel(m, base, m.module.get_submodule(head), causal) for m in (original, reduced))  # type: ignore[return-value]


def sample_mask(ids: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """``(n, T)`` booleans: which tokens are samples (module docstring)."""
    keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.ne(0)
    if not causal:
        return keep
    out = torch.zeros_like(keep)
    out[:, :-1] = keep[:, :-1] & keep[:, 1:]
    return out


def rows_per_chunk(vocab: int) -> int:
    """Tokens per head chunk: at most ``_LOGIT_ELEMENTS`` logits at once."""
    return max(1, _LOGIT_ELEMENTS // max(vocab, 1))


class Stores:
    """Clean site values of chosen sample tokens, kept for interchange sources.

    ``wanted[site]``: sorted global sample indices whose value of ``site`` is needed;
    ``columns[site]``: the value columns to keep (O: its retained units' channels; R: all).
    """

    def __init__(self, wanted: dict[str, torch.Tensor], columns: dict[str, torch.Tensor | None]) -> None:
        self.wanted, self.columns = wanted, columns
        self.values: dict[str, torch.Tensor] = {}

    def take(self, values: dict[str, torch.Tensor], first: int, flat: torch.Tensor) -> None:
        """Keep the wanted rows of one pass: ``flat`` indexes the pass's ``(b·T)`` positions
        of its samples, ``first`` is the global index of its first sample."""
        for name, v in values.items():
            want = self.wanted[name]
            lo, hi = torch.searchsorted(want, first), torch.searchsorted(want, first + flat.numel())
            if hi <= lo:
                continue
            rows = v.reshape(-1, v.shape[-1]).index_select(0, flat[want[lo:hi] - first])
            cols = self.columns[name]
            rows = rows if cols is None else rows.index_select(1, cols)
            if name not in self.values:
                self.values[name] = torch.empty(want.numel(), rows.shape[1], dtype=rows.dtype)
            self.values[name][lo:hi] = rows

    def get(self, name: str, samples: torch.Tensor) -> torch.Tensor:
        """Stored values of ``samples`` (global sample indices, all wanted)."""
        return self.values[name].index_select(0, torch.searchsorted(self.wanted[name], samples))


def stream_fidelity(
    o: TokenModel, r: TokenModel, inputs: Sequence[torch.Tensor], samples: torch.Tensor, clamp: dict[str, Any],
    stores: tuple[Stores, Stores], max_sequences: int, advance: Callable[[int], None], caches: list[list[Any]] | None = None,
) -> tuple[TokenFidelity, torch.Tensor]:
    """Per-token fidelity and fold error over all sequences, and O's prediction per sample.

    Each pass runs O's base (capturing what ``stores[0]`` wants), O_clamped's (``clamp``) and
    R's (capturing for ``stores[1]``) on a few sequences; the heads then run in chunks over
    the pass's sample tokens.
    """
    acc = TokenFidelity()
    ids = inputs[0]
    n, length = ids.shape[0], ids.shape[1]
    hidden = int(getattr(o.model.hf_config, "hidden_size", 0) or 1024)
    # One model's captures are alive at a time (each pass keeps only the wanted rows).
    widths = max(sum(o.model.site(s).channels for s in stores[0].wanted), sum(r.model.site(s).channels for s in stores[1].wanted))
    per_seq = length * (3 * hidden + widths) * o.model.dtype.itemsize
    step = max(1, min(max_sequences, _PASS_BYTES // max(per_seq, 1)))
    chunk = chunk_for(o)
    preds: list[torch.Tensor] = []
    first = 0
    with torch.no_grad():
        for i in range(0, n, step):
            x = [t[i : i + step] for t in inputs]
            s = samples[i : i + step]
            flat = s.reshape(-1).nonzero().squeeze(1)  # the pass's samples, row-major
            ho = _clean(o, x, stores[0], first, flat, None if caches is None else caches[0])
            hc, _ = o.hidden(x, edits=clamp)
            hr = _clean(r, x, stores[1], first, flat, None if caches is None else caches[1])
            ho, hc, hr = (h.reshape(-1, h.shape[-1]).index_select(0, flat) for h in (ho, hc, hr))
            target = None
            if o.causal:  # position t predicts token t + 1
                target = torch.cat([x[0][:, 1:], x[0][:, :1]], 1).reshape(-1).index_select(0, flat)
            for c in range(0, flat.numel(), chunk):
                sl = slice(c, c + chunk)
                zo = o.logits(ho[sl])
                acc.add(zo, r.logits(hr[sl]), o.logits(hc[sl]), None if target is None else target[sl])
                preds.append(zo.max(-1).indices)
            first += flat.numel()
            advance(x[0].shape[0])
    return acc, torch.cat(preds) if preds else torch.zeros(0, dtype=torch.int64)


def _clean(tm: TokenModel, x: Sequence[torch.Tensor], store: Stores, first: int, flat: torch.Tensor, caches: list[Any] | None) -> torch.Tensor:
    """Hidden states of a clean pass; the wanted site values go to ``store`` and, for token
    swaps on a causal LM, the KV cache to ``caches``."""
    if caches is not None:
        h, values, kv = tm.hidden_and_cache(x, list(store.wanted))
        caches.append(kv)
    else:
        h, values = tm.hidden(x, capture=list(store.wanted))
    store.take(values, first, flat)
    return h


def chunk_for(model: TokenModel) -> int:
    """Tokens per head chunk: the head's output width from its weight, else the config's vocabulary."""
    weight = getattr(model.head, "weight", None)
    vocab = int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else 0
    return rows_per_chunk(vocab or int(getattr(model.model.hf_config, "vocab_size", 0) or 0) or 65536)
