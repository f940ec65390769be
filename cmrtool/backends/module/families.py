"""The model families cmrtool knows, in ONE table: what each layer type looks like and how its
config describes it. A new family is one :class:`Family` entry.

Per family (keyed by the config's ``model_type``):

- **layers** (:class:`Layer`, keyed by module class name): FFNs and attention blocks whose layout
  the generic patterns of :mod:`cmrtool.backends.module.patterns` do not cover — which attributes produce
  and consume the units, whether weights are stored ``(in, out)`` (GPT-2's ``Conv1D``: producers
  are sliced along columns, consumers along rows), how a fused parameter splits (Phi-3's
  ``gate_up_proj``: gate = first half of the rows, up = second half; GPT-2's ``c_attn``: q/k/v =
  thirds; GPT-NeoX's ``query_key_value``: ``[q_h; k_h; v_h]`` per head), and whether the FFN is a
  bank of experts stored as 3-D parameters ``(E, out, in)`` (Mixtral, Qwen-MoE in transformers 5);
- **width fields**: the config field that holds an FFN's width, by a marker in the site name
  (``experts`` → ``moe_intermediate_size``…; ``""`` matches every site);
- **bias flags**: the config flag that gives the FFN / attention output projection a bias to hold
  folded constants (``mlp_bias``, ``bias``, ``enable_bias``, ``attention_bias``); ``ALWAYS`` when it
  always has one, ``None`` when the config cannot give it one;
- **heads in config**: whether config.json can express removed heads (a ``head_dim`` field;
  families that derive it as ``hidden_size / num_heads`` cannot);
- **stack** (:class:`Stack`): where the block engine (:mod:`cmrtool.engine.blocks`) finds the
  layer list, the token table and the modules after the layers, and whether the sequential fast
  path applies (``None``: the family goes through the whole-model path);
- **written as**: the class-name prefix of an exactly equivalent family whose config *can* hold the biases (Mistral and
  Qwen2 as LLaMA with ``mlp_bias`` / ``attention_bias``), used when the plan folds constants the
  family itself cannot hold; otherwise those sites fall back to ``zero`` replacement
  (:mod:`cmrtool.backends.module.hfout`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Layer", "Stack", "Family", "FAMILIES", "ALWAYS", "family_of", "layer_of", "stack_of", "width_field"]

ALWAYS = "always"


@dataclass(frozen=True)
class Layer:
    """One module class's layout.

    Attributes:
        kind: ``neuron`` (an FFN) or ``head`` (attention).
        producer: attribute of the producing Linear/Conv1D (or 3-D parameter, for experts).
        consumer: attribute of the consuming Linear/Conv1D (or 3-D parameter).
        act: attribute of the activation module.
        gated: the FFN is ``act(gate) * up`` (the producer fuses gate and up).
        transposed: weights stored ``(in, out)`` (``Conv1D``).
        fused: labels of the row blocks of a fused producer, e.g. ``("gate", "up")`` or
            ``("q", "k", "v")`` (q : k : v in the proportions of query to key/value heads).
        per_head: q/k/v interleaved per head, ``[q_h; k_h; v_h]`` (GPT-NeoX).
        experts: the producer/consumer are ``(E, out, in)`` parameters, one FFN per expert.
    """

    kind: str
    producer: str
    consumer: str
    act: str = ""
    gated: bool = False
    transposed: bool = False
    fused: tuple[str, ...] = ()
    per_head: bool = False
    experts: bool = False


@dataclass(frozen=True)
class Stack:
    """How a family's stack of layers runs, for the block engine (paths are module attributes).

    Attributes:
        layers: the layer list, below the runner (``layers``, ``h``, ``encoder.layer``).
        tokens: the token embedding table, below the runner (read only at the calibration ids).
        after: modules the runner applies after the layers (final norm, OPT's ``project_out``,
            an encoder's pooler): the identity while one block runs.
        runner: the module whose ``forward`` runs the layers, below the base model (OPT: ``decoder``).
        encoder: bidirectional (an encoder's layer ends with a LayerNorm after its FFN).
        ffn_last: a layer's FFN output is added to the residual stream last, so the sequential
            pass can add a reduced FFN's change to the recorded output instead of re-running the
            layer (False with a norm after the FFN, Gemma-2's; or experts, whose values are per
            routed token); a callable decides from the config.
        tuple_out: a layer returns a tuple whose first item is the hidden states (Falcon).
    """

    layers: str = "layers"
    tokens: str = "embed_tokens"
    after: tuple[str, ...] = ("norm",)
    runner: str = ""
    encoder: bool = False
    ffn_last: bool | Callable[[Any], bool] = True
    tuple_out: bool = False


_DECODER = Stack()
_MOE = Stack(ffn_last=False)  # an expert's values are per routed token; Qwen2-MoE gates its shared expert
_ENCODER = Stack("encoder.layer", "embeddings.word_embeddings", ("pooler",), encoder=True, ffn_last=False)


@dataclass(frozen=True)
class Family:
    """One model family (see the module docstring)."""

    label: str
    model_types: tuple[str, ...]
    layers: dict[str, Layer] = field(default_factory=dict)
    widths: tuple[tuple[str, str], ...] = (("", "intermediate_size"),)
    mlp_bias: str | None = "mlp_bias"
    attention_bias: str | None = "attention_bias"
    heads_in_config: bool = True
    written_as: str | None = None
    same_as: Callable[[Any], bool] | None = None  # the config meets the written-as family's assumptions
    stack: Stack | None = _DECODER


def _no_sliding_window(config: Any) -> bool:
    """Equivalent to LLaMA only if no layer attends through a window shorter than the context."""
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False or not window:
        return True
    return int(window) >= int(getattr(config, "max_position_embeddings", 0) or 0)


_EXPERTS = Layer("neuron", "gate_up_proj", "down_proj", act="act_fn", gated=True, fused=("gate", "up"), experts=True)
_NEOX_MLP = Layer("neuron", "dense_h_to_4h", "dense_4h_to_h", act="act")

FAMILIES: tuple[Family, ...] = (
    Family("LLaMA", ("llama",)),
    Family("Mistral", ("mistral",), mlp_bias=None, attention_bias=None, written_as="Llama", same_as=_no_sliding_window),
    Family("Qwen2", ("qwen2",), mlp_bias=None, attention_bias=None, written_as="Llama", same_as=_no_sliding_window),
    Family("Qwen3", ("qwen3",), mlp_bias=None),
    Family("Gemma", ("gemma",), mlp_bias=None),
    Family("Gemma-2", ("gemma2",), mlp_bias=None, stack=Stack(ffn_last=False)),  # post-FFN norm
    Family("Gemma-3 (text)", ("gemma3_text",), mlp_bias=None, stack=Stack(ffn_last=False)),
    Family(
        "Phi-3", ("phi3",), mlp_bias=None, attention_bias=None,
        layers={
            "Phi3MLP": Layer("neuron", "gate_up_proj", "down_proj", act="activation_fn", gated=True, fused=("gate", "up")),
            "Phi3Attention": Layer("head", "qkv_proj", "o_proj", fused=("q", "k", "v")),
        },
    ),
    Family(
        "GPT-2", ("gpt2",), widths=(("", "n_inner"),), mlp_bias=ALWAYS, attention_bias=ALWAYS, heads_in_config=False,
        stack=Stack("h", "wte", ("ln_f",)),
        layers={
            "GPT2MLP": Layer("neuron", "c_fc", "c_proj", act="act", transposed=True),
            "GPT2Attention": Layer("head", "c_attn", "c_proj", transposed=True, fused=("q", "k", "v")),
        },
    ),
    Family(
        "GPT-NeoX / Pythia", ("gpt_neox",), mlp_bias=ALWAYS, attention_bias=ALWAYS, heads_in_config=False,
        stack=Stack("layers", "embed_in", ("final_layer_norm",)),
        layers={"GPTNeoXMLP": _NEOX_MLP, "GPTNeoXAttention": Layer("head", "query_key_value", "dense", per_head=True)},
    ),
    Family("OPT", ("opt",), widths=(("", "ffn_dim"),), mlp_bias="enable_bias", attention_bias="enable_bias", heads_in_config=False,
           stack=Stack("layers", "embed_tokens", ("final_layer_norm", "project_out"), runner="decoder",
                       ffn_last=lambda c: bool(getattr(c, "do_layer_norm_before", True)))),  # OPT-350m: norm after the residual
    Family("Falcon", ("falcon",), widths=(("", "ffn_hidden_size"),), mlp_bias="bias", attention_bias="bias", layers={"FalconMLP": _NEOX_MLP},
           stack=Stack("h", "word_embeddings", ("ln_f",), tuple_out=True)),
    Family("Mixtral", ("mixtral",), mlp_bias=None, attention_bias=None, layers={"MixtralExperts": _EXPERTS}, stack=_MOE),
    Family(
        "Qwen2-MoE", ("qwen2_moe",), mlp_bias=None, attention_bias=None, layers={"Qwen2MoeExperts": _EXPERTS}, stack=_MOE,
        widths=(("experts", "moe_intermediate_size"), ("shared_expert", "shared_expert_intermediate_size"), ("", "intermediate_size")),
    ),
    Family(
        "Qwen3-MoE", ("qwen3_moe",), mlp_bias=None, layers={"Qwen3MoeExperts": _EXPERTS}, stack=_MOE,
        widths=(("experts", "moe_intermediate_size"), ("", "intermediate_size")),
    ),
    Family("BERT / RoBERTa / ELECTRA", ("bert", "roberta", "xlm-roberta", "electra"), mlp_bias=ALWAYS, attention_bias=ALWAYS, heads_in_config=False, stack=_ENCODER),
    Family("ViT", ("vit",), mlp_bias=ALWAYS, attention_bias=ALWAYS, heads_in_config=False, stack=None),
)

_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}
_LAYERS = {cls: layer for f in FAMILIES for cls, layer in f.layers.items()}


def family_of(config: Any) -> Family | None:
    """The family of a Hugging Face config (None for model types the table does not list)."""
    return _BY_TYPE.get(getattr(config, "model_type", None) or "")


def stack_of(model_type: str | None) -> Stack | None:
    """The block engine's description of a model type's stack (None: whole-model path only)."""
    family = _BY_TYPE.get(model_type or "")
    return family.stack if family is not None else None


def layer_of(module: Any) -> Layer | None:
    """The table's layout for a module, by class name."""
    return _LAYERS.get(type(module).__name__)


def width_field(family: Family | None, site_name: str) -> str:
    """The config field that holds the width of the FFN site ``site_name``."""
    for marker, key in family.widths if family is not None else ():
        if not marker or f".{marker}" in site_name:
            return key
    return "intermediate_size"
