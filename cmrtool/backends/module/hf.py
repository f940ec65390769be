"""Hugging Face directories in and out, through the optional ``transformers`` extra (imported
lazily, always offline: ``HF_HUB_OFFLINE=1`` and ``local_files_only``).

In: a directory with ``config.json`` and ``model.safetensors`` (or its sharded index), loaded
with the class named by the config's ``architectures`` (``AutoModel`` when it names none).

Out: a reduced model whose every layer keeps the same number of FFN units and of heads is
written back as a directory that stock ``from_pretrained`` loads — ``config.json`` with
``intermediate_size`` / ``num_attention_heads`` / ``num_key_value_heads`` / ``head_dim`` updated
and ``mlp_bias`` / ``attention_bias`` set where a folded constant needs a bias that the
architecture lacks (the other biases that flag creates are written as zeros), ``model.safetensors``
with the plan in its metadata, ``cmrtool_plan.json`` (with ``cmrtool_plan.safetensors`` beside it
when the plan's affine matrices are large, :mod:`cmrtool.io.planstore`), and the input's other files
(tokenizer…).
Which config fields hold each family's widths and biases, and the family a model is written as
when its own config cannot hold a folded constant, come from :mod:`cmrtool.backends.module.hfout`.
Architectures that derive the head size from ``hidden_size / num_attention_heads`` (BERT, ViT)
cannot express removed heads in their config; those and non-uniform widths get an error that
names the outputs that work (``-o reduced.safetensors`` or ``-o reduced.onnx``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cmrtool.errors import InputError, UsageError
from cmrtool.backends.module.hfcheck import check_loading_info, refuse_remote_code
from cmrtool.io.files import sha256_file
from cmrtool.plan import Plan
from cmrtool.io.planstore import PLAN_JSON_FILE, PLAN_TENSORS_FILE, read_dir_plan, write_dir_plan

__all__ = [
    "PLAN_FILE", "transformers_module", "is_hf_dir", "load_dir", "write_dir", "require_hf_input", "check_dir_output",
    "build_from_config", "config_from_json",
]

PLAN_FILE = PLAN_JSON_FILE
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
_OUTPUTS = "or write -o reduced.safetensors (cmrtool rebuilds it: cmrtool.load_reduced) or -o reduced.onnx"


def transformers_module() -> Any:
    """``transformers``, imported offline and quiet; a clear error when it is not installed."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError as e:
        raise InputError("Hugging Face models need the optional 'transformers' package", "pip install 'cmrtool[hf]'") from e
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def is_hf_dir(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def _weight_files(p: Path) -> list[Path]:
    index = p / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"{index} is not a valid safetensors index", "re-save the model with save_pretrained") from e
        return [p / s for s in shards]
    return [p / "model.safetensors"] if (p / "model.safetensors").is_file() else []


def _sha256_dir(p: Path, weights: list[Path]) -> str:
    h = hashlib.sha256()
    for f in [p / "config.json", *weights]:
        h.update(f.name.encode() + b"\0" + sha256_file(f).encode())
    return h.hexdigest()


def load_dir(path: str | Path) -> Any:
    """A Hugging Face directory as a :class:`~cmrtool.backends.module.model.ModuleModel` (its plan too, if reduced)."""
    from cmrtool.backends.module.model import ModuleModel

    p = Path(path)
    if not (p / "config.json").is_file():
        raise InputError(f"{p} is a directory without config.json", "a Hugging Face model directory holds config.json and model.safetensors (save_pretrained writes both)")
    weights = _weight_files(p)
    if not weights:
        legacy = any(p.glob("pytorch_model*.bin"))
        raise InputError(
            f"{p} has {'only pytorch_model.bin weights' if legacy else 'no model.safetensors'}",
            "cmrtool reads safetensors weights: re-save the model with model.save_pretrained(dir) (safetensors is the default)",
        )
    tf = transformers_module()
    refuse_remote_code(p)
    try:
        # trust_remote_code=False everywhere: a directory's own Python never runs, and
        # transformers never asks on a terminal whether it may.
        config = tf.AutoConfig.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
        cls = next((getattr(tf, a) for a in (config.architectures or []) if hasattr(tf, a)), tf.AutoModel)
        module, info = cls.from_pretrained(str(p), local_files_only=True, trust_remote_code=False, output_loading_info=True)
    except Exception as e:  # transformers raises many exception types for bad directories
        raise InputError(f"transformers could not load {p}: {_first_line(e)}", "check that config.json and the weights belong together") from e
    check_loading_info(p, info)
    plan = read_dir_plan(p)
    return ModuleModel(module, p, _sha256_dir(p, weights), arch=f"hf:{type(module).__name__}", plan=plan, hf_config=module.config, fmt="huggingface")


def _model_class(class_name: str) -> Any:
    tf = transformers_module()
    cls = getattr(tf, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, tf.PreTrainedModel)):
        raise InputError(f"transformers has no model class {class_name}", "upgrade transformers to the version the model was reduced with")
    return cls


