"""bench: the JSON contract, MACs beside measured speed, the CPU fallback notices, ONNX timing,
the alternating protocol, and bad input. Timings are tiny (--repeats 3 --warmup 1)."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import SAMPLES, TinyMLP, build, save_ts

from cmrtool import api
from cmrtool.measure import precision
from cmrtool.backends.torchscript.model import TorchScriptModel
from cmrtool.measure.bench import width_notes
from cmrtool.measure.timing import contention_note, paired_speedup, spread, time_alternating

MLP = SAMPLES / "digits_mlp.pt"
CALIB = SAMPLES / "calib.safetensors"
FAST = ("--repeats", "3", "--warmup", "1", "--batch", "8")
MLP_MACS, REDUCED_MACS = 84480, 64 * 128 + 128 * 128 + 128 * 10


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "mlp_r.pt"
    api.compile(MLP, out, calib=CALIB, keep=0.5)
    return out


@pytest.fixture(scope="module")
def mlp_onnx(tmp_path_factory):
    """The digits MLP exported with the legacy exporter (needed for ScriptModules), dynamic batch."""
    path = tmp_path_factory.mktemp("onnx") / "mlp.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            torch.jit.load(str(MLP)), (torch.zeros(2, 1, 8, 8),), str(path), dynamo=False,
            input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
        )
    return path


@pytest.fixture
def no_cuda(monkeypatch):
    """A CPU-only machine without native fp16, whatever this one has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(precision, "cpu_native", lambda dtype: False)


def test_json_contract_and_figures(cli, reduced, no_cuda):
    r = cli("bench", MLP, reduced, "--data", CALIB, *FAST)
    assert r.code == 0, r.err
    d = r.json()
    assert {"schema_version", "tool_version", "device", "dtype", "models", "speedup", "mac_ratio"} <= set(d)
    assert d["device"] == "cpu" and d["batch"] == 8 and d["input_shapes"] == [[8, 1, 8, 8]]
    first, second = d["models"]
    for m in (first, second):
        assert {"path", "params", "macs", "throughput", "latency_ms", "latency_p10_ms", "latency_p90_ms", "file_bytes", "sites"} <= set(m)
        assert len(m["latencies_ms"]) == 3
        assert m["latency_p10_ms"] <= m["latency_ms"] <= m["latency_p90_ms"]
        assert m["throughput"] == pytest.approx(8 / (m["latency_ms"] / 1e3))
    assert (first["params"], first["macs"]) == (85002, MLP_MACS)
    assert (second["params"], second["macs"]) == (TorchScriptModel(reduced).num_params(), REDUCED_MACS)
    assert first["file_bytes"] == MLP.stat().st_size
    assert first["speedup"] is None and first["mac_ratio"] is None
    assert d["mac_ratio"] == second["mac_ratio"] == pytest.approx(MLP_MACS / REDUCED_MACS)
    assert d["speedup"] == second["speedup"] > 0
    assert second["speedup_realized"] == pytest.approx(second["speedup"] / second["mac_ratio"])
    # per-site MACs: producer + consumer layers, at the reduced widths
    assert first["sites"] == [
        {"name": "body.0", "kind": "neuron", "width": 256, "macs": 64 * 256 + 256 * 256},
        {"name": "body.3", "kind": "neuron", "width": 256, "macs": 256 * 256 + 256 * 10},
    ]
    assert [(s["width"], s["macs"]) for s in second["sites"]] == [(128, 64 * 128 + 128 * 128), (128, 128 * 128 + 128 * 10)]
    assert "timing 2 models (cpu, fp32): 64 samples" in r.err  # progress: (1 + 3) rounds x 2 models x 8


def test_cpu_fallback_is_said_on_stderr_in_json_and_in_the_table(cli, reduced, no_cuda):
    r = cli("bench", MLP, reduced, "--data", CALIB, *FAST)
    assert r.code == 0, r.err
    d = r.json()
    assert d["dtype"] == "fp32" and d["requested_dtype"] == "fp16"
    assert [m["dtype"] for m in d["models"]] == ["fp32", "fp32"]
    assert any("CUDA is not available" in n and "fp32" in n for n in d["notes"])
    assert "warning: CUDA is not available" in r.err
    t = cli("bench", MLP, reduced, "--data", CALIB, *FAST, "--no-json")
    assert t.code == 0 and "fp32 (requested fp16)" in t.out
    assert "CUDA is not available" not in t.out and t.err.count("warning: CUDA is not available") == 1  # said once
    assert "MAC ratio" in t.out and "speedup" in t.out and "body.0" in t.out


