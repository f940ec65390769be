"""The ``cmrtool`` command: a thin client over :mod:`cmrtool.api`.

Each command parses its options, makes one library call and renders the result (JSON on stdout
with ``--json`` or when stdout is not a terminal; a table otherwise; logs and progress on
stderr). The error boundary around a command (``error:`` / ``hint:``, exit codes, signals) is
:func:`cmrtool.cli.main.main`.
"""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from cmrtool import __version__
from cmrtool.score.criteria import ALLOCATIONS, DEFAULT_CRITERION, REGISTRY, REPLACEMENT_MODES

__all__ = ["app"]

CRITERIA = ", ".join(REGISTRY)


def _examples(*lines: str) -> str:
    """An epilog that click prints verbatim (the \\b marker stops it from rewrapping)."""
    return "Examples:\n\n\b\n" + "\n".join(f"  {ln}" for ln in lines)


app = typer.Typer(
    name="cmrtool",
    help=(
        "Reduce trained PyTorch networks by mechanism replacement: score hidden units, replace the "
        "weakest by constants, and fold them exactly into a smaller checkpoint.\n\n"
        "Pipeline: inspect → score → compile → verify → bench (and audit, sweep).  Results go to stdout (JSON with --json or when "
        "piped), logs and progress to stderr.  Exit codes: 0 ok, 1 bad input, 2 bad usage, "
        "3 verification failed.  Set CMRTOOL_DEBUG=1 for tracebacks."
    ),
    epilog=_examples(
        "cmrtool inspect samples/digits_mlp.pt --calib samples/calib.safetensors",
        "cmrtool score samples/digits_mlp.pt --calib samples/calib.safetensors --json > scores.json",
        "cmrtool compile samples/digits_mlp.pt --calib samples/calib.safetensors --keep 0.5 -o reduced.pt",
        "cmrtool verify samples/digits_mlp.pt reduced.pt --data samples/eval.safetensors --min-iia 0.4",
        "cmrtool bench samples/digits_mlp.pt reduced.pt --data samples/calib.safetensors",
        "cmrtool sweep samples/digits_mlp.pt --calib samples/calib.safetensors --data samples/eval.safetensors --plot sweep.png",
    ),
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode=None,
)

