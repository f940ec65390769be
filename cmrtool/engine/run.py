"""Entry points of the block engine for ``score`` and ``compile`` on Hugging Face directories
(called by :mod:`cmrtool.api`, which validates the options first).

Only block-local criteria run here: their evidence is statistics of the layer's own sites
(moments, co-moments). Criteria that need the loss gradient through the rest of the network
(``cmr-const``, ``cmr-affine``, ``taylor``, ``gndi``), ``--replacement optimal``,
``--joint-refit``, ``--schedule`` and ``--allocation global`` are refused with an error that
says so.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cmrtool import distributed
from cmrtool.compile.run import CompileReport
from cmrtool.score.criteria import REGISTRY, get_criterion
from cmrtool.engine.blocks import BlockStack
from cmrtool.engine.loop import BlockRun, calibration_inputs, check_exact, fold_error_of, run_blocks, scratch
from cmrtool.engine.options import EngineOptions
from cmrtool.engine.writer import StreamWriter
from cmrtool.errors import UsageError
from cmrtool.plan import Plan
from cmrtool.score.scoring import ScoreReport
from cmrtool.sites import Site

__all__ = ["EngineCompileReport", "check_supported", "score_dir", "compile_dir"]

Log = Callable[[str], None]
_LOCAL = frozenset({"moments", "cov", "consumers"})  # what one layer gives: statistics and its own weights


def check_supported(criterion: str | None, replacement: str = "auto", schedule: int = 1, joint_refit: bool = False, allocation: str = "site") -> None:
    """Refuse what the block engine cannot do, with the alternatives in the hint."""
    local = sorted(n for n, c in REGISTRY.items() if c.needs <= _LOCAL)
    why = "Hugging Face language models are processed block by block (one layer in memory at a time)"
    if criterion is not None and not get_criterion(criterion).needs <= _LOCAL:  # needs "gradients" (protocol.CAPABILITIES)
        raise UsageError(f"{criterion} needs the loss gradient through the rest of the network, and {why}",
                         f"use a block-local criterion: {', '.join(local)}")
    for bad, what in ((replacement == "optimal", "--replacement optimal"), (joint_refit, "--joint-refit"),
                      (schedule > 1, "--schedule"), (allocation != "site", "--allocation global")):
        if bad:
            raise UsageError(f"{what} needs the curvature of the loss at the logits, and {why}",
                             "drop it (mean, zero and affine replacements run per block)")


def _check_sites(stack: BlockStack, chosen: Sequence[Site]) -> None:
    outside = [s.name for s in chosen if not s.name.startswith(stack.layer_prefix + ".")]
    if outside:
        raise UsageError(f"site {outside[0]} is not inside a layer of {stack.layer_prefix}", "choose layer sites with --site")


def score_dir(
    stack: BlockStack, calib: str | Path, chosen: Sequence[Site], options: EngineOptions, criterion: str, seed: int,
    limit: int | None, curvature: str, parents: int, ridge: float, loss: str, log: Log | None = None,
) -> ScoreReport:
    """Score ``chosen`` block by block (statistics of the original model; padding excluded)."""
    check_supported(criterion)
    _check_sites(stack, chosen)
    cal = calibration_inputs(stack, calib, limit)
    args = dict(criterion=criterion, seed=seed, batch_size=options.batch_size, curvature=curvature, parents=parents, ridge=ridge, loss=loss)
    with scratch(options, None) as work:
        run = run_blocks(stack, cal, chosen, dataclasses.replace(options, calibration="original"), score_args=args, work=work, log=log)
    order = {s.name: k for k, s in enumerate(chosen)}
    sites = tuple(sorted(run.scores, key=lambda s: order[s.name]))
    return ScoreReport(criterion=criterion, source_sha256=stack.sha256, seed=seed, samples=cal.n, sites=sites)


@dataclass(frozen=True)
class EngineCompileReport(CompileReport):
    """A :class:`CompileReport` with what the block engine adds: output dtype, calibration mode,
    and its costs."""

    dtype: str = ""
    calibration: str = ""
    engine: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "dtype": self.dtype, "calibration": self.calibration, "engine": dict(self.engine)}


def compile_dir(
    stack: BlockStack, out: Path, kind: str, calib: str | Path | None, chosen: Sequence[Site], report: ScoreReport | None,
    plan_args: dict[str, Any], options: EngineOptions, log: Log | None = None,
) -> EngineCompileReport:
    """Reduce block by block and write ``out`` (a directory when ``kind == "dir"``, else one
    ``.safetensors`` file with the plan in its metadata), atomically."""
    from cmrtool.backends.module.checkpoint import ARCH_KEY, HF_CONFIG_KEY, PLAN_KEY
    from cmrtool.compile.run import _staging
    from cmrtool.engine.loop import _merge_plans
    from cmrtool.io.planstore import is_plan_tensor
    from cmrtool.io.planstore import split as split_plan

    _check_sites(stack, chosen)
    cal = calibration_inputs(stack, calib) if calib is not None else None
    sequential = cal is not None and report is None and options.calibration == "sequential"
    source = set(stack.top.state_dict())
    layer_names = {k for i in range(len(stack)) for k in stack.layer_names(i)}
    arch = f"hf:{type(stack.top).__name__}"
    with scratch(options, out.parent) as work:
        # Room for each file's header, so the tensors are written once (StreamWriter): its tensor
        # entries and the plan in its metadata (about 24 bytes per unit of a mean or zero
        # replacement); a larger header (e.g. affine matrices) is copied instead.
        reserve = 4096 + 256 * (len(source) + len(chosen)) + 32 * sum(s.width for s in chosen)
        writer = StreamWriter(work, shard_bytes=2 << 30 if kind == "dir" else 1 << 62, reserve=reserve)

        def put(name: str, t: torch.Tensor) -> None:
            if kind == "dir" and name not in source and not bool(t.any()):
                return  # a zero bias made by folding zeros: the config decides whether it exists
            for k, v in (stack.conversions.to_checkpoint({name: t}) if kind == "dir" else {name: t}).items():
                writer.add(k, v)  # a directory in the stored format (experts one by one), as save_pretrained writes

        write = _stock_writer(stack, put)

        copied = time.perf_counter()
        for name in stack.weights.names():  # embeddings, final norm, head: unchanged, copied in chunks
            model_name = stack.model_name(name)  # a directory keeps the checkpoint's names, a file the model's
            if name not in layer_names and model_name in source and distributed.is_writer():
                info = stack.weights.info(name)
                writer.add_raw(name if kind == "dir" else model_name, info.dtype, info.shape, stack.weights.chunks(name), stack.weights.nbytes(name))
        if cal is None:
            run = _fold_only(stack, chosen, report, plan_args, write)
        else:
            run = run_blocks(stack, cal, chosen, options, plan_args=plan_args, scores=report, write=write, work=work, log=log)
        run.phases["copy"] = run.phases.get("copy", 0.0) + time.perf_counter() - copied - run.seconds
        check_exact(run)
        finishing = time.perf_counter()
        extra: tuple[tuple[str, Any], ...] = (("calibration", "sequential"),) if sequential else ()
        if cal is not None:
            extra += (("input_shapes", [list(s) for s in cal.shapes]),)
        plan = _merge_plans(run.plans, stack.sha256, extra)
        distributed.sync()  # under torchrun: every rank holds the same plan; rank 0 writes
        if distributed.is_writer():
            with _staging(out, kind) as stage:
                if kind == "dir":
                    text = _finish_dir(stack, plan, writer, stage)
                    writer.finish(stage, None, {"format": "pt", PLAN_KEY: text, ARCH_KEY: arch})
                else:
                    text, side = split_plan(plan)  # a large plan's matrices: extra tensors of the file
                    for name, t in side.items():
                        writer.add(name, t)
                    meta = {"format": "pt", PLAN_KEY: text, ARCH_KEY: arch, HF_CONFIG_KEY: stack.config.to_json_string()}
                    writer.finish(None, stage, meta)
    run.phases["finish"] = time.perf_counter() - finishing
    rows = []
    for sp in plan.sites:
        site = stack.meta.site(sp.name)
        rows.append({"name": sp.name, "kind": sp.kind, "width": sp.width, "kept": len(sp.kept), "replaced": len(sp.replaced), "fold": site.fold})
    before = stack.meta.num_params()
    params = set(dict(stack.top.named_parameters(remove_duplicate=False)))
    after = sum(math.prod(shape) for k, shape in writer.shapes.items() if (k in params or k not in source) and not is_plan_tensor(k))
    dtype = str(stack.checkpoint_dtype).replace("torch.", "")
    fe = fold_error_of(run)
    notes = [f"processed block by block ({options.calibration if cal is not None else 'no'} calibration); weights written in {dtype}"]
    if fe is not None:
        where = f"{run.check_tokens} kept tokens of " if run.check_tokens else ""
        how = f"in float64 on {len(run.exact_layers)} layer{'s' if len(run.exact_layers) != 1 else ''}"
        if run.screens:
            how += f", screened in float32 on {len(run.screens)} (largest relative error {max(run.screens):.1e}, each under its rounding bound)"
        notes.append(f"fold checked per layer on {where}{fe.samples} calibration sequence{'s' if fe.samples != 1 else ''}: {how}")
    engine = {"blocks": len(stack) + 2, "seconds": run.seconds, "peak_rss_bytes": run.peak_rss,
              "buffer_bytes": run.buffer_bytes, "spilled_bytes": run.spilled_bytes,
              "phases": {k: round(v, 3) for k, v in run.phases.items()},
              "fold_check": {"mode": options.check, "tokens": run.check_tokens, "float64_layers": list(run.exact_layers),
                             "float32_layers": len(run.screens), "float32_max_relative": max(run.screens, default=None)}}
    return EngineCompileReport(
        output=str(out), plan=plan, params_before=before, params_after=after, sites=tuple(rows),
        fold_error=fe, notes=tuple(notes), dtype=dtype, calibration=options.calibration if sequential or cal is None else "original",
        engine=engine,
    )


def _stock_writer(stack: BlockStack, put: Callable[[str, torch.Tensor], None]) -> Callable[[str, torch.Tensor], None]:
    """``write(name, tensor)`` for canonical tensors (:mod:`cmrtool.backends.module.layouts`) that calls
    ``put`` with stock ones: a viewed tensor's pieces are held until all of them are written, then
    joined (GPT-2's transposed ``Conv1D``, fused projections, experts); an expert's new bias can
    only be zero (dropped)."""
    from cmrtool.backends.module.layouts import join_views

    owner = {n: v for v in stack.meta.views for n in v.names()}
    pending: dict[str, torch.Tensor] = {}

    def write(name: str, t: torch.Tensor) -> None:
        if not distributed.is_writer():
            return
        view = owner.get(name)
        if view is None:
            for k, v in join_views({name: t}, []).items():  # refuses a nonzero bias no stock tensor holds
                put(k, v)
            return
        pending[name] = t
        if all(n in pending for n in view.names()):
            put(view.source, view.join({n: pending.pop(n) for n in view.names()}))

    return write


def _fold_only(stack: BlockStack, chosen: Sequence[Site], report: ScoreReport | None, plan_args: dict[str, Any], write: Callable[[str, torch.Tensor], None]) -> BlockRun:
    """Compile from scores without calibration data: plan and fold each layer, no forward."""
    from cmrtool.backends.module.hfout import zero_replacements
    from cmrtool.reduce.plans import make_plan
    from cmrtool.engine.memory import peak_rss_bytes
    from cmrtool.compile.fold import fold

    assert report is not None
    plans: list[Plan] = []
    written: dict[str, tuple[int, ...]] = {}
    delta = 0
    for i in range(len(stack)):
        raw = stack.read_layer(i)
        mine = stack.layer_sites(i)
        mine = [s for s in chosen if s in mine]
        tensors = raw
        if mine:
            plan = make_plan(report, mine, plan_args["keep"], plan_args["keep_count"], plan_args["round_to"], plan_args["replacement"], plan_args["allocation"])
            plan = zero_replacements(plan, frozenset(plan_args.get("zero_sites", ())))
            plans.append(plan)
            tensors = fold(raw, mine, plan).tensors
        for k, v in tensors.items():
            write(k, v)
            written[k] = tuple(v.shape)
            delta += v.numel() - (raw[k].numel() if k in raw else 0)
    return BlockRun(plans, [], [], written, delta, 0, 0.0, peak_rss_bytes(), 0, 0)


def _finish_dir(stack: BlockStack, plan: Plan, writer: StreamWriter, stage: Path) -> str:
    """Config, plan files and the input's other files; zero biases the new config creates.
    Returns the plan's JSON text (with references to its tensors when it is large)."""
    from cmrtool.backends.module.hf import _OUTPUTS, _copy_extras, check_dir_output
    from cmrtool.errors import UsageError
    from cmrtool.io.planstore import write_dir_plan

    config, want, tied = check_dir_output(stack.meta, plan)
    written = {stack.model_name(k) for k in writer.shapes}
    for k, shape in want.items():
        if k not in written and k not in tied and k.endswith(".bias"):  # made by mlp_bias / attention_bias: zero is exact
            writer.add(k, torch.zeros(shape, dtype=stack.checkpoint_dtype))
    for name, shape in writer.shapes.items():
        k = stack.model_name(name)
        if k not in want:
            raise UsageError(f"{type(config).__name__} cannot hold {k} (a bias the folded constants need)", f"use --replacement zero to fold nothing, {_OUTPUTS}")
        if tuple(shape) != tuple(want[k]) and not stack.conversions.merged(name):  # one expert's part of a merged tensor
            raise UsageError(f"config.json cannot express the reduced {k}: shape {tuple(shape)}, the config gives {want[k]}", f"keep those units {_OUTPUTS}")
    config.save_pretrained(str(stage))
    text = write_dir_plan(stage, plan)
    _copy_extras(stack.path, stage)
    return text
