"""The first thing every site kind must pass: the compiled model equals the original with the
replaced units clamped to their replacements, to float rounding (DESIGN §3.4)."""

from __future__ import annotations

import pytest
import torch
from helpers import CASES, SAMPLES, UNFOLDABLE, ZeroPadConv, build, inputs_for, save_ts, write_data

from cmrtool.backends.torchscript.model import TorchScriptModel
from cmrtool.compile.clamp import clamp_edits, fold_error, site_ranks
from cmrtool.compile.run import compile_model
from cmrtool.reduce.plans import make_plan
from cmrtool.io.data import Dataset
from cmrtool.score.scoring import score_model

# Expected discovery per case: site -> (kind, fold, consumer fold modes) for script and trace.
EXPECTED = {
    "mlp": {"fc1": ("neuron", "exact", ["bias"]), "fc2": ("neuron", "exact", ["bias"])},
    "conv": {
        "c1": ("channel", "exact", {"script": ["new-bias"], "trace": ["bn-mean"]}),
        "c2": ("channel", "exact", ["bias"]),
        "c3": ("channel", "exact", ["bias"]),
    },
    "conv_flatten": {"conv": ("channel", "exact", ["bias"])},
    "token_flatten": {"proj": ("neuron", "exact", ["bias"])},
    "token_ffn": {"fc1": ("neuron", "exact", ["bias"])},
    "reflect_conv": {"c1": ("channel", "exact", ["bias"])},
    # A Linear without bias cannot gain one in TorchScript (typed NoneType when scripted, a
    # constant None when traced), and no BatchNorm follows: the site cannot be folded.
    "nobias_linear": {"fc1": ("neuron", "none", ["none"])},
    "flagged": {"fc1": ("neuron", "exact", ["bias"])},
}


def _pick(value, mode):
    return value[mode] if isinstance(value, dict) else value


def _compile(tmp_path, path, x, keep=0.5, sites=None):
    m = TorchScriptModel(path)
    data = Dataset(write_data(tmp_path / "calib.safetensors", x), m.arg_names, m.required_args, m.dtype)
    chosen = [s for s in m.sites if s.foldable and (sites is None or s.name in sites)]
    report = score_model(m, data, "cmr-logit", chosen)
    plan = make_plan(report, chosen, keep=keep)
    out = tmp_path / "reduced.pt"
    result = compile_model(m, plan, out, check_inputs=[x])
    return m, plan, result, out


@pytest.mark.parametrize("mode", ["script", "trace"])
@pytest.mark.parametrize("case", sorted(CASES) + sorted(UNFOLDABLE))
def test_discovery(case, mode, tmp_path):
    factory, shape = {**CASES, **UNFOLDABLE}[case]
    x = inputs_for(shape)
    m = TorchScriptModel(save_ts(build(factory), tmp_path / "m.pt", mode, x[:2]))
    found = {s.name: (s.kind, s.fold, [c.fold_mode for c in s.consumers]) for s in m.sites}
    want = {k: (v[0], _pick(v[1], mode), _pick(v[2], mode)) for k, v in EXPECTED[case].items()}
    assert found == want