# Options shared by several commands.
ModelArg = Annotated[str, typer.Argument(help="TorchScript checkpoint (torch.jit.save; '-' reads stdin), .safetensors weights (with --arch), or a Hugging Face directory (config.json + model.safetensors).", show_default=False)]
ArchOpt = Annotated[Optional[str], typer.Option("--arch", help="For .safetensors weights: pkg.module:factory, a callable that returns the nn.Module (e.g. cmrtool.testing.models:digits_mlp).", show_default=False)]
JsonOpt = Annotated[Optional[bool], typer.Option("--json/--no-json", help="JSON on stdout (default: JSON when stdout is not a terminal).", show_default=False)]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", help="torch CPU threads (default: usable CPUs, at most 4).", show_default=False)]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No logs or progress on stderr.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for criteria that draw (random).")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Samples per forward pass.")]
CalibrationOpt = Annotated[str, typer.Option("--calibration", help="Hugging Face language models (LLaMA, Mistral, Qwen2/3, Gemma, Gemma-2, Gemma-3, Phi-3, GPT-2, GPT-NeoX, OPT, Falcon, Mixtral, Qwen2/3-MoE; encoders BERT, RoBERTa, XLM-RoBERTa, ELECTRA) are processed layer by layer: 'original' (default) calibrates every layer on the original model's hidden states (the one-shot result of the whole-model path); 'sequential' calibrates each layer on the outputs of the layers already reduced, so later choices see earlier reductions (no extra forward pass for decoder FFNs). On the bundled tiny_lm, sequential gave the same perplexity with mean replacement and a worse one with --replacement affine (81.6 vs 81.2 at keep 0.5; benchmarks/RESULTS.md), hence the default. E.g. --calibration sequential.")]
MaxMemoryOpt = Annotated[Optional[str], typer.Option("--max-memory", help="Memory for the calibration hidden states of layer-by-layer processing (e.g. 4GB, 512MB); past it they spill to memory-mapped files in --work-dir. Default: a quarter of the available memory.", show_default=False)]
WorkDirOpt = Annotated[Optional[str], typer.Option("--work-dir", help="Where spilled calibration buffers and output parts go (e.g. --work-dir /scratch). Default: a temporary directory next to the output, removed at the end.", show_default=False)]
SiteOpt = Annotated[Optional[list[str]], typer.Option("--site", help="Site name or glob (repeatable), e.g. --site 'blocks.*.fc1'. Default: every neuron and channel site.", show_default=False)]
KindOpt = Annotated[Optional[list[str]], typer.Option("--kind", help="Only sites of this kind: neuron, channel, head (repeatable). Heads are reduced only when asked for.", show_default=False)]
CriterionOpt = Annotated[str, typer.Option("--criterion", "-c", help=f"Scoring criterion: {CRITERIA}.")]
KeepOpt = Annotated[Optional[float], typer.Option("--keep", help="Fraction of each site's units to keep, in (0, 1].", show_default=False)]
KeepCountOpt = Annotated[Optional[int], typer.Option("--keep-count", help="Number of units to keep per site (instead of --keep).", show_default=False)]
RoundOpt = Annotated[Optional[int], typer.Option("--round-to", help="Keep a multiple of N units per site (GPU-friendly widths).", show_default=False)]
CurvatureOpt = Annotated[str, typer.Option("--curvature", help="Gauss-Newton curvature for cmr-const, cmr-affine, optimal constants and joint refits: auto (closed form for sites feeding the logits, else one sampled draw per sample), exact (one backward pass per class), sampled.")]
ParentsOpt = Annotated[str, typer.Option("--parents", help="Affine replacements: 'all' (every kept unit of the site: one dense least-squares fit, folded into the consumer's kept columns and bias) or N, the N most correlated kept units per replaced unit. E.g. --parents all, --parents 16.")]
LossOpt = Annotated[str, typer.Option("--loss", help="Loss for gradients and curvature: auto (cross-entropy on the data's labels, else KL to the model's own prediction), ce, kl.")]
RidgeOpt = Annotated[float, typer.Option("--ridge", help="Affine replacements and peer R²: ridge, relative to the mean unit variance.")]


def _output(json_mode: bool | None, quiet: bool) -> Any:
    from cmrtool.cli.output import Output

    return Output(json_mode, quiet)


def _setup(threads: int | None) -> None:
    from cmrtool.api import configure
    from cmrtool.options import check_at_least

    check_at_least("--threads", threads, 1, "4 (default: usable CPUs, at most 4)")
    configure(threads)


