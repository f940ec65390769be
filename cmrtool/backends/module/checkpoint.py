"""safetensors checkpoints of nn.Modules: loading with an architecture, and reduced checkpoints.

A plain checkpoint is a state dict; ``--arch pkg.module:factory`` names a callable that returns
the (untrained) module, and the weights are assigned to it with their own dtypes.

A **reduced** checkpoint is the state dict of the reduced model with three metadata entries:
``cmrtool_plan`` (the plan, JSON), ``cmrtool_arch`` (the factory, or ``hf:ClassName`` for a
Hugging Face model) and, for Hugging Face models, ``cmrtool_hf_config`` (the original config).
A large plan's affine matrices are extra tensors ``cmrtool.plan.<site>.matrix`` of the same file
(:mod:`cmrtool.io.planstore`); they are not weights, and :func:`load_reduced` skips them.
:func:`load_reduced` rebuilds it: the factory's model, then the plan's surgery — the shapes come
from folding the plan into the fresh model's tensors, so a file that does not match its plan is
refused — then the weights.

Module surgery (:func:`assign_tensors`) assigns through ``Parameter.data`` where a parameter
exists, so tied weights stay tied, and registers parameters that folding added (a new bias).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cmrtool.backends.module.layouts import split_views
from cmrtool.errors import InputError, UsageError
from cmrtool.io.files import require_file, sha256_file
from cmrtool.plan import Plan
from cmrtool.io.planstore import SafetensorsTensors, is_plan_tensor
from cmrtool.io.planstore import split as split_plan
from cmrtool.io.safety import import_user_module, trusted_arch

__all__ = [
    "PLAN_KEY", "ARCH_KEY", "HF_CONFIG_KEY", "resolve_factory", "load_safetensors", "load_reduced",
    "save_reduced", "assign_tensors", "sync_shapes", "unique_tensors", "read_metadata",
]

PLAN_KEY = "cmrtool_plan"
ARCH_KEY = "cmrtool_arch"
HF_CONFIG_KEY = "cmrtool_hf_config"
_ARCH_HINT = "pass --arch pkg.module:factory, a callable that returns the model (e.g. cmrtool.testing.models:digits_mlp)"


def resolve_factory(spec: str) -> Callable[[], nn.Module]:
    """The callable named by ``pkg.module:factory`` (imported, checked to be callable)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"invalid --arch '{spec}'", _ARCH_HINT)
    try:
        mod = import_user_module(module_name)
    except ImportError as e:
        raise InputError(f"cannot import {module_name} for --arch {spec}: {e}", "install the package that defines the model, or fix the module path") from e
    obj: Any = mod
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise InputError(f"{module_name} has no attribute {attr} (--arch {spec})", _ARCH_HINT)
    if not callable(obj):
        raise InputError(f"--arch {spec} is a {type(obj).__name__}, not a callable", _ARCH_HINT)
    return obj


def build_module(arch: str, hf_config: str | None = None) -> nn.Module:
    """A fresh, untrained model from a factory spec or ``hf:ClassName`` with its config."""
    if arch.startswith("hf:"):
        from cmrtool.backends.module.hf import build_from_config

        if hf_config is None:
            raise InputError(f"the checkpoint names Hugging Face class {arch[3:]} but carries no config", "re-run cmrtool compile on the Hugging Face directory")
        return build_from_config(arch[3:], hf_config)
    factory = resolve_factory(arch)
    try:
        module = factory()
    except Exception as e:
        raise InputError(f"--arch {arch} failed when called: {type(e).__name__}: {e}", "the factory must build the model without arguments") from e
    if not isinstance(module, nn.Module):
        raise InputError(f"--arch {arch} returned a {type(module).__name__}, not a torch.nn.Module", _ARCH_HINT)
    return module


def read_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    require_file(path, "model file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise InputError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0][:120]})", "the file is truncated or not safetensors; save weights with safetensors.torch.save_file") from e


