"""Hugging Face models: tiny random BERT-like and LLaMA-like (grouped-query attention) models built
from configs here, saved with save_pretrained and read back offline. FFN units, gated FFN units
and heads must compile exactly (float64), round-trip through the reduced safetensors, and load
with stock from_pretrained when written as a directory."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

from cmrtool import api  # noqa: E402
from cmrtool.backends import load_model  # noqa: E402
from cmrtool.backends.module.checkpoint import load_reduced  # noqa: E402
from cmrtool.errors import InputError, UsageError  # noqa: E402
from cmrtool.compile.fold import fold  # noqa: E402

def config(name: str):
    """A fresh config (models built from it may change its dtype, so it is never shared)."""
    return _CONFIGS[name]()


_CONFIGS = {
    "bert": lambda: transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24,
        max_position_embeddings=16, num_labels=3, initializer_range=0.4,
    ),
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=16, num_labels=3, pad_token_id=0, initializer_range=0.4,
    ),
}


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """{name: directory} of float64 sequence classifiers, and a data file with padding."""
    root = tmp_path_factory.mktemp("hf")
    dirs = {}
    for name in _CONFIGS:
        torch.manual_seed(0)
        model = transformers.AutoModelForSequenceClassification.from_config(config(name)).double().eval()
        model.save_pretrained(str(root / name))
        dirs[name] = root / name
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 40, (48, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, 6:] = 0
    ids[mask == 0] = 0
    data = root / "data.safetensors"
    save_file({"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (48,), generator=g)}, str(data))
    return dirs, data


def _inputs(data):
    from cmrtool.io.data import Dataset

    return list(Dataset(data, ["input_ids", "attention_mask"], 1).all().inputs)


def test_discovery(hf):
    dirs, _ = hf
    bert, llama = load_model(dirs["bert"]), load_model(dirs["llama"])
    assert bert.format == "huggingface" and bert.arg_names[:2] == ["input_ids", "attention_mask"]
    got = {s.name: (s.kind, s.width, s.group, s.fold, s.activation) for s in bert.sites}
    assert got == {
        "bert.encoder.layer.0.attention": ("head", 4, 4, "exact", "attention"),
        "bert.encoder.layer.0.intermediate.dense": ("neuron", 24, 1, "exact", "gelu"),
        "bert.encoder.layer.1.attention": ("head", 4, 4, "exact", "attention"),
        "bert.encoder.layer.1.intermediate.dense": ("neuron", 24, 1, "exact", "gelu"),
    }
    # LLaMA: 4 query heads share 2 key/value heads, so a unit is a KV group (2 heads = 8 channels).
    head = llama.site("model.layers.0.self_attn")
    assert (head.width, head.group) == (2, 8) and "grouped-query" in head.notes[0]
    assert [p.group for p in head.producers] == [8, 8, 4, 4, 4, 4]
    mlp = llama.site("model.layers.1.mlp")
    assert (mlp.kind, mlp.width, mlp.consumers[0].fold_mode) == ("neuron", 24, "new-bias")
    assert [p.name for p in mlp.producers if not p.optional] == ["model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight"]


@pytest.mark.parametrize("name", ["bert", "llama"])
@pytest.mark.parametrize("kind", ["neuron", "head"])
def test_compiled_equals_clamped_and_round_trips(hf, name, kind, tmp_path):
    dirs, data = hf
    out = tmp_path / "r.safetensors"
    report = api.compile(dirs[name], out, calib=data, kinds=[kind], keep=0.5)
    assert report.fold_error.relative <= 1e-10, report.fold_error
    assert all(s["kept"] < s["width"] for s in report.sites) and report.params_after < report.params_before
    original = load_model(dirs[name])
    reduced = load_reduced(out)
    assert reduced.plan.source_sha256 == original.sha256 and reduced.num_params() == report.params_after
    x = _inputs(data)
    in_memory = original.reduced_module(fold(original.tensors(), original.sites, reduced.plan).tensors, reduced.plan)
    with torch.no_grad():
        assert torch.equal(reduced.forward(x), in_memory(*x).logits)
        assert (reduced.forward(x) - original.forward(x)).abs().max() > 1e-6  # not vacuous


@pytest.mark.parametrize(("name", "kind", "field", "value"), [
    ("bert", "neuron", "intermediate_size", 12),
    ("llama", "neuron", "intermediate_size", 12),
    ("llama", "head", "num_key_value_heads", 1),
])
def test_directory_output_loads_with_stock_from_pretrained(hf, name, kind, field, value, tmp_path):
    dirs, data = hf
    out = f"{tmp_path}/reduced/"
    report = api.compile(dirs[name], out, calib=data, kinds=[kind], keep=0.5)
    assert report.fold_error.relative <= 1e-10 and report.output == str(tmp_path / "reduced")
    config = json.loads((tmp_path / "reduced" / "config.json").read_text())
    assert config[field] == value
    if name == "llama":  # the folded constants need biases that LLaMA configs switch on
        assert config["mlp_bias" if kind == "neuron" else "attention_bias"] is True
    if kind == "head":
        assert (config["num_attention_heads"], config["head_dim"]) == (2, 4)
    stock = transformers.AutoModelForSequenceClassification.from_pretrained(out, local_files_only=True).eval()
    base = transformers.AutoModel.from_pretrained(out, local_files_only=True)
    assert type(base).__name__ in ("BertModel", "LlamaModel")
    original = load_model(dirs[name])
    x = _inputs(data)
    plan = load_model(out).plan
    in_memory = original.reduced_module(fold(original.tensors(), original.sites, plan).tensors, plan)
    with torch.no_grad():
        torch.testing.assert_close(stock(*x).logits, in_memory(*x).logits, rtol=1e-12, atol=1e-12)
    assert (tmp_path / "reduced" / "cmrtool_plan.json").is_file()


def test_directory_output_refuses_what_config_json_cannot_express(hf, tmp_path):
    dirs, data = hf
    with pytest.raises(UsageError, match="derives the head size") as e:
        api.compile(dirs["bert"], f"{tmp_path}/b/", calib=data, kinds=["head"], keep=0.5)
    assert "reduced.safetensors" in e.value.hint and "onnx" in e.value.hint
    with pytest.raises(UsageError, match="same FFN width in every layer") as e:
        api.compile(dirs["llama"], f"{tmp_path}/l/", calib=data, sites=["model.layers.0.mlp"], keep=0.5)
    assert "--keep-count" in e.value.hint and "reduced.safetensors" in e.value.hint and "reduced.onnx" in e.value.hint
    assert not (tmp_path / "b").exists() and not (tmp_path / "l").exists()
    # The same plan as a reduced safetensors file is fine.
    r = api.compile(dirs["llama"], tmp_path / "l.safetensors", calib=data, sites=["model.layers.0.mlp"], keep=0.5)
    assert r.fold_error.relative <= 1e-10


def test_a_config_without_bias_flags_is_written_as_llama_or_deletes(hf, tmp_path):
    """Mistral has no mlp_bias: without a sliding window shorter than its context it is written as
    the equivalent LlamaForSequenceClassification; with one, the units are deleted (zero), with a note."""
    dirs, data = hf
    def mistral(window):
        c = transformers.MistralConfig(
            vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=4, sliding_window=window,
            num_key_value_heads=2, max_position_embeddings=16, num_labels=3, pad_token_id=0, initializer_range=0.4,
        )
        return transformers.AutoModelForSequenceClassification.from_config(c).double()
    mistral(None).save_pretrained(str(tmp_path / "m"))
    r = api.compile(tmp_path / "m", f"{tmp_path}/a/", calib=data, keep=0.5)
    assert r.fold_error.relative <= 1e-10 and r.written_as == "LlamaForSequenceClassification" and "written as" in r.notes[0]
    stock = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "a"), local_files_only=True)
    assert type(stock).__name__ == "LlamaForSequenceClassification" and stock.model.layers[0].mlp.down_proj.bias is not None
    mistral(4).save_pretrained(str(tmp_path / "w"))  # a window of 4 < 9 tokens: LLaMA would differ
    warned = []
    r = api.compile(tmp_path / "w", f"{tmp_path}/b/", calib=data, keep=0.5, warn=warned.append)
    assert r.fold_error.relative <= 1e-10 and r.written_as == "MistralForSequenceClassification"
    assert len(warned) == 1 and "deleted (--replacement zero)" in warned[0] and r.notes[0] == warned[0]
    assert all(not any(s.replacement.values) for s in r.plan.sites)
    stock = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "b"), local_files_only=True)
    assert stock.model.layers[0].mlp.down_proj.bias is None and stock.config.intermediate_size == 12


def test_verify_cli(hf, cli, tmp_path):
    dirs, data = hf
    out = f"{tmp_path}/r/"
    r = cli("compile", dirs["llama"], "--calib", data, "--kind", "head", "--kind", "neuron", "--keep", "0.5", "-o", out)
    assert r.code == 0, r.err
    v = cli("verify", dirs["llama"], out, "--data", data, "--swaps", "60")
    assert v.code == 0, v.err
    d = v.json()
    assert d["fold_error"] < 1e-10 and len(d["sites"]) == 4 and d["all_sites"]["retained"] == 1 + 1 + 12 + 12
    assert cli("inspect", dirs["bert"], "--input-shape", "1,9").json()["macs"] > 0


def test_bad_directories(hf, tmp_path, monkeypatch):
    dirs, _ = hf
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="without config.json"):
        load_model(tmp_path / "empty")
    nocfg = tmp_path / "noweights"
    nocfg.mkdir()
    (nocfg / "config.json").write_text((dirs["bert"] / "config.json").read_text())
    with pytest.raises(InputError, match="no model.safetensors"):
        load_model(nocfg)
    (nocfg / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(InputError, match="only pytorch_model.bin") as e:
        load_model(nocfg)
    assert "save_pretrained" in e.value.hint
    with pytest.raises(UsageError, match="--arch applies to .safetensors files only"):
        load_model(dirs["bert"], "cmrtool.testing.models:digits_mlp")
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if the extra were not installed
    with pytest.raises(InputError, match="optional 'transformers' package") as e:
        load_model(dirs["bert"])
    assert e.value.hint == "pip install 'cmrtool[hf]'"
