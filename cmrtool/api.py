"""The public API on file paths: one function per command, each a complete job.

These are what ``cmrtool inspect|score|compile|bench`` call, and what a Python user calls to do the
same from a script::

    import cmrtool.api as cmr

    report = cmr.score("samples/digits_mlp.pt", "samples/calib.safetensors", criterion="cmr-logit")
    result = cmr.compile("samples/digits_mlp.pt", "reduced.pt", calib="samples/calib.safetensors", keep=0.5)
    print(result.fold_error.max_abs, result.params_after / result.params_before)
    bench = cmr.bench(["samples/digits_mlp.pt", "reduced.pt"], data="samples/calib.safetensors", device="cpu")
    print(bench.speedup, bench.mac_ratio)

Lower-level pieces (backends, statistics, criteria, folding) are in their own modules.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ContextManager

from cmrtool.errors import UsageError
from cmrtool.options import check_at_least, check_thresholds
from cmrtool.runtime import configure, default_threads, tune_malloc, usable_cpus

__all__ = ["configure", "tune_malloc", "open_model", "inspect", "score", "compile", "verify", "bench", "audit", "sweep", "ProgressFactory", "default_threads", "usable_cpus"]

ProgressFactory = Callable[..., ContextManager[Callable[[int], None]]]  # (description, total[, unit])


@contextlib.contextmanager
def _no_progress(description: str, total: int, unit: str = "samples") -> Iterator[Callable[[int], None]]:
    yield lambda n: None


def open_model(path: str | Path, arch: str | None = None, data: str | Path | None = None) -> Any:
    """Load a checkpoint with the right backend (see :mod:`cmrtool.backends`); ``data`` supplies
    a TorchScript model's non-tensor arguments (:mod:`cmrtool.backends.torchscript.tsargs`)."""
    from cmrtool.backends import load_model

    return load_model(path, arch, data)


def _parse_shape(text: str) -> list[int]:
    try:
        dims = [int(x) for x in text.replace("x", ",").split(",") if x.strip()]
    except ValueError:
        dims = []
    if not dims or any(d < 1 for d in dims):
        raise UsageError(f"invalid --input-shape '{text}'", "give positive integers separated by commas, e.g. 1,1,8,8")
    return dims


def _single_stdin(*paths: str | Path | None) -> None:
    if sum(1 for p in paths if p is not None and str(p) == "-") > 1:
        raise UsageError("only one input can be read from stdin ('-')", "write the others to files")


def inspect(
    path: str | Path,
    calib: str | Path | None = None,
    input_shape: str | Sequence[int] | None = None,
    arch: str | None = None,
) -> Any:
    """Sites, fold kinds, parameters and MACs of a model (:class:`cmrtool.measure.inspection.InspectReport`)."""
    from cmrtool.io.data import open_data
    from cmrtool.measure.inspection import example_inputs, inspect_model

    _single_stdin(path, calib)
    model = open_model(path, arch, calib)
    inputs = None
    if calib is not None:
        inputs = list(open_data(calib, model).read(0, 1).inputs)
    elif input_shape is not None:
        shape = _parse_shape(input_shape) if isinstance(input_shape, str) else list(input_shape)
        inputs = example_inputs(model, [shape])
    return inspect_model(model, inputs)


