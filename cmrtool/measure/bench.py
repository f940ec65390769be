"""Bench: parameters, file size and MACs (per site and in total) beside measured throughput.

For each model: parameters, file size, MACs of one sample (:mod:`cmrtool.measure.macs`: FlopCounterMode
plus attention formulas, MACs = FLOPs / 2) in total and per site (a site's producer and consumer
layers), then latency and throughput on one input batch with the alternating protocol of
:mod:`cmrtool.measure.timing`. Every model after the first is compared with the first:

- ``speedup`` = median over rounds of ``latency_first / latency_model`` (measured);
- ``mac_ratio`` = ``MACs_first / MACs_model`` (the MAC-ideal speedup);
- ``speedup_realized`` = ``speedup / mac_ratio``: the share of the ideal that the hardware delivers.

Hugging Face causal LMs also get prefill and decode tokens/s (:mod:`cmrtool.measure.bench_lm`).

Precision and device (fp16 on CUDA; fp32 on a CPU without native fp16, said so) are chosen in
:mod:`cmrtool.measure.precision`; what runs (torch for TorchScript, onnxruntime for ``.onnx``) and on
which batch in :mod:`cmrtool.measure.runners`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cmrtool import __version__
from cmrtool.runtime import usable_cpus
from cmrtool.errors import InputError, UsageError
from cmrtool.measure.macs import MacCount, profile_macs, site_macs
from cmrtool.measure.precision import Target, dtype_name, resolve_device, resolve_dtype
from cmrtool.measure.runners import BenchModel, benchmark_inputs, error_detail, load_bench_model, make_runners, onnx_precision
from cmrtool.measure.timing import Spread, contention_note, paired_speedup, spread, time_alternating

__all__ = ["BenchSettings", "BenchReport", "ModelResult", "SiteMacs", "bench_models", "width_notes", "BENCH_SCHEMA_VERSION"]

BENCH_SCHEMA_VERSION = 1
ProgressFactory = Callable[[str, int], Any]


@dataclass(frozen=True)
class BenchSettings:
    """How to time: samples per batch, device (``auto`` | ``cpu`` | ``cuda[:N]``), precision
    (``fp16`` | ``bf16`` | ``fp32``), untimed warm-up rounds and timed rounds."""

    batch: int = 64
    device: str = "auto"
    dtype: str = "fp16"
    warmup: int = 5
    repeats: int = 30
    prompt_tokens: int = 128  # causal LMs: prompt length of the prefill/decode timing
    decode_tokens: int = 32  # causal LMs: greedy decode steps timed (0: no generation timing)

    def __post_init__(self) -> None:
        for name, value, least in (("batch", self.batch, 1), ("repeats", self.repeats, 1), ("warmup", self.warmup, 0),
                                   ("prompt-tokens", self.prompt_tokens, 1), ("decode-tokens", self.decode_tokens, 0)):
            if value < least:
                raise UsageError(f"--{name} must be at least {least}, got {value}", f"e.g. --{name} {max(least, 5)}")
        dtype_name(self.dtype)  # unknown names fail here, before any model is loaded


@dataclass(frozen=True)
class SiteMacs:
    """A site of a benchmarked model: its current width and its producer + consumer MACs."""

    name: str
    kind: str
    width: int
    macs: int | None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "width": self.width, "macs": self.macs}


@dataclass(frozen=True)
class ModelResult:
    """One model's size and speed; ``speedup``/``mac_ratio`` are against the first model."""

    path: str
    format: str
    runtime: str
    dtype: str
    sha256: str
    params: int
    file_bytes: int
    macs: MacCount | None
    sites: tuple[SiteMacs, ...]
    latency: Spread  # seconds per batch
    latencies: tuple[float, ...]
    throughput: float  # samples per second
    speedup: Spread | None
    mac_ratio: float | None

    @property
    def speedup_realized(self) -> float | None:
        if self.speedup is None or not self.mac_ratio:
            return None
        return self.speedup.median / self.mac_ratio

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "runtime": self.runtime,
            "dtype": self.dtype,
            "sha256": self.sha256,
            "params": self.params,
            "file_bytes": self.file_bytes,
            "macs": None if self.macs is None else self.macs.total,
            "throughput": self.throughput,
            "latency_ms": self.latency.median * 1e3,
            "latency_p10_ms": self.latency.p10 * 1e3,
            "latency_p90_ms": self.latency.p90 * 1e3,
            "latencies_ms": [t * 1e3 for t in self.latencies],
            "speedup": None if self.speedup is None else self.speedup.median,
            "speedup_p10": None if self.speedup is None else self.speedup.p10,
            "speedup_p90": None if self.speedup is None else self.speedup.p90,
            "mac_ratio": self.mac_ratio,
            "speedup_realized": self.speedup_realized,
            "sites": [s.to_json() for s in self.sites],
            "mac_breakdown": None if self.macs is None else self.macs.to_json(),
        }