def config_from_json(class_name: str, text: str) -> Any:
    return _model_class(class_name).config_class.from_dict(json.loads(text))


def build_from_config(class_name: str, text: str) -> Any:
    """A fresh model of Hugging Face class ``class_name`` from a config's JSON."""
    return _model_class(class_name)(config_from_json(class_name, text))


def require_hf_input(model: Any) -> None:
    """A Hugging Face directory can only be written for a model read from one."""
    if getattr(model, "hf_config", None) is None:
        native = ".pt" if model.format == "torchscript" else ".safetensors"
        raise UsageError(f"a directory output needs a Hugging Face input, and {model.path} is not one", f"write -o reduced{native} or -o reduced.onnx")


def check_dir_output(model: Any, plan: Plan) -> tuple[Any, dict[str, tuple[int, ...]], set[str]]:
    """The reduced model's config, the tensor shapes it implies (from an instance on the meta
    device), and its tied aliases; or an error saying why a directory cannot hold the model.
    The config, and the family it is written as, come from :func:`cmrtool.backends.module.hfout.reduced_config`."""
    from cmrtool.backends.module.hfout import reduced_config

    require_hf_input(model)
    config, cls = reduced_config(model, plan)
    with torch.device("meta"):  # shapes only: which tensors the new config makes, and how large
        fresh = cls(config)
    want = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    viewed = {n for v in model.views for n in v.names()}  # other layouts: their shapes are checked when written
    for sp in plan.sites:
        site = model.site(sp.name)
        rows = len(sp.kept) * site.producers[0].group
        if site.producers[0].name not in viewed and want.get(site.producers[0].name, (rows,))[0] != rows:
            raise UsageError(
                f"{type(config).__name__} derives the head size from hidden_size / num_attention_heads, so config.json cannot express removed heads"
                if site.kind == "head" else f"config.json of {type(config).__name__} cannot express the reduced {site.producers[0].name}",
                "write -o reduced.safetensors (cmrtool rebuilds it: cmrtool.load_reduced) or -o reduced.onnx",
            )
    aliases: dict[int, list[str]] = {}
    for k, prm in fresh.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(prm), []).append(k)
    return config, want, {k for names in aliases.values() for k in names[1:]}


def write_dir(model: Any, path: str | Path, tensors: Mapping[str, torch.Tensor], plan: Plan) -> None:
    """Write the reduced model as a Hugging Face directory (``path`` exists and is empty)."""
    from safetensors.torch import save_file

    from cmrtool.backends.module.checkpoint import ARCH_KEY, PLAN_KEY, unique_tensors

    config, want, tied = check_dir_output(model, plan)
    canonical_added = set(tensors) - set(model.tensors())
    tensors = model.stock(tensors)  # in the stock layout (transposed / fused / stacked back)
    state: dict[str, torch.Tensor] = {}
    for k, shape in want.items():
        t = tensors.get(k)
        if t is None and k.endswith(".bias"):  # created by mlp_bias / attention_bias: zero is exact
            t = torch.zeros(shape, dtype=model.dtype)
        if t is None:
            if k in tied:
                continue
            raise InputError(f"the reduced model has no tensor {k}, which {type(model.module).__name__} expects", f"please report this; meanwhile {_OUTPUTS}")
        if tuple(t.shape) != shape:
            raise UsageError(f"config.json cannot express the reduced {k}: shape {tuple(t.shape)}, the config gives {shape}", f"keep those units {_OUTPUTS}")
        state[k] = t
    source, added = set(model.module.state_dict()), {k.split("#", 1)[0] for k in canonical_added}
    extra = [k for k in tensors if k not in want and (k in source or (k in added and bool(tensors[k].any())))]
    if extra:
        raise UsageError(f"{type(config).__name__} cannot hold {extra[0]} (a bias the folded constants need)", f"use --replacement zero to fold nothing, {_OUTPUTS}")
    out = Path(path)
    config.save_pretrained(str(out))
    text = write_dir_plan(out, plan)  # cmrtool_plan.json, and cmrtool_plan.safetensors for a large plan
    meta = {"format": "pt", PLAN_KEY: text, ARCH_KEY: f"hf:{type(model.module).__name__}"}
    save_file(unique_tensors(state), str(out / "model.safetensors"), metadata=meta)
    _copy_extras(Path(model.path), out)


def _copy_extras(src: Path, dest: Path) -> None:
    """Tokenizer and other files of the input directory (not its weights, config or plan)."""
    skip = {"config.json", PLAN_FILE, PLAN_TENSORS_FILE, *_WEIGHTS}
    for f in src.iterdir():
        if f.is_file() and f.name not in skip and not f.name.startswith(("model-", "pytorch_model", ".")) and not (dest / f.name).exists():
            shutil.copy2(f, dest / f.name)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]