def _read_tensors(path: str | Path, weights_only: bool = False) -> dict[str, torch.Tensor]:
    """The file's tensors; with ``weights_only`` without the plan's (``cmrtool.plan.*``)."""
    from safetensors import safe_open

    from cmrtool.io.planstore import is_plan_tensor

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if not (weights_only and is_plan_tensor(k))}
    except Exception as e:
        raise InputError(f"cannot read the tensors of {path} ({str(e).splitlines()[0][:120]})", "the file is truncated or corrupt") from e


def load_safetensors(path: str | Path, arch: str | None = None) -> Any:
    """A safetensors checkpoint as a :class:`~cmrtool.backends.module.model.ModuleModel`.

    A reduced checkpoint (with a plan) rebuilds itself from its metadata; a plain state dict
    needs ``arch``.
    """
    from cmrtool.backends.module.model import ModuleModel

    meta = read_metadata(path)
    if PLAN_KEY in meta:
        return load_reduced(path, arch)
    if arch is None:
        raise UsageError(f"{path} holds weights only: cmrtool needs the architecture that uses them", _ARCH_HINT)
    module = build_module(arch)
    assign_tensors(module, _read_tensors(path), strict=True, what=f"{path} does not match --arch {arch}")
    return ModuleModel(module, path, sha256_file(path), arch=arch)


def load_reduced(path: str | Path, arch: str | None = None) -> Any:
    """Rebuild a reduced checkpoint written by ``cmrtool compile -o reduced.safetensors``.

    The file records its factory, but only ``arch`` (the user's choice) or cmrtool's own
    factories are ever imported (:mod:`cmrtool.io.safety`); a file naming other code is refused
    with the ``--arch`` to pass. A Hugging Face class is only ever looked up in ``transformers``.

    Args:
        path: the reduced safetensors file.
        arch: the factory, if the file's ``cmrtool_arch`` should not be used.

    Example:
        >>> reduced = load_reduced("reduced.safetensors")
        >>> logits = reduced.forward([x])
    """
    from cmrtool.backends.module.model import ModuleModel
    from cmrtool.compile.fold import fold

    meta = read_metadata(path)
    if PLAN_KEY not in meta:
        raise InputError(f"{path} has no cmrtool plan: it was not written by cmrtool compile", "load it with --arch as an unreduced checkpoint")
    plan = Plan.loads(meta[PLAN_KEY], SafetensorsTensors(path), str(path))  # a large plan's matrices are tensors of the file
    arch = trusted_arch(path, meta.get(ARCH_KEY), arch)
    if not arch:
        raise UsageError(f"{path} does not say which architecture it reduces", _ARCH_HINT)
    hf_text = meta.get(HF_CONFIG_KEY)
    base = ModuleModel(build_module(arch, hf_text), path, "", arch=arch, hf_config=_hf_config(arch, hf_text))
    expected = fold(base.tensors(), base.sites, plan)
    names = set(base.module.state_dict()) | set(expected.added)
    want = {k: tuple(v.shape) for k, v in base.stock(expected.tensors).items() if k in names}
    state = _read_tensors(path, weights_only=True)
    params = dict(base.module.named_parameters(remove_duplicate=False))
    _check_state(state, want, params, f"{path} does not match its plan for --arch {arch}")
    module = base.reduced_module(split_views(state, base.views), plan, in_place=True)  # the file is in stock layout
    return ModuleModel(module, path, sha256_file(path), arch=arch, plan=plan, hf_config=base.hf_config)


def _hf_config(arch: str, text: str | None) -> Any:
    if not arch.startswith("hf:") or text is None:
        return None
    from cmrtool.backends.module.hf import config_from_json

    return config_from_json(arch[3:], text)