def score(
    path: str | Path,
    calib: str | Path,
    criterion: str = "cmr-logit",
    sites: Sequence[str] | None = None,
    kinds: Sequence[str] | None = None,
    seed: int = 0,
    batch_size: int = 256,
    limit: int | None = None,
    progress: ProgressFactory | None = None,
    curvature: str = "auto",
    parents: int | str | None = "all",
    ridge: float = 1e-3,
    loss: str = "auto",
    arch: str | None = None,
    calibration: str = "original",
    max_memory: str | int | None = None,
    work_dir: str | Path | None = None,
) -> Any:
    """Score every unit of the selected sites (:class:`cmrtool.score.scoring.ScoreReport`).

    A Hugging Face decoder or encoder directory is scored block by block (:mod:`cmrtool.engine`):
    statistics of the original model, padding excluded, in memory bounded by ``max_memory``
    (``calibration`` matters only to compile; it is accepted here for symmetry).
    """
    from cmrtool.score.criteria import get_criterion
    from cmrtool.io.data import open_data
    from cmrtool.score.scoring import score_model, select_sites
    from cmrtool.score.sensitivity import check_curvature, check_loss

    from cmrtool.reduce.affine import check_parents, check_ridge

    _single_stdin(path, calib)
    get_criterion(criterion)
    check_curvature(curvature)
    check_loss(loss)
    parents = check_parents(parents)
    check_ridge(ridge)
    engine_options = _engine_options(path, arch, calibration, max_memory, work_dir, batch_size)
    if engine_options is not None:
        from cmrtool.engine import BlockStack, score_dir

        stack = BlockStack(path)
        stack.meta.require_sites()
        chosen = select_sites(stack.meta.sites, sites, kinds)
        return score_dir(stack, calib, chosen, engine_options, criterion, seed, limit, curvature, parents, ridge, loss, _log_of(progress))
    model = open_model(path, arch, calib)
    model.require_sites()
    chosen = select_sites(model.sites, sites, kinds)
    data = open_data(calib, model)
    n = data.n if limit is None else min(data.n, limit)
    with (progress or _no_progress)(f"scoring ({criterion})", n) as advance:
        return score_model(model, data, criterion, chosen, seed, batch_size, advance, limit, curvature, parents, ridge, loss=loss)


