"""Plan storage (cmrtool.io.planstore): a large plan's dense affine matrices travel as tensors beside
its JSON in every output format — a side file of a Hugging Face directory (block engine and
whole-model path), extra tensors of one .safetensors, an extra file of a TorchScript archive,
references with sha256 in ONNX metadata — small plans stay inline, and a plan whose side data is
missing or altered is refused with an error and a hint."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from helpers import CASES, SAMPLES, build, dense_plan, inputs_for, save_ts
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cmrtool.io import planstore
from cmrtool.backends import load_model
from cmrtool.backends.module.checkpoint import load_reduced
from cmrtool.backends.torchscript.model import PLAN_FILE, TorchScriptModel
from cmrtool.compile.run import compile_model
from cmrtool.errors import InputError
from cmrtool.plan import Plan


@pytest.fixture
def external(monkeypatch):
    """Every plan with a dense matrix stores it outside its JSON (the test models are tiny)."""
    monkeypatch.setattr(planstore, "INLINE_MATRIX_BYTES", 0)


def _ts(tmp_path):
    factory, shape = CASES["token_ffn"]
    x = inputs_for(shape)
    return TorchScriptModel(save_ts(build(factory), tmp_path / "m.pt", "script", x[:2])), x


def _bump(tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    out = {k: v.clone() for k, v in tensors.items()}
    out[name].view(-1)[0] += 1.0
    return out


def test_small_plans_stay_inline_and_large_ones_are_references_checked_by_sha256(tmp_path, monkeypatch):
    m, _ = _ts(tmp_path)
    plan = dense_plan(m, torch.Generator().manual_seed(0))
    text, side = planstore.split(plan)
    assert side == {} and '"matrix":' in text and Plan.loads(text) == plan  # small: inline, as before
    monkeypatch.setattr(planstore, "INLINE_MATRIX_BYTES", plan.matrix_bytes() - 1)
    text, side = planstore.split(plan)
    refs = [s["replacement"]["matrix_ref"] for s in json.loads(text)["sites"]]
    assert '"matrix":' not in text and sorted(side) == sorted(r["tensor"] for r in refs) == sorted(plan.matrices())
    assert all(side[r["tensor"]].dtype == torch.float32 and list(side[r["tensor"]].shape) == r["shape"] for r in refs)
    assert Plan.loads(text, side, "side") == plan
    name = refs[0]["tensor"]
    with pytest.raises(InputError, match=r"outside its JSON, in side\.st, which is missing"):
        Plan.loads(text, None, "side.st")
    with pytest.raises(InputError, match="does not hold it"):
        Plan.loads(text, {k: v for k, v in side.items() if k != name}, "side.st")
    with pytest.raises(InputError, match="was altered"):
        Plan.loads(text, _bump(side, name), "side.st")
    with pytest.raises(InputError, match="not float32 of shape"):
        Plan.loads(text, {**side, name: side[name].double()}, "side.st")


def test_torchscript_keeps_a_large_plan_in_an_extra_file(external, tmp_path, cli):
    m, x = _ts(tmp_path)
    plan = dense_plan(m, torch.Generator().manual_seed(1))
    r = compile_model(m, plan, tmp_path / "r.pt", check_inputs=[x])
    assert r.fold_error.relative <= 1e-10
    assert TorchScriptModel(str(tmp_path / "r.pt")).plan == plan
    extra = {PLAN_FILE: "", planstore.TS_TENSORS_FILE: ""}
    module = torch.jit.load(str(tmp_path / "r.pt"), _extra_files=extra)
    assert b'"matrix_ref"' in extra[PLAN_FILE] and b'"matrix":' not in extra[PLAN_FILE]
    side = planstore.tensors_from_bytes(extra[planstore.TS_TENSORS_FILE], "extra")
    assert sorted(side) == sorted(plan.matrices())
    torch.jit.save(module, str(tmp_path / "altered.pt"), _extra_files={
        PLAN_FILE: extra[PLAN_FILE], planstore.TS_TENSORS_FILE: planstore.tensors_to_bytes(_bump(side, next(iter(side))))})
    torch.jit.save(module, str(tmp_path / "missing.pt"), _extra_files={PLAN_FILE: extra[PLAN_FILE]})
    for bad, why in (("altered.pt", "was altered"), ("missing.pt", "which is missing")):
        res = cli("inspect", tmp_path / bad)
        assert res.code != 0 and why in res.err and "hint: a plan and its tensors are written together" in res.err
        assert "Traceback" not in res.err


def test_safetensors_and_onnx_outputs_carry_a_large_plan(external, tmp_path):
    from cmrtool.io.data import Dataset
    from cmrtool.compile.onnxcheck import check_onnx_plan

    arch = "cmrtool.testing.models:digits_mlp"
    m = load_model(SAMPLES / "digits_mlp.safetensors", arch=arch)
    plan = dense_plan(m, torch.Generator().manual_seed(2))
    x = list(Dataset(SAMPLES / "calib.safetensors", m.arg_names, 1).read(0, 16).inputs)
    out, onnx_path = tmp_path / "r.safetensors", tmp_path / "r.onnx"
    r = compile_model(m, plan, out, check_inputs=x, onnx=onnx_path)
    assert r.fold_error.relative <= 1e-5 and r.onnx.max_abs_diff <= 1e-4  # float32 sample
    reduced = load_reduced(out)
    assert reduced.plan == plan and reduced.num_params() == r.params_after  # plan tensors are not weights
    with safe_open(str(out), framework="pt") as f:
        names, meta = set(f.keys()), f.metadata()
    assert set(plan.matrices()) <= names and '"matrix_ref"' in meta["cmrtool_plan"] and '"matrix":' not in meta["cmrtool_plan"]
    import onnx

    props = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert '"matrix_ref"' in props["cmrtool_plan"]
    check_onnx_plan(onnx_path, reduced)  # its references resolve against the checkpoint's own matrices
    other = dense_plan(m, torch.Generator().manual_seed(3))  # same shapes, other matrices
    compile_model(m, other, tmp_path / "other.safetensors")
    with pytest.raises(InputError, match="another reduction"):
        check_onnx_plan(onnx_path, load_reduced(tmp_path / "other.safetensors"))
    name = next(iter(plan.matrices()))
    save_file(_bump(load_file(str(out)), name), str(tmp_path / "altered.safetensors"), metadata=meta)
    with pytest.raises(InputError, match="was altered"):
        load_reduced(tmp_path / "altered.safetensors")


transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A float64 LLaMA whose FFN (width 1024, 2 layers) gives 2 MiB of affine matrices at keep
    0.5: over the real inline limit, so nothing is patched."""
    transformers.utils.logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("wide")
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0, initializer_range=0.4, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).double().eval().save_pretrained(str(root / "llama"))
    ids = torch.randint(1, 40, (32, 12), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, str(root / "data.safetensors"))
    return root / "llama", root / "data.safetensors"


