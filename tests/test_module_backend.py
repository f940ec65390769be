"""The nn.Module backend (safetensors + --arch): discovery by tracing and by structure, the
exactness contract for every site kind including attention heads, the reduced safetensors
round trip, and the errors for bad architectures and weights."""

from __future__ import annotations

import pytest
import torch
from helpers import CASES, SAMPLES, UNFOLDABLE, ZeroPadConv, build, inputs_for, small_transformer, write_data
from safetensors.torch import save_file

from cmrtool.backends import load_model
from cmrtool.backends.module.checkpoint import load_reduced
from cmrtool.backends.torchscript.model import TorchScriptModel
from cmrtool.compile.clamp import clamp_edits, fold_error, site_ranks
from cmrtool.compile.run import compile_model
from cmrtool.reduce.plans import make_plan
from cmrtool.io.data import Dataset
from cmrtool.errors import InputError, UsageError
from cmrtool.io.files import check_output_path
from cmrtool.compile.fold import fold
from cmrtool.plan import Plan
from cmrtool.score.scoring import score_model, select_sites

ARCH = "cmrtool.testing.models:{}"


def _save(model: torch.nn.Module, path) -> str:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def _compile(tmp_path, m, x, keep=0.5, kinds=None, criterion="cmr-logit"):
    data = Dataset(write_data(tmp_path / "calib.safetensors", x), m.arg_names, m.required_args, m.dtype)
    chosen = [s for s in select_sites(m.sites, None, kinds) if s.foldable]
    plan = make_plan(score_model(m, data, criterion, chosen), chosen, keep=keep)
    out = check_output_path(tmp_path / "reduced.safetensors", [], force=True)  # compile_model's contract
    return plan, compile_model(m, plan, out, check_inputs=[x]), out


@pytest.mark.parametrize("name", ["digits_mlp", "digits_convnet", "digits_transformer"])
def test_discovery_matches_the_torchscript_backend(name):
    m = load_model(SAMPLES / f"{name}.safetensors", ARCH.format(name))
    ts = TorchScriptModel(SAMPLES / f"{name}.pt")
    neurons = {s.name: (s.kind, s.width, s.fold, s.feeds_logits) for s in m.sites if s.kind != "head"}
    assert neurons == {s.name: (s.kind, s.width, s.fold, s.feeds_logits) for s in ts.sites}
    heads = [(s.name, s.width, s.group) for s in m.sites if s.kind == "head"]
    assert heads == ([("blocks.0.attn", 4, 8), ("blocks.1.attn", 4, 8)] if name == "digits_transformer" else [])
    assert m.num_params() == ts.num_params() and m.format == "safetensors"


@pytest.mark.parametrize("case", sorted(CASES) + sorted(UNFOLDABLE))
def test_compiled_equals_clamped_float64(case, tmp_path):
    factory, shape = {**CASES, **UNFOLDABLE}[case]
    x = inputs_for(shape)
    m = load_model(_save(build(factory), tmp_path / "m.safetensors"), f"helpers:{factory.__name__}")
    assert m.dtype == torch.float64 and m.sites
    # An nn.Module can always gain a bias, so the TorchScript-unfoldable case folds here.
    assert all(s.fold == "exact" for s in m.sites)
    plan, result, out = _compile(tmp_path, m, x)
    assert result.fold_error.relative <= 1e-10, result.fold_error
    with pytest.raises(InputError, match="names code to run") as e:
        load_model(out)  # the file names a factory outside cmrtool: never imported unasked
    assert e.value.hint == f"if you trust that code, pass --arch helpers:{factory.__name__}"
    reduced = load_model(out, f"helpers:{factory.__name__}")
    assert reduced.plan == plan and reduced.num_params() < m.num_params() == sum(p.numel() for p in build(factory).parameters())
    for sp in plan.sites:
        assert reduced.site(sp.name).width == len(sp.kept)
    with torch.no_grad():
        assert (reduced.forward([x]) - m.forward([x])).abs().max() > 1e-6  # the check is not vacuous


def test_zero_padded_consumer_is_interior_exact(tmp_path):
    x = inputs_for((1, 7, 7))
    m = load_model(_save(build(ZeroPadConv), tmp_path / "m.safetensors"), "helpers:ZeroPadConv")
    assert m.site("c1").fold == "interior-exact"
    plan, result, out = _compile(tmp_path, m, x)
    clamped, _ = m.run([x], edits=clamp_edits(m, plan, site_ranks(m, [x], ["c1"])))
    diff = (load_model(out, m.arch).forward([x]) - clamped).abs().reshape(len(x), 2, 7, 7)
    assert diff[:, :, 1:-1, 1:-1].max() <= 1e-10 * clamped.abs().max() < diff.max()
    assert result.notes