@app.command(
    epilog=_examples(
        "cmrtool inspect model.pt",
        "cmrtool inspect model.pt --calib calib.safetensors --json | jq '.sites[].name'",
        "cmrtool inspect model.safetensors --arch mypkg.models:build_model",
        "cmrtool inspect ./bert-dir --input-shape 1,128",
    )
)
def inspect(
    model: ModelArg,
    calib: Annotated[Optional[str], typer.Option("--calib", help="Data file whose first sample sizes the MAC count.", show_default=False)] = None,
    input_shape: Annotated[Optional[str], typer.Option("--input-shape", help="Input shape for the MAC count, e.g. 1,1,8,8.", show_default=False)] = None,
    arch: ArchOpt = None,
    json_mode: JsonOpt = None,
    threads: ThreadsOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """List the sites a model offers for reduction: kind, width, activation, fold kind, consumers; and its parameters and MACs."""
    from cmrtool import api
    from cmrtool.cli import render
    from cmrtool.backends.torchscript.discover import no_sites_hint
    from cmrtool.errors import UnsupportedModelError

    out = _output(json_mode, quiet)
    _setup(threads)
    report = api.inspect(model, calib, input_shape, arch)
    out.result(report.to_json(), lambda c: render.inspect_table(report, c))
    if not report.sites:
        raise UnsupportedModelError(f"no reducible sites in {model}", no_sites_hint(report.rejected, report.unsupported))


@app.command(
    epilog=_examples(
        "cmrtool score model.pt --calib calib.safetensors",
        "cmrtool score model.pt --calib calib.safetensors -c vbp --keep 0.5 --json > scores.json",
        "cmrtool score model.pt --calib calib.safetensors --json \\",
        "  | cmrtool compile model.pt --scores - --keep 0.5 -o reduced.pt",
    )
)
def score(
    model: ModelArg,
    calib: Annotated[str, typer.Option("--calib", help="Calibration data (.safetensors with 'input' [and 'labels'], .npz, .npy, .pt; '-' reads stdin).", show_default=False)],
    criterion: CriterionOpt = DEFAULT_CRITERION,
    site: SiteOpt = None,
    kind: KindOpt = None,
    keep: KeepOpt = None,
    keep_count: KeepCountOpt = None,
    round_to: RoundOpt = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Also write the JSON document to this file.", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite --output if it exists.")] = False,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Use at most this many calibration samples.", show_default=False)] = None,
    curvature: CurvatureOpt = "auto",
    loss: LossOpt = "auto",
    parents: ParentsOpt = "all",
    ridge: RidgeOpt = 1e-3,
    batch_size: BatchOpt = 256,
    seed: SeedOpt = 0,
    arch: ArchOpt = None,
    max_memory: MaxMemoryOpt = None,
    work_dir: WorkDirOpt = None,
    json_mode: JsonOpt = None,
    threads: ThreadsOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Score every unit of the selected sites on calibration data (lower score = replaced first). With --keep, also show which units would be kept."""
    import json

    import torch

    from cmrtool import api
    from cmrtool.cli import render
    from cmrtool.distributed import is_writer
    from cmrtool.io.files import atomic_write_bytes, check_output_path
    from cmrtool.reduce.selection import choose_kept, kept_width, validate_keep

    out = _output(json_mode, quiet)
    validate_keep(keep, keep_count, round_to)
    if output is not None:
        check_output_path(output, [model, calib], force)
    _setup(threads)
    report = api.score(model, calib, criterion, site, kind, seed, batch_size, limit, out.progress, curvature, parents, ridge, loss, arch,
                       max_memory=max_memory, work_dir=work_dir)
    doc = report.to_json()
    if keep is not None or keep_count is not None:
        for s in doc["sites"]:
            k = kept_width(s["name"], s["width"], keep, keep_count, round_to)
            s["kept"] = list(choose_kept(torch.tensor(s["scores"], dtype=torch.float64), k)[0])
    if output is not None and is_writer():  # under torchrun, rank 0 writes
        atomic_write_bytes(output, (json.dumps(doc, indent=2, allow_nan=False) + "\n").encode())
        out.log(f"wrote {output}")
    out.result(doc, lambda c: render.score_table(doc, c))


@app.command(
    name="compile",
    epilog=_examples(
        "cmrtool compile model.pt --calib calib.safetensors --keep 0.5 -o reduced.pt",
        "cmrtool compile model.pt --calib calib.safetensors --site body.2 --keep-count 128 --round-to 8 -o reduced.pt",
        "cmrtool score model.pt --calib calib.safetensors --json \\",
        "  | cmrtool compile model.pt --scores - --keep 0.5 -o reduced.pt",
        "cmrtool compile model.safetensors --arch mypkg.models:build_model --calib calib.safetensors --keep 0.5 -o reduced.safetensors",
        "cmrtool compile ./llama-dir --calib calib.safetensors --kind head --keep-count 4 -o ./llama-reduced/ --onnx reduced.onnx",
        "cmrtool compile ./llama-8b --calib tokens.safetensors --keep 0.5 --max-memory 2GB --work-dir /scratch -o ./llama-8b-ffn50/",
        "cmrtool compile ./llama-dir --calib tokens.safetensors --keep 0.5 --calibration original -o ./llama-reduced/",
    ),
)
def compile_(
    model: ModelArg,
    output: Annotated[str, typer.Option("--output", "-o", help="What to write (refuses to overwrite without --force): reduced.pt for TorchScript input; reduced.safetensors for .safetensors or Hugging Face input (cmrtool rebuilds it); DIR/ (trailing slash) for a Hugging Face directory that from_pretrained loads (equal widths in every layer); reduced.onnx for ONNX only.", show_default=False)],
    calib: Annotated[Optional[str], typer.Option("--calib", help="Calibration data: scores the model, and checks the fold error of the result.", show_default=False)] = None,
    scores: Annotated[Optional[str], typer.Option("--scores", help="Scores from 'cmrtool score --json' ('-' reads stdin) instead of scoring here.", show_default=False)] = None,
    keep: KeepOpt = None,
    keep_count: KeepCountOpt = None,
    round_to: RoundOpt = None,
    criterion: CriterionOpt = DEFAULT_CRITERION,
    replacement: Annotated[str, typer.Option("--replacement", help=f"What replaced units become: {', '.join(REPLACEMENT_MODES)} (auto = the criterion's choice; zero = delete without folding; optimal = c* of the loss proxy; affine = a ridge fit on kept parent units; affine-nobias = the same without intercept, for consumers without a bias; e.g. --criterion cmr-lsq --replacement affine).")] = "auto",
    allocation: Annotated[str, typer.Option("--allocation", help=f"{' or '.join(ALLOCATIONS)}: keep the fraction per site, or rank all sites' units together (criteria on a common scale: cmr-const, gndi, cmr-logit on sites feeding the logits).")] = "site",
    schedule: Annotated[int, typer.Option("--schedule", help="Reduce in K steps, re-scoring the partly reduced model after each (iterative recomputation).")] = 1,
    joint_refit: Annotated[bool, typer.Option("--joint-refit", help="Refit each site's constants jointly under the full curvature of the logits.")] = False,
    parents: ParentsOpt = "all",
    ridge: RidgeOpt = 1e-3,
    curvature: CurvatureOpt = "auto",
    loss: LossOpt = "auto",
    site: SiteOpt = None,
    kind: KindOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite the output if it exists (never an input).")] = False,
    check_samples: Annotated[int, typer.Option("--check-samples", help="Calibration samples used to measure the fold error (0 skips the check). Layer-by-layer models check every layer on a window of 64 kept tokens of the first samples (see --fold-check).")] = 256,
    fold_check: Annotated[str, typer.Option("--fold-check", help="Layer-by-layer models: 'auto' checks the first reduced layer in float64 (exact to float64 rounding) and screens the others in float32 against a rounding bound of 4·eps·√width, checking any layer above it in float64, which decides; 'float64' checks every layer in float64 (about 0.4 forward passes more at 2,048 calibration tokens of an 8B model). E.g. --fold-check float64.")] = "auto",
    onnx: Annotated[Optional[str], typer.Option("--onnx", help="Also export the reduced model to this .onnx file, checked with onnx.checker and onnxruntime (needs --calib).", show_default=False)] = None,
    batch_size: BatchOpt = 256,
    seed: SeedOpt = 0,
    arch: ArchOpt = None,
    calibration: CalibrationOpt = "original",
    max_memory: MaxMemoryOpt = None,
    work_dir: WorkDirOpt = None,
    json_mode: JsonOpt = None,
    threads: ThreadsOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Replace the lowest-scoring units of each site and fold them exactly into a smaller checkpoint, with the plan embedded; then measure the fold error against the original with those units clamped."""
    from cmrtool import api
    from cmrtool.cli import render

    out = _output(json_mode, quiet)
    _setup(threads)
    report = api.compile(
        model, output, calib=calib, scores=scores, criterion=criterion, sites=site, kinds=kind,
        keep=keep, keep_count=keep_count, round_to=round_to, replacement=replacement, seed=seed,
        batch_size=batch_size, force=force, check_samples=check_samples, progress=out.progress, warn=out.warn,
        allocation=allocation, schedule=schedule, joint_refit=joint_refit, parents=parents, ridge=ridge, curvature=curvature,
        loss=loss, arch=arch, onnx=onnx, calibration=calibration, max_memory=max_memory, work_dir=work_dir,
        fold_check=fold_check,
    )
    out.result(report.to_json(), lambda c: render.compile_table(report, c))


