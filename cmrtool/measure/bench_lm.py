"""Generation speed of causal language models: prefill and decode tokens per second (DESIGN §3.7).

People who shrink language models judge them by two figures, measured here for every Hugging
Face causal LM of a bench run, at batch 1 and at a larger batch:

- **prefill**: one forward over ``batch × prompt`` tokens with the KV cache on and the head on
  the last position only (what generation does); tokens/s = batch · prompt / seconds;
- **decode**: ``steps`` greedy steps after that prefill, one token per sequence per step, each
  reading the KV cache; tokens/s = batch · steps / seconds (the prefill is not in this time).

The models alternate within every round (the order rotating, as in :mod:`cmrtool.measure.timing`); each
figure is the median over rounds, and each model's speedup over the first is the median of the
per-round ratios, reported beside the MAC ratio of one forward. Precision and device are the
bench run's (fp16/bf16 on CUDA; fp32 on a CPU without native half precision, said so there).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cmrtool.measure.precision import Target
from cmrtool.measure.timing import paired_speedup, spread

__all__ = ["GenerationResult", "is_causal_lm", "bench_generation"]


@dataclass(frozen=True)
class GenerationResult:
    """Prefill and decode tokens/s of one model at one batch size (speedups against the first model)."""

    path: str
    batch: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    prefill_speedup: float | None
    decode_speedup: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "batch": self.batch,
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "prefill_speedup": self.prefill_speedup,
            "decode_speedup": self.decode_speedup,
        }


def is_causal_lm(model: Any) -> bool:
    """A Hugging Face causal LM (one that can decode with a KV cache)."""
    module = getattr(model, "module", None)
    return module is not None and getattr(model, "hf_config", None) is not None and type(module).__name__.endswith("ForCausalLM")


def _steps(module: Any, ids: torch.Tensor, steps: int, sync: Callable[[], None]) -> tuple[float, float]:
    """Seconds of one prefill of ``ids`` and of ``steps`` greedy decode steps after it."""
    params = inspect.signature(module.forward).parameters
    last = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    cache_arg = "cache" if "cache" in params else "past_key_values"  # transformers renamed it
    mask = torch.ones_like(ids)
    sync()
    t0 = time.perf_counter()
    out = module(input_ids=ids, attention_mask=mask, use_cache=True, **last)
    sync()
    t1 = time.perf_counter()
    cache = _cache(out)
    token = out.logits[:, -1:].argmax(-1)
    for _ in range(steps):
        mask = torch.cat([mask, torch.ones_like(token)], 1)
        out = module(input_ids=token, attention_mask=mask, use_cache=True, **{cache_arg: cache})
        cache = _cache(out)
        token = out.logits[:, -1:].argmax(-1)
    sync()
    return t1 - t0, time.perf_counter() - t1


def _cache(out: Any) -> Any:
    cache = getattr(out, "past_key_values", None)
    return getattr(out, "cache", None) if cache is None else cache


def bench_generation(
    models: Sequence[tuple[str, Any]], target: Target, batches: Sequence[int], prompt: int, steps: int, warmup: int, repeats: int,
    vocab: int, advance: Callable[[int], None] = lambda n: None,
) -> list[GenerationResult]:
    """Prefill and decode tokens/s of ``models`` (``(path, ModuleModel)``, the first is the
    reference) at each batch size, on seeded random prompts of ``prompt`` tokens."""
    modules = [m.fresh_module().to(device=target.device, dtype=target.dtype).eval() for _, m in models]
    out: list[GenerationResult] = []
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for b in batches:
            ids = torch.randint(0, vocab, (b, prompt), generator=g).to(target.device)
            pre: list[list[float]] = [[] for _ in modules]
            dec: list[list[float]] = [[] for _ in modules]
            for r in range(warmup + repeats):
                for k in range(len(modules)):
                    i = (r + k) % len(modules)
                    tp, td = _steps(modules[i], ids, steps, target.sync)
                    if r >= warmup:
                        pre[i].append(tp)
                        dec[i].append(td)
                    advance(1)
            for i, (path, _) in enumerate(models):
                out.append(GenerationResult(
                    path=path,
                    batch=b,
                    prefill_tokens_per_s=b * prompt / spread(pre[i]).median,
                    decode_tokens_per_s=b * steps / spread(dec[i]).median,
                    prefill_speedup=paired_speedup(pre[0], pre[i]).median if i else None,
                    decode_speedup=paired_speedup(dec[0], dec[i]).median if i else None,
                ))
    return out
