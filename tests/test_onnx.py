"""ONNX output for every backend: the legacy exporter for TorchScript, dynamo for nn.Modules;
onnx.checker and onnxruntime parity ≤ 1e-4 for every sample and test model that exports, and a
clear error for operators ONNX cannot express."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from helpers import SAMPLES, inputs_for, write_data
from torch import nn

from cmrtool import api
from cmrtool.backends import load_model
from cmrtool.io.data import Dataset
from cmrtool.compile.export import export_onnx

CALIB, EVAL = SAMPLES / "calib.safetensors", SAMPLES / "eval.safetensors"
SAMPLE_NAMES = ["digits_mlp", "digits_convnet", "digits_transformer"]


@pytest.mark.slow
@pytest.mark.parametrize("name", SAMPLE_NAMES)
@pytest.mark.parametrize("backend", ["torchscript", "module"])
def test_samples_export_with_parity(name, backend, cli, tmp_path):
    model = SAMPLES / (f"{name}.pt" if backend == "torchscript" else f"{name}.safetensors")
    arch = [] if backend == "torchscript" else ["--arch", f"cmrtool.testing.models:{name}"]
    kinds = ["--kind", "head", "--kind", "neuron"] if name == "digits_transformer" and backend == "module" else []
    if name == "digits_convnet":
        kinds = ["--site", "conv2", "--site", "conv3"]  # conv1 is interior-exact (zero padding)
    out = tmp_path / "r.onnx"
    r = cli("compile", model, *arch, "--calib", CALIB, "--keep", "0.5", *kinds, "-o", out)
    assert r.code == 0, r.err
    d = r.json()
    assert d["onnx"]["exporter"] == ("legacy" if backend == "torchscript" else "dynamo")
    assert d["onnx_max_abs_diff"] <= 1e-4 and d["onnx"]["samples"] == 256 and d["fold_error_relative"] <= 1e-5
    onnx.checker.check_model(str(out))
    assert list(tmp_path.iterdir()) == [out]  # only the ONNX file: the checkpoint was scratch
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert [s["name"] for s in json.loads(props["cmrtool_plan"])["sites"]] == [s["name"] for s in d["sites"]]


@pytest.mark.slow
def test_both_outputs_verify_parity_and_eval_mode(cli, tmp_path):
    arch = ["--arch", "cmrtool.testing.models:digits_mlp"]
    out, onnx_path = tmp_path / "r.safetensors", tmp_path / "r.onnx"
    r = cli("compile", SAMPLES / "digits_mlp.safetensors", *arch, "--calib", CALIB, "--keep", "0.5", "-o", out, "--onnx", onnx_path)
    assert r.code == 0, r.err
    assert r.json()["onnx_max_abs_diff"] <= 1e-4 and out.is_file() and onnx_path.is_file()
    # The ONNX file has a dynamic batch axis and agrees with the model on the held-out data too.
    v = cli("verify", SAMPLES / "digits_mlp.safetensors", out, *arch, "--data", EVAL, "--swaps", "20", "--onnx", onnx_path)
    assert v.code == 0, v.err
    assert v.json()["onnx_max_abs_diff"] <= 1e-4
    reduced = load_model(out)
    reduced.module.train()  # export must leave the model in eval mode whatever it was
    x = Dataset(EVAL, reduced.arg_names, 1).read(0, 8).inputs
    report = export_onnx(reduced, tmp_path / "again.onnx", list(x))
    assert not any(m.training for m in reduced.module.modules())
    assert report.max_abs_diff <= 1e-4 and report.samples == 8


class _WithMHA(nn.Module):
    """A reducible FFN followed by nn.MultiheadAttention, whose eval-mode fast path is one fused op."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.fc2(torch.relu(self.fc1(x)))
        y, _ = self.mha(x, x, x, need_weights=False)
        return self.head(y.mean(1))


def test_unsupported_operator_is_named(cli, tmp_path):
    x = inputs_for((5, 8), n=16, dtype=torch.float32)
    with torch.no_grad():
        torch.jit.trace(_WithMHA().eval(), x[:2]).save(str(tmp_path / "m.pt"))
    data = write_data(tmp_path / "c.safetensors", x)
    r = cli("compile", tmp_path / "m.pt", "--calib", data, "--keep", "0.5", "-o", tmp_path / "r.onnx")
    assert r.code == 1
    err = [ln for ln in r.err.splitlines() if ln.startswith("error: ")]
    assert len(err) == 1 and "ONNX export failed" in err[0] and "_native_multi_head_attention" in err[0], r.err
    assert "hint: " in r.err and "MultiheadAttention" in r.err and r.out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors", "m.pt"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert", "llama"])
def test_hf_models_export_with_parity(name, tmp_path):
    transformers = pytest.importorskip("transformers")
    from test_hf import config

    torch.manual_seed(0)
    transformers.AutoModelForSequenceClassification.from_config(config(name)).eval().save_pretrained(str(tmp_path / name))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 40, (32, 9), generator=g)
    from safetensors.torch import save_file

    save_file({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, str(tmp_path / "d.safetensors"))
    kinds = ["head", "neuron"] if name == "llama" else ["neuron", "head"]
    r = api.compile(tmp_path / name, tmp_path / "r.onnx", calib=tmp_path / "d.safetensors", kinds=kinds, keep=0.5)
    assert r.onnx.exporter == "dynamo" and r.onnx.max_abs_diff <= 1e-4, r.onnx
    assert r.fold_error.relative <= 1e-5