def compile(
    path: str | Path,
    output: str | Path,
    calib: str | Path | None = None,
    scores: str | Path | Any | None = None,
    criterion: str = "cmr-logit",
    sites: Sequence[str] | None = None,
    kinds: Sequence[str] | None = None,
    keep: float | None = None,
    keep_count: int | None = None,
    round_to: int | None = None,
    replacement: str = "auto",
    seed: int = 0,
    batch_size: int = 256,
    force: bool = False,
    check_samples: int = 256,
    progress: ProgressFactory | None = None,
    warn: Callable[[str], None] | None = None,
    allocation: str = "site",
    schedule: int = 1,
    joint_refit: bool = False,
    parents: int | str | None = "all",
    ridge: float = 1e-3,
    curvature: str = "auto",
    loss: str = "auto",
    arch: str | None = None,
    onnx: str | Path | None = None,
    calibration: str = "original",
    max_memory: str | int | None = None,
    work_dir: str | Path | None = None,
    fold_check: str = "auto",
) -> Any:
    """Reduce a model and write the smaller checkpoint (:class:`cmrtool.compile.run.CompileReport`).

    Scores come from ``scores`` (a :class:`~cmrtool.score.scoring.ScoreReport`, or the path of a
    ``score --json`` document, ``-`` for stdin) or are computed on ``calib``. With ``calib`` the
    written model's fold error is measured on its first ``check_samples`` samples.

    Args beyond the selection options:
        replacement: ``auto`` (the criterion's), ``mean``, ``zero``, ``optimal`` or ``affine``.
        allocation: ``site`` or ``global`` (rank all sites' units together).
        schedule: re-score after each of this many steps towards ``keep`` (iterative reduction).
        joint_refit: fit each site's constants jointly under the full curvature of the logits.
        parents, ridge: affine replacements: parents per unit (``"all"``/None: every kept unit,
            one dense least-squares fit per site) and ridge relative to the mean kept-unit variance.
        curvature: ``auto``, ``exact`` or ``sampled`` Gauss-Newton curvature.
        loss: ``auto`` (cross-entropy with labels, else KL to the model's prediction), ``ce``, ``kl``.
        calibration, max_memory, work_dir: the block engine's options (Hugging Face decoders and
            encoders; see :class:`cmrtool.engine.EngineOptions`): ``original`` (default) or
            ``sequential`` calibration, the memory for calibration buffers (bytes or ``"4GB"``), and
            where buffers spill. Such models are reduced layer by layer, written in the
            checkpoint's dtype, and their fold is checked per layer.
        fold_check: block models: ``auto`` checks the first reduced layer in float64 and screens
            the others in float32 against a rounding bound (float64 above it); ``float64`` checks
            every layer in float64.

    ``output`` is the backend's checkpoint (``.pt`` for TorchScript, ``.safetensors`` for
    nn.Modules), a Hugging Face directory (ends with ``/``; Hugging Face inputs whose layers keep
    equal widths), or ``.onnx``; ``onnx`` additionally exports the reduced model to that file.
    """
    from cmrtool.reduce.affine import check_parents, check_ridge
    from cmrtool.reduce.plans import check_allocation
    from cmrtool.compile.run import compile_model, output_kind
    from cmrtool.score.criteria import AFFINE_MODES, REPLACEMENT_MODES, get_criterion
    from cmrtool.io.data import open_data
    from cmrtool.io.files import check_output_name, check_output_path, read_bytes
    from cmrtool.reduce.selection import validate_keep
    from cmrtool.score.sensitivity import check_curvature, check_loss

    # Validate everything cheap before loading anything.
    validate_keep(keep, keep_count, round_to)
    if keep is None and keep_count is None:
        raise UsageError("compile needs --keep or --keep-count", "e.g. --keep 0.5 keeps half the units of each site")
    if replacement not in REPLACEMENT_MODES:
        raise UsageError(f"unknown replacement '{replacement}'", f"choose one of: {', '.join(REPLACEMENT_MODES)}")
    parents = check_parents(parents)
    check_ridge(ridge)
    if replacement == "affine-nobias" and parents is not None:
        raise UsageError("--replacement affine-nobias fits on every kept unit", "drop --parents (or pass --parents all)")
    check_curvature(curvature)
    check_loss(loss)
    check_at_least("--check-samples", check_samples, 0, "256 (0 skips the fold check)")
    if schedule < 1:
        raise UsageError(f"--schedule must be at least 1, got {schedule}", "e.g. --schedule 4 re-scores after each of 4 steps")
    score_path = scores if isinstance(scores, (str, Path)) else None
    if scores is None and calib is None:
        raise UsageError("compile needs --calib (to score) or --scores (from cmrtool score --json)", "e.g. cmrtool compile model.pt --calib calib.safetensors --keep 0.5 -o reduced.pt")
    if calib is None and (joint_refit or schedule > 1 or replacement in AFFINE_MODES):
        what = "--joint-refit" if joint_refit else "--schedule" if schedule > 1 else f"--replacement {replacement}"
        raise UsageError(f"{what} needs calibration data", "pass --calib")
    if scores is not None and schedule > 1:
        raise UsageError("--schedule re-scores the model after every step, so it cannot start from --scores", "drop --scores and pass --calib")
    if scores is None:
        get_criterion(criterion)
    _single_stdin(path, calib, score_path)
    if str(output) == "-":
        raise UsageError("compile cannot write the model to stdout", "give a file name with -o, e.g. -o reduced.pt")
    check_output_name(output)  # before any stat of it: ENAMETOOLONG is a usage error
    kind = output_kind(output)
    if kind == "file" and not Path(str(output)).suffix and Path(str(path)).is_dir():
        kind, output = "dir", str(output) + os.sep  # like save_pretrained: a Hugging Face input's -o NAME is a directory
    if (kind == "onnx" or onnx is not None) and (calib is None or check_samples < 1):
        raise UsageError("ONNX export needs example inputs", "pass --calib (and --check-samples ≥ 1): its first samples are exported and checked with onnxruntime")
    inputs = _input_files(path, calib, score_path)
    out = check_output_path(output, inputs, force, directory=kind == "dir")
    if onnx is not None:
        if output_kind(onnx) != "onnx":
            raise UsageError(f"--onnx {onnx} does not end in .onnx", "e.g. --onnx reduced.onnx")
        check_output_path(onnx, [*inputs, out], force)

    engine_options = None
    if kind != "onnx" and onnx is None:
        engine_options = _engine_options(path, arch, calibration, max_memory, work_dir, batch_size, check_samples, fold_check)
    if engine_options is not None:
        from cmrtool.engine import BlockStack

        stack = BlockStack(path)
        model = stack.meta
    else:
        model = open_model(path, arch, calib)
    model.require_sites()
    _check_output_format(model, out, kind)
    chosen = _foldable_sites(model, sites, kinds, keep, keep_count, round_to, allocation, warn)
    check_allocation(allocation, criterion if scores is None else _criterion_of(scores, read_bytes), chosen)
    if engine_options is not None:
        from cmrtool.engine import check_supported, compile_dir

        check_supported(criterion if scores is None else None, replacement, schedule, joint_refit, allocation)
        # Only --scores needs the input's hash now; otherwise it is computed beside the work.
        report = None if scores is None else _read_scores(scores, stack.sha256, read_bytes)
        plan_args = dict(keep=keep, keep_count=keep_count, round_to=round_to, schedule=1, progress=_no_progress,
                         criterion=criterion, replacement=replacement, allocation=allocation, joint_refit=joint_refit,
                         parents=parents, ridge=ridge, curvature=curvature, seed=seed, batch_size=engine_options.batch_size, loss=loss)
        if kind != "dir" or replacement == "zero":
            return compile_dir(stack, out, kind, calib, chosen, report, plan_args, engine_options, _log_of(progress))
        from cmrtool.backends.module.hfout import dir_output_for_sites

        # Layers are folded as they are processed, so where the output's config goes is decided first.
        written_as, dir_notes, zeroed = dir_output_for_sites(model, chosen)
        for note in dir_notes:
            if warn:
                warn(note)
        result = compile_dir(stack, out, kind, calib, chosen, report, {**plan_args, "zero_sites": zeroed}, engine_options, _log_of(progress))
        return dataclasses.replace(result, written_as=written_as, notes=dir_notes + result.notes)

    data = open_data(calib, model) if calib is not None else None
    report = _read_scores(scores, model.sha256, read_bytes)
    options = dict(criterion=criterion, replacement=replacement, allocation=allocation, joint_refit=joint_refit,
                   parents=parents, ridge=ridge, curvature=curvature, seed=seed, batch_size=batch_size, loss=loss)
    from cmrtool.reduce.planner import plan_reduction

    plan = plan_reduction(model, data, chosen, report, keep, keep_count, round_to, schedule, progress or _no_progress, **options)
    plan = dataclasses.replace(plan, source_sha256=model.sha256)
    choice = None
    if kind == "dir":
        from cmrtool.backends.module.hf import check_dir_output
        from cmrtool.backends.module.hfout import choose_dir_output

        choice = choose_dir_output(model, plan)  # constants the config cannot hold: another family, or deleted
        plan = choice.plan
        for note in choice.notes:
            if warn:
                warn(note)
        check_dir_output(model, plan)  # uniform widths and a config that can express them
    check = None
    if data is not None:
        shapes = [list(s) for s in data.input_shapes().values()]
        plan = dataclasses.replace(plan, settings=plan.settings + (("input_shapes", shapes),))
        if check_samples > 0:
            check = list(data.read(0, min(data.n, check_samples)).inputs)
    result = compile_model(model, plan, output, check, onnx)
    if choice is not None:
        result = dataclasses.replace(result, written_as=choice.written_as, notes=choice.notes + result.notes)
    return result