def _stock(path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    return model


def test_engine_directory_holds_the_matrices_beside_a_small_plan_and_verifies(wide, tmp_path, cli):
    from cmrtool import api

    model, data = wide
    out = tmp_path / "r"
    r = api.compile(model, out, calib=data, kinds=["neuron"], keep=0.5, replacement="affine")
    assert r.fold_error.relative <= 1e-10
    matrix_bytes = r.plan.matrix_bytes()
    assert matrix_bytes == 2 * 512 * 512 * 4 > planstore.INLINE_MATRIX_BYTES
    plan_json = (out / "cmrtool_plan.json").stat().st_size
    assert plan_json < 64_000 and plan_json * 20 < matrix_bytes  # indices and intercepts, no coefficients
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert not any(planstore.is_plan_tensor(k) for k in f.keys()) and len(f.metadata()["cmrtool_plan"]) == plan_json
    assert sorted(load_file(str(out / planstore.PLAN_TENSORS_FILE))) == sorted(r.plan.matrices())
    assert _stock(out).config.intermediate_size == 512  # stock from_pretrained ignores the side file
    assert load_model(out).plan.sites == r.plan.sites
    v = api.verify(model, out, data, swaps=64)  # rebuilds the clamped original from the side tensors
    assert v.passed and v.to_json()["fold_error_relative"] <= 1e-10
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    side = load_file(str(bad / planstore.PLAN_TENSORS_FILE))
    save_file(_bump(side, next(iter(side))), str(bad / planstore.PLAN_TENSORS_FILE))
    res = cli("verify", model, bad, "--data", data, "--swaps", "8")
    assert res.code != 0 and "was altered" in res.err and "hint:" in res.err and "Traceback" not in res.err
    (bad / planstore.PLAN_TENSORS_FILE).unlink()
    res = cli("verify", model, bad, "--data", data, "--swaps", "8")
    assert res.code != 0 and "cmrtool_plan.safetensors, which is missing" in res.err and "hint:" in res.err


def test_engine_single_file_and_whole_model_directory_round_trip(wide, tmp_path):
    from cmrtool import api
    from cmrtool.compile.clamp import fold_error
    from cmrtool.io.data import Dataset

    model, data = wide
    out = tmp_path / "r.safetensors"
    r = api.compile(model, out, calib=data, kinds=["neuron"], keep=0.5, replacement="affine")
    reduced, original = load_reduced(out), load_model(model)
    assert reduced.plan.sites == r.plan.sites and reduced.num_params() == r.params_after
    with safe_open(str(out), framework="pt") as f:
        assert sorted(k for k in f.keys() if planstore.is_plan_tensor(k)) == sorted(r.plan.matrices())
        assert len(f.metadata()["cmrtool_plan"]) < 64_000
    x = list(Dataset(data, ["input_ids", "attention_mask"], 1).all().inputs)
    assert fold_error(original, reduced, reduced.plan, x).relative <= 1e-10
    # The whole-model path (cmrtool.backends.module.hf.write_dir) writes the same side file.
    plan = dataclasses.replace(r.plan, source_sha256=original.sha256)
    whole = compile_model(original, plan, str(tmp_path / "whole") + "/", check_inputs=[t[:4] for t in x])
    assert whole.fold_error.relative <= 1e-10 and (tmp_path / "whole" / planstore.PLAN_TENSORS_FILE).is_file()
    assert load_model(tmp_path / "whole").plan.sites == plan.sites and _stock(tmp_path / "whole").config.intermediate_size == 512