@dataclass(frozen=True)
class BenchReport:
    """A benchmark run. Top-level ``speedup``/``mac_ratio`` compare ``models[1]`` with ``models[0]``."""

    device: str
    device_name: str
    dtype: str
    requested_dtype: str
    threads: int
    batch: int
    warmup: int
    repeats: int
    inputs: str
    input_shapes: tuple[tuple[int, ...], ...]
    models: tuple[ModelResult, ...]
    notes: tuple[str, ...] = field(default=())
    load_average: tuple[float, ...] = field(default=())
    generation: tuple[Any, ...] = field(default=())  # cmrtool.measure.bench_lm.GenerationResult, causal LMs only
    prompt_tokens: int = 0
    decode_tokens: int = 0

    @property
    def speedup(self) -> float | None:
        return self.models[1].speedup.median if len(self.models) > 1 and self.models[1].speedup else None

    @property
    def mac_ratio(self) -> float | None:
        return self.models[1].mac_ratio if len(self.models) > 1 else None

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": BENCH_SCHEMA_VERSION,
            "tool_version": __version__,
            "torch_version": torch.__version__,
            "device": self.device,
            "device_name": self.device_name,
            "dtype": self.dtype,
            "requested_dtype": self.requested_dtype,
            "threads": self.threads,
            "batch": self.batch,
            "warmup": self.warmup,
            "repeats": self.repeats,
            "inputs": self.inputs,
            "input_shapes": [list(s) for s in self.input_shapes],
            "models": [m.to_json() for m in self.models],
            "speedup": self.speedup,
            "mac_ratio": self.mac_ratio,
            "load_average": list(self.load_average),
            "notes": list(self.notes),
            "generation": None if not self.generation else {
                "prompt_tokens": self.prompt_tokens,
                "decode_tokens": self.decode_tokens,
                "results": [g.to_json() for g in self.generation],
            },
        }


def _count(e: BenchModel, inputs: Sequence[torch.Tensor], note: Callable[[str], None]) -> MacCount | None:
    """MACs of one sample (the batch's first), on the CPU in the model's own dtype."""
    if e.model is None:
        return None
    try:
        return profile_macs(e.model, [t[:1] for t in inputs])
    except Exception as err:  # it ran on the whole batch; a count that fails must not hide the timing
        note(f"{Path(e.path).name}: MACs could not be counted ({error_detail(err)})")
        return None


def width_notes(plans: Sequence[tuple[str, Any]], cuda: bool) -> list[str]:
    """On CUDA, name every kept width of a reduced model that is not a multiple of 8."""
    if not cuda:
        return []
    notes = []
    for path, plan in plans:
        odd = [f"{s.name} {len(s.kept)}" for s in (plan.sites if plan is not None else ()) if len(s.kept) % 8]
        if odd:
            notes.append(f"{Path(path).name}: kept widths not a multiple of 8 ({', '.join(odd)}) leave GPU tensor cores idle; recompile with --round-to 8")
    return notes