def _foldable_sites(
    model: Any, sites: Sequence[str] | None, kinds: Sequence[str] | None, keep: float | None, keep_count: int | None,
    round_to: int | None, allocation: str, warn: Callable[[str], None] | None,
) -> list[Any]:
    """The selected sites that can be folded (unfoldable ones skipped with a warning, or an
    error when named explicitly); keep-count checked against every width before any scoring."""
    from cmrtool.errors import InputError
    from cmrtool.score.scoring import select_sites
    from cmrtool.reduce.selection import kept_width

    explicit = bool(sites)
    chosen = select_sites(model.sites, sites, kinds)
    unfoldable = [s for s in chosen if not s.foldable]
    if unfoldable and explicit:
        s = unfoldable[0]
        raise InputError(f"site {s.name} cannot be folded: {s.reason}", "choose other sites with --site (see cmrtool inspect)")
    for s in unfoldable:
        if warn:
            warn(f"skipping site {s.name}: {s.reason}")
    chosen = [s for s in chosen if s.foldable]
    if not chosen:
        raise InputError("none of the selected sites can be folded", "see cmrtool inspect for fold kinds and reasons")
    if allocation == "site":
        for s in chosen:  # keep-count against every width, before any scoring
            kept_width(s.name, s.width, keep, keep_count, round_to)
    return chosen


