"""The block loop (DESIGN §8): block-outer, token-batch-inner.

::

    H = embed(calibration tokens)                   # buffer (sequences, tokens, hidden)
    for layer in model.layers:                      # weights read and materialized for this layer only
        plan_b = plan_reduction(layer, H, …)        # the whole-model planner on the block; its one
                                                    #   statistics pass also records the layer's output
        H = output + correction                     # sequential: the reduced layer's output
        F = fold(layer tensors in float64, plan_b)  # once per layer (eq. A.5)
        check F on a slice, in float64              # reduced vs clamped layer, kept tokens
        write(cast(F))                              # checkpoint dtype, one rounding

Each layer runs once over the calibration set: its statistics pass records the layer's output
(:mod:`cmrtool.engine.record`); for a decoder FFN the sequential pass adds the replaced units'
change to it instead of running the reduced layer again; attention heads and encoder layers (a
LayerNorm follows the FFN) run the reduced layer again.

The fold check compares, on the first sequences of the buffer (kept tokens only), the reduced
layer with the original layer whose replaced units are clamped, both in float64: exact to
float64 rounding whatever the depth, and never a false alarm from float32 rounding through
dozens of layers and a large head. No logits are computed: the head is never run.

Each layer is read from the checkpoint once: the tensors read for the statistics pass are
widened to float64 for the fold and its check, and the tensors written are that checked fold,
cast. The check's float64 passes (clamped and reduced layer on at most ``check_tokens`` tokens)
are the one cost per layer that does not shrink with the calibration set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cmrtool import distributed
from cmrtool.compile.clamp import FoldError, clamp_edits, site_ranks
from cmrtool.engine.blocks import BlockStack
from cmrtool.engine.buffer import BlockData, BufferPool
from cmrtool.engine.record import Recorder, correct, share_outputs
from cmrtool.engine.memory import peak_rss_bytes, release, rss_bytes
from cmrtool.engine.options import EngineOptions
from cmrtool.errors import CmrError
from cmrtool.compile.fold import fold
from cmrtool.plan import Plan, SitePlan
from cmrtool.score.scoring import ScoreReport, SiteScores, score_model
from cmrtool.sites import Site

__all__ = ["BlockRun", "Calibration", "run_blocks", "check_window", "calibration_inputs", "scratch", "fold_error_of", "check_exact"]

Log = Callable[[str], None]


@dataclass(frozen=True)
class Calibration:
    """The calibration inputs, whole (token ids are small): ids, mask and extra embedding inputs."""

    inputs: dict[str, torch.Tensor]
    shapes: tuple[tuple[int, ...], ...] = ()

    @property
    def mask(self) -> torch.Tensor:
        return self.inputs["attention_mask"]

    @property
    def n(self) -> int:
        return int(self.inputs["input_ids"].shape[0])

    @property
    def tokens(self) -> int:
        return int(self.mask.sum())


def calibration_inputs(stack: BlockStack, path: str | Path, limit: int | None = None) -> Calibration:
    """Read the calibration file for ``stack``'s model (``input_ids``, optional ``attention_mask``)."""
    from cmrtool.errors import InputError

    data = stack.calibration_data(path)  # by name: GPT-2's forward takes the cache before the mask
    batch = data.all(limit)
    inputs = dict(zip(data.keys, batch.inputs))
    if "input" in inputs:
        inputs["input_ids"] = inputs.pop("input")
    ids = inputs.get("input_ids")
    if ids is None or ids.dim() != 2 or ids.dtype.is_floating_point:
        raise InputError(f"{path} has no 2-D integer 'input_ids'", "store token ids as input_ids (sequences × tokens) and attention_mask")
    mask = inputs.get("attention_mask")
    inputs["attention_mask"] = torch.ones_like(ids) if mask is None else mask.long()
    unknown = set(inputs) - {"input_ids", "attention_mask", "token_type_ids"}
    if unknown:
        raise InputError(f"the block engine does not take '{sorted(unknown)[0]}' in {path}",
                         "store input_ids, attention_mask (and token_type_ids for encoders) only")
    return Calibration(inputs, tuple(tuple(v) for v in data.input_shapes().values()))