def bench_models(
    paths: Sequence[str | Path],
    settings: BenchSettings = BenchSettings(),
    data: str | Path | None = None,
    input_shapes: Sequence[Sequence[int]] | None = None,
    progress: ProgressFactory | None = None,
    warn: Callable[[str], None] | None = None,
    arch: str | None = None,
) -> BenchReport:
    """Measure size, MACs and speed of ``paths``, comparing each with the first (DESIGN §3.7).

    Args:
        paths: checkpoints (TorchScript, ``.safetensors`` with ``arch``, reduced ``.safetensors``,
            Hugging Face directories) and/or ``.onnx`` files taking the same inputs.
        settings: batch size, device, precision, warm-up and timed rounds.
        data: a data file whose first ``batch`` samples form the benchmark batch; else random
            tensors of ``input_shapes`` (batch dimension replaced), else of the shapes a reduced
            model recorded at compile time.
        progress, warn: the output layer's progress factory and warning printer.
        arch: ``pkg.module:factory`` for ``.safetensors`` weights (DESIGN §3.1).

    Example:
        >>> r = bench_models(["model.pt", "reduced.pt"], BenchSettings(device="cpu"), input_shapes=[[1, 1, 8, 8]])
        >>> r.speedup, r.mac_ratio
    """
    batch, warmup, repeats = settings.batch, settings.warmup, settings.repeats
    if not paths:
        raise UsageError("bench needs at least one model", "e.g. cmrtool bench model.pt reduced.pt")
    notes: list[str] = []

    def note(message: str) -> None:
        notes.append(message)
        if warn is not None:
            warn(message)

    target, fallback = resolve_dtype(settings.dtype, resolve_device(settings.device))
    requested = dtype_name(settings.dtype)
    for n in fallback:
        note(n)
    threads = torch.get_num_threads()
    loaded = [load_bench_model(str(p), threads, target, note, arch) for p in paths]
    inputs, source = benchmark_inputs(loaded, None if data is None else str(data), input_shapes, batch)

    runners, err, bad = make_runners(loaded, inputs, target)
    if err is not None and target.dtype != torch.float32:  # a precision problem, if fp32 runs
        fp32 = Target(target.device, torch.float32)
        retry, err32, bad32 = make_runners(loaded, inputs, fp32)
        if err32 is None:
            note(f"{Path(loaded[bad].path).name} does not run in {target.dtype_name} on {target.device} ({error_detail(err)}): timing in fp32")
            target, runners = fp32, retry
        err, bad = err32, bad32
    if err is not None:
        shapes = ", ".join(f"{tuple(t.shape[1:])} {str(t.dtype).removeprefix('torch.')}" for t in inputs)
        which = "the benchmark inputs" if bad == 0 else f"the inputs of {loaded[0].path}"
        raise InputError(
            f"{loaded[bad].path} does not accept {which} (per-sample shape {shapes}): {error_detail(err)}",
            "bench models that take the same inputs, and give their shape with --input-shape or --data",
        )
    for n in width_notes([(e.path, e.model.plan) for e in loaded if e.model is not None], target.cuda):
        note(n)
    counts = [_count(e, inputs, note) for e in loaded]

    load = os.getloadavg() if hasattr(os, "getloadavg") else ()
    busy = contention_note(load[0], usable_cpus(), threads) if load and not target.cuda else None
    if busy:
        note(busy)
    total = (warmup + repeats) * len(runners) * batch
    desc = f"timing {len(runners)} model{'s' if len(runners) > 1 else ''} ({target.device}, {target.dtype_name})"
    with (progress or _no_progress)(desc, total) as advance:
        times = time_alternating(runners, warmup, repeats, target.sync, lambda n: advance(n * batch))

    generation = _generation(loaded, settings, target, progress)

    results = []
    for i, e in enumerate(loaded):
        count = counts[i]
        sites = tuple(SiteMacs(s.name, s.kind, s.width, site_macs(count, s) if count else None) for s in (e.model.sites if e.model else ()))
        lat = spread(times[i])
        first = counts[0]
        results.append(
            ModelResult(
                path=e.path,
                format=e.format,
                runtime="onnxruntime" if e.session is not None else "torch",
                dtype=target.dtype_name if e.session is None else onnx_precision(e.session),
                sha256=e.sha256,
                params=e.params,
                file_bytes=e.file_bytes,
                macs=count,
                sites=sites,
                latency=lat,
                latencies=tuple(times[i]),
                throughput=batch / lat.median if lat.median > 0 else float("inf"),
                speedup=paired_speedup(times[0], times[i]) if i > 0 else None,
                mac_ratio=(first.total / count.total) if i > 0 and first and count and count.total else None,
            )
        )
    return BenchReport(
        device=str(target.device),
        device_name=target.describe(),
        dtype=target.dtype_name,
        requested_dtype=requested,
        threads=threads,
        batch=batch,
        warmup=warmup,
        repeats=repeats,
        inputs=source,
        input_shapes=tuple(tuple(t.shape) for t in inputs),
        models=tuple(results),
        notes=tuple(notes),
        load_average=tuple(load),
        generation=tuple(generation),
        prompt_tokens=settings.prompt_tokens if generation else 0,
        decode_tokens=settings.decode_tokens if generation else 0,
    )


def _generation(loaded: Sequence[BenchModel], settings: BenchSettings, target: Target, progress: ProgressFactory | None) -> list[Any]:
    """Prefill/decode tokens/s at batch 1 and ``settings.batch`` when every model is a causal LM."""
    from cmrtool.measure.bench_lm import bench_generation, is_causal_lm

    if not settings.decode_tokens or not all(e.model is not None and is_causal_lm(e.model) for e in loaded):
        return []
    batches = sorted({1, settings.batch})
    vocab = int(loaded[0].model.hf_config.vocab_size)
    total = (settings.warmup + settings.repeats) * len(loaded) * len(batches)
    with (progress or _no_progress)(f"generation ({target.device}, {target.dtype_name})", total) as advance:
        return bench_generation([(e.path, e.model) for e in loaded], target, batches, settings.prompt_tokens, settings.decode_tokens,
                                settings.warmup, settings.repeats, vocab, advance)


def _no_progress(description: str, total: int) -> Any:
    import contextlib

    return contextlib.nullcontext(lambda n: None)
