"""The block engine: score and compile language models block by block in bounded memory.

A Hugging Face decoder or encoder whose stack the family table describes
(:class:`cmrtool.backends.module.families.Stack`: LLaMA, Mistral, Qwen2/3, Gemma, Gemma-2, Gemma-3, Phi-3,
GPT-2, GPT-NeoX, OPT, Falcon, Mixtral, Qwen2/3-MoE; BERT, RoBERTa, XLM-RoBERTa, ELECTRA) is processed as
embeddings, each layer, and the final norm + head (:mod:`cmrtool.engine.blocks`, run inside the
stack's own forward: :mod:`cmrtool.engine.surgery`); weights are read lazily
(:mod:`cmrtool.engine.weights`) and converted from the stored format as transformers does
(:mod:`cmrtool.engine.convert`); calibration hidden states live in one buffer per block
boundary (:mod:`cmrtool.engine.buffer`); :mod:`cmrtool.engine.loop` runs the layers; the output is
written block by block (:mod:`cmrtool.engine.writer`). Entry points: :mod:`cmrtool.engine.run`.
"""

from __future__ import annotations

from cmrtool.engine.blocks import BlockModel, BlockStack, supports
from cmrtool.engine.options import CALIBRATIONS, EngineOptions, parse_memory
from cmrtool.engine.run import EngineCompileReport, check_supported, compile_dir, score_dir

__all__ = [
    "BlockModel", "BlockStack", "supports", "CALIBRATIONS", "EngineOptions", "parse_memory",
    "EngineCompileReport", "check_supported", "compile_dir", "score_dir",
]