@dataclass
class BlockRun:
    """What the loop made: per-layer plans and scores, fold errors, sizes, and its costs."""

    plans: list[Plan]
    scores: list[SiteScores]
    fold_errors: list[tuple[float, float]]
    written: dict[str, tuple[int, ...]]
    param_delta: int
    check_samples: int
    seconds: float
    peak_rss: int
    buffer_bytes: int
    spilled_bytes: int
    phases: dict[str, float] = dataclasses.field(default_factory=dict)
    check_tokens: int = 0
    exact_layers: list[int] = dataclasses.field(default_factory=list)
    screens: list[float] = dataclasses.field(default_factory=list)


def _block_report(scores: ScoreReport | None, names: set[str]) -> ScoreReport | None:
    if scores is None:
        return None
    return dataclasses.replace(scores, sites=tuple(s for s in scores.sites if s.name in names))


def _fast_sites(stack: BlockStack, chosen: Sequence[Site], sequential: bool) -> list[Site]:
    """Sites whose reduction the sequential pass can apply to the recorded output (decoder FFNs
    whose consumer adds into the residual stream last: ``stack.ffn_last``); empty when the layer
    must re-run."""
    if not sequential or not stack.ffn_last or any(s.kind != "neuron" for s in chosen):
        return []
    return list(chosen)