def test_fp16_runs_on_a_cpu_with_native_fp16(cli, reduced, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(precision, "cpu_native", lambda dtype: True)
    d = cli("bench", MLP, reduced, "--data", CALIB, *FAST).json()
    assert d["dtype"] == "fp16" and not any("fp32" in n for n in d["notes"])


def test_bf16_and_fp32_on_cpu(cli, reduced, no_cuda):
    d = cli("bench", MLP, reduced, "--input-shape", "1,1,8,8", "--dtype", "bf16", *FAST).json()
    assert d["dtype"] == d["requested_dtype"] == "bf16" and d["models"][1]["macs"] == REDUCED_MACS
    d = cli("bench", MLP, "--input-shape", "1,1,8,8", "--dtype", "float32", *FAST).json()
    assert d["dtype"] == "fp32" and not any("fp16" in n for n in d["notes"]) and d["speedup"] is None


class _FixedFloat32(torch.nn.Module):
    """Multiplies by a float32 constant made inside forward: runs in fp32, fails in bf16."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) @ torch.ones(3, 2)


def test_a_model_that_fails_in_the_requested_precision_is_timed_in_fp32(cli, tmp_path, no_cuda):
    path = tmp_path / "m.pt"
    torch.jit.script(_FixedFloat32().eval()).save(str(path))
    r = cli("bench", path, "--input-shape", "1,4", "--dtype", "bf16", *FAST)
    assert r.code == 0, r.err
    d = r.json()
    assert d["dtype"] == "fp32" and d["requested_dtype"] == "bf16"
    assert any("does not run in bf16" in n and "timing in fp32" in n for n in d["notes"])


def test_cli_import_stays_light():
    import subprocess
    import sys

    code = "import sys, cmrtool.cli.main; print(sorted({'torch', 'onnx', 'onnxruntime'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_cuda_request_without_cuda_is_an_error(cli, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = cli("bench", MLP, "--input-shape", "1,1,8,8", "--device", "cuda", *FAST)
    assert r.code == 1 and r.out == ""
    assert "error: --device cuda was asked for" in r.err and "hint: " in r.err and "--device cpu" in r.err


def test_input_shapes_come_from_the_reduced_models_plan(cli, reduced, no_cuda):
    d = cli("bench", MLP, reduced, *FAST).json()
    assert "recorded" in d["inputs"] and d["input_shapes"] == [[8, 1, 8, 8]]
    d = cli("bench", MLP, reduced, "--input-shape", "5,1,8,8", *FAST).json()
    assert "--input-shape" in d["inputs"] and d["input_shapes"] == [[8, 1, 8, 8]]  # batch dim replaced


def test_onnx_model_is_timed_with_onnxruntime(cli, reduced, mlp_onnx, no_cuda):
    d = cli("bench", MLP, reduced, mlp_onnx, "--data", CALIB, *FAST).json()
    onnx = d["models"][2]
    assert onnx["runtime"] == "onnxruntime" and onnx["format"] == "onnx" and onnx["dtype"] == "fp32"
    assert onnx["params"] == 85002 and onnx["macs"] is None and onnx["mac_ratio"] is None
    assert onnx["speedup"] > 0 and len(onnx["latencies_ms"]) == 3
    assert any("MACs are not counted for ONNX" in n for n in d["notes"])
    assert d["speedup"] == d["models"][1]["speedup"]  # top level: models[1] vs models[0]


def test_onnx_with_a_fixed_batch_says_how_to_fix_it(cli, tmp_path):
    path = tmp_path / "fixed.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(torch.jit.load(str(MLP)), (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False, input_names=["x"])
    r = cli("bench", path, "--device", "cpu", "--dtype", "fp32", *FAST)
    assert r.code == 1 and "fixed batch size of 1" in r.err and "--batch 1" in r.err
    d = cli("bench", path, "--device", "cpu", "--dtype", "fp32", "--repeats", "2", "--batch", "1").json()
    assert d["input_shapes"] == [[1, 1, 8, 8]]  # the ONNX model's static shape sized the input


def test_widths_not_a_multiple_of_8_are_flagged_on_cuda_only(tmp_path):
    out = tmp_path / "r.pt"
    api.compile(MLP, out, calib=CALIB, keep_count=100)
    plan = TorchScriptModel(out).plan
    notes = width_notes([(str(MLP), None), (str(out), plan)], cuda=True)
    assert len(notes) == 1 and "body.0 100" in notes[0] and "--round-to 8" in notes[0]
    assert width_notes([(str(out), plan)], cuda=False) == []


def test_alternating_protocol_rotates_and_pairs():
    calls: list[str] = []
    runs = [lambda: calls.append("a"), lambda: calls.append("b")]
    done = []
    times = time_alternating(runs, warmup=1, repeats=3, advance=done.append)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]  # A B, B A, ...: no model always first
    assert [len(t) for t in times] == [3, 3] and sum(done) == 8
    s = spread([float(x) for x in range(1, 12)])
    assert (s.median, s.p10, s.p90) == (6.0, 2.0, 10.0)
    sp = paired_speedup([2.0, 4.0, 6.0], [1.0, 1.0, 3.0])  # per-round ratios 2, 4, 2
    assert (sp.median, sp.p10, sp.p90) == pytest.approx((2.0, 2.0, 3.6))


def test_busy_cpus_are_flagged():
    assert contention_note(1.0, cpus=2, threads=2) is None  # only this process
    assert contention_note(1.4, cpus=4, threads=2) is None  # spare CPUs for the others
    note = contention_note(2.1, cpus=2, threads=2)
    assert note is not None and "--threads 1" in note and "2.1 on 2 CPUs" in note
    single = contention_note(3.0, cpus=2, threads=1)
    assert single is not None and "--threads" not in single and "idle machine" in single  # already 1 thread


def test_help_has_examples(cli):
    h = cli("bench", "--help")
    assert h.code == 0 and "Examples:" in h.out and "cmrtool bench" in h.out and "--dtype" in h.out
    assert "bench" in cli("--help").out


def _other_signature(tmp):
    return save_ts(build(TinyMLP, dtype=torch.float32), tmp / "other.pt", "script", None)


def _bad(tmp, reduced):
    pickled = tmp / "pickle.pt"
    torch.save(torch.nn.Linear(2, 2), pickled)
    return {
        "missing model": (["bench", tmp / "nope.pt", "--input-shape", "1,1,8,8"], 1, "not found"),
        "pickle model": (["bench", pickled, "--input-shape", "1,1,8,8"], 1, "torch.save pickle"),
        "other signature": (["bench", MLP, _other_signature(tmp), "--data", CALIB], 1, "does not accept the inputs of"),
        "shape does not fit": (["bench", MLP, "--input-shape", "1,3,3"], 1, "does not accept the benchmark inputs"),
        "batch zero": (["bench", MLP, "--input-shape", "1,1,8,8", "--batch", "0"], 2, "--batch must be at least 1"),
        "repeats zero": (["bench", MLP, "--input-shape", "1,1,8,8", "--repeats", "0"], 2, "--repeats must be at least 1"),
        "unknown dtype": (["bench", MLP, "--input-shape", "1,1,8,8", "--dtype", "int4"], 2, "unknown dtype"),
        "unknown device": (["bench", MLP, "--input-shape", "1,1,8,8", "--device", "tpu"], 2, "unknown device"),
        "no input": (["bench", MLP], 2, "needs an input"),
        "bad shape": (["bench", MLP, "--input-shape", "1,a"], 2, "invalid --input-shape"),
        "too few samples": (["bench", MLP, reduced, "--data", CALIB, "--batch", "100000"], 1, "samples, --batch 100000 needs"),
        "safetensors without --arch": (["bench", SAMPLES / "digits_mlp.safetensors", "--input-shape", "1,1,8,8"], 2, "holds weights only"),
    }


@pytest.mark.parametrize(
    "case",
    ["missing model", "pickle model", "other signature", "shape does not fit", "batch zero", "repeats zero",
     "unknown dtype", "unknown device", "no input", "bad shape", "too few samples", "safetensors without --arch"],
)
def test_bad_input_gets_error_and_hint(case, cli, tmp_path, reduced, no_cuda):
    args, code, text = _bad(tmp_path, reduced)[case]
    r = cli(*args, "--repeats", "2") if case != "repeats zero" else cli(*args)
    assert r.code == code, r.err
    errors = [ln for ln in r.err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and text in errors[0], r.err
    assert any(ln.startswith("hint: ") for ln in r.err.splitlines())
    assert "Traceback" not in r.err and r.out == ""