def test_heads_compiled_equal_clamped_float64(tmp_path):
    model = build(small_transformer)
    x = inputs_for((1, 8, 8))
    m = load_model(_save(model, tmp_path / "m.safetensors"), "helpers:small_transformer")
    assert [s.name for s in select_sites(m.sites, None, ["head"])] == ["blocks.0.attn", "blocks.1.attn"]
    plan, result, out = _compile(tmp_path, m, x, kinds=["head"])
    assert [len(sp.kept) for sp in plan.sites] == [2, 2] and all(sp.group == 4 for sp in plan.sites)
    assert len(plan.sites[0].replacement.values) == 2 * 4  # a vector per replaced head
    assert result.fold_error.relative <= 1e-10, result.fold_error
    reduced = load_model(out, m.arch)
    assert reduced.module.blocks[0].attn.q_proj.weight.shape == (8, 16) and reduced.module.blocks[0].attn.heads == 2
    # Heads and FFN units together, and clamping fixes exactly the replaced heads' channels.
    plan2, result2, _ = _compile(tmp_path, m, x, kinds=["head", "neuron"])
    assert result2.fold_error.relative <= 1e-10 and len(plan2.sites) == 4
    edits = clamp_edits(m, plan, site_ranks(m, [x], [sp.name for sp in plan.sites]))
    _, clean = m.run([x], capture=["blocks.0.attn"])
    _, clamped = m.run([x], capture=["blocks.0.attn"], edits={"blocks.0.attn": edits["blocks.0.attn"]})
    sp = plan.site("blocks.0.attn")
    for h, j in enumerate(sp.replaced):
        assert torch.equal(clamped["blocks.0.attn"][..., j * 4 : j * 4 + 4], torch.tensor(sp.replacement.values[h * 4 : h * 4 + 4], dtype=x.dtype).expand(64, 8, 4))
    for j in sp.kept:
        assert torch.equal(clamped["blocks.0.attn"][..., j * 4 : j * 4 + 4], clean["blocks.0.attn"][..., j * 4 : j * 4 + 4])


def test_head_cmr_logit_is_the_exact_distortion_of_o_proj(tmp_path):
    """cmr-logit for a head = E‖W_o[:, block_h](a_h − ā_h)‖², computed here from the activations."""
    model = build(small_transformer)
    x = inputs_for((1, 8, 8), n=32)
    m = load_model(_save(model, tmp_path / "m.safetensors"), "helpers:small_transformer")
    site = m.site("blocks.0.attn")
    data = Dataset(write_data(tmp_path / "c.safetensors", x), m.arg_names, 1, m.dtype)
    s = score_model(m, data, "cmr-logit", [site], batch_size=7).site(site.name)
    _, values = m.run([x], capture=[site.name])
    a = values[site.name].reshape(-1, 4, 4)  # (tokens, heads, head_dim)
    w = m.tensors()["blocks.0.attn.o_proj.weight"].reshape(16, 4, 4)
    want = [torch.einsum("oi,ni->no", w[:, h], a[:, h] - a[:, h].mean(0)).square().sum(1).mean() for h in range(4)]
    assert torch.allclose(torch.tensor(s.scores, dtype=torch.float64), torch.stack(want), rtol=1e-10)
    assert torch.allclose(torch.tensor(s.replacement, dtype=torch.float64), a.mean(0).reshape(-1), rtol=1e-10, atol=1e-12)
    vbp = score_model(m, data, "vbp", [site]).site(site.name)
    assert torch.allclose(torch.tensor(vbp.scores, dtype=torch.float64), a.var(0, unbiased=False).sum(1), rtol=1e-10)


@pytest.mark.parametrize(
    ("name", "kinds"), [("digits_mlp", None), ("digits_convnet", None), ("digits_transformer", None), ("digits_transformer", ["head"])]
)
def test_samples_compiled_equal_clamped_float32(name, kinds, tmp_path):
    m = load_model(SAMPLES / f"{name}.safetensors", ARCH.format(name))
    calib = Dataset(SAMPLES / "calib.safetensors", m.arg_names, 1, m.dtype)
    chosen = [s for s in select_sites(m.sites, None, kinds) if s.fold == "exact"]
    plan = make_plan(score_model(m, calib, "cmr-logit", chosen), chosen, keep=0.5)
    result = compile_model(m, plan, tmp_path / "r.safetensors", check_inputs=[calib.read(0, 256).inputs[0]])
    assert result.fold_error.relative <= 1e-5
    held = Dataset(SAMPLES / "eval.safetensors", m.arg_names, 1, m.dtype).all().inputs
    assert fold_error(m, load_model(tmp_path / "r.safetensors", m.arch), plan, held).relative <= 1e-5


