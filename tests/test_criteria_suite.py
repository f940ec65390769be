"""The full criteria suite: curvature (Gauss-Newton vs autograd), c*, Lemma 1, affine
replacements, joint refit, schedules, global allocation, and the audits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import CASES, SAMPLES, TinyMLP, build, inputs_for, save_ts, write_data

from cmrtool import api
from cmrtool.studies.audit import kendall, rescaled_tensors, spearman
from cmrtool.backends.torchscript.model import TorchScriptModel
from cmrtool.compile.run import compile_model
from cmrtool.reduce.plans import compose, make_plan
from cmrtool.io.data import Dataset
from cmrtool.errors import UsageError
from cmrtool.plan import Plan, Replacement, SitePlan
from cmrtool.reduce.refit import joint_constants
from cmrtool.score.scoring import score_model
from cmrtool.score.sensitivity import closed_form_weight, site_sensitivity
from cmrtool.score.stats import CurvatureSums


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("suite")
    x = inputs_for((6,), n=200, seed=2)
    labels = torch.randint(0, 4, (200,), generator=torch.Generator().manual_seed(5))
    path = save_ts(build(TinyMLP, seed=4), tmp / "m.pt", "script", None)
    m = TorchScriptModel(path)
    return m, x, labels, Dataset(write_data(tmp / "d.safetensors", x, labels), m.arg_names, 1, m.dtype), tmp


def _explicit_jacobian(m, site, x):
    """J (n, q, width) of the logits w.r.t. the site value, sample by sample, via autograd."""
    ds = m.downstream([site], [x])
    _, vals, fr = ds.capture([x])
    a = vals[site].detach()
    rows = []
    for i in range(a.shape[0]):
        def f(v, i=i):
            return ds.run([x[i : i + 1]], v.unsqueeze(0), [t[i : i + 1] for t in fr]).squeeze(0)

        rows.append(torch.autograd.functional.jacobian(f, a[i]))
    return a, torch.stack(rows)


@pytest.mark.parametrize("site", ["fc1", "fc2"])
def test_gauss_newton_curvature_matches_autograd(tiny, site):
    m, x, labels, _, _ = tiny
    x = x[:12]
    a, J = _explicit_jacobian(m, site, x)  # (n, width), (n, q, width)
    z = m.forward([x]).detach()
    p = F.softmax(z.double(), -1)
    H = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)  # (n, q, q)
    h_ref = torch.einsum("nqj,nqr,nrj->nj", J, H, J)
    g_ref = torch.einsum("nqj,nq->nj", J, p - F.one_hot(labels[:12], 4).double())
    s = m.site(site)
    ds = m.downstream([site], [x])
    _, vals, fr = ds.capture([x])
    weight = closed_form_weight(s, m.tensors())
    assert (weight is not None) == (site == "fc2")  # fc2 feeds the logits: closed form
    r = site_sensitivity(s, vals[site], z, labels[:12], weight, ds, [x], fr, True, True, mode="exact")
    assert torch.allclose(r.curv, h_ref, rtol=1e-9, atol=1e-12)
    assert torch.allclose(r.grad, g_ref, rtol=1e-9, atol=1e-12)


def test_sampled_curvature_is_unbiased(tiny):
    m, x, _, _, _ = tiny
    x = x[:4]
    s = m.site("fc1")
    ds = m.downstream(["fc1"], [x])
    _, vals, fr = ds.capture([x])
    z = m.forward([x]).detach()
    exact = site_sensitivity(s, vals["fc1"], z, None, None, ds, [x], fr, False, True, mode="exact").curv
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([site_sensitivity(s, vals["fc1"], z, None, None, ds, [x], fr, False, True, mode="sampled", generator=g).curv for _ in range(3000)])
    assert torch.allclose(draws.mean(0), exact, rtol=0.1, atol=1e-3 * float(exact.abs().max()))


def test_curvature_is_cancellation_free_on_saturated_softmax():
    w = torch.tensor([[1e4, 0.0], [0.0, 1.0], [-3.0, 2.0]], dtype=torch.float64)  # (q, width)
    p = torch.tensor([[1 - 1e-12, 5e-13, 5e-13]], dtype=torch.float64)
    from cmrtool.score.sensitivity import _closed_form

    h = _closed_form(torch.zeros(1, 2), p, None, w, False, True, False).curv
    naive = p @ w.square() - (p @ w).square()
    exact = (p.T * (w - p @ w).square()).sum(0)
    assert (h >= 0).all() and torch.allclose(h[0], exact, rtol=1e-9)
    assert abs(float(naive[0, 0] - exact[0])) > 1e-6 * float(exact[0])  # the naive form is off


def test_optimal_constant_minimizes_the_quadratic_proxy(tiny):
    m, x, labels, _, _ = tiny
    s = m.site("fc1")
    ds = m.downstream(["fc1"], [x])
    _, vals, fr = ds.capture([x])
    z = m.forward([x]).detach()
    r = site_sensitivity(s, vals["fc1"], z, labels, None, ds, [x], fr, True, True, mode="exact")
    cs = CurvatureSums(s.width).update(r.value, r.grad, r.curv, -1)
    c, score = cs.optimal()
    a = r.value.double()

    def q(cvec):  # eq. (6) times 1, per unit
        d = cvec.unsqueeze(0) - a
        return (r.grad * d).sum(0) + 0.5 * (r.curv * d * d).sum(0)

    n = a.shape[0]
    assert torch.allclose(q(c) / n, score, rtol=1e-9, atol=1e-12)  # eq. (9) is the minimum value
    for delta in (1e-3, 0.1, 1.0):
        assert (q(c + delta) >= q(c) - 1e-12).all() and (q(c - delta) >= q(c) - 1e-12).all()


def test_lemma1_cmr_const_is_vbp_under_zero_gradient_and_uniform_curvature():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 9, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 9, dtype=torch.float64) + 2
    alpha = 0.7
    cs = CurvatureSums(9).update(a, torch.zeros_like(a), torch.full_like(a, alpha), -1)
    c, score = cs.optimal()
    assert torch.allclose(c, a.mean(0), rtol=1e-12)
    assert torch.allclose(score, alpha / 2 * a.var(0, unbiased=False), rtol=1e-9)
    assert torch.equal(torch.argsort(score), torch.argsort(a.var(0, unbiased=False)))


@pytest.mark.parametrize("criterion", ["cmr-logit", "cmr-const", "taylor", "gndi", "peer"])
def test_invariant_criteria_survive_rescaling(criterion, tiny):
    m, x, labels, data, tmp = tiny
    s = m.site("fc1")
    scales = {"fc1": torch.exp(torch.empty(s.width, dtype=torch.float64).uniform_(-4.6, 4.6, generator=torch.Generator().manual_seed(1)))}
    path = tmp / f"twin_{criterion}.pt"
    m.write(path, rescaled_tensors(m.tensors(), [s], scales), None)
    twin = TorchScriptModel(path)
    assert torch.allclose(twin.forward([x]), m.forward([x]), rtol=1e-10, atol=1e-10)
    a = score_model(m, data, criterion, [s]).site("fc1").scores
    b = score_model(twin, data, criterion, [twin.site("fc1")]).site("fc1").scores
    assert torch.allclose(torch.tensor(a), torch.tensor(b), rtol=1e-6, atol=1e-12)
    if criterion == "cmr-logit":  # and vbp is not
        va = score_model(m, data, "vbp", [s]).site("fc1").scores
        vb = score_model(twin, data, "vbp", [twin.site("fc1")]).site("fc1").scores
        assert not torch.allclose(torch.tensor(va), torch.tensor(vb), rtol=1e-3)


def test_gndi_exact_equals_the_closed_form_at_the_logits(tiny):
    m, _, _, data, _ = tiny
    r = score_model(m, data, "gndi", [m.site("fc2")]).site("fc2")
    x = data.all().inputs[0]
    _, vals = m.run([x], capture=["fc2"])
    w = m.tensors()["out.weight"].double()
    dev = vals["fc2"].double() - torch.tensor(r.mean, dtype=torch.float64)
    ref = (dev.abs().unsqueeze(1) * w.abs().unsqueeze(0)).square().sum(1).sqrt().mean(0)  # |a−b|·‖W[:, j]‖
    assert torch.allclose(torch.tensor(r.scores, dtype=torch.float64), ref, rtol=1e-9)
    assert r.site_score is not None and r.site_score > 0


@pytest.mark.parametrize("mode", ["script", "trace"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_affine_replacements_fold_exactly(case, mode, tmp_path):
    factory, shape = CASES[case]
    x = inputs_for(shape)
    m = TorchScriptModel(save_ts(build(factory), tmp_path / "m.pt", mode, x[:2]))
    g = torch.Generator().manual_seed(3)
    sites = []
    for s in m.sites:
        if not s.foldable:
            continue
        kept = tuple(range(0, s.width, 2))
        replaced = tuple(range(1, s.width, 2))
        parents = tuple(tuple(sorted(torch.randperm(len(kept), generator=g)[:2].tolist())) for _ in replaced)
        parents = tuple(tuple(kept[i] for i in p) for p in parents)
        coefs = tuple(tuple(torch.randn(len(p), generator=g).tolist()) for p in parents)
        b0 = tuple(torch.randn(len(replaced), generator=g).tolist())
        sites.append(SitePlan(s.name, s.kind, s.width, kept, replaced, Replacement("affine", b0, parents, coefs)))
    plan = Plan(m.sha256, "hand", tuple(sites))
    r = compile_model(m, plan, tmp_path / "r.pt", check_inputs=[x])
    assert r.fold_error.relative <= 1e-10, r.fold_error
    assert Plan.loads(plan.dumps()) == plan


def test_affine_criteria_compile_and_beat_their_constant_versions(tmp_path):
    calib, held = SAMPLES / "calib.safetensors", SAMPLES / "eval.safetensors"
    for criterion in ("peer", "cmr-affine"):
        out = tmp_path / f"{criterion}.pt"
        r = api.compile(SAMPLES / "digits_mlp.pt", out, calib=calib, criterion=criterion, keep=0.5)
        assert r.fold_error.relative <= 1e-5 and r.plan.sites[0].replacement.kind == "affine"
        v = api.verify(SAMPLES / "digits_mlp.pt", out, held, swaps=100)
        assert v.accuracy_reduced > 0.93, (criterion, v.accuracy_reduced)


def test_joint_refit_solves_the_joint_system(tiny):
    m, x, labels, data, _ = tiny
    s = m.site("fc2")  # feeds 4 logits: keep 4 of 7 so the 3 replaced constants are determined
    kept, replaced = (0, 2, 4, 6), (1, 3, 5)
    c = torch.tensor(joint_constants(m, data, s, replaced, loss="ce", start=[0.0, 0.0, 0.0], damping=1e-12), dtype=torch.float64)
    _, vals = m.run([x], capture=["fc2"])
    a = vals["fc2"].double()[:, list(replaced)]
    W = m.tensors()["out.weight"].double()[:, list(replaced)]
    p = F.softmax(m.forward([x]).double(), -1)
    y = F.one_hot(labels, 4).double()
    A = sum(W.T @ (torch.diag(p[i]) - torch.outer(p[i], p[i])) @ W for i in range(len(x)))
    b = sum(W.T @ ((torch.diag(p[i]) - torch.outer(p[i], p[i])) @ (W @ a[i]) - (p[i] - y[i])) for i in range(len(x)))
    assert torch.allclose(c, torch.linalg.solve(A, b), rtol=1e-6)


def test_joint_refit_improves_fidelity(tmp_path):
    calib, held = SAMPLES / "calib.safetensors", SAMPLES / "eval.safetensors"
    api.compile(SAMPLES / "digits_mlp.pt", tmp_path / "a.pt", calib=calib, keep=0.5)
    api.compile(SAMPLES / "digits_mlp.pt", tmp_path / "b.pt", calib=calib, keep=0.5, joint_refit=True)
    a = api.verify(SAMPLES / "digits_mlp.pt", tmp_path / "a.pt", held, swaps=50)
    b = api.verify(SAMPLES / "digits_mlp.pt", tmp_path / "b.pt", held, swaps=50)
    assert b.kl < a.kl and b.agreement > a.agreement


def test_compose_equals_one_plan():
    first = Plan("x", "c", (SitePlan("s", "neuron", 6, (0, 2, 3, 5), (1, 4), Replacement("constant", (1.0, 4.0))),))
    second = Plan("y", "c", (SitePlan("s", "neuron", 4, (1, 2), (0, 3), Replacement("constant", (10.0, 30.0))),))
    both = compose(first, second).site("s")
    assert both.kept == (2, 3) and both.replaced == (0, 1, 4, 5)
    assert both.replacement.values == (10.0, 1.0, 4.0, 30.0)


def test_schedule_reduces_in_steps_and_folds_exactly(tmp_path):
    r = api.compile(SAMPLES / "digits_mlp.pt", tmp_path / "r.pt", calib=SAMPLES / "calib.safetensors", keep=0.25, schedule=3)
    assert [len(s.kept) for s in r.plan.sites] == [64, 64]
    assert r.fold_error.relative <= 1e-5
    assert dict(r.plan.settings)["schedule"] == 3
    one = api.compile(SAMPLES / "digits_mlp.pt", tmp_path / "o.pt", calib=SAMPLES / "calib.safetensors", keep=0.25)
    assert [s.kept for s in one.plan.sites] != [s.kept for s in r.plan.sites]  # re-scoring changed the choice


def test_global_allocation(tmp_path, tiny):
    m, _, _, data, _ = tiny
    report = score_model(m, data, "cmr-const", [m.site("fc1"), m.site("fc2")])
    plan = make_plan(report, [m.site("fc1"), m.site("fc2")], keep=0.5, allocation="global")
    assert sum(len(s.kept) for s in plan.sites) == round(0.5 * (8 + 7))
    with pytest.raises(UsageError, match="common scale"):
        make_plan(score_model(m, data, "vbp", [m.site("fc1"), m.site("fc2")]), [m.site("fc1"), m.site("fc2")], keep=0.5, allocation="global")
    with pytest.raises(UsageError, match="cmr-logit qualifies only"):
        make_plan(score_model(m, data, "cmr-logit", [m.site("fc1"), m.site("fc2")]), [m.site("fc1"), m.site("fc2")], keep=0.5, allocation="global")
    ok = make_plan(score_model(m, data, "cmr-logit", [m.site("fc2")]), [m.site("fc2")], keep=0.5, allocation="global")
    assert len(ok.sites[0].kept) == 4


def test_rank_correlations():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(a, a * 10) == pytest.approx(1.0) and kendall(a, -a) == pytest.approx(-1.0)
    assert spearman(a, torch.tensor([2.0, 1.0, 4.0, 3.0, 5.0])) == pytest.approx(0.8)


def test_audit_cli_contract(cli):
    r = cli("audit", SAMPLES / "digits_mlp.pt", "--calib", SAMPLES / "calib.safetensors", "--seeds", "3", "--validate", "24",
            "--criteria", "cmr-logit,vbp,random")
    assert r.code == 0, r.err
    d = r.json()
    assert {"sites", "max_logit_change", "schema_version", "tool_version"} <= set(d)
    assert d["max_logit_change"] < 1e-4
    for s in d["sites"]:
        assert s["criteria"]["cmr-logit"]["jaccard_mean"] == 1.0
        assert s["criteria"]["vbp"]["jaccard_mean"] < 0.6
    v = d["validation"]
    assert v["units"] == 24 and v["criteria"]["cmr-logit"]["spearman"] > v["criteria"]["random"]["spearman"]


@pytest.mark.parametrize(("criteria", "message"), [(",", "no criteria given"), ("cmr-logit,nope", "unknown criterion 'nope'")])
def test_audit_bad_criteria_are_usage_errors(cli, criteria, message):
    r = cli("audit", SAMPLES / "digits_mlp.pt", "--calib", SAMPLES / "calib.safetensors", "--criteria", criteria)
    assert r.code == 2 and f"error: {message}" in r.err and "hint:" in r.err and r.out == ""


def test_audit_refuses_models_without_relu_sites(cli):
    r = cli("audit", SAMPLES / "digits_transformer.pt", "--calib", SAMPLES / "calib.safetensors", "--seeds", "1")
    assert r.code == 1 and "positively homogeneous" in r.err


def test_fitted_replacements_never_lose_calibration_fidelity(tmp_path):
    """Joint refits and affine fits are shrunk towards the per-unit constants by calibration KL."""
    import torch.nn.functional as F

    calib = SAMPLES / "calib.safetensors"
    src = SAMPLES / "digits_convnet.pt"
    base = api.compile(src, tmp_path / "a.pt", calib=calib, keep=0.5, sites=["conv2", "conv3"])
    refit = api.compile(src, tmp_path / "b.pt", calib=calib, keep=0.5, sites=["conv2", "conv3"], joint_refit=True)
    shrink = dict(refit.plan.settings)["fit_shrinkage"]
    assert set(shrink) == {"conv2", "conv3"} and all(t in (1.0, 0.5, 0.25, 0.125, 0.0) for t in shrink.values())
    x = Dataset(calib, ["x"], 1).read(0, 512).inputs[0]
    o = torch.jit.load(str(src))
    lp = F.log_softmax(o(x).double(), -1)

    @torch.no_grad()
    def kl(path):
        lq = F.log_softmax(torch.jit.load(str(path))(x).double(), -1)
        return float((lp.exp() * (lp - lq)).sum(-1).mean())

    assert kl(tmp_path / "b.pt") <= kl(tmp_path / "a.pt") + 1e-6


@pytest.mark.slow
def test_cmr_const_is_invariant_on_conv_sites_with_sampled_curvature():
    # Deeper conv sites use the sampled curvature: each site has its own draw stream, so a site
    # gets the same draws whichever other sites are scored with it.
    r = api.audit(SAMPLES / "digits_convnet.pt", SAMPLES / "calib.safetensors", ["cmr-const", "vbp"], seeds=1)
    for name, crit in r.sites.items():
        assert crit["cmr-const"][0] == 1.0, name
        assert crit["vbp"][0] < 0.7, name
