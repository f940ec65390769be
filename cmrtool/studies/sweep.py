"""Sweep: the fidelity / compression trade-off of a model over keep fractions and criteria.

For every (criterion, keep) pair the model is compiled and verified with the same settings, so
one table (or plot) answers "how much do I lose, by which measure, at which size". It composes
the public API: each criterion scores the model once (:func:`cmrtool.api.score`); each keep is
compiled from those scores (:func:`cmrtool.api.compile`), verified on held-out data
(:func:`cmrtool.api.verify`) and its MACs counted (:func:`cmrtool.api.inspect`). A row reports

- size: parameters and MACs, and their ratios to the original (``macs_ratio`` = MACs kept);
- plain fidelity: accuracy (when the data has labels), top-1 agreement, ``fidelity_kl`` =
  mean KL(softmax O ‖ softmax R); for token models (``unit`` = ``token``) these are per-token
  means (:mod:`cmrtool.verify.token_metrics`), with ``fidelity_kl_p99`` and ``perplexity_ratio`` too;
- interchange (DESIGN §3.5): ``iia`` and ``kl`` = KL(z_L ‖ z_H) of the all-sites entry when
  several sites are reduced, else of the one site (``iia_of`` names it); per-site figures under
  ``sites``.

Reduced checkpoints go to a temporary directory that is removed afterwards, unless
``keep_models`` names a directory to keep them in.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager

from cmrtool import __version__
from cmrtool.errors import UsageError

__all__ = ["SweepRow", "SweepReport", "parse_keeps", "model_path_for", "run_sweep"]

SWEEP_SCHEMA_VERSION = 1


def _items(value: str | Sequence[Any]) -> list[Any]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value)


def parse_keeps(keeps: str | Sequence[float]) -> tuple[float, ...]:
    """Keep fractions from ``"0.9,0.75"`` or a sequence: each in (0, 1], duplicates dropped."""
    out: list[float] = []
    for item in _items(keeps):
        try:
            k = float(item)
        except (TypeError, ValueError):
            raise UsageError(f"invalid keep fraction '{item}'", "give fractions in (0, 1] separated by commas, e.g. --keep 0.9,0.75,0.5,0.25") from None
        if not (0.0 < k <= 1.0) or math.isnan(k):
            raise UsageError(f"keep fractions must be in (0, 1], got {item}", "e.g. --keep 0.9,0.75,0.5,0.25")
        if k not in out:
            out.append(k)
    if not out:
        raise UsageError("no keep fractions given", "e.g. --keep 0.9,0.75,0.5,0.25")
    return tuple(out)


def model_path_for(directory: str | Path, model: str | Path, criterion: str, keep: float) -> Path:
    """Where a sweep writes the reduced checkpoint of (criterion, keep), e.g. ``DIR/digits_mlp-vbp-keep0.5.pt``.

    nn.Module models (``.safetensors`` weights, Hugging Face directories) get ``.safetensors``.
    """
    p = Path(str(model))
    module = p.suffix.lower() == ".safetensors" or p.is_dir()
    stem = (p.name if p.is_dir() else p.stem) if str(model) != "-" else "model"
    return Path(directory) / f"{stem}-{criterion}-keep{keep:g}{'.safetensors' if module else '.pt'}"


@dataclass(frozen=True)
class SweepRow:
    """One (criterion, keep) reduction, compiled and verified."""

    keep: float
    criterion: str
    params: int
    macs: int | None
    params_ratio: float
    macs_ratio: float | None
    accuracy: float | None
    agreement: float
    fidelity_kl: float
    iia: float
    iia_ci: tuple[float, float]
    kl: float
    kl_reverse: float
    d2: float
    iia_of: str
    fold_error: float
    sites: tuple[dict[str, Any], ...]
    seconds: dict[str, float]
    model: str | None = None
    unit: str = "sample"  # "token" for token models: every figure is then a per-token mean
    fidelity_kl_p99: float | None = None
    perplexity_ratio: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "keep": self.keep,
            "criterion": self.criterion,
            "params": self.params,
            "macs": self.macs,
            "params_ratio": self.params_ratio,
            "macs_ratio": self.macs_ratio,
            "accuracy": self.accuracy,
            "agreement": self.agreement,
            "fidelity_kl": self.fidelity_kl,
            "iia": self.iia,
            "iia_ci": list(self.iia_ci),
            "kl": self.kl,
            "kl_reverse": self.kl_reverse,
            "d2": self.d2,
            "iia_of": self.iia_of,
            "fold_error": self.fold_error,
            "sites": [dict(s) for s in self.sites],
            "seconds": dict(self.seconds),
            "model": self.model,
            "unit": self.unit,
            "fidelity_kl_p99": self.fidelity_kl_p99,
            "perplexity_ratio": self.perplexity_ratio,
        }


@dataclass(frozen=True)
class SweepReport:
    """All rows of a sweep, with the original model's size and accuracy and the settings."""

    model: str
    sha256: str
    params: int
    macs: int | None
    accuracy: float | None
    rows: tuple[SweepRow, ...]
    settings: dict[str, Any] = field(default_factory=dict)
    wall_seconds: float | None = None  # the whole sweep, start to end (rows time only their own steps)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SWEEP_SCHEMA_VERSION,
            "tool_version": __version__,
            "wall_seconds": self.wall_seconds,
            "model": self.model,
            "sha256": self.sha256,
            "original": {"params": self.params, "macs": self.macs, "accuracy": self.accuracy},
            "settings": dict(self.settings),
            "rows": [r.to_json() for r in self.rows],
        }