def test_reduced_safetensors_round_trip(tmp_path):
    m = load_model(SAMPLES / "digits_transformer.safetensors", ARCH.format("digits_transformer"))
    x = Dataset(SAMPLES / "eval.safetensors", m.arg_names, 1, m.dtype).read(0, 100).inputs[0]
    plan, _, out = _compile(tmp_path, m, x, kinds=["head", "neuron"])
    in_memory = m.reduced_module(fold(m.tensors(), m.sites, plan).tensors, plan)
    loaded = load_reduced(out)
    assert Plan.loads(loaded.plan.dumps()) == plan and loaded.arch == ARCH.format("digits_transformer")
    with torch.no_grad():
        assert torch.equal(loaded.forward([x]), in_memory(x))
    assert not m.module.training and m.module.blocks[0].attn.heads == 4  # compile never edits its input


def test_verify_heads_via_arch(cli, tmp_path):
    model, arch = SAMPLES / "digits_transformer.safetensors", ARCH.format("digits_transformer")
    out = tmp_path / "r.safetensors"
    r = cli("compile", model, "--arch", arch, "--calib", SAMPLES / "calib.safetensors", "--kind", "head", "--keep", "0.5", "-o", out)
    assert r.code == 0, r.err
    assert [(s["name"], s["kind"], s["kept"]) for s in r.json()["sites"]] == [("blocks.0.attn", "head", 2), ("blocks.1.attn", "head", 2)]
    v = cli("verify", model, out, "--arch", arch, "--data", SAMPLES / "eval.safetensors", "--swaps", "100")
    assert v.code == 0, v.err
    d = v.json()
    assert d["fold_error"] < 1e-4 and [s["name"] for s in d["sites"]] == ["blocks.0.attn", "blocks.1.attn"]
    assert all(0.0 <= s["iia"] <= 1.0 and s["retained"] == 2 for s in d["sites"]) and d["all_sites"]["retained"] == 4
    s = cli("score", model, "--arch", arch, "--calib", SAMPLES / "calib.safetensors", "--site", "blocks.0.attn").json()["sites"][0]
    assert s["group"] == 8 and len(s["scores"]) == 4 and len(s["replacement"]) == len(s["mean"]) == 32


def test_bench_and_audit_take_arch(cli, tmp_path):
    model, arch, calib = SAMPLES / "digits_transformer.safetensors", ARCH.format("digits_transformer"), SAMPLES / "calib.safetensors"
    out = tmp_path / "r.safetensors"
    assert cli("compile", model, "--arch", arch, "--calib", calib, "--keep", "0.5", "-o", out).code == 0
    b = cli("bench", model, out, "--arch", arch, "--data", calib, "--batch", "16", "--warmup", "1", "--repeats", "3", "--device", "cpu", "--dtype", "fp32")
    assert b.code == 0, b.err
    d = b.json()
    first, second = d["models"]
    assert first["format"] == second["format"] == "safetensors" and first["params"] == 26346 and second["params"] < 26346
    assert d["mac_ratio"] > 1.0 and second["macs"] < first["macs"]
    mlp = SAMPLES / "digits_mlp.safetensors"
    a = cli("audit", mlp, "--arch", ARCH.format("digits_mlp"), "--calib", calib, "--seeds", "2", "--criteria", "cmr-logit,magnitude")
    assert a.code == 0, a.err
    sites = a.json()["sites"]
    assert [s["name"] for s in sites] == ["body.0", "body.3"]
    assert all(s["criteria"]["cmr-logit"]["jaccard_mean"] == 1.0 for s in sites)
    assert all(s["criteria"]["magnitude"]["jaccard_mean"] < 0.9 for s in sites)


def test_inspect_lists_heads_and_macs(cli):
    r = cli("inspect", SAMPLES / "digits_transformer.safetensors", "--arch", ARCH.format("digits_transformer"), "--input-shape", "1,1,8,8")
    assert r.code == 0, r.err
    d = r.json()
    assert d["format"] == "safetensors" and d["params"] == 26346 and d["macs"] > 0
    head = next(s for s in d["sites"] if s["kind"] == "head")
    assert head["group"] == 8 and head["producers"][0] == {"name": "blocks.0.attn.q_proj.weight", "axis": 0, "group": 8}