@app.command(
    epilog=_examples(
        "cmrtool verify model.pt reduced.pt --data heldout.safetensors",
        "cmrtool verify model.pt reduced.pt --data heldout.safetensors --swaps 2000 --min-iia 0.9 --max-kl 0.5",
        "cmrtool verify model.pt reduced.pt --data heldout.safetensors --onnx reduced.onnx --json > report.json",
        "cmrtool verify model.safetensors reduced.safetensors --arch mypkg.models:build_model --data heldout.safetensors",
        "cmrtool verify ./bert-dir ./bert-reduced --data heldout.safetensors",
    )
)
def verify(
    original: Annotated[str, typer.Argument(help="The original checkpoint (TorchScript, .safetensors with --arch, or a Hugging Face directory).", show_default=False)],
    reduced: Annotated[str, typer.Argument(help="The checkpoint cmrtool compile wrote from it (its plan travels inside).", show_default=False)],
    data: Annotated[str, typer.Option("--data", help="Held-out data ('input' [and 'labels']).", show_default=False)],
    swaps: Annotated[int, typer.Option("--swaps", help="Interchange interventions per site (and for all sites together).")] = 2000,
    p: Annotated[float, typer.Option("--p", help="Probability that a retained unit takes the source's activation.")] = 0.5,
    site: Annotated[Optional[list[str]], typer.Option("--site", help="Verify only this planned site (repeatable). Default: every site of the plan.", show_default=False)] = None,
    min_iia: Annotated[Optional[float], typer.Option("--min-iia", help="Fail (exit 3) if any site's or the all-sites IIA is below this.", show_default=False)] = None,
    max_kl: Annotated[Optional[float], typer.Option("--max-kl", help="Fail (exit 3) if any site's or the all-sites interchange KL(low‖high) is above this.", show_default=False)] = None,
    max_fold_error: Annotated[Optional[float], typer.Option("--max-fold-error", help="Fail (exit 3) if max |R(x) − O_clamped(x)| is above this.", show_default=False)] = None,
    onnx: Annotated[Optional[str], typer.Option("--onnx", help="An ONNX export of the reduced model: report onnxruntime vs torch max |diff|.", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples or swaps per forward pass, at least (passes grow up to 32 MB of cached activations).")] = 256,
    seed: SeedOpt = 0,
    arch: ArchOpt = None,
    json_mode: JsonOpt = None,
    threads: ThreadsOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Check a reduced model against its original: fold error, plain fidelity, and interchange interventions per site and for all sites (IIA with a 95% interval, KL, D2, the margin certificate). Exit code 3 when a threshold fails."""
    from cmrtool import api
    from cmrtool.cli import render
    from cmrtool.errors import VerificationFailed

    out = _output(json_mode, quiet)
    _setup(threads)
    report = api.verify(
        original, reduced, data, swaps=swaps, p=p, seed=seed, sites=site, batch_size=batch_size,
        min_iia=min_iia, max_kl=max_kl, max_fold_error=max_fold_error, onnx=onnx, progress=out.progress, arch=arch,
    )
    out.result(report.to_json(), lambda c: render.verify_table(report, c))
    if not report.passed:
        raise VerificationFailed("verification failed: " + "; ".join(report.failures), "see the report on stdout; relax the thresholds or keep more units")


@app.command(
    epilog=_examples(
        "cmrtool bench model.pt reduced.pt --data calib.safetensors",
        "cmrtool bench model.pt reduced.pt --input-shape 1,1,8,8 --batch 256 --device cuda --dtype fp16",
        "cmrtool bench model.pt reduced.pt reduced.onnx --repeats 100 --json > bench.json",
        "cmrtool bench model.safetensors reduced.safetensors --arch mypkg.models:build_model --data calib.safetensors",
        "cmrtool bench ./llama ./llama-ffn/ --data eval.safetensors --batch 8 --prompt-tokens 128 --decode-tokens 32 --repeats 5",
    )
)
def bench(
    models: Annotated[list[str], typer.Argument(help="Checkpoints (TorchScript .pt, .safetensors with --arch, reduced .safetensors, Hugging Face directories) and ONNX files (.onnx, run by onnxruntime) taking the same inputs; the first is the baseline.", show_default=False)],
    data: Annotated[Optional[str], typer.Option("--data", help="Data file whose first --batch samples are the benchmark batch.", show_default=False)] = None,
    input_shape: Annotated[Optional[list[str]], typer.Option("--input-shape", help="Shape of a random input, e.g. 1,1,8,8 (the batch dimension becomes --batch); repeat for several inputs. Default: the shapes a reduced model recorded at compile time.", show_default=False)] = None,
    batch: Annotated[int, typer.Option("--batch", "--batch-size", help="Samples per timed forward pass.")] = 64,
    device: Annotated[str, typer.Option("--device", help="auto (the GPU when torch sees one, else the CPU), cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="fp16, bf16 or fp32. On a CPU without native fp16, fp16 falls back to fp32 and the report says so.")] = "fp16",
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed rounds before timing.")] = 5,
    repeats: Annotated[int, typer.Option("--repeats", help="Timed rounds; each runs every model once, alternating.")] = 30,
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", help="Causal LMs (Hugging Face directories): prompt length of the prefill timing, e.g. --prompt-tokens 512.")] = 128,
    decode_tokens: Annotated[int, typer.Option("--decode-tokens", help="Causal LMs: greedy decode steps timed with the KV cache, at batch 1 and --batch (0 skips prefill/decode timing), e.g. --decode-tokens 64.")] = 32,
    arch: ArchOpt = None,
    json_mode: JsonOpt = None,
    threads: ThreadsOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Parameters, file size and MACs (per site and total) beside measured latency and throughput; each model's speedup over the first next to its MAC ratio (the MAC-ideal speedup)."""
    from cmrtool import api
    from cmrtool.cli import render

    out = _output(json_mode, quiet)
    _setup(threads)
    report = api.bench(
        models, data=data, input_shapes=input_shape, batch=batch, device=device, dtype=dtype,
        warmup=warmup, repeats=repeats, progress=out.progress, warn=out.warn, arch=arch,
        prompt_tokens=prompt_tokens, decode_tokens=decode_tokens,
    )
    out.result(report.to_json(), lambda c: render.bench_table(report, c))


@app.command(
    epilog=_examples(
        "cmrtool audit model.pt --calib calib.safetensors",
        "cmrtool audit model.pt --calib calib.safetensors --criteria cmr-logit,cmr-const,vbp --seeds 10 --validate 64",
        "cmrtool audit model.pt --calib calib.safetensors --scale-range 0.1,10 --json > audit.json",
        "cmrtool audit model.safetensors --arch mypkg.models:build_model --calib calib.safetensors",
    )
)
def audit(
    model: ModelArg,
    calib: Annotated[str, typer.Option("--calib", help="Calibration data for scoring (and for validation).", show_default=False)],
    criteria: Annotated[str, typer.Option("--criteria", help=f"Comma-separated criteria to audit ({CRITERIA}).")] = "cmr-logit,vbp,magnitude,random",
    keep: Annotated[float, typer.Option("--keep", help="Fraction of units each kept set holds.")] = 0.5,
    seeds: Annotated[int, typer.Option("--seeds", help="Random rescalings (Jaccard mean ± sd over them).")] = 10,
    scale_range: Annotated[str, typer.Option("--scale-range", help="Rescaling factors are drawn log-uniformly from this range.")] = "0.01,100",
    validate: Annotated[int, typer.Option("--validate", help="Also measure the true damage of replacing N sampled units alone and its rank correlation with each criterion.")] = 0,
    site: SiteOpt = None,
    batch_size: BatchOpt = 256,
    arch: ArchOpt = None,
    json_mode: JsonOpt = None,
    threads: ThreadsOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Reparameterization audit: rescale every ReLU unit (inverse on its consumers), check the function is unchanged, and report how much each criterion's kept set moves (Jaccard); with --validate, how well each criterion predicts the true damage of replacing a unit (Spearman, Kendall)."""
    from cmrtool import api
    from cmrtool.cli import render
    from cmrtool.errors import UsageError

    try:
        lo, hi = (float(v) for v in scale_range.split(","))
    except ValueError:
        raise UsageError(f"invalid --scale-range '{scale_range}'", "give two numbers, e.g. --scale-range 0.01,100") from None
    out = _output(json_mode, quiet)
    _setup(threads)
    report = api.audit(
        model, calib, criteria, site, keep, seeds, (lo, hi), validate,
        batch_size, out.progress, arch,
    )
    out.result(report.to_json(), lambda c: render.audit_table(report, c))


@app.command(
    epilog=_examples(
        "cmrtool sweep model.pt --calib calib.safetensors --data heldout.safetensors",
        "cmrtool sweep model.pt --calib calib.safetensors --data heldout.safetensors \\",
        "  --keep 0.9,0.75,0.5,0.25 --criterion cmr-logit,vbp,random --plot sweep.png",
        "cmrtool sweep model.pt --calib calib.safetensors --data heldout.safetensors --site body.3 --swaps 500 --json > sweep.json",
        "cmrtool sweep model.pt --calib calib.safetensors --data heldout.safetensors --keep 0.5 --keep-models reduced/",
    )
)
def sweep(
    model: Annotated[str, typer.Argument(help="TorchScript checkpoint, .safetensors weights (with --arch) or a Hugging Face directory; read once per reduction, so not stdin.", show_default=False)],
    calib: Annotated[str, typer.Option("--calib", help="Calibration data for scoring and the fold check.", show_default=False)],
    data: Annotated[str, typer.Option("--data", help="Held-out data for verification ('input' [and 'labels']).", show_default=False)],
    keep: Annotated[str, typer.Option("--keep", help="Comma-separated keep fractions, each in (0, 1].")] = "0.9,0.75,0.5,0.25",
    criterion: Annotated[str, typer.Option("--criterion", "-c", help=f"Comma-separated criteria ({CRITERIA}).")] = "cmr-logit,vbp,random",
    swaps: Annotated[int, typer.Option("--swaps", help="Interchange interventions per site (and for all sites together), as in verify.")] = 2000,
    p: Annotated[float, typer.Option("--p", help="Probability that a retained unit takes the source's activation.")] = 0.5,
    plot: Annotated[Optional[str], typer.Option("--plot", help="Also write a PNG of IIA and KL against MACs kept, one line per criterion (needs matplotlib: pip install 'cmrtool[plot]').", show_default=False)] = None,
    keep_models: Annotated[Optional[str], typer.Option("--keep-models", help="Keep the reduced checkpoints in this directory (default: a temporary one, removed).", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite the plot and kept checkpoints if they exist.")] = False,
    site: SiteOpt = None,
    kind: KindOpt = None,
    batch_size: BatchOpt = 256,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the swap draws and of criteria that draw (random).")] = 0,
    arch: ArchOpt = None,
    json_mode: JsonOpt = None,
    threads: ThreadsOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Compile and verify the model at every keep fraction with every criterion: a table (or JSON rows) of params, MACs, accuracy, agreement, IIA and KL, and with --plot a PNG of the trade-off."""
    from cmrtool import api
    from cmrtool.cli import render

    out = _output(json_mode, quiet)
    _setup(threads)
    report = api.sweep(
        model, calib, data, keeps=keep, criteria=criterion, sites=site, kinds=kind, swaps=swaps, p=p, seed=seed,
        batch_size=batch_size, plot=plot, keep_models=keep_models, force=force, progress=out.progress, warn=out.warn,
        arch=arch,
    )
    out.result(report.to_json(), lambda c: render.sweep_table(report, c))
    if plot is not None:
        out.log(f"wrote {plot}")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cmrtool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    pass
