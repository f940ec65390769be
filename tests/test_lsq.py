"""Least-squares compensation (cmrtool.reduce.lsq, CMR A.5): the dense ridge fit against its closed
form, the exactness of every dense fold (TorchScript cases, gated and plain FFNs, GQA heads),
the plan's compact matrix round-trip, the cmr-lsq criterion's invariances, and clean usage
errors for the new options."""

from __future__ import annotations

import pytest
import torch
from helpers import CASES, SAMPLES, build, dense_plan, inputs_for, save_ts

from cmrtool.backends.torchscript.model import TorchScriptModel
from cmrtool.compile.run import compile_model
from cmrtool.score.criteria import Evidence, get_criterion
from cmrtool.errors import InputError
from cmrtool.reduce.lsq import dense_fit, greedy_removal, removal_scores, residual_covariance
from cmrtool.plan import Plan, Replacement, SitePlan
from cmrtool.score.stats import Comoments, Moments


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c = Comoments(x.shape[1]).update_value(x, -1)
    return c.mean, c.cov


def test_three_unit_refit_residual_is_the_closed_form():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 2, generator=g, dtype=torch.float64) * torch.tensor([2.0, 0.5], dtype=torch.float64) + torch.tensor([1.0, -3.0], dtype=torch.float64)
    a = torch.cat([a, a[:, :1] * 0.3], 1)  # correlated kept pair
    a[:, 1] += a[:, 0]
    noise = torch.randn(4000, generator=g, dtype=torch.float64) * 0.7
    unit = 1.5 + 2.0 * a[:, 0] - 1.0 * a[:, 1] + noise
    x = torch.stack([a[:, 0], a[:, 1], unit], 1)
    mean, cov = _stats(x)
    b0, coef = dense_fit(mean, cov, [0, 1], [2], ridge=0.0)
    # Ordinary least squares with intercept on the samples.
    design = torch.cat([torch.ones(4000, 1, dtype=torch.float64), x[:, :2]], 1)
    ols = torch.linalg.lstsq(design, x[:, 2:]).solution.squeeze(1)
    assert torch.allclose(torch.cat([b0, coef[0]]), ols, atol=1e-9)
    # Residual: the empirical one, and the Schur complement Σ_SS − Σ_SK Σ_KK⁻¹ Σ_KS by hand (2×2 inverse).
    resid = x[:, 2] - (b0 + x[:, :2] @ coef[0])
    (p, q), (_, r) = cov[:2, :2].tolist()
    inv = torch.tensor([[r, -q], [-q, p]], dtype=torch.float64) / (p * r - q * q)
    schur = cov[2, 2] - cov[2, :2] @ inv @ cov[:2, 2]
    closed = residual_covariance(mean, cov, [0, 1], [2], b0, coef)
    assert torch.allclose(closed[0, 0], schur, rtol=1e-10)
    assert torch.allclose(closed[0, 0], resid.square().mean(), rtol=1e-9)
    assert abs(float(closed[0, 0]) - 0.49) < 0.05  # the noise variance, not vacuous
    # Intercept-free: least squares through the origin, residual second moment.
    z0, zc = dense_fit(mean, cov, [0, 1], [2], ridge=0.0, intercept=False)
    through = torch.linalg.lstsq(x[:, :2], x[:, 2:]).solution.squeeze(1)
    assert torch.equal(z0, torch.zeros(1, dtype=torch.float64)) and torch.allclose(zc[0], through, atol=1e-9)
    r0 = x[:, 2] - x[:, :2] @ zc[0]
    assert torch.allclose(residual_covariance(mean, cov, [0, 1], [2], z0, zc)[0, 0], r0.square().mean(), rtol=1e-9)


def test_dense_fit_solves_the_ridge_normal_equations_for_all_removed_units_at_once():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 9, generator=g, dtype=torch.float64) @ torch.randn(9, 9, generator=g, dtype=torch.float64)
    mean, cov = _stats(x)
    kept, rep = [0, 2, 3, 5, 8], [1, 4, 6, 7]
    b0, coef = dense_fit(mean, cov, kept, rep, ridge=0.05)
    ckk = cov[kept][:, kept]
    lam = 0.05 * float(ckk.diagonal().mean())
    want = torch.linalg.solve(ckk + lam * torch.eye(5, dtype=torch.float64), cov[kept][:, rep]).T
    assert torch.allclose(coef, want, atol=1e-10) and torch.allclose(b0, mean[rep] - want @ mean[kept], atol=1e-10)


@pytest.mark.parametrize("case", sorted(CASES))
def test_dense_affine_folds_exactly_and_round_trips(case, tmp_path):
    factory, shape = CASES[case]
    x = inputs_for(shape)
    m = TorchScriptModel(save_ts(build(factory), tmp_path / "m.pt", "script", x[:2]))
    plan = dense_plan(m, torch.Generator().manual_seed(3))
    r = compile_model(m, plan, tmp_path / "r.pt", check_inputs=[x])
    assert r.fold_error.relative <= 1e-10, r.fold_error
    back = Plan.loads(plan.dumps())
    assert back == plan and back.sites[0].replacement.matrix == plan.sites[0].replacement.matrix
    assert TorchScriptModel(str(tmp_path / "r.pt")).plan == plan


