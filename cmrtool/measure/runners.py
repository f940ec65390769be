"""What the benchmark times: checkpoints under torch, ``.onnx`` files under onnxruntime.

Every model becomes a no-argument *runner*: one forward pass on the benchmark batch, already
converted to the device and precision (:mod:`cmrtool.measure.precision`), with a trial call made up front
so that a model that does not accept the inputs fails before timing starts, with a clear message.
The batch is the first ``batch`` samples of a data file, else seeded random tensors of the given
shapes (or of the shapes a reduced model recorded at compile time). onnxruntime runs a model in
the precision it was exported in, with as many threads as torch and without busy-waiting workers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from cmrtool.errors import CmrError, InputError, UsageError
from cmrtool.measure.precision import Target

__all__ = ["BenchModel", "load_bench_model", "benchmark_inputs", "make_runners", "torch_runner", "onnx_session", "onnx_runner", "onnx_precision", "error_detail"]


@dataclass
class BenchModel:
    """A model to time: a TorchScript backend model or an onnxruntime session."""

    path: str
    sha256: str
    file_bytes: int
    params: int
    model: Any = None  # a backend model (TorchScriptModel or ModuleModel)
    session: Any = None  # onnxruntime.InferenceSession

    @property
    def format(self) -> str:
        return "onnx" if self.session is not None else str(self.model.format)


def load_bench_model(path: str, threads: int, target: Target, note: Callable[[str], None], arch: str | None = None) -> BenchModel:
    """Open a checkpoint with its backend, or an ``.onnx`` file with onnxruntime.

    ``arch`` applies to ``.safetensors`` files only (a reduced one names its own). ONNX
    parameters are the elements of the graph's initializers; its MACs are not counted.
    """
    from cmrtool.io.files import read_bytes, require_file, sha256_file

    if Path(path).suffix.lower() != ".onnx":
        from cmrtool.backends import load_model

        model = load_model(path, arch if Path(path).suffix.lower() == ".safetensors" else None)
        if path == "-":
            size = len(read_bytes(path))
        elif Path(path).is_dir():
            size = sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())
        else:
            size = Path(path).stat().st_size
        return BenchModel(path, model.sha256, size, model.num_params(), model=model)
    require_file(path, "model file")
    try:
        import onnx

        proto = onnx.load(path, load_external_data=False)
    except Exception as e:
        raise InputError(f"{path} is not a readable ONNX model ({type(e).__name__})", "export it again with torch.onnx.export") from e
    params = sum(int(torch.Size(t.dims).numel()) for t in proto.graph.initializer)
    session, notes = onnx_session(path, threads, target.cuda)
    if onnx_precision(session) != target.dtype_name:
        notes.append(f"{Path(path).name} runs in {onnx_precision(session)}, the precision it was exported in")
    for n in [f"{Path(path).name}: MACs are not counted for ONNX models; params = initializer elements", *notes]:
        note(n)
    return BenchModel(path, sha256_file(path), Path(path).stat().st_size, params, session=session)


def _shapes_from(loaded: Sequence[BenchModel]) -> list[list[int]] | None:
    """Input shapes a reduced model recorded at compile time, or an ONNX model's static ones."""
    for e in loaded:
        if e.model is not None and e.model.plan is not None:
            recorded = dict(e.model.plan.settings).get("input_shapes")
            if recorded:
                return [list(s) for s in recorded]
    for e in loaded:
        if e.session is not None:
            shapes = [i.shape for i in e.session.get_inputs()]
            if all(all(isinstance(d, int) for d in s[1:]) for s in shapes):
                return [[1, *s[1:]] for s in shapes]
    return None


def benchmark_inputs(loaded: Sequence[BenchModel], data: str | None, shapes: Sequence[Sequence[int]] | None, batch: int) -> tuple[list[torch.Tensor], str]:
    """The benchmark batch (CPU, the first TorchScript model's dtype) and where it came from."""
    from cmrtool.io.data import Dataset
    from cmrtool.measure.inspection import example_inputs

    ref = next((e.model for e in loaded if e.model is not None), None)
    if ref is None:
        names = [i.name for i in loaded[0].session.get_inputs()]
        ref = SimpleNamespace(arg_names=names, required_args=len(names), dtype=torch.float32)
    if data is not None:
        ds = Dataset(data, ref.arg_names, ref.required_args, ref.dtype)
        if ds.n < batch:
            raise InputError(f"{data} has {ds.n} samples, --batch {batch} needs {batch}", f"use --batch {ds.n} or a larger data file")
        return list(ds.read(0, batch, labels=False).inputs), f"first {batch} samples of {data}"
    source = "--input-shape"
    if not shapes:
        shapes = _shapes_from(loaded)
        source = "input shapes recorded in a model"
        if not shapes:
            raise UsageError("bench needs an input to time the models on", "pass --data FILE or --input-shape 1,1,8,8 (the batch dimension becomes --batch)")
    inputs = example_inputs(ref, [[batch, *s[1:]] for s in shapes])
    g = torch.Generator().manual_seed(0)
    for t in inputs:
        if t.is_floating_point():
            t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype))
    return inputs, f"random tensors ({source})"


