"""verify: interchange interventions, the margin certificate, the verdict, ONNX parity."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import SAMPLES, TinyMLP, build, inputs_for, save_ts, write_data
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cmrtool import api
from cmrtool.backends.torchscript.model import TorchScriptModel
from cmrtool.compile.run import compile_model
from cmrtool.io.data import Dataset
from cmrtool.plan import Plan, Replacement, SitePlan
from cmrtool.backends.swap import select
from cmrtool.verify.interchange import _bernoulli, _Cache, _downstreams, interchange, prepare_interchange
from cmrtool.verify.metrics import margin_certificate, wilson


class ThreeUnit(nn.Module):
    """x (2) → fc1 (3 ReLU units) → fc2 (2 logits)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2, 3)
        self.fc2 = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _three_unit(tmp_path):
    m = ThreeUnit().double().eval()
    with torch.no_grad():
        m.fc1.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        m.fc1.bias.copy_(torch.tensor([0.0, 0.0, -1.0]))
        m.fc2.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [-1.0, 1.0, 0.5]]))
        m.fc2.bias.copy_(torch.tensor([0.5, -0.5]))
    path = save_ts(m, tmp_path / "o.pt", "script", None)
    original = TorchScriptModel(path)
    # Keep units 0 and 1; unit 2 becomes the constant 0.25.
    plan = Plan(original.sha256, "hand", (SitePlan("fc1", "neuron", 3, (0, 1), (2,), Replacement("constant", (0.25,))),))
    compile_model(original, plan, tmp_path / "r.pt")
    return original, TorchScriptModel(tmp_path / "r.pt")