def test_dense_plan_is_compact_and_checked():
    coef = torch.arange(6, dtype=torch.float64).reshape(2, 3) / 7
    rep = Replacement.dense_affine(torch.tensor([0.5, -1.0], dtype=torch.float64), coef)
    sp = SitePlan("s", "neuron", 5, (0, 2, 4), (1, 3), rep)
    d = sp.to_json()["replacement"]
    assert set(d) == {"kind", "values", "matrix", "matrix_dtype"} and len(d["matrix"]) == 32  # 24 bytes in base64
    assert torch.equal(rep.dense(2), coef.float().double())  # float32 storage, read back exactly
    with pytest.raises(InputError, match="not 2×2"):
        SitePlan("s", "neuron", 4, (0, 2), (1, 3), rep)
    bad = dict(d, matrix=d["matrix"][:-4])
    with pytest.raises(InputError):
        SitePlan.from_json({**sp.to_json(), "replacement": bad})


transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """Tiny float64 LLaMA (gated FFN, GQA heads) and BERT (plain FFN) classifiers and data."""
    from safetensors.torch import save_file

    transformers.utils.logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("hf-lsq")
    configs = {
        "llama": transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, max_position_embeddings=16, num_labels=3, pad_token_id=0, initializer_range=0.4),
        "bert": transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24,
                                        max_position_embeddings=16, num_labels=3, initializer_range=0.4),
    }
    dirs = {}
    for name, cfg in configs.items():
        torch.manual_seed(0)
        transformers.AutoModelForSequenceClassification.from_config(cfg).double().eval().save_pretrained(str(root / name))
        dirs[name] = root / name
    ids = torch.randint(1, 40, (64, 9), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, str(root / "data.safetensors"))
    return dirs, root / "data.safetensors"


@pytest.mark.parametrize(("name", "kind", "replacement", "criterion"), [
    ("llama", "neuron", "affine", "cmr-logit"),  # gated FFN: the product entering down_proj
    ("llama", "neuron", "affine-nobias", "cmr-lsq"),
    ("llama", "head", "affine", "cmr-logit"),  # GQA: a unit is a key/value group, fitted over its channels
    ("bert", "neuron", "affine", "cmr-lsq"),  # plain FFN
    ("bert", "head", "affine-nobias", "vbp"),
])
def test_hf_affine_compiles_exactly_and_reloads(hf, name, kind, replacement, criterion, tmp_path):
    from cmrtool import api
    from cmrtool.backends import load_model
    from cmrtool.backends.module.checkpoint import load_reduced

    dirs, data = hf
    out = tmp_path / "r.safetensors"
    # One-shot calibration: the fit and its mean/zero baseline see the same layer inputs.
    r = api.compile(dirs[name], out, calib=data, kinds=[kind], keep=0.5, replacement=replacement, criterion=criterion, calibration="original")
    assert r.fold_error.relative <= 1e-10, r.fold_error
    sp = r.plan.sites[0]
    assert sp.replacement.matrix and sp.replacement.dense(len(sp.replaced) * sp.group).shape == (len(sp.replaced) * sp.group, len(sp.kept) * sp.group)
    assert any(v != 0 for v in sp.replacement.values) == (replacement == "affine")
    reduced = load_reduced(out)
    assert reduced.plan.sites == r.plan.sites  # the matrix survives the safetensors metadata
    original = load_model(dirs[name])
    from cmrtool.io.data import Dataset

    x = list(Dataset(data, ["input_ids", "attention_mask"], 1).all().inputs)
    baseline = "mean" if replacement == "affine" else "zero"  # the fit's own constant-only special case
    with torch.no_grad():  # the refit beats it on its own calibration data
        mean = api.compile(dirs[name], tmp_path / "m.safetensors", calib=data, kinds=[kind], keep=0.5, replacement=baseline, criterion=criterion,
                           calibration="original")
        dense = original.forward(x)
        err_affine = (reduced.forward(x) - dense).square().mean()
        err_mean = (load_reduced(tmp_path / "m.safetensors").forward(x) - dense).square().mean()
    assert mean.plan.sites[0].kept == sp.kept
    assert err_affine < err_mean, (err_affine, err_mean)


def _evidence(x: torch.Tensor, w: torch.Tensor, ridge: float = 1e-3) -> Evidence:
    from cmrtool.sites import Site

    width = x.shape[1]
    site = Site("s", "neuron", width, (), ())
    return Evidence(site=site, moments=Moments(width).update(x), col_sq_norms=w.square().sum(0), comoments=Comoments(width).update_value(x, -1),
                    ridge=ridge, consumer_weights=w)