def make_runners(loaded: Sequence[BenchModel], inputs: list[torch.Tensor], target: Target) -> tuple[list[Callable[[], Any]], Exception | None, int]:
    """One runner per model, or the first failure and the index of the model that failed."""
    runners = []
    for i, e in enumerate(loaded):
        try:
            if e.session is not None:
                runners.append(onnx_runner(e.session, inputs))
            else:
                args = e.model.arg_names
                if not e.model.required_args <= len(inputs) <= len(args):
                    raise InputError(
                        f"{e.path} takes {len(args)} inputs ({', '.join(args)}), the benchmark has {len(inputs)}",
                        "bench models with the same forward signature (an original and its reductions)",
                    )
                names = args if getattr(e.model, "by_name", False) else None
                runners.append(torch_runner(e.model.fresh_module(), inputs, target, names))
        except CmrError:
            raise
        except Exception as err:  # torch and onnxruntime raise their own types
            return [], err, i
    return runners, None, -1


def error_detail(err: Exception) -> str:
    """The last line of an exception's message (TorchScript puts the cause there), shortened."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else type(err).__name__)[:200]


def _cast(t: torch.Tensor, target: Target) -> torch.Tensor:
    dtype = target.dtype if t.is_floating_point() else t.dtype
    return t.to(device=target.device, dtype=dtype)


def torch_runner(module: Any, inputs: Sequence[torch.Tensor], target: Target, names: Sequence[str] | None = None) -> Callable[[], Any]:
    """A no-argument forward call of ``module`` (converted to the target) on the converted inputs
    (passed by these ``names`` when given: a model whose inputs are not its first arguments).

    Raises RuntimeError (from torch) when the module rejects the inputs or the precision.
    """
    module = module.to(device=target.device, dtype=target.dtype).eval()
    args = [_cast(t, target) for t in inputs]

    def run() -> Any:
        with torch.no_grad():
            return module(**dict(zip(names, args))) if names else module(*args)

    run()  # fail here, not inside the timing loop
    target.sync()
    return run


def onnx_session(path: str, threads: int, cuda: bool) -> tuple[Any, list[str]]:
    """An onnxruntime session (CUDA provider when asked for and available) and notes."""
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise InputError("onnxruntime is not installed", "pip install onnxruntime (or onnxruntime-gpu)") from e
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # onnxruntime's workers spin after each run by default; alternating with torch models, they
    # would hold the CPUs that torch's threads need next.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    notes: list[str] = []
    providers = ["CPUExecutionProvider"]
    if cuda:
        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
            notes.append(f"{Path(path).name}: onnxruntime timings include copying inputs and outputs between host and GPU")
        else:
            notes.append(f"{Path(path).name}: this onnxruntime has no CUDA provider; timed on the CPU (install onnxruntime-gpu)")
    try:
        session = ort.InferenceSession(path, sess_options=opts, providers=providers)
    except Exception as e:
        raise InputError(
            f"{path} is not a model onnxruntime can load: {str(e).strip().splitlines()[0][:200]}",
            "export it again with torch.onnx.export and check it with onnx.checker",
        ) from e
    return session, notes


_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64", "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool"}
_ORT_PRECISION = {"tensor(float)": "fp32", "tensor(float16)": "fp16", "tensor(bfloat16)": "bf16", "tensor(double)": "fp64"}


def onnx_precision(session: Any) -> str:
    """The precision an ONNX model runs in: that of its first floating input (fp32 if none)."""
    for spec in session.get_inputs():
        if spec.type in _ORT_PRECISION:
            return _ORT_PRECISION[spec.type]
    return "fp32"


def onnx_runner(session: Any, inputs: Sequence[torch.Tensor]) -> Callable[[], Any]:
    """A no-argument ``session.run`` on the inputs, converted to the types the graph declares."""
    declared = session.get_inputs()
    if len(inputs) < len(declared):
        raise InputError(
            f"the ONNX model takes {len(declared)} inputs ({', '.join(i.name for i in declared)}), {len(inputs)} given",
            "give every input with --input-shape (repeatable) or a --data file with all of them",
        )
    feed = {}
    for spec, t in zip(declared, inputs):
        batch = spec.shape[0] if spec.shape else None
        if isinstance(batch, int) and batch != t.shape[0]:
            raise InputError(
                f"the ONNX model's input '{spec.name}' has a fixed batch size of {batch}, the benchmark batch is {t.shape[0]}",
                f"use --batch {batch}, or export with dynamic_axes={{'{spec.name}': {{0: 'batch'}}}}",
            )
        feed[spec.name] = t.detach().cpu().numpy().astype(_ORT_TYPES.get(spec.type, "float32"))

    def run() -> Any:
        return session.run(None, feed)

    run()
    return run