def _read_scores(scores: Any, sha256: str, read: Callable[[Any], bytes]) -> Any:
    """The :class:`~cmrtool.score.scoring.ScoreReport` given as a path (or ``-``), an object, or None."""
    from cmrtool.errors import InputError
    from cmrtool.score.scoring import ScoreReport

    if not isinstance(scores, (str, Path)):
        return scores
    report = ScoreReport.loads(read(scores))
    if report.source_sha256 and report.source_sha256 != sha256:
        raise InputError(
            f"the scores were computed for another model (sha256 {report.source_sha256[:12]}…, this is {sha256[:12]}…)",
            "score this model: cmrtool score MODEL --calib DATA --json > scores.json",
        )
    return report


def _engine_options(
    path: str | Path, arch: str | None, calibration: str, max_memory: str | int | None, work_dir: str | Path | None,
    batch_size: int, check_samples: int = 0, fold_check: str = "auto",
) -> Any:
    """The block engine's options when ``path`` is a model it processes (else None, after
    validating the options all the same)."""
    from cmrtool.engine import EngineOptions, parse_memory, supports

    options = EngineOptions(
        calibration=calibration, max_memory=parse_memory(max_memory), work_dir=None if work_dir is None else str(work_dir),
        batch_size=batch_size, check_samples=check_samples, check=fold_check,
    )
    if arch is not None or str(path) == "-" or not supports(path):
        return None
    return options


def _log_of(progress: ProgressFactory | None) -> Callable[[str], None] | None:
    """The log method of the CLI's output object behind ``progress`` (per-block lines), if any."""
    owner = getattr(progress, "__self__", None)
    log = getattr(owner, "log", None)
    return log if callable(log) else None


def _check_output_format(model: Any, out: Path, kind: str) -> None:
    """The output is a format this model can be written in (before any scoring)."""
    if kind == "dir":
        from cmrtool.backends.module.hf import require_hf_input

        require_hf_input(model)
    elif kind == "file":
        torchscript = model.format == "torchscript"
        if torchscript == (out.suffix.lower() == ".safetensors"):
            native = "TorchScript (e.g. reduced.pt)" if torchscript else "safetensors (reduced.safetensors)"
            raise UsageError(
                f"a {model.format} model is written as {native}, not as {out.name}",
                "change the output name, or write -o reduced.onnx" + ("" if torchscript else " or, for a Hugging Face input, a directory: -o reduced/"),
            )


def _input_files(*paths: str | Path | None) -> list[str | Path]:
    """The inputs an output must never replace (a Hugging Face directory: and every file in it)."""
    files: list[str | Path] = []
    for p in paths:
        if p is None:
            continue
        files.append(p)
        if str(p) != "-" and Path(p).is_dir():
            files.extend(f for f in Path(p).iterdir() if f.is_file())
    return files


def _criterion_of(scores: Any, read: Callable[[Any], bytes]) -> str:
    from cmrtool.score.scoring import ScoreReport

    if isinstance(scores, (str, Path)):
        return str(ScoreReport.loads(read(scores)).criterion)
    return str(scores.criterion)


