"""Scoring: one streaming pass over calibration data, then a criterion per site.

The pass captures every selected site's value for each batch, reshapes it to
``(samples, width)`` and folds it into float64 :class:`~cmrtool.stats.Moments`; nothing of the
activations is kept. The criterion then turns the statistics (and the consumer weights) into a
score and a replacement per unit (:mod:`cmrtool.criteria`).

The result, :class:`ScoreReport`, round-trips through JSON (``cmrtool score --json``), so
``cmrtool score … --json | cmrtool compile … --scores -`` composes.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cmrtool import __version__
from cmrtool.criteria import Evidence, consumer_sq_norms, get_criterion
from cmrtool.data import Dataset
from cmrtool.errors import InputError, UsageError
from cmrtool.groups import GroupMoments, new_moments, score_grouped
from cmrtool.sites import Site
from cmrtool.stats import Moments

__all__ = [
    "SCORES_SCHEMA_VERSION",
    "SiteScores",
    "ScoreReport",
    "select_sites",
    "collect_moments",
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
    group: int = 1  # values per unit in ``replacement`` and ``mean`` (head_dim for heads)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "width": self.width,
            **({"group": self.group} if self.group != 1 else {}),
            "fold": self.fold,
            "samples": self.samples,
            "scores": list(self.scores),
            "replacement": list(self.replacement),
            "mean": list(self.mean),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SiteScores:
        width = int(d["width"])
        group = int(d.get("group", 1))
        scores = tuple(float(x) for x in d["scores"])
        replacement = tuple(float(x) for x in d["replacement"])
        mean = tuple(float(x) for x in d.get("mean", replacement))
        if not (len(scores) == width and len(replacement) == len(mean) == width * group):
            raise InputError(f"scores for site {d['name']} do not have {width} entries", "regenerate them with cmrtool score --json")
        return cls(str(d["name"]), str(d.get("kind", "neuron")), width, scores, replacement, mean, int(d.get("samples", 0)), str(d.get("fold", "exact")), group)


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
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"the scores file is malformed ({type(e).__name__}: {e})", "regenerate it with cmrtool score --json") from e

    @classmethod
    def loads(cls, text: str | bytes) -> ScoreReport:
        try:
            return cls.from_json(json.loads(text))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"the scores file is not valid JSON: {e}", "produce it with: cmrtool score MODEL --calib DATA --json > scores.json") from e


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


def collect_moments(
    model: Any,
    data: Dataset,
    sites: Sequence[Site],
    batch_size: int = 256,
    progress: ProgressFn | None = None,
    limit: int | None = None,
) -> dict[str, Moments | GroupMoments]:
    """Stream ``data`` through ``model`` once and return float64 moments per site."""
    moments = {s.name: new_moments(s) for s in sites}
    names = [s.name for s in sites]
    axes = {s.name: s.unit_axis for s in sites}
    in_graph = hasattr(model, "batch_moments") and all(s.group == 1 for s in sites)
    with torch.no_grad():
        for batch in data.batches(batch_size, limit, labels=False):
            if in_graph:  # the backend reduces inside its graph: activations never surface
                for name, (n, mean, m2) in model.batch_moments(batch.inputs, names).items():
                    moments[name].add_partial(n, mean, m2)
                if progress is not None:
                    progress(len(batch))
                continue
            _, values = model.run(batch.inputs, capture=names)
            for name, v in values.items():
                if v.dim() == 0 or v.shape[axes[name]] != moments[name].width:
                    raise InputError(
                        f"site {name} produced a value of shape {tuple(v.shape)}, expected {moments[name].width} units on axis {axes[name]}",
                        "the model's graph does not match its weights; re-export it",
                    )
                moments[name].update_value(v, axes[name])
            if progress is not None:
                progress(len(batch))
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
) -> ScoreReport:
    """Score every unit of ``sites`` (default: all neuron and channel sites).

    Args:
        model: a backend model (see :func:`cmrtool.backends.load_model`).
        data: calibration data bound to the model.
        criterion: a name from :data:`cmrtool.criteria.REGISTRY`.
        sites: the sites to score.
        seed: seed for criteria that draw (``random``).
        batch_size: samples per forward pass.
        progress: called with the number of samples after each batch.
        limit: use at most this many samples.

    Example:
        >>> report = score_model(load_model("samples/digits_mlp.pt"), data, "cmr-logit")
        >>> report.site("body.2").scores[:3]
    """
    crit = get_criterion(criterion)
    sites = list(sites) if sites is not None else select_sites(model.sites)
    moments = collect_moments(model, data, sites, batch_size, progress, limit)
    tensors = model.tensors()
    out: list[SiteScores] = []
    for site in sites:
        m = moments[site.name]
        if site.group == 1:
            res = crit.fn(Evidence(site=site, moments=m, col_sq_norms=consumer_sq_norms(site, tensors), seed=seed))
        else:  # attention heads: a unit is a group of channels (cmrtool.groups)
            res = score_grouped(crit, site, m, tensors, seed)
        if res.scores.shape != (site.width,) or res.replacement.shape != (site.channels,):
            raise RuntimeError(f"criterion {criterion} returned wrong shapes for site {site.name}")
        out.append(
            SiteScores(
                name=site.name,
                kind=site.kind,
                width=site.width,
                scores=tuple(res.scores.tolist()),
                replacement=tuple(res.replacement.tolist()),
                mean=tuple(m.mean.tolist()),
                samples=m.count,
                fold=site.fold,
                group=site.group,
            )
        )
    n = data.n if limit is None else min(data.n, limit)
    return ScoreReport(criterion=criterion, source_sha256=model.sha256, seed=seed, samples=n, sites=tuple(out))
