"""What a reduced Hugging Face directory's config.json says, family by family.

Folding a replaced unit's constant c moves ``W[:, S] c`` into the consumer's bias (Proposition 1),
so a stock directory can hold a plan only where the config can give that consumer a bias. Per
family (:mod:`cmrtool.backends.module.families`) the choice is, in order:

1. the family's own config: set each FFN width field (``intermediate_size``, ``ffn_dim``,
   ``n_inner``, ``moe_intermediate_size``…) and, where a constant needs a new bias, its bias flag
   (``mlp_bias``, ``attention_bias``, ``bias``, ``enable_bias``; the other biases that flag creates
   are written as zeros, which is exact);
2. an exactly equivalent stock family whose config holds the biases (``written_as``: Mistral and
   Qwen2 as LLaMA with ``mlp_bias`` / ``attention_bias``; Qwen2's q/k/v biases are LLaMA's
   ``attention_bias`` ones, its o_proj bias starts at zero); compile's fold check then proves the
   equivalence on the check batch;
3. otherwise the sites whose constants have no home are written with **zero replacement**
   (deletion: nothing to fold), announced by a one-line notice and recorded in the report's
   ``notes`` — never dropped silently. Experts' down projections are bias-free, so expert sites
   always take this path when their constants are nonzero.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

from cmrtool.backends.module.families import ALWAYS, Family, family_of, width_field
from cmrtool.backends.module.hf import _OUTPUTS, transformers_module
from cmrtool.errors import UsageError
from cmrtool.plan import Plan, Replacement, SitePlan
from cmrtool.sites import Site

__all__ = ["DirChoice", "choose_dir_output", "dir_output_for_sites", "reduced_config", "zero_replacements"]

_DEFAULT_FLAGS = {"neuron": "mlp_bias", "head": "attention_bias"}


@dataclasses.dataclass(frozen=True)
class DirChoice:
    """The plan a directory can hold, the family it is written as, and the notices about it."""

    plan: Plan
    written_as: str
    notes: tuple[str, ...]


def _folds_constant(sp: SitePlan) -> bool:
    return bool(sp.replaced) and (sp.replacement.kind != "constant" or any(sp.replacement.values))


def _needs_bias(site: Site, sp: SitePlan) -> bool:
    return _folds_constant(sp) and any(c.fold_mode == "new-bias" for c in site.consumers)


def _flag(family: Family | None, kind: str) -> str | None:
    if family is None:
        return _DEFAULT_FLAGS[kind]
    return family.mlp_bias if kind == "neuron" else family.attention_bias


def _holds(config: Any, family: Family | None, site: Site) -> bool:
    """The family's own config can give this site's consumer a bias."""
    if any("#" in (c.fold_target or "") for c in site.consumers):  # an expert's down projection: bias-free
        return False
    flag = _flag(family, site.kind)
    return flag == ALWAYS or (flag is not None and hasattr(config, flag))


def _as_other(config: Any, family: Family | None) -> bool:
    return family is not None and family.written_as is not None and (family.same_as is None or family.same_as(config))


def choose_dir_output(model: Any, plan: Plan) -> DirChoice:
    """Decide how a stock directory holds ``plan`` (see the module docstring)."""
    planned = {sp.name for sp in plan.sites if _needs_bias(model.site(sp.name), sp)}
    written_as, notes, zeroed = dir_output_for_sites(model, [model.site(n) for n in planned])
    return DirChoice(zero_replacements(plan, zeroed), written_as, notes)


def dir_output_for_sites(model: Any, sites: Sequence[Site]) -> tuple[str, tuple[str, ...], frozenset[str]]:
    """The class a directory is written as, its notices, and the sites whose replaced units are
    deleted, for ``sites`` whose replacements fold something into a new bias. The block engine
    asks this before any layer is processed, since it folds each layer as it goes."""
    config, family = model.hf_config, family_of(model.hf_config)
    label = family.label if family is not None else config.model_type
    homeless = [s for s in sites if any(c.fold_mode == "new-bias" for c in s.consumers) and not _holds(config, family, s)]
    other = [s for s in homeless if _as_other(config, family) and "#" not in (s.consumers[0].fold_target or "")]
    zeroed = frozenset(s.name for s in homeless if s not in other)
    notes: list[str] = []
    written_as = type(model.module).__name__
    if other:
        assert family is not None and family.written_as is not None
        written_as = family.written_as + _class_suffix(type(model.module).__name__)
        notes.append(f"{label}'s config.json cannot hold folded constants: written as {written_as}, an exactly equivalent stock family whose config can (checked by the fold error)")
    if zeroed:
        kinds = sorted({model.site(n).kind for n in zeroed})
        experts = any("#" in (c.fold_target or "") for n in zeroed for c in model.site(n).consumers)
        notes.append(
            f"{label}'s config.json has no bias for the folded constants of {len(zeroed)} {'/'.join(kinds)} site(s)"
            f"{' (expert layers are bias-free)' if experts else ''}: their replaced units are deleted (--replacement zero) instead; "
            "-o reduced.safetensors keeps the folded constants"
        )
    return written_as, tuple(notes), zeroed


def zero_replacements(plan: Plan, names: frozenset[str] | set[str]) -> Plan:
    """``plan`` with the replaced units of ``names`` deleted (zero constants: nothing to fold)."""
    if not names:
        return plan
    sites = tuple(
        dataclasses.replace(sp, replacement=Replacement("constant", (0.0,) * (len(sp.replaced) * sp.group))) if sp.name in names else sp
        for sp in plan.sites
    )
    return dataclasses.replace(plan, sites=sites)


def _class_suffix(name: str) -> str:
    """``ForCausalLM`` of ``Qwen2ForCausalLM``, ``Model`` of ``MistralModel``."""
    i = name.find("For")
    return name[i:] if i > 0 else "Model"


def _uniform(sites: Sequence[Site], planned: dict[str, SitePlan], label: str) -> int | None:
    """The one width every site of a group keeps (None when the plan reduces none of them)."""
    if not any(s.name in planned for s in sites):
        return None
    widths = {len(planned[s.name].kept) if s.name in planned else s.width for s in sites}
    if len(widths) > 1:
        raise UsageError(
            f"a Hugging Face directory needs the same {label} width in every layer, and the plan gives {', '.join(map(str, sorted(widths)))}",
            f"keep the same number of units in every layer (--keep-count N, or --keep with --round-to), {_OUTPUTS}",
        )
    return widths.pop()


def _set(config: Any, key: str, value: Any, why: str) -> None:
    if not hasattr(config, key):
        fold_nothing = ", fold nothing (--replacement zero)," if key.endswith("bias") else ""
        raise UsageError(f"{type(config).__name__} has no '{key}', so config.json cannot express {why}", f"keep those units{fold_nothing} {_OUTPUTS}")
    setattr(config, key, value)


def reduced_config(model: Any, plan: Plan) -> tuple[Any, type]:
    """The reduced model's config and the stock class that loads it (maybe another family's)."""
    planned = {sp.name: sp for sp in plan.sites}
    config, family = copy.deepcopy(model.hf_config), family_of(model.hf_config)
    by_field: dict[str, list[Site]] = {}
    for s in model.sites:
        if s.kind == "neuron":
            by_field.setdefault(width_field(family, s.name), []).append(s)
    for key, sites in by_field.items():
        width = _uniform(sites, planned, "FFN" if len(by_field) == 1 else f"FFN ({key})")
        if width is not None:
            _set(config, key, width, "a smaller FFN")
    heads = [s for s in model.sites if s.kind == "head"]
    width = _uniform(heads, planned, "attention")
    if width is not None:
        mine = next(s for s in heads if s.name in planned)
        if family is not None and not family.heads_in_config:
            raise UsageError(
                f"{type(config).__name__} derives the head size from hidden_size / num_attention_heads, so config.json cannot express removed heads",
                "write -o reduced.safetensors (cmrtool rebuilds it: cmrtool.load_reduced) or -o reduced.onnx",
            )
        head_dim = mine.producers[2].group
        config.num_attention_heads = width * mine.group // head_dim
        if hasattr(config, "num_key_value_heads"):
            config.num_key_value_heads = width
        config.head_dim = head_dim
    need = {s.kind for s in model.sites if s.name in planned and _needs_bias(s, planned[s.name])}
    other = False
    for kind in sorted(need):
        site = next(s for s in model.sites if s.kind == kind and s.name in planned and _needs_bias(s, planned[s.name]))
        if _holds(config, family, site):
            flag = _flag(family, kind)
            if flag != ALWAYS:
                setattr(config, str(flag), True)
        elif _as_other(config, family) and "#" not in (site.consumers[0].fold_target or ""):
            other = True
        else:
            what = "the bias of the FFN output that holds the folded constants" if kind == "neuron" else "the bias of the attention output that holds the folded head outputs"
            _set(config, _flag(family, kind) or _DEFAULT_FLAGS[kind], True, what)
    cls = type(model.module)
    if other:
        assert family is not None and family.written_as is not None
        tf = transformers_module()
        cls = getattr(tf, family.written_as + _class_suffix(cls.__name__))
        config = _converted(tf, family.written_as, config, model, need)
    config.architectures = [cls.__name__]
    return config, cls


def _converted(tf: Any, prefix: str, config: Any, model: Any, need: set[str]) -> Any:
    """``config`` as the equivalent family ``prefix`` (LLaMA) with the biases it needs switched on."""
    d = config.to_dict()
    for k in ("model_type", "architectures", "transformers_version", "auto_map", "layer_types"):
        d.pop(k, None)
    d.setdefault("head_dim", None)
    if d["head_dim"] is None:
        d["head_dim"] = config.hidden_size // config.num_attention_heads
    qkv_bias = any(k.endswith("q_proj.bias") for k in model.module.state_dict())  # Qwen2's fixed q/k/v biases
    d["attention_bias"] = qkv_bias or "head" in need
    d["mlp_bias"] = "neuron" in need
    return getattr(tf, f"{prefix}Config").from_dict(d)