def test_cmr_lsq_invariances_and_determinism():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(800, 10, generator=g, dtype=torch.float64) @ torch.randn(10, 10, generator=g, dtype=torch.float64)
    w = torch.randn(4, 10, generator=g, dtype=torch.float64)
    crit = get_criterion("cmr-lsq")
    base = crit.fn(_evidence(x, w))
    assert base.kind == "affine" and torch.equal(base.scores, crit.fn(_evidence(x, w)).scores)  # deterministic
    assert len(set(base.scores.tolist())) == 10  # strictly ordered: nested kept sets
    perm = torch.randperm(10, generator=g)
    permuted = crit.fn(_evidence(x[:, perm], w[:, perm]))
    assert torch.allclose(permuted.scores, base.scores[perm], rtol=1e-9)
    scaled = crit.fn(_evidence(x * 3.0, w / 3.0))  # a → s·a, W → W/s (Proposition 2, common s)
    assert torch.allclose(scaled.scores, base.scores, rtol=1e-9)
    s = torch.rand(10, generator=g, dtype=torch.float64) * 4 + 0.25  # per-unit s: exact as ridge → 0
    per_unit = crit.fn(_evidence(x * s, w / s, ridge=1e-12))
    assert torch.equal(torch.argsort(per_unit.scores), torch.argsort(crit.fn(_evidence(x, w, ridge=1e-12)).scores))


def test_greedy_removal_costs_are_the_refit_distortion():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(600, 8, generator=g, dtype=torch.float64) @ torch.randn(8, 8, generator=g, dtype=torch.float64)
    w = torch.randn(3, 8, generator=g, dtype=torch.float64)
    mean, cov = _stats(x)
    order, added = greedy_removal(cov, w, ridge=0.0)
    # First step: ‖W_j‖² · Var[a_j | all others] (local replaceability × column norm²).
    prec = torch.linalg.inv(cov)
    assert torch.allclose(added[0], (w.square().sum(0) / prec.diagonal()).min(), rtol=1e-8)
    for m in (1, 3, 5):  # cumulative cost = tr(W_S R W_Sᵀ) after refitting S on the rest
        rep = sorted(order[:m].tolist())
        kept = [i for i in range(8) if i not in rep]
        b0, coef = dense_fit(mean, cov, kept, rep, ridge=0.0)
        distortion = torch.trace(w[:, rep] @ residual_covariance(mean, cov, kept, rep, b0, coef) @ w[:, rep].T)
        assert torch.allclose(added[:m].sum(), distortion, rtol=1e-7), m
        # ...and the greedy's choice is the best single addition to the previous set.
        if m > 1:
            prev = sorted(order[: m - 1].tolist())
            best = min(
                float(torch.trace(w[:, prev + [j]] @ residual_covariance(mean, cov, [i for i in range(8) if i not in prev + [j]], prev + [j],
                      *dense_fit(mean, cov, [i for i in range(8) if i not in prev + [j]], prev + [j], 0.0)) @ w[:, prev + [j]].T))
                for j in range(8) if j not in prev
            )
            assert abs(float(distortion) - best) <= 1e-7 * best
    scores = removal_scores(order, added)
    assert torch.equal(torch.argsort(scores), order)
    o3, a3 = greedy_removal(cov, w, ridge=0.0, block=3)  # deferred updates flushed mid-way: same result
    assert torch.equal(o3, order) and torch.allclose(a3, added, rtol=1e-8, atol=1e-12 * float(added.max()))


@pytest.mark.parametrize(("args", "text"), [
    (["--parents", "0"], "--parents must be 'all' or a positive integer"),
    (["--parents", "many"], "--parents must be 'all' or a positive integer"),
    (["--ridge", "-1"], "--ridge must be a finite number"),
    (["--ridge", "nan"], "--ridge must be a finite number"),
    (["--replacement", "affine-nobias", "--parents", "4"], "affine-nobias fits on every kept unit"),
    (["--replacement", "affine-nobias"], "needs calibration data"),
])
def test_bad_affine_options_are_clean_usage_errors(args, text, cli, tmp_path):
    calib = [] if args == ["--replacement", "affine-nobias"] else ["--calib", SAMPLES / "calib.safetensors"]
    scores = ["--scores", tmp_path / "missing.json"] if not calib else []
    r = cli("compile", SAMPLES / "digits_mlp.pt", *calib, *scores, "--keep", "0.5", *args, "-o", tmp_path / "r.pt")
    assert r.code == 2, r.err
    lines = r.err.strip().splitlines()
    assert sum(ln.startswith("error: ") for ln in lines) == 1 and text in r.err and sum(ln.startswith("hint: ") for ln in lines) == 1, r.err
    assert "Traceback" not in r.err and r.out == "" and not (tmp_path / "r.pt").exists()


def test_heads_take_every_kept_head_as_parents(hf, tmp_path):
    from cmrtool import api
    from cmrtool.errors import UsageError

    dirs, data = hf
    with pytest.raises(UsageError, match="grouped"):
        api.compile(dirs["llama"], tmp_path / "r.safetensors", calib=data, kinds=["head"], keep=0.5, replacement="affine", parents=1)
    assert not (tmp_path / "r.safetensors").exists()