def _row(keep: float, criterion: str, compiled: Any, checked: Any, macs: int | None, original_macs: int | None,
         seconds: dict[str, float], kept_model: str | None) -> SweepRow:
    v = checked.to_json()
    entry = v["all_sites"] or v["sites"][0]
    widths = {s["name"]: s for s in compiled.sites}
    sites = tuple(
        {"name": s["name"], "width": widths[s["name"]]["width"], "kept": widths[s["name"]]["kept"], "iia": s["iia"], "kl": s["kl"]}
        for s in v["sites"]
    )
    return SweepRow(
        keep=keep, criterion=criterion, params=compiled.params_after, macs=macs,
        params_ratio=compiled.params_after / max(compiled.params_before, 1),
        macs_ratio=None if macs is None or not original_macs else macs / original_macs,
        accuracy=v["accuracy_reduced"], agreement=v["agreement"], fidelity_kl=v["kl"],
        iia=entry["iia"], iia_ci=tuple(entry["iia_ci"]), kl=entry["kl"], kl_reverse=entry["kl_reverse"], d2=entry["d2"],
        iia_of=entry["name"], fold_error=v["fold_error"], sites=sites, seconds=seconds, model=kept_model,
        unit=v["unit"], fidelity_kl_p99=v["kl_p99"], perplexity_ratio=v["perplexity_ratio"],
    )


def run_sweep(
    path: str | Path,
    calib: str | Path,
    data: str | Path,
    keeps: Sequence[float],
    criteria: Sequence[str],
    sites: Sequence[str] | None,
    kinds: Sequence[str] | None,
    swaps: int,
    p: float,
    seed: int,
    batch_size: int,
    keep_models: str | Path | None,
    force: bool,
    progress: Callable[..., ContextManager[Callable[[int], None]]],
    warn: Callable[[str], None] | None = None,
    arch: str | None = None,
) -> SweepReport:
    """Compile and verify every (criterion, keep) pair; arguments as in :func:`cmrtool.api.sweep` (already validated)."""
    from cmrtool import api
    from cmrtool.io import interrupts

    start = time.perf_counter()
    rows: list[SweepRow] = []
    accuracy: float | None = None
    with tempfile.TemporaryDirectory(prefix="cmrtool-sweep-") as tmp, progress("sweep", len(keeps) * len(criteria), "reductions") as advance:
        original = api.inspect(path, calib=calib, arch=arch)  # inside: the progress line times the whole sweep
        for criterion in criteria:
            t0 = time.perf_counter()
            scores = api.score(path, calib, criterion, sites, kinds, seed, batch_size, arch=arch)
            score_s = time.perf_counter() - t0
            for keep in keeps:
                out = model_path_for(keep_models if keep_models is not None else tmp, path, criterion, keep)
                t0 = time.perf_counter()
                compiled = api.compile(path, out, calib=calib, scores=scores, criterion=criterion, sites=sites, kinds=kinds,
                                       keep=keep, seed=seed, batch_size=batch_size, force=force, warn=warn if not rows else None, arch=arch)
                interrupts.rearm()  # each kept model is complete on its own: Ctrl-C works again
                t1 = time.perf_counter()
                checked = api.verify(path, out, data, swaps=swaps, p=p, seed=seed, batch_size=batch_size, arch=arch)
                t2 = time.perf_counter()
                macs = api.inspect(out).macs
                accuracy = checked.accuracy_original
                seconds = {"score": score_s, "compile": t1 - t0, "verify": t2 - t1}
                rows.append(_row(keep, criterion, compiled, checked, macs, original.macs, seconds,
                                 str(out) if keep_models is not None else None))
                if keep_models is None:
                    out.unlink(missing_ok=True)
                advance(1)
    settings = {"keeps": list(keeps), "criteria": list(criteria), "sites": [s["name"] for s in rows[0].sites],
                "swaps": swaps, "p": p, "seed": seed, "batch_size": batch_size, "calib": str(calib), "data": str(data),
                "keep_models": None if keep_models is None else str(keep_models)}
    return SweepReport(model=str(path), sha256=original.sha256, params=original.params, macs=original.macs,
                       accuracy=accuracy, rows=tuple(rows), settings=settings, wall_seconds=time.perf_counter() - start)