def save_reduced(model: Any, module: nn.Module, path: str | Path, plan: Plan) -> None:
    """Write ``module``'s state dict with the plan and the architecture in the metadata."""
    from safetensors.torch import save

    text, side = split_plan(plan)  # a large plan's matrices become extra tensors of the file
    meta = {"format": "pt", PLAN_KEY: text, ARCH_KEY: model.arch or ""}
    if model.hf_config is not None:
        meta[HF_CONFIG_KEY] = model.hf_config.to_json_string()
    if not model.arch:
        raise UsageError("this model was built in memory: cmrtool cannot record how to rebuild it", _ARCH_HINT)
    # Serialized in memory and written through a file object: the destination may be an unnamed
    # temporary file (``/proc/self/fd/N``, see cmrtool.io.files.atomic_write), next to which
    # save_file could not create its own temporary file.
    state = unique_tensors(module.state_dict())
    clash = [k for k in state if is_plan_tensor(k)]
    if clash:
        raise UsageError(f"the model has a tensor named {clash[0]}, a name cmrtool keeps for its plan", "write -o reduced.pt or -o reduced.onnx")
    data = save({**state, **side}, metadata=meta)
    with open(path, "wb") as f:
        f.write(data)


def unique_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with tied tensors stored once (safetensors refuses shared storage)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for k, v in state.items():
        key = (v.data_ptr(), tuple(v.shape))
        if v.numel() and key in seen:
            continue
        seen.add(key)
        out[k] = v.detach().contiguous()
    return out


def assign_tensors(module: nn.Module, tensors: Mapping[str, torch.Tensor], strict: bool = False, what: str = "") -> None:
    """Put ``tensors`` into ``module`` by name: ``Parameter.data`` for parameters (ties survive),
    buffers replaced, new names registered as parameters.

    With ``strict`` every state-dict entry must be given (or tied to one that is) with its
    current shape, and nothing else; the first problem is reported with ``what``.
    """
    params = dict(module.named_parameters(remove_duplicate=False))
    buffers = dict(module.named_buffers(remove_duplicate=False))
    if strict:
        want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        _check_state(tensors, want, params, what)
    for name, t in tensors.items():
        owner_path, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_path)
        p = params.get(name)
        if p is not None and p.is_floating_point() and not t.is_floating_point():
            raise InputError(
                f"{what + ': ' if what else ''}weight {name} has dtype {str(t.dtype).removeprefix('torch.')}, and the model's parameters are floating point",
                "save the weights in float32 (or float16/bfloat16/float64); quantized integer weights are not supported",
            )
        if p is not None:
            p.data = t
        elif name in buffers or leaf in owner._buffers:
            owner._buffers[leaf] = t
        else:
            owner._parameters[leaf] = nn.Parameter(t, requires_grad=False)


def _check_state(
    tensors: Mapping[str, torch.Tensor], want: Mapping[str, tuple[int, ...]], params: dict[str, nn.Parameter], what: str
) -> None:
    """Every wanted name present (or tied to a present one) with its shape, and nothing else."""
    by_id: dict[int, set[str]] = {}
    for k, p in params.items():
        by_id.setdefault(id(p), set()).add(k)
    missing = [k for k in want if k not in tensors and not (by_id.get(id(params.get(k)), set()) & set(tensors))]
    unexpected = [k for k in tensors if k not in want]
    shapes = [k for k in tensors if k in want and want[k] != tuple(tensors[k].shape)]
    if missing or unexpected or shapes:
        if shapes:
            k = shapes[0]
            detail = f"{k} has shape {tuple(tensors[k].shape)} in the file, {want[k]} in the model"
        else:
            detail = "; ".join(p for p in (
                f"missing {', '.join(missing[:3])}" if missing else "", f"unexpected {', '.join(unexpected[:3])}" if unexpected else "",
            ) if p)
        raise InputError(f"{what}: {detail}", "pass the --arch factory that built these weights (same layer sizes and names)")


def sync_shapes(module: nn.Module) -> None:
    """Make layer attributes (``in_features``, ``out_channels``, ``num_features``…) match their weights."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            m.out_features, m.in_features = int(m.weight.shape[0]), int(m.weight.shape[1])
        elif isinstance(m, nn.modules.conv._ConvNd):
            m.out_channels, m.in_channels = int(m.weight.shape[0]), int(m.weight.shape[1]) * m.groups
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            ref = m.running_mean if m.running_mean is not None else m.weight
            if ref is not None:
                m.num_features = int(ref.numel())