def test_bad_architectures_and_weights(cli, tmp_path):
    mlp = SAMPLES / "digits_mlp.safetensors"
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(mlp.read_bytes()[:200])
    cases = [
        (["inspect", mlp], 2, "holds weights only", "--arch"),
        (["inspect", mlp, "--arch", "nodots"], 2, "invalid --arch", "pkg.module:factory"),
        (["inspect", mlp, "--arch", "no_such_pkg.models:f"], 1, "cannot import no_such_pkg.models", "install"),
        (["inspect", mlp, "--arch", "cmrtool.testing.models:nope"], 1, "has no attribute nope", "--arch"),
        (["inspect", mlp, "--arch", "cmrtool.testing.models:__doc__"], 1, "not a callable", "--arch"),
        (["inspect", mlp, "--arch", "cmrtool.testing.models:DigitsMLP.forward"], 1, "failed when called", "without arguments"),
        (["inspect", mlp, "--arch", "helpers:not_a_module"], 1, "not a torch.nn.Module", "--arch"),
        (["inspect", mlp, "--arch", ARCH.format("digits_convnet")], 1, "does not match --arch", "factory that built these weights"),
        (["inspect", SAMPLES / "digits_mlp.pt", "--arch", ARCH.format("digits_mlp")], 2, "--arch applies to .safetensors", "drop --arch"),
        (["inspect", broken, "--arch", ARCH.format("digits_mlp")], 1, "not a readable safetensors file", "truncated"),
        (["compile", SAMPLES / "digits_mlp.pt", "--calib", SAMPLES / "calib.safetensors", "--keep", "0.5", "-o", f"{tmp_path}/d/"], 2, "needs a Hugging Face input", "reduced.pt"),
        (["compile", mlp, "--arch", ARCH.format("digits_mlp"), "--scores", "-", "--keep", "0.5", "-o", tmp_path / "r.onnx"], 2, "ONNX export needs example inputs", "--calib"),
        (["compile", mlp, "--arch", ARCH.format("digits_mlp"), "--calib", SAMPLES / "calib.safetensors", "--keep", "0.5", "-o", tmp_path / "r.pt"], 2, "written as safetensors", "reduced.onnx"),
        (["compile", SAMPLES / "digits_mlp.pt", "--calib", SAMPLES / "calib.safetensors", "--keep", "0.5", "-o", tmp_path / "r.safetensors"], 2, "written as TorchScript", "reduced.onnx"),
    ]
    for args, code, text, hint in cases:
        r = cli(*args)
        assert r.code == code, (args, r.err)
        errors = [ln for ln in r.err.splitlines() if ln.startswith("error: ")]
        assert len(errors) == 1 and text in errors[0], r.err
        assert hint in r.err.split("hint: ", 1)[1] and "Traceback" not in r.err
    assert not list(tmp_path.glob("r.*")) and not (tmp_path / "d").exists()


def test_state_dict_mismatch_names_the_tensor(tmp_path):
    from safetensors.torch import load_file

    state = load_file(str(SAMPLES / "digits_mlp.safetensors"))
    state["body.3.weight"] = state["body.3.weight"][:10]
    save_file(state, str(tmp_path / "m.safetensors"))
    with pytest.raises(InputError, match=r"body.3.weight has shape \(10, 256\) in the file, \(256, 256\) in the model"):
        load_model(tmp_path / "m.safetensors", ARCH.format("digits_mlp"))
    del state["body.3.weight"]
    save_file(state, str(tmp_path / "m2.safetensors"))
    with pytest.raises(InputError, match="missing body.3.weight"):
        load_model(tmp_path / "m2.safetensors", ARCH.format("digits_mlp"))
    with pytest.raises(UsageError, match="holds weights only"):
        load_model(tmp_path / "m2.safetensors")


def test_head_scores_pipe_into_compile(cli, tmp_path):
    model, arch = SAMPLES / "digits_transformer.safetensors", ARCH.format("digits_transformer")
    calib = SAMPLES / "calib.safetensors"
    scores = cli("score", model, "--arch", arch, "--calib", calib, "--kind", "head", "--keep", "0.5")
    assert scores.code == 0, scores.err
    out = tmp_path / "r.safetensors"
    r = cli("compile", model, "--arch", arch, "--scores", "-", "--calib", calib, "--kind", "head", "--keep", "0.5", "-o", out, stdin=scores.out.encode())
    assert r.code == 0, r.err
    plan = load_model(out).plan
    for s in scores.json()["sites"]:
        sp = plan.site(s["name"])
        assert list(sp.kept) == s["kept"] and sp.group == s["group"] == 8
        assert list(sp.replacement.values) == [s["replacement"][j * 8 + i] for j in sp.replaced for i in range(8)]