def verify(
    original: str | Path,
    reduced: str | Path,
    data: str | Path,
    swaps: int = 2000,
    p: float = 0.5,
    seed: int = 0,
    sites: Sequence[str] | None = None,
    batch_size: int = 256,
    min_iia: float | None = None,
    max_kl: float | None = None,
    max_fold_error: float | None = None,
    onnx: str | Path | None = None,
    progress: ProgressFactory | None = None,
    arch: str | None = None,
) -> Any:
    """Verify a reduced checkpoint against its original (:class:`cmrtool.verify.report.VerifyReport`).

    The reduced model carries its plan, so only the two models and held-out data are needed.
    ``report.passed`` is False when a threshold fails (the CLI then exits with code 3).
    """
    from cmrtool.io.data import open_data
    from cmrtool.io.files import sha256_file
    from cmrtool.verify.report import Thresholds
    from cmrtool.verify.report import verify as run_verify

    _single_stdin(original, reduced, data)
    check_thresholds(min_iia, max_kl, max_fold_error)
    o = open_model(original, arch, data)
    r = open_model(reduced, arch if str(reduced).endswith(".safetensors") else None, data)
    ds = open_data(data, o)
    if onnx is not None:
        from cmrtool.compile.onnxcheck import check_onnx_plan

        check_onnx_plan(onnx, r)
    report = run_verify(
        o, r, ds, swaps=swaps, p=p, seed=seed, sites=sites, batch_size=batch_size,
        thresholds=Thresholds(min_iia, max_kl, max_fold_error), onnx=None if onnx is None else str(onnx), progress=progress,
    )
    if onnx is not None:
        from cmrtool.compile.onnxcheck import onnx_failure

        failed = onnx_failure(report.onnx_max_abs_diff)
        if failed:
            report = dataclasses.replace(report, failures=(*report.failures, failed))
    report.inputs["data"] = sha256_file(data)
    if onnx is not None:
        report.inputs["onnx"] = sha256_file(onnx)
    return report
def bench(
    paths: Sequence[str | Path],
    data: str | Path | None = None,
    input_shapes: Sequence[str | Sequence[int]] | None = None,
    batch: int = 64,
    device: str = "auto",
    dtype: str = "fp16",
    warmup: int = 5,
    repeats: int = 30,
    progress: ProgressFactory | None = None,
    warn: Callable[[str], None] | None = None,
    arch: str | None = None,
    prompt_tokens: int = 128,
    decode_tokens: int = 32,
) -> Any:
    """Parameters, MACs and measured speed of models, each compared with the first (:class:`cmrtool.measure.bench.BenchReport`).

    Hugging Face causal LMs also get prefill and decode tokens/s at batch 1 and ``batch``
    (prompts of ``prompt_tokens``, ``decode_tokens`` greedy steps; 0 skips them).

    The benchmark batch is the first ``batch`` samples of ``data``, else random tensors of
    ``input_shapes`` (strings like ``"1,1,8,8"`` or lists; the batch dimension becomes ``batch``),
    else of the shapes a reduced model recorded at compile time. Call :func:`configure` first: the
    thread count it sets is the one measured.
    """
    from cmrtool.measure.bench import BenchSettings, bench_models

    settings = BenchSettings(batch=batch, device=device, dtype=dtype, warmup=warmup, repeats=repeats,
                             prompt_tokens=prompt_tokens, decode_tokens=decode_tokens)
    _single_stdin(*paths, data)
    shapes = [_parse_shape(s) if isinstance(s, str) else list(s) for s in input_shapes] if input_shapes else None
    return bench_models(paths, settings, data, shapes, progress or _no_progress, warn, arch)


def audit(
    path: str | Path,
    calib: str | Path,
    criteria: str | Sequence[str] = ("cmr-logit", "vbp", "magnitude", "random"),
    sites: Sequence[str] | None = None,
    keep: float = 0.5,
    seeds: int = 10,
    scale_range: tuple[float, float] = (0.01, 100.0),
    validate: int = 0,
    batch_size: int = 256,
    progress: ProgressFactory | None = None,
    arch: str | None = None,
) -> Any:
    """Reparameterization audit and criterion validation (:class:`cmrtool.studies.audit.AuditReport`)."""
    from cmrtool.studies.audit import audit as run_audit
    from cmrtool.score.criteria import parse_criteria
    from cmrtool.io.data import open_data
    from cmrtool.score.scoring import select_sites

    criteria = parse_criteria(criteria)
    if not 0 < keep < 1:
        raise UsageError(f"--keep must be in (0, 1) for the audit, got {keep}", "e.g. --keep 0.5")
    lo, hi = scale_range
    if not 0 < lo <= hi:
        raise UsageError(f"invalid scale range {lo}..{hi}", "give two positive numbers, e.g. --scale-range 0.01,100")
    if seeds < 1 or validate < 0:
        raise UsageError("--seeds must be at least 1 and --validate at least 0", "e.g. --seeds 10 --validate 64")
    _single_stdin(path, calib)
    model = open_model(path, arch, calib)
    model.require_sites()
    chosen = select_sites(model.sites, sites, None)
    data = open_data(calib, model)
    with (progress or _no_progress)("audit", seeds, "seeds") as advance:
        return run_audit(model, data, list(criteria), chosen, keep, seeds, (lo, hi), validate, batch_size, advance)


