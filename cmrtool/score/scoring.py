"""Scoring: one streaming pass over calibration data, then a criterion per site.

The pass (:func:`cmrtool.score.evidence.collect_evidence`) gathers what the criterion needs per site:
float64 moments always, plus co-moments, loss gradients and curvature, or G-NDI sums; nothing
of the activations is kept. The criterion then turns the evidence (and the consumer weights)
into a score and a replacement per unit (:mod:`cmrtool.score.criteria`).

The result, :class:`ScoreReport`, round-trips through JSON (``cmrtool score --json``), so
``cmrtool score … --json | cmrtool compile … --scores -`` composes.
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cmrtool import __version__, distributed
from cmrtool.score.criteria import REGISTRY, Evidence, consumer_matrix, consumer_sq_norms, get_criterion
from cmrtool.io.data import Batch, Dataset
from cmrtool.errors import InputError, UsageError
from cmrtool.score.groups import GroupMoments, new_moments, score_grouped
from cmrtool.sites import Site
from cmrtool.score.stats import Moments

__all__ = [
    "SCORES_SCHEMA_VERSION",
    "SiteScores",
    "ScoreReport",
    "select_sites",
    "score_model",
    "ProgressFn",
]

SCORES_SCHEMA_VERSION = 1
ProgressFn = Callable[[int], None]


@dataclass(frozen=True)
class SiteScores:
    """Per-unit scores and replacements of one site (float64 values as Python floats)."""

    name: str
    kind: str
    width: int
    scores: tuple[float, ...]
    replacement: tuple[float, ...]
    mean: tuple[float, ...]
    samples: int
    fold: str = "exact"
    replacement_kind: str = "constant"
    site_score: float | None = None
    optimal: tuple[float, ...] | None = None  # c* of eq. (7), when curvature was gathered
    group: int = 1  # values per unit in ``replacement`` and ``mean`` (head_dim for heads)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "width": self.width,
            **({"group": self.group} if self.group != 1 else {}),
            "fold": self.fold,
            "samples": self.samples,
            "scores": list(self.scores),
            "replacement": list(self.replacement),
            "replacement_kind": self.replacement_kind,
            "mean": list(self.mean),
        }
        if self.site_score is not None:
            d["site_score"] = self.site_score
        if self.optimal is not None:
            d["optimal"] = list(self.optimal)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SiteScores:
        width = int(d["width"])
        group = int(d.get("group", 1))
        scores = tuple(float(x) for x in d["scores"])
        replacement = tuple(float(x) for x in d["replacement"])
        mean = tuple(float(x) for x in d.get("mean", replacement))
        if not (len(scores) == width and len(replacement) == len(mean) == width * group):
            raise InputError(f"scores for site {d['name']} do not have {width} entries", "regenerate them with cmrtool score --json")
        if not all(math.isfinite(v) for v in scores + replacement + mean):
            raise InputError(f"scores for site {d['name']} contain NaN or infinite values", "regenerate them with cmrtool score --json")
        return cls(
            str(d["name"]), str(d.get("kind", "neuron")), width, scores, replacement, mean, int(d.get("samples", 0)),
            str(d.get("fold", "exact")), str(d.get("replacement_kind", "constant")),
            None if d.get("site_score") is None else float(d["site_score"]),
            None if d.get("optimal") is None else tuple(float(x) for x in d["optimal"]),
            group,
        )


@dataclass(frozen=True)
class ScoreReport:
    """Scores of every selected site under one criterion."""

    criterion: str
    source_sha256: str
    seed: int
    samples: int
    sites: tuple[SiteScores, ...]
    tool_version: str = __version__

    def site(self, name: str) -> SiteScores:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCORES_SCHEMA_VERSION,
            "tool_version": self.tool_version,
            "kind": "cmrtool-scores",
            "criterion": self.criterion,
            "source_sha256": self.source_sha256,
            "seed": self.seed,
            "samples": self.samples,
            "sites": [s.to_json() for s in self.sites],
        }

    @classmethod
    def from_json(cls, d: Any) -> ScoreReport:
        if not isinstance(d, dict) or d.get("kind", "cmrtool-scores") != "cmrtool-scores" or "sites" not in d:
            raise InputError("the scores file is not the output of 'cmrtool score --json'", "produce it with: cmrtool score MODEL --calib DATA --json > scores.json")
        try:
            version = int(d.get("schema_version", 1))
            if version > SCORES_SCHEMA_VERSION:
                raise InputError(f"scores schema version {version} is newer than this cmrtool understands", "upgrade cmrtool")
            return cls(
                criterion=str(d["criterion"]),
                source_sha256=str(d.get("source_sha256", "")),
                seed=int(d.get("seed", 0)),
                samples=int(d.get("samples", 0)),
                sites=tuple(SiteScores.from_json(s) for s in d["sites"]),
                tool_version=str(d.get("tool_version", "")),
            )
        except InputError:
            raise
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise InputError(f"the scores file is malformed ({type(e).__name__}: {e})", "regenerate it with cmrtool score --json") from e

    @classmethod
    def loads(cls, text: str | bytes) -> ScoreReport:
        try:
            return cls.from_json(json.loads(text))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise InputError(f"the scores file is not valid JSON: {str(e)[:200]}", "produce it with: cmrtool score MODEL --calib DATA --json > scores.json") from e


def select_sites(
    sites: Sequence[Site],
    patterns: Sequence[str] | None = None,
    kinds: Sequence[str] | None = None,
) -> list[Site]:
    """Sites named by ``patterns`` (globs, e.g. ``blocks.*.fc1``) and of ``kinds``.

    By default every neuron and channel site; heads only when asked for by kind or name.
    """
    chosen = list(sites)
    if kinds:
        unknown = set(kinds) - {"neuron", "channel", "head"}
        if unknown:
            raise UsageError(f"unknown site kind '{sorted(unknown)[0]}'", "choose --kind neuron, channel or head")
        chosen = [s for s in chosen if s.kind in kinds]
    elif not patterns:
        chosen = [s for s in chosen if s.kind in ("neuron", "channel")]
    if patterns:
        picked: list[Site] = []
        for pat in patterns:
            hits = [s for s in chosen if fnmatch.fnmatchcase(s.name, pat)]
            if not hits:
                names = ", ".join(s.name for s in sites) or "none"
                raise UsageError(f"no site matches '{pat}'", f"sites of this model: {names} (see cmrtool inspect)")
            picked.extend(s for s in hits if s not in picked)
        chosen = [s for s in chosen if s in picked]
    if not chosen:
        raise UsageError("the selection leaves no sites", "drop --kind/--site, or see cmrtool inspect for the sites")
    return chosen


def _check_value(name: str, v: torch.Tensor, width: int, axis: int) -> None:
    if v.dim() == 0 or v.shape[axis] != width:
        raise InputError(
            f"site {name} produced a value of shape {tuple(v.shape)}, expected {width} units on axis {axis}",
            "the model's graph does not match its weights; re-export it",
        )


def _collect_grouped(
    model: Any, data: Dataset, sites: Sequence[Site], batch_size: int, progress: ProgressFn | None, limit: int | None
) -> dict[str, Moments | GroupMoments]:
    """Moments with per-group covariances (attention heads), in one process."""
    if distributed.enabled():
        raise UsageError("attention heads are scored in one process, not under torchrun", "run this command without torchrun")
    moments = {s.name: new_moments(s) for s in sites}
    names = [s.name for s in sites]
    with torch.no_grad():
        for batch in data.batches(batch_size, limit, labels=False):
            _, values = model.run(batch.inputs, capture=names)
            for s in sites:
                v = values[s.name]
                _check_value(s.name, v, s.channels, s.unit_axis)
                moments[s.name].update_value(v, s.unit_axis)  # type: ignore[union-attr]
            if progress is not None:
                progress(len(batch))
    return moments  # type: ignore[return-value]


def collect_moments(
    model: Any,
    data: Dataset,
    sites: Sequence[Site],
    batch_size: int = 256,
    progress: ProgressFn | None = None,
    limit: int | None = None,
) -> dict[str, Moments | GroupMoments]:
    """Stream ``data`` through ``model`` once and return float64 moments per site.

    Under torchrun (``WORLD_SIZE`` > 1) each rank computes a share of the batches and all ranks
    receive every batch's partial moments in the single-process order, so the result is the
    single-process one bit for bit (:mod:`cmrtool.distributed`); ``progress`` then counts the
    samples of all ranks. Grouped sites (attention heads) keep per-group covariances and are
    gathered in one process.
    """
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1, got {limit}", "omit --limit to use every sample")
    data.chunk_batches(batch_size)  # validates batch_size before any work
    if any(s.group != 1 for s in sites):
        return _collect_grouped(model, data, sites, batch_size, progress, limit)
    moments = {s.name: Moments(s.width) for s in sites}
    names = [s.name for s in sites]
    axes = {s.name: s.unit_axis for s in sites}
    in_graph = hasattr(model, "batch_moments")

    def partials(batch: Batch) -> dict[str, tuple[int, torch.Tensor, torch.Tensor]]:
        if in_graph:  # the backend reduces inside its graph: activations never surface
            return dict(model.batch_moments(batch.inputs, names))
        _, values = model.run(batch.inputs, capture=names)
        out = {}
        for name, v in values.items():
            _check_value(name, v, moments[name].width, axes[name])
            out[name] = moments[name].partial(v, axes[name])
        return out

    with torch.no_grad():
        if distributed.enabled():
            stream = distributed.gather_partials(data, batch_size, limit, partials, [(s.name, s.width) for s in sites])
        else:
            stream = ((len(b), partials(b)) for b in data.batches(batch_size, limit, labels=False))
        try:
            for rows, batch_partials in stream:
                for name, (n, mean, m2) in batch_partials.items():
                    moments[name].add_partial(n, mean, m2)
                if progress is not None:
                    progress(rows)
        except Exception as e:
            if distributed.enabled():  # tell the other ranks, who wait in an exchange
                raise distributed.fail(e)[0] from None
            raise
    return moments


def score_model(
    model: Any,
    data: Dataset,
    criterion: str = "cmr-logit",
    sites: Sequence[Site] | None = None,
    seed: int = 0,
    batch_size: int = 256,
    progress: ProgressFn | None = None,
    limit: int | None = None,
    curvature: str = "auto",
    parents: int | None = 8,
    ridge: float = 1e-3,
    extra_needs: frozenset[str] = frozenset(),
    loss: str = "auto",
) -> ScoreReport:
    """Score every unit of ``sites`` (default: all neuron and channel sites).

    Args:
        model: a backend model (see :func:`cmrtool.backends.load_model`).
        data: calibration data bound to the model.
        criterion: a name from :data:`cmrtool.score.criteria.REGISTRY`.
        sites: the sites to score.
        seed: seed for criteria that draw (``random``, sampled curvature).
        batch_size: samples per forward pass.
        progress: called with the number of samples after each batch.
        limit: use at most this many samples.
        curvature: ``auto``, ``exact`` or ``sampled`` (criteria that need curvature).
        parents: parents per unit for affine criteria (None: every other unit).
        ridge: relative ridge for regressions.
        extra_needs: statistics to gather besides the criterion's (e.g. ``curv`` for the
            optimal constants of ``--replacement optimal``).
        loss: ``auto`` (cross-entropy with labels, else KL to the model's prediction), ``ce``, ``kl``.

    Example:
        >>> report = score_model(load_model("samples/digits_mlp.pt"), data, "cmr-logit")
        >>> report.site("body.3").scores[:3]
    """
    from cmrtool.score.evidence import collect_evidence

    crit = get_criterion(criterion)
    sites = list(sites) if sites is not None else select_sites(model.sites)
    needs = crit.needs | extra_needs
    grouped = [s.name for s in sites if s.group != 1]
    if grouped and not needs <= {"moments"}:
        moment_criteria = sorted(n for n, c in REGISTRY.items() if c.needs <= {"moments"})
        raise UsageError(
            f"site {grouped[0]} is grouped (attention heads): {criterion} needs {', '.join(sorted(needs - {'moments'}))}",
            f"score heads with {', '.join(moment_criteria)}, or choose neuron/channel sites with --kind",
        )
    evidence = collect_evidence(model, data, sites, needs, batch_size, progress, limit, curvature, seed, loss=loss)
    tensors = model.tensors()
    out: list[SiteScores] = []
    for site in sites:
        e = evidence[site.name]
        if site.group == 1:
            ev = Evidence(
                site=site, moments=e.moments, col_sq_norms=consumer_sq_norms(site, tensors), seed=seed,
                comoments=e.comoments, curvature=e.curvature, gndi_unit=e.gndi_unit, gndi_site=e.gndi_site,
                gndi_count=e.gndi_count, ridge=ridge, parents=parents,
                consumer_weights=consumer_matrix(site, tensors) if "consumers" in needs else None,
            )
            res = crit.fn(ev)
        else:  # attention heads: a unit is a group of channels (cmrtool.score.groups)
            res = score_grouped(crit, site, e.moments, tensors, seed)
        if res.scores.shape != (site.width,) or res.replacement.shape != (site.channels,):
            raise RuntimeError(f"criterion {criterion} returned wrong shapes for site {site.name}")
        optimal = e.curvature.optimal()[0] if e.curvature is not None and "curv" in needs else None
        out.append(
            SiteScores(
                name=site.name,
                kind=site.kind,
                width=site.width,
                scores=tuple(res.scores.tolist()),
                replacement=tuple(res.replacement.tolist()),
                mean=tuple(e.moments.mean.tolist()),
                samples=e.moments.count,
                fold=site.fold,
                replacement_kind=res.kind,
                site_score=res.site_score,
                optimal=None if optimal is None else tuple(optimal.tolist()),
                group=site.group,
            )
        )
    n = data.n if limit is None else min(data.n, limit)
    return ScoreReport(criterion=criterion, source_sha256=model.sha256, seed=seed, samples=n, sites=tuple(out))