@pytest.mark.parametrize("mode", ["script", "trace"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_compiled_equals_clamped_float64(case, mode, tmp_path):
    factory, shape = CASES[case]
    x = inputs_for(shape)
    path = save_ts(build(factory), tmp_path / "m.pt", mode, x[:2])
    m, plan, result, out = _compile(tmp_path, path, x)
    assert result.fold_error is not None
    assert result.fold_error.relative <= 1e-10, result.fold_error
    # The reduced model really is smaller, and its plan travels with it.
    reduced = TorchScriptModel(out)
    assert reduced.plan == plan
    assert reduced.num_params() < m.num_params()
    for sp in plan.sites:
        assert reduced.site(sp.name).width == len(sp.kept)
    # And the check is not vacuous: without clamping the outputs differ.
    with torch.no_grad():
        assert (reduced.forward([x]) - m.forward([x])).abs().max() > 1e-6


def test_clamping_changes_only_replaced_units(tmp_path):
    factory, shape = CASES["conv"]
    x = inputs_for(shape)
    m = TorchScriptModel(save_ts(build(factory), tmp_path / "m.pt", "script", x[:2]))
    data = Dataset(write_data(tmp_path / "c.safetensors", x), m.arg_names, 1, m.dtype)
    report = score_model(m, data, "vbp", m.sites)
    plan = make_plan(report, m.sites, keep=0.5)
    ranks = site_ranks(m, [x], [s.name for s in m.sites])
    edits = clamp_edits(m, plan, ranks)
    _, clean = m.run([x], capture=["c2"])
    _, clamped = m.run([x], capture=["c2"], edits={"c2": edits["c2"]})
    sp = plan.site("c2")
    assert torch.equal(clamped["c2"][:, list(sp.kept)], clean["c2"][:, list(sp.kept)])
    for j, c in zip(sp.replaced, sp.replacement.values):
        assert torch.all(clamped["c2"][:, j] == c)


@pytest.mark.parametrize("mode", ["script", "trace"])
def test_zero_padded_consumer_is_exact_in_the_interior_only(mode, tmp_path):
    x = inputs_for((1, 7, 7))
    path = save_ts(build(ZeroPadConv), tmp_path / "m.pt", mode, x[:2])
    m = TorchScriptModel(path)
    assert m.site("c1").fold == "interior-exact"
    assert "zeros" in m.site("c1").reason
    _, plan, result, out = _compile(tmp_path, path, x)
    reduced = TorchScriptModel(out)
    ranks = site_ranks(m, [x], ["c1"])
    with torch.no_grad():
        clamped, _ = m.run([x], edits=clamp_edits(m, plan, ranks))
        got = reduced.forward([x])
    diff = (got - clamped).abs().reshape(len(x), 2, 7, 7)
    assert diff[:, :, 1:-1, 1:-1].max() <= 1e-10 * clamped.abs().max()
    border = diff.clone()
    border[:, :, 1:-1, 1:-1] = 0
    assert border.max() > 1e-6  # the border effect is real, and measured
    assert result.fold_error.max_abs == pytest.approx(border.max().item(), rel=1e-6)


SAMPLE_MODELS = ["digits_mlp", "digits_convnet", "digits_transformer"]


@pytest.mark.parametrize("suffix", ["", "_traced"])
@pytest.mark.parametrize("name", SAMPLE_MODELS)
def test_samples_compiled_equals_clamped_float32(name, suffix, tmp_path):
    path = SAMPLES / f"{name}{suffix}.pt"
    m = TorchScriptModel(path)
    calib = Dataset(SAMPLES / "calib.safetensors", m.arg_names, 1, m.dtype)
    x = calib.read(0, 256).inputs[0]
    exact = [s for s in m.sites if s.fold == "exact"]
    assert exact, "every sample has exact sites"
    report = score_model(m, calib, "cmr-logit", exact)
    plan = make_plan(report, exact, keep=0.5)
    result = compile_model(m, plan, tmp_path / "r.pt", check_inputs=[x])
    assert result.fold_error.relative <= 1e-5
    # The same again on held-out data (the check batch was calibration data).
    held = Dataset(SAMPLES / "eval.safetensors", m.arg_names, 1, m.dtype).all().inputs
    fe = fold_error(m, TorchScriptModel(tmp_path / "r.pt"), plan, held)
    assert fe.relative <= 1e-5


def test_sample_convnet_labels_its_zero_padded_site():
    m = TorchScriptModel(SAMPLES / "digits_convnet.pt")
    folds = {s.name: s.fold for s in m.sites}
    assert folds == {"conv1": "interior-exact", "conv2": "exact", "conv3": "exact"}
