"""Data that cannot belong to the model, found before any work, with a message that says so.

Without these checks the first forward pass fails deep inside torch ("Expected tensor for
argument #1 'indices' to have one of the following scalar types", "index out of range in
self") and is reported as an internal error, or, for labels, nothing fails at all: a label of
7 for a 3-class model, or -3, silently corrupts accuracy and the cross-entropy curvature.

Checks, in order: token ids (the inputs of an embedding, for Hugging Face models: any input
named ``*input_ids``) are integers in ``[0, vocab_size)``; labels are non-negative; one
sample runs through the model (an error there is the data's, reported with the model's message);
labels are below the number of logits the model returns. Integer tensors are scanned in chunks,
never loaded whole.
"""

from __future__ import annotations

from typing import Any

import torch

from cmrtool.errors import CmrError, InputError

__all__ = ["check_data"]

_ROWS = 65536


def _scan(ds: Any, name: str) -> tuple[int, int, int, int]:
    """(min, row of min, max, row of max) of an integer tensor, chunk by chunk."""
    lo = hi = None
    lo_row = hi_row = 0
    for start in range(0, ds.n, _ROWS):
        t = ds._reader.rows(name, start, min(ds.n, start + _ROWS))
        t = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(-1, 1)
        mn, mx = t.min(dim=1).values, t.max(dim=1).values
        i, j = int(mn.argmin()), int(mx.argmax())
        if lo is None or int(mn[i]) < lo:
            lo, lo_row = int(mn[i]), start + i
        if hi is None or int(mx[j]) > hi:
            hi, hi_row = int(mx[j]), start + j
    return int(lo or 0), lo_row, int(hi or 0), hi_row


def _vocab_size(model: Any) -> int | None:
    config = getattr(model, "hf_config", None)
    size = getattr(config, "vocab_size", None) if config is not None else None
    return int(size) if isinstance(size, int) and size > 0 else None


def _on_meta_device(model: Any) -> bool:
    module = getattr(model, "module", None)
    if not isinstance(module, torch.nn.Module):
        return False
    first = next(module.parameters(), None)
    return first is not None and first.is_meta


def check_data(ds: Any, model: Any) -> None:
    """Refuse data that ``model`` cannot take (see the module docstring)."""
    from cmrtool.io.data import LABELS

    vocab = _vocab_size(model)
    for key in ds.keys:
        if not key.endswith("input_ids") or vocab is None:
            continue
        dt = ds._reader.dtype(key)
        if dt.is_floating_point:
            raise InputError(
                f"'{key}' in {ds.path} holds {str(dt).removeprefix('torch.')} values, and {type(model.module).__name__} takes integer token ids",
                "pass tokenized text (int64 token ids from the model's tokenizer), not image or feature data",
            )
    if vocab is not None and ds.keys and ds.keys[0] in ("input", "input_ids") and ds._reader.dtype(ds.keys[0]).is_floating_point:
        raise InputError(
            f"'{ds.keys[0]}' in {ds.path} holds floating-point data, and {type(model.module).__name__} takes integer token ids",
            "pass tokenized text (int64 token ids from the model's tokenizer), not image or feature data",
        )
    for key in ds.keys:
        if vocab is None or not key.endswith("input_ids"):
            continue
        lo, lo_row, hi, hi_row = _scan(ds, key)
        if lo < 0 or hi >= vocab:
            bad, row = (lo, lo_row) if lo < 0 else (hi, hi_row)
            raise InputError(
                f"token id {bad} in '{key}' of {ds.path} (sample {row}) is outside the vocabulary of {type(model.module).__name__} (0..{vocab - 1})",
                "tokenize the text with this model's tokenizer",
            )
    labels_max = None
    if ds.has_labels:
        lo, lo_row, labels_max, hi_row = _scan(ds, LABELS)
        if lo < 0:
            raise InputError(f"label {lo} in {ds.path} (sample {lo_row}) is negative", "labels are class indices 0..classes-1 (drop ignored samples instead of marking them -100)")
    if _on_meta_device(model):  # the block engine's skeleton: its layers are checked as they run
        return
    probe = ds.read(0, 1, labels=False)
    try:
        with torch.no_grad():
            logits = model.forward(list(probe.inputs))
    except CmrError:
        raise
    except (RuntimeError, IndexError, ValueError, TypeError) as e:
        detail = next((ln.strip() for ln in str(e).strip().splitlines() if ln.strip()), type(e).__name__)
        shapes = ", ".join(f"{k} {tuple(t.shape[1:])} {str(t.dtype).removeprefix('torch.')}" for k, t in zip(ds.keys, probe.inputs))
        raise InputError(
            f"the model cannot run on the data in {ds.path} (per sample: {shapes}): {detail[:200]}",
            "pass data prepared for this model (the tensor names, shapes and dtypes its forward takes)",
        ) from e
    if labels_max is not None and torch.is_tensor(logits) and logits.dim() >= 1:
        classes = int(logits.shape[-1])
        if labels_max >= classes:
            raise InputError(
                f"label {labels_max} in {ds.path} (sample {hi_row}) is out of range: the model returns {classes} logits (classes 0..{classes - 1})",
                "pass the labels of this model's task",
            )