def test_golden_three_unit_mlp(tmp_path):
    original, reduced = _three_unit(tmp_path)
    x = torch.tensor([[2.0, 1.0], [0.5, 3.0]], dtype=torch.float64)
    # By hand: h = relu(W1 x + b1).  x0 = (2, 1) -> h = (2, 1, 2);  x1 = (0.5, 3) -> h = (0.5, 3, 2.5).
    # Swap base x0, source x1, mask over retained units (0, 1) = (1, 0): unit 0 from the source.
    # Low level (O): h_L = (0.5, 1, 2)  [replaced unit 2 keeps the base's 2]
    #   z_L = (0.5 + 2 + 6 + 0.5, -0.5 + 1 + 1 - 0.5) = (9.0, 1.0)
    # High level (R): h_H = (0.5, 1), unit 2 folded as the constant 0.25:
    #   z_H = (0.5 + 2 + 0.75 + 0.5, -0.5 + 1 + 0.125 - 0.5) = (3.75, 0.125)
    low, high = prepare_interchange(original, reduced, ["fc1"], [x])
    zl, zh = interchange(low, high, reduced.plan, original, reduced, torch.tensor([0]), torch.tensor([1]), {"fc1": torch.tensor([[True, False]])})
    assert torch.allclose(zl, torch.tensor([[9.0, 1.0]], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(zh, torch.tensor([[3.75, 0.125]], dtype=torch.float64), atol=1e-12)
    # Mask (0, 1): unit 1 from the source.  Low: h = (2, 3, 2) -> z = (2+6+6+0.5, -2+3+1-0.5) = (14.5, 1.5)
    # High: h = (2, 3) -> z = (2+6+0.75+0.5, -2+3+0.125-0.5) = (9.25, 0.625)
    zl, zh = interchange(low, high, reduced.plan, original, reduced, torch.tensor([0]), torch.tensor([1]), {"fc1": torch.tensor([[False, True]])})
    assert torch.allclose(zl, torch.tensor([[14.5, 1.5]], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(zh, torch.tensor([[9.25, 0.625]], dtype=torch.float64), atol=1e-12)


def test_nothing_replaced_means_iia_one_and_kl_zero(tmp_path):
    x = inputs_for((6,), n=80)
    path = save_ts(build(TinyMLP), tmp_path / "o.pt", "script", None)
    data = write_data(tmp_path / "d.safetensors", x)
    api.compile(path, tmp_path / "r.pt", calib=data, keep=1.0)
    r = api.verify(path, tmp_path / "r.pt", data, swaps=300)
    assert r.fold_error == 0 and r.agreement == 1 and r.kl == 0
    for s in r.sites + (r.all_sites,):
        assert s.iia == 1.0 and s.kl == 0.0 and s.d2 == 0.0


def _reduced_pair(tmp_path, seed, keep, criterion="cmr-logit", n=120):
    x = inputs_for((6,), n=n, seed=seed)
    path = save_ts(build(TinyMLP, seed=seed), tmp_path / f"o{seed}.pt", "trace", x[:2])
    data = write_data(tmp_path / f"d{seed}.safetensors", x)
    out = tmp_path / f"r{seed}.pt"
    api.compile(path, out, calib=data, keep=keep, criterion=criterion, force=True)
    return path, out, data


@settings(max_examples=12, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([0.3, 0.5, 0.8]), st.sampled_from([0.2, 0.5, 0.9]))
def test_certificate_never_exceeds_the_measured_iia(tmp_path_factory, seed, keep, p):
    tmp = tmp_path_factory.mktemp("cert")
    o, r, data = _reduced_pair(tmp, seed, keep)
    rep = api.verify(o, r, data, swaps=200, p=p, seed=seed)
    for s in rep.sites + (rep.all_sites,):
        assert s.certificate <= s.iia + 1e-12 and s.certificate_linf <= s.iia + 1e-12
        assert s.certificate <= s.certificate_linf + 1e-12  # D∞² ≤ D2 gives the tighter bound
        assert s.iia_ci[0] <= s.iia <= s.iia_ci[1]


def test_certificate_formula():
    assert margin_certificate(torch.full((100,), 10.0), 1.0)[0] == pytest.approx(1 - 4 / 100)
    assert margin_certificate(torch.tensor([0.0, 1.0]), 1.0)[0] == 0.0
    assert margin_certificate(torch.tensor([0.0, 2.0, 2.0, 2.0]), 0.0)[0] == pytest.approx(0.75)
    lo, hi = wilson(45, 50)
    assert lo == pytest.approx(0.7864, abs=1e-3) and hi == pytest.approx(0.9565, abs=1e-3)


def test_batched_equals_one_swap_at_a_time_and_same_seed_same_report(tmp_path):
    o, r, data = _reduced_pair(tmp_path, 3, 0.5)
    a = api.verify(o, r, data, swaps=60, batch_size=256, seed=7).to_json()
    b = api.verify(o, r, data, swaps=60, batch_size=1, seed=7).to_json()
    c = api.verify(o, r, data, swaps=60, batch_size=256, seed=7).to_json()
    d = api.verify(o, r, data, swaps=60, batch_size=256, seed=8).to_json()
    for x, y in zip(a["sites"] + [a["all_sites"]], b["sites"] + [b["all_sites"]]):
        assert x["iia"] == y["iia"] and x["changed"] == y["changed"]
        assert x["kl"] == pytest.approx(y["kl"], rel=1e-12, abs=1e-15) and x["d2"] == pytest.approx(y["d2"], rel=1e-12)
    a.pop("inputs"), c.pop("inputs")
    assert json.dumps(a) == json.dumps(c)
    assert [s["iia"] for s in d["sites"]] != [s["iia"] for s in a["sites"]] or d["sites"][0]["kl"] != a["sites"][0]["kl"]


@pytest.mark.parametrize("name", ["digits_transformer", "digits_convnet_traced"])
def test_downstream_runs_equal_full_runs_with_edits(name, tmp_path):
    """The cut (re-run only after the first site) gives the same logits as editing the whole model."""
    src = SAMPLES / f"{name}.pt"
    out = tmp_path / "r.pt"
    api.compile(src, out, calib=SAMPLES / "calib.safetensors", keep=0.5)
    o, r = TorchScriptModel(src), TorchScriptModel(out)
    x = Dataset(SAMPLES / "eval.safetensors", o.arg_names, 1, o.dtype).read(0, 40).inputs
    names = o.site_order([s.name for s in r.plan.sites])
    low, high = prepare_interchange(o, r, names, x)
    g = torch.Generator().manual_seed(0)
    base, source = torch.randint(40, (25,), generator=g), torch.randint(40, (25,), generator=g)
    masks = {s: torch.rand(25, len(r.plan.site(s).kept), generator=g) < 0.5 for s in names}
    zl, zh = interchange(low, high, r.plan, o, r, base, source, masks)
    for model, z, level in ((o, zl, "low"), (r, zh, "high")):
        _, clean = model.run(list(x), capture=names)
        edits = {}
        for s in names:
            site = model.site(s)
            keep = masks[s]
            if level == "low":
                full = torch.zeros(25, site.width, dtype=torch.bool)
                full[:, list(r.plan.site(s).kept)] = keep
                keep = full
            src_v = clean[s].index_select(0, source)
            shape = (25, site.width) + (1,) * (src_v.dim() - 2) if site.kind == "channel" else (25,) + (1,) * (src_v.dim() - 2) + (site.width,)
            edits[s] = (keep.reshape(shape), src_v)
        full_run, _ = model.run([t.index_select(0, base) for t in x], edits=edits)
        assert torch.allclose(z, full_run, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("args", [["--batch-size", "0"], ["--swaps", "0"], ["--p", "1.5"]])
def test_cli_bad_settings_are_usage_errors(cli, tmp_path, args):
    out = tmp_path / "r.pt"
    assert cli("compile", SAMPLES / "digits_mlp.pt", "--calib", SAMPLES / "calib.safetensors", "--keep", "0.5", "-o", out).code == 0
    bad = cli("verify", SAMPLES / "digits_mlp.pt", out, "--data", SAMPLES / "eval.safetensors", *args)
    assert bad.code == 2 and "error:" in bad.err and "hint:" in bad.err and "Traceback" not in bad.err


def test_onnx_parity(tmp_path):
    out = tmp_path / "r.pt"
    api.compile(SAMPLES / "digits_mlp.pt", out, calib=SAMPLES / "calib.safetensors", keep=0.5, onnx=tmp_path / "r.onnx")
    r = api.verify(SAMPLES / "digits_mlp.pt", out, SAMPLES / "eval.safetensors", swaps=50, onnx=tmp_path / "r.onnx")
    assert r.onnx_max_abs_diff is not None and r.onnx_max_abs_diff <= 1e-4
    assert "onnx" in r.inputs


def test_cli_verdict_json_and_exit_codes(cli, tmp_path):
    out = tmp_path / "r.pt"
    assert cli("compile", SAMPLES / "digits_mlp.pt", "--calib", SAMPLES / "calib.safetensors", "--keep", "0.5", "-o", out).code == 0
    ok = cli("verify", SAMPLES / "digits_mlp.pt", out, "--data", SAMPLES / "eval.safetensors", "--swaps", "200", "--min-iia", "0.1")
    assert ok.code == 0, ok.err
    d = ok.json()
    assert {"passed", "fold_error", "agreement", "kl", "sites", "onnx_max_abs_diff", "schema_version", "tool_version"} <= set(d)
    assert d["passed"] is True and d["fold_error"] < 1e-4
    assert d["accuracy_original"] == pytest.approx(0.9765, abs=1e-4)
    for s in d["sites"]:
        assert {"name", "iia", "iia_ci", "kl", "d2", "certificate"} <= set(s)
    assert d["all_sites"]["name"] == "all"
    assert set(d["inputs"]) == {"original", "reduced", "data"}
    bad = cli("verify", SAMPLES / "digits_mlp.pt", out, "--data", SAMPLES / "eval.safetensors", "--swaps", "200", "--min-iia", "0.99", "--max-fold-error", "1e-9")
    assert bad.code == 3
    assert bad.json()["passed"] is False and len(bad.json()["failures"]) == 4  # 2 sites + all + fold error
    assert [ln for ln in bad.err.splitlines() if ln.startswith("error: ")][0].startswith("error: verification failed")
    assert "hint:" in bad.err and "interchange: 600 swaps" in bad.err


def test_bad_inputs(cli, tmp_path):
    out = tmp_path / "r.pt"
    cli("compile", SAMPLES / "digits_mlp.pt", "--calib", SAMPLES / "calib.safetensors", "--keep", "0.5", "-o", out)
    wrong = write_data(tmp_path / "w.safetensors", torch.rand(5, 3, 3))
    cases = [
        (["verify", SAMPLES / "digits_mlp.pt", SAMPLES / "digits_mlp.pt", "--data", SAMPLES / "eval.safetensors"], 1, "has no cmrtool plan"),
        (["verify", SAMPLES / "digits_mlp_traced.pt", out, "--data", SAMPLES / "eval.safetensors"], 1, "reduced from another model"),
        (["verify", SAMPLES / "digits_mlp.pt", out, "--data", wrong], 1, "rejected inputs"),
        (["verify", SAMPLES / "digits_mlp.pt", out, "--data", SAMPLES / "eval.safetensors", "--site", "nope"], 2, "not in the reduced model's plan"),
        (["verify", SAMPLES / "digits_mlp.pt", out, "--data", SAMPLES / "eval.safetensors", "--swaps", "0"], 2, "--swaps"),
        (["verify", SAMPLES / "digits_mlp.pt", out, "--data", SAMPLES / "eval.safetensors", "--onnx", tmp_path / "x.onnx"], 1, "not found"),
    ]
    for args, code, text in cases:
        r = cli(*args)
        assert r.code == code, (args, r.err)
        errors = [ln for ln in r.err.splitlines() if ln.startswith("error: ")]
        assert len(errors) == 1 and text in errors[0], r.err
        assert "hint: " in r.err and "Traceback" not in r.err and r.out == ""


_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}


@pytest.mark.parametrize("dtype", list(_BITS))
def test_select_equals_where_bit_for_bit(dtype):
    """The bitwise select gives where's bits, NaN, infinities and signed zeros included; float
    weights give lerp, which equals where on finite values."""
    g = torch.Generator().manual_seed(0)
    v, f = torch.randn(40, 24, generator=g), torch.randn(40, 24, generator=g)
    special = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0, 0.0])
    v[0, :5], f[0, 5:10], f[1, :5], v[1, 5:10] = special, special, special, special
    v, f = v.to(dtype), f.to(dtype)
    m = torch.rand(40, 24, generator=g) < 0.5
    assert torch.equal(select(m, f, v).view(_BITS[dtype]), torch.where(m, f, v).view(_BITS[dtype]))
    # a broadcast mask goes to where
    assert torch.equal(select(m[:, :1], f, v).view(_BITS[dtype]), torch.where(m[:, :1], f, v).view(_BITS[dtype]))
    fin_v, fin_f = torch.nan_to_num(v, posinf=1.0, neginf=-1.0, nan=2.0), torch.nan_to_num(f, posinf=1.0, neginf=-1.0, nan=2.0)
    assert torch.equal(select(m.to(dtype), fin_f, fin_v), torch.where(m, fin_f, fin_v))


@pytest.mark.parametrize("p", [0.0, 0.25, 0.3, 0.5, 0.875, 1.0])
def test_mask_draws_are_bernoulli_p_and_reproducible(p):
    n, w = 6000, 37  # a width that is not a multiple of the 32-bit words
    m = _bernoulli(torch.Generator().manual_seed(4), n, w, p)
    assert m.shape == (n, w) and m.dtype == torch.bool and m.is_contiguous()
    tol = 5 * (p * (1 - p) / (n * w)) ** 0.5 + 1e-12
    assert abs(float(m.double().mean()) - p) <= tol
    cols = m.double().mean(0)
    assert float((cols - p).abs().max()) <= 5 * (p * (1 - p) / n) ** 0.5 + 1e-12  # every unit, not just the total
    if 0 < p < 1:  # units independent: two columns agree as often as chance says
        a, b = m[:, 0].double(), m[:, 1].double()
        assert abs(float((a * b).mean()) - p * p) <= 5 * (p * p * (1 - p * p) / n) ** 0.5
    assert torch.equal(_bernoulli(torch.Generator().manual_seed(4), n, w, p), m)


def _scripted_pair(tmp_path, seed, n):
    """A scripted float64 TinyMLP, its data, and its keep-0.5 reduction: (x, path, data, O, R, site order)."""
    x = inputs_for((6,), n=n, seed=seed)
    path = save_ts(build(TinyMLP, seed=seed), tmp_path / "o.pt", "script", None)
    data = write_data(tmp_path / "d.safetensors", x)
    api.compile(path, tmp_path / "r.pt", calib=data, keep=0.5)
    o, r = TorchScriptModel(path), TorchScriptModel(tmp_path / "r.pt")
    return x, path, data, o, r, o.site_order([s.name for s in r.plan.sites])


def _site_cache(model, ds, x):
    """O's clean activations for a downstream cut at the site itself (the reference path)."""
    with torch.no_grad():
        _, vals, fronts = model.capture_for([ds], [x])
    return _Cache(ds, [x], vals, fronts[0])


def test_runs_after_the_linear_equal_runs_from_the_site(tmp_path):
    """O's interchange runs start after the Linear that reads the site, applying its retained
    columns to the change of the retained units (linearity); equal to cutting at the site and
    mixing the full-width value, to float64 rounding, and exactly so for the fold-error pass."""
    x, path, data, o, r, names = _scripted_pair(tmp_path, 5, 90)
    g = torch.Generator().manual_seed(0)
    base, source = torch.randint(90, (70,), generator=g), torch.randint(90, (70,), generator=g)
    masks = {s: torch.rand(70, len(r.plan.site(s).kept), generator=g) < 0.5 for s in names}
    for group in ([names[0]], [names[1]], names):
        low, high = prepare_interchange(o, r, group, [x])
        assert low.downstream.linear is not None  # fc1 → fc2 and fc2 → out are both Linear readers
        at_site = _downstreams(o, [(group, "")], [x])[0]
        assert at_site.linear is None
        plain = _site_cache(o, at_site, x)
        zl, zh = interchange(low, high, r.plan, o, r, base, source, masks)
        ref, zh2 = interchange(plain, high, r.plan, o, r, base, source, masks)
        assert torch.allclose(zl, ref, rtol=1e-12, atol=1e-12) and torch.equal(zh, zh2)
        assert not torch.equal(zl, zh)  # the reduction changed something: the check is not vacuous
    rep = api.verify(path, tmp_path / "r.pt", data, swaps=100)
    assert rep.fold_error < 1e-12


def test_non_finite_activations_are_selected_exactly(tmp_path):
    """An infinite cached activation must not turn into NaN through the lerp or linearity fast
    paths: those are used only for finite values, and the runs fall back to exact selection."""
    x, _, _, o, r, names = _scripted_pair(tmp_path, 6, 40)
    low, high = prepare_interchange(o, r, names, [x])
    at_site = _downstreams(o, [(names, "")], [x])[0]
    plain = _site_cache(o, at_site, x)
    kept = r.plan.site(names[0]).kept
    for cache in (low, plain):
        cache.values[names[0]][3, kept[0]] = float("inf")  # sample 3, a retained unit
        cache.finite.clear()
    base = torch.tensor([i for i in range(40) if i != 3])
    source = torch.full((39,), 3)
    masks = {s: torch.zeros(39, len(r.plan.site(s).kept), dtype=torch.bool) for s in names}
    masks[names[0]][:, 1:] = True  # take every retained unit but the infinite one from sample 3
    zl, _ = interchange(low, high, r.plan, o, r, base, source, masks)
    ref, _ = interchange(plain, high, r.plan, o, r, base, source, masks)
    assert torch.isfinite(zl).all() and torch.allclose(zl, ref, rtol=1e-12, atol=1e-12)


def test_a_linear_cut_whose_layout_cannot_be_told_falls_back_to_the_site(tmp_path, monkeypatch):
    x, _, _, o, _, names = _scripted_pair(tmp_path, 7, 30)
    probe = TorchScriptModel._batch_axes
    seen = []

    def picky(self, values, inputs):
        seen.append(tuple(values))
        return None if len(seen) == 1 else probe(self, values, inputs)  # the first probe is the Linear cut's

    monkeypatch.setattr(TorchScriptModel, "_batch_axes", picky)
    ds = o.downstream([names[0]], [x], after_linear=True)
    assert ds is not None and ds.linear is None and len(seen) == 2
    assert o.downstream([names[0]], [x], after_linear=False) is not None
