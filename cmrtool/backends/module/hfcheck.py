"""Checks on a Hugging Face directory before and after ``from_pretrained``: no remote code, and
weights that match the config exactly.

``from_pretrained`` initialises a missing tensor at random and drops an unexpected one with a
log line; for cmrtool that is a silently different model on every run (scores, plans and the
fold check would all be of a random network). The loading report is therefore required to be
empty. A ``config.json`` whose ``model_type`` transformers does not know, or that maps classes
to the directory's own Python (``auto_map``) without a built-in class to fall back to, is
refused before transformers sees it: its code never runs and no prompt is ever shown.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cmrtool.errors import InputError

__all__ = ["refuse_remote_code", "check_loading_info"]


def _names(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")


def refuse_remote_code(directory: Path) -> None:
    """Refuse a config that only the directory's own Python could load."""
    from cmrtool.backends.module.hf import transformers_module

    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{directory / 'config.json'} is not valid JSON ({e})", "re-save the model with save_pretrained") from e
    if not isinstance(config, dict):
        raise InputError(f"{directory / 'config.json'} is not a JSON object", "re-save the model with save_pretrained")
    mapping = transformers_module().models.auto.configuration_auto.CONFIG_MAPPING
    model_type = config.get("model_type")
    known = isinstance(model_type, str) and model_type in mapping
    if not known and ("auto_map" in config or any(directory.glob("*.py"))):
        raise InputError(
            f"{directory} needs its own Python code (model_type {model_type!r}{', auto_map' if 'auto_map' in config else ''}); cmrtool never runs code from a model directory",
            "export the model with a model_type built into transformers, or to TorchScript (torch.jit.script/trace) and pass the .pt",
        )


def check_loading_info(directory: Path, info: dict[str, Any]) -> None:
    """Refuse weights that do not match the config: tensors missing, unexpected or resized."""
    missing = set(info.get("missing_keys") or ())
    unexpected = set(info.get("unexpected_keys") or ())
    mismatched = {k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys") or ()}
    if not (missing or unexpected or mismatched):
        return
    parts = [f"{what} {_names(keys)}" for what, keys in (("missing", missing), ("unexpected", unexpected), ("resized", mismatched)) if keys]
    raise InputError(
        f"the weights in {directory} do not match its config.json: {'; '.join(parts)}",
        "use the config.json saved with these weights (save_pretrained writes both together)",
    )