def sweep(
    path: str | Path,
    calib: str | Path,
    data: str | Path,
    keeps: str | Sequence[float] = (0.9, 0.75, 0.5, 0.25),
    criteria: str | Sequence[str] = ("cmr-logit", "vbp", "random"),
    sites: Sequence[str] | None = None,
    kinds: Sequence[str] | None = None,
    swaps: int = 2000,
    p: float = 0.5,
    seed: int = 0,
    batch_size: int = 256,
    plot: str | Path | None = None,
    keep_models: str | Path | None = None,
    force: bool = False,
    progress: ProgressFactory | None = None,
    warn: Callable[[str], None] | None = None,
    arch: str | None = None,
) -> Any:
    """Compile and verify every (criterion, keep) pair (:class:`cmrtool.studies.sweep.SweepReport`).

    Each criterion scores the model once on ``calib``; each keep fraction is compiled from those
    scores and verified on ``data`` with ``swaps`` interchange interventions at ``p``.

    Args:
        keeps: keep fractions in (0, 1], a sequence or ``"0.9,0.5"``.
        criteria: criterion names, a sequence or ``"cmr-logit,vbp"``.
        plot: also write a PNG of IIA and KL against MACs kept (needs matplotlib, ``cmrtool[plot]``).
        keep_models: keep the reduced checkpoints in this directory (created if missing) instead
            of a temporary one; existing files there are replaced only with ``force``.
        arch: ``pkg.module:factory`` for ``.safetensors`` weights; reduced checkpoints of an
            nn.Module model are written as ``.safetensors``, of a TorchScript model as ``.pt``.

    Example:
        >>> report = sweep("samples/digits_mlp.pt", "samples/calib.safetensors", "samples/eval.safetensors",
        ...                keeps=[0.75, 0.5], criteria=["cmr-logit", "vbp"], swaps=500)
        >>> [(r.criterion, r.keep, r.iia) for r in report.rows]
    """
    from cmrtool.errors import InputError
    from cmrtool.io.files import check_output_path, require_file
    from cmrtool.score.criteria import parse_criteria
    from cmrtool.studies.sweep import model_path_for, parse_keeps, run_sweep

    # Everything cheap is checked before the first compile.
    keep_list = parse_keeps(keeps)
    criterion_list = parse_criteria(criteria)
    if swaps < 1 or not (0.0 <= p <= 1.0):
        raise UsageError(f"need --swaps ≥ 1 and --p in [0, 1], got {swaps} and {p}", "e.g. --swaps 2000 --p 0.5")
    if any(str(x) == "-" for x in (path, calib, data)):
        raise UsageError("sweep reads its model and data once per reduction, so it cannot read stdin ('-')", "write them to files first")
    inputs = [path, calib, data]
    for what, f in zip(("model", "calibration data", "held-out data"), inputs):
        if not (what == "model" and Path(f).is_dir()):  # a Hugging Face directory
            require_file(f, what)
    if plot is not None:
        from cmrtool.studies.plot import require_matplotlib

        require_matplotlib()
        check_output_path(plot, inputs, force)
    if keep_models is not None:
        directory = Path(keep_models)
        if directory.exists() and not directory.is_dir():
            raise InputError(f"--keep-models {directory} is not a directory", "give a directory (it is created if missing)")
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"cannot create --keep-models directory {directory}: {e.strerror}", "choose a directory you can write to") from None
        for c in criterion_list:
            for k in keep_list:
                check_output_path(model_path_for(directory, path, c, k), inputs, force)
    report = run_sweep(path, calib, data, keep_list, criterion_list, sites, kinds, swaps, p, seed, batch_size,
                       keep_models, force, progress or _no_progress, warn, arch)
    if plot is not None:
        from cmrtool.studies.plot import plot_sweep

        plot_sweep(report, plot)
    return report