def _folded(block: Any, raw: Mapping[str, torch.Tensor], plan: Plan, checkpoint_dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Fold a layer once in float64: ``(its changed and added tensors by the block's names, in
    float64; the tensors to write)``.

    The fold reads the tensors as read from the checkpoint (``raw``; rows and columns are
    selected before they are widened, exactly), so each layer is read from disk once. The tensors
    written are this fold cast once (eq. A.5 in float64, then one rounding); unchanged tensors
    are written as read. A layer whose checkpoint names differ from the block's (stock fused or
    transposed layouts seen as canonical views) is folded under both names.
    """
    tensors = block.tensors()
    if all(k in tensors for k in raw):
        result = fold(raw, block.sites, plan, dtype=torch.float64)
        new = {k: result.tensors[k] for k in (*result.changed, *result.added)}
        out = {k: new[k].to(raw[k].dtype if k in raw else checkpoint_dtype) if k in new else v for k, v in result.tensors.items()}
        return new, out
    result = fold(tensors, block.sites, plan, dtype=torch.float64)
    new = {k: result.tensors[k] for k in (*result.changed, *result.added)}
    folded = fold({k: v.to(torch.float64) for k, v in raw.items()}, block.sites, plan).tensors
    return new, {k: v.to(raw[k].dtype if k in raw else checkpoint_dtype) for k, v in folded.items()}


def _compare(block: Any, new: Mapping[str, torch.Tensor], plan: Plan, x: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """``(max |reduced(x) − clamped(x)|, the same ÷ max |clamped(x)|)`` over kept tokens, in the
    block's dtype. The block is the original layer; it is reduced in place here (so it is
    spent)."""
    dtype = block.dtype
    x = x.to(dtype)
    names = [sp.name for sp in plan.sites]
    with torch.no_grad():
        # The ranks of the site values (hook time) from one token: another pass over the
        # check's tokens would cost as much as the check itself.
        ranks = site_ranks(block, [x[:1, :1], torch.ones_like(mask[:1, :1])], names)
        clamped = block.run([x, mask], edits=clamp_edits(block, plan, ranks))[0]
        whole = {**block.tensors(), **{k: v.to(dtype) for k, v in new.items()}}
        result = block.reduced_module(whole, plan, in_place=True)(x, mask)
    keep = mask.bool()
    diff = float((result - clamped)[keep].abs().max())
    scale = max(float(clamped[keep].abs().max()), 1e-30)
    return diff, diff / scale


def screen_tolerance(dtype: torch.dtype, plan: Plan) -> float:
    """The float32 screen's bound on ``|reduced − clamped| ÷ max |clamped|`` for one layer:
    ``4 · eps · √n`` with n the widest site of the layer (the consumers' fan-in over which the
    two sides round differently). Measured: 3–5e-7 at the Llama-3-8B shape (n = 14,336), where
    the bound is 5.7e-5."""
    width = max((sp.width * sp.group for sp in plan.sites), default=1)
    return 4.0 * torch.finfo(dtype).eps * math.sqrt(width)


def _checked_fold(
    stack: BlockStack, i: int, raw: Mapping[str, torch.Tensor], plan: Plan, x: torch.Tensor, mask: torch.Tensor,
    lent: list[Any] | None = None, exact: bool = True,
) -> tuple[dict[str, torch.Tensor], tuple[float, float] | None, float | None]:
    """Fold layer ``i`` once in float64, check it, and return ``(the tensors to write, the
    float64 fold error (absolute, relative) or None, the float32 screen's relative error or None)``.

    ``exact``: the reduced layer is compared with the original layer whose replaced units are
    clamped, both in float64 (exact to float64 rounding whatever the depth). Otherwise it is
    screened in the compute dtype (``lent``: ``[the layer as the statistics pass ran it,
    unmodified]``, handed over so that this is its only reference and it is freed before a
    float64 copy is made) against :func:`screen_tolerance`, and a layer above the bound is checked in float64, which
    decides: so the screen never raises a false alarm and never lets a fold error pass that
    float64 would catch above the bound. The float64 check holds one float64 copy of the layer
    plus its folded tensors and nothing else of it.
    """
    block = lent.pop() if lent else stack.block(i, raw, torch.float64 if exact else None)
    new, out = _folded(block, raw, plan, stack.checkpoint_dtype)
    screened = None
    if not exact and block.dtype != torch.float64:
        screened = _compare(block, new, plan, x, mask)[1]
        if screened <= screen_tolerance(block.dtype, plan):
            return out, None, screened
    if block.dtype != torch.float64:  # (a screened block is spent: it was reduced in place)
        del block
        release()
        block = stack.block(i, raw, torch.float64)
    return out, _compare(block, new, plan, x, mask), screened


def check_window(mask: torch.Tensor, options: EngineOptions) -> tuple[torch.Tensor, slice] | None:
    """The fold check's inputs: which sequences (rows) and which token positions (one window).

    At most ``check_samples`` sequences, a sixteenth of them, and ``check_tokens`` tokens in all,
    taken from sequences that have kept tokens, in a window that starts at the first kept
    position (left padding skipped). The reduced and the clamped layer must agree on *any*
    input, so a short window is as strict a test of the fold as a whole sequence; its float64
    passes are the one per-layer cost that does not shrink with the calibration set, so it is
    kept small. None when no sequence has a kept token.
    """
    n, t = mask.shape
    live = mask.bool().any(1).nonzero().flatten()
    if live.numel() == 0:
        return None
    count = max(1, min(options.check_samples, max(1, n // 16), max(1, options.check_tokens // max(t, 1)), int(live.numel())))
    rows = live[:count]
    length = max(1, min(t, options.check_tokens // count))
    first = int(mask[rows].bool().any(0).nonzero()[0])
    start = min(first, t - length)
    return rows, slice(start, start + length)


def _merge_plans(plans: Sequence[Plan], sha256: str, extra: tuple[tuple[str, Any], ...]) -> Plan:
    """One plan from the layers' plans (settings merged; per-site dicts joined)."""
    first = plans[0]
    settings: dict[str, Any] = {}
    for p in plans:
        for k, v in p.settings:
            if isinstance(v, dict) and isinstance(settings.get(k), dict):
                settings[k] = {**settings[k], **v}
            else:
                settings.setdefault(k, v)
    sites: tuple[SitePlan, ...] = tuple(sp for p in plans for sp in p.sites)
    return Plan(source_sha256=sha256, criterion=first.criterion, sites=sites, replacement=first.replacement,
                seed=first.seed, settings=tuple(settings.items()) + extra)


@contextlib.contextmanager
def scratch(options: EngineOptions, near: Path | None) -> Iterator[Path]:
    if options.work_dir is not None:
        Path(options.work_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="cmrtool-work-", dir=options.work_dir) as d:
            yield Path(d)
        return
    directory = near if near is not None and near.is_dir() else None
    with tempfile.TemporaryDirectory(prefix=".cmrtool-work-", dir=directory) as d:
        yield Path(d)


def run_blocks(
    stack: BlockStack,
    calib: Calibration,
    chosen: Sequence[Site],
    options: EngineOptions,
    plan_args: Mapping[str, Any] | None = None,
    scores: ScoreReport | None = None,
    score_args: Mapping[str, Any] | None = None,
    write: Callable[[str, torch.Tensor], None] | None = None,
    work: Path | None = None,
    log: Log | None = None,
) -> BlockRun:
    """Run the block loop.

    Args:
        stack: the model's blocks.
        calib: calibration inputs.
        chosen: the sites to score or reduce (all inside layers).
        options: engine options.
        plan_args: compile: keyword arguments of :func:`cmrtool.reduce.planner.plan_reduction` (keep,
            keep_count, round_to and the ``**options``); None scores only.
        scores: compile from these scores instead of scoring (``--scores``).
        score_args: score: keyword arguments of :func:`cmrtool.score.scoring.score_model`.
        write: called with every reduced tensor of every layer (checkpoint dtype).
        work: the work directory for spilled buffers (see :func:`scratch`).
        log: one line per block (tokens/s, resident memory).
    """
    from cmrtool.backends.module.hfout import zero_replacements
    from cmrtool.reduce.planner import plan_reduction

    compiling = plan_args is not None
    bs = options.batch_for(int(calib.mask.shape[1]))
    options = dataclasses.replace(options, batch_size=bs)
    zero_sites: frozenset[str] = frozenset()
    if plan_args is not None:
        plan_args = {**plan_args, "batch_size": bs}
        zero_sites = frozenset(plan_args.pop("zero_sites", ()))  # no bias to hold their constants (hfout)
    if score_args is not None:
        score_args = {**score_args, "batch_size": bs}
    sequential = compiling and scores is None and options.calibration == "sequential"
    start = time.perf_counter()
    mask = calib.mask
    n, t = mask.shape
    hidden = int(stack.config.hidden_size)
    by_layer: dict[int, list[Site]] = {}
    for s in chosen:
        i = int(s.name[len(stack.layer_prefix) + 1 :].split(".", 1)[0])
        by_layer.setdefault(i, []).append(s)
    plans: list[Plan] = []
    site_scores: list[SiteScores] = []
    fold_errors: list[tuple[float, float]] = []
    exact_layers: list[int] = []  # layers checked in float64
    screens: list[float] = []  # the float32 screen's relative errors
    written: dict[str, tuple[int, ...]] = {}
    param_delta = 0
    check = check_window(mask, options) if compiling and options.check_samples > 0 else None
    check_rows = 0 if check is None else int(check[0].numel())
    check_tokens = 0 if check is None else int(mask[check[0]][:, check[1]].sum())
    last = max(by_layer) if by_layer else -1
    tokens = calib.tokens
    pool = BufferPool(options.budget, work if work is not None else Path(tempfile.gettempdir()))
    h_in = pool.allocate((n, t, hidden), stack.dtype)
    h_out = pool.allocate((n, t, hidden), stack.dtype)
    widest = max((sum(s.width for s in ss if s.kind == "neuron") for ss in by_layer.values()), default=0)
    site_buf = pool.allocate((tokens, widest), stack.dtype) if sequential and widest else None
    phases = dict.fromkeys(("embed", "read", "statistics", "check", "fold", "write"), 0.0)
    clock = _Clock(phases)
    with clock("embed"):
        for b0 in range(0, n, options.batch_size):
            part = {k: v[b0 : b0 + options.batch_size] for k, v in calib.inputs.items()}
            h_in[b0 : b0 + options.batch_size] = stack.embed(part)
    for i in range(len(stack)):
        t0 = time.perf_counter()
        if not compiling and i > last:
            break
        with clock("read"):
            raw = stack.read_layer(i)
        mine = by_layer.get(i, [])
        if i > last:  # nothing left to reduce: the layer is copied as it is, without running it
            with clock("write"):
                for k, v in raw.items():
                    if write is not None:
                        write(k, v)
                    written[k] = tuple(v.shape)
            del raw
            continue
        started = time.perf_counter()  # the statistics pass (and the recorded outputs)
        block = stack.block(i, raw)
        data = BlockData(h_in, mask)
        fast = _fast_sites(stack, mine, sequential)
        values = {}
        offset = 0
        for s in fast:  # each FFN site's recorded values: a column range of the shared buffer
            assert site_buf is not None
            values[s.name] = site_buf[:, offset : offset + s.width]
            offset += s.width
        recorder = Recorder(h_in, h_out, mask, values)
        block.recorder = recorder
        plan = None
        with torch.no_grad():
            if mine and compiling:
                plan = plan_reduction(block, data, mine, _block_report(scores, {s.name for s in mine}), **plan_args)
                plan = zero_replacements(plan, zero_sites & {s.name for s in mine})
                plans.append(plan)
            elif mine:
                report = score_model(block, data, sites=mine, **(score_args or {}))
                site_scores.extend(report.sites)
            if distributed.enabled():
                share_outputs(block, data, recorder, values, h_out, site_buf, options.batch_size)
            elif not bool(recorder.done.all()):  # nothing ran every row yet (e.g. --scores)
                for batch in data.batches(options.batch_size):
                    block.run(batch.inputs, capture=list(values))
        block.recorder = None
        phases["statistics"] += time.perf_counter() - started
        if compiling:
            replaced = plan is not None and any(sp.replaced for sp in plan.sites)
            if sequential and replaced:
                assert plan is not None
                if fast:
                    correct(h_out, mask, block, plan, values)
                else:  # the reduced layer runs again (heads, encoders)
                    folded = fold(block.tensors(), block.sites, plan)
                    reduced = block.reduced_module(folded.tensors, plan, in_place=True)
                    del folded
                    with torch.no_grad():
                        for b0 in range(0, n, options.batch_size):
                            b1 = b0 + options.batch_size
                            h_out[b0:b1] = reduced(h_in[b0:b1], mask[b0:b1])
            sites = block.sites
            # The statistics pass's layer, unmodified, screens the fold (float32) after the first
            # checked layer; a layer reduced in place above (sequential) is rebuilt for it.
            exact = not fold_errors or options.check == "float64"
            lent = [] if exact or (sequential and replaced and not fast) else [block]
            del block
            if not lent:
                release()
            if replaced and check_rows:  # one float64 fold: checked here, cast and written below
                assert plan is not None
                assert check is not None
                rows, cols = check
                with clock("check"):
                    tensors, error, screened = _checked_fold(stack, i, raw, plan, h_in[rows][:, cols], mask[rows][:, cols], lent, exact)
                if error is not None:
                    fold_errors.append(error)
                    exact_layers.append(i)
                if screened is not None:
                    screens.append(screened)
            else:
                lent.clear()
                with clock("fold"):
                    tensors = fold(raw, sites, plan).tensors if plan is not None else raw
            with clock("write"):
                for k, v in tensors.items():
                    if write is not None:
                        write(k, v)
                    written[k] = tuple(v.shape)
                    param_delta += v.numel() - (raw[k].numel() if k in raw else 0)
            del tensors, raw
        else:
            del block, raw
        release()
        h_in, h_out = h_out, h_in
        if log is not None:
            dt = time.perf_counter() - t0
            log(f"block {i + 1}/{len(stack)} {stack.layer_path(i)}: {tokens / max(dt, 1e-9):,.0f} tokens/s, "
                f"RSS {rss_bytes() / 2**30:.2f} GB")
    buffers = 2 * n * t * hidden * stack.dtype.itemsize + (site_buf.numel() * site_buf.element_size() if site_buf is not None else 0)
    return BlockRun(plans, site_scores, fold_errors, written, param_delta, check_rows, time.perf_counter() - start,
                    peak_rss_bytes(), buffers, pool.spilled, phases, check_tokens, exact_layers, screens)


class _Clock:
    """Wall seconds per phase of the loop (the compile report's ``engine.phases``), so a slow run
    says where its time went."""

    def __init__(self, phases: dict[str, float]) -> None:
        self.phases = phases

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] += time.perf_counter() - t0


def fold_error_of(run: BlockRun) -> FoldError | None:
    """The largest per-layer fold error (absolute and relative) as a :class:`FoldError`."""
    if not run.fold_errors:
        return None
    return FoldError(max(a for a, _ in run.fold_errors), max(r for _, r in run.fold_errors), run.check_samples)


def check_exact(run: BlockRun, tol: float = 1e-10) -> None:
    """Every layer's fold must match its clamped original to float64 rounding."""
    for a, r in run.fold_errors:
        if not r <= tol:  # NaN fails too
            raise CmrError(
                f"a compiled layer differs from its clamped original by {a:.3g} (relative {r:.3g}, float64)",
                "this model's graph is not supported for exact folding; set CMRTOOL_DEBUG=1 and report it",
            )
