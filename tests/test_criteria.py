"""Registry-wide criterion properties, and the pinned meaning of cmr-logit."""

from __future__ import annotations

import pytest
import torch
from helpers import CASES, TinyMLP, build, inputs_for, save_ts, write_data

from cmrtool.backends.torchscript.model import TorchScriptModel
from cmrtool.score.criteria import REGISTRY, get_criterion
from cmrtool.io.data import Dataset
from cmrtool.errors import UsageError
from cmrtool.score.scoring import score_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("crit")
    out = {}
    for case in ("mlp", "conv", "token_flatten", "conv_flatten"):
        factory, shape = CASES[case]
        x = inputs_for(shape)
        m = TorchScriptModel(save_ts(build(factory), tmp / f"{case}.pt", "script", None))
        q = m.forward([x[:1]]).shape[-1]
        labels = torch.randint(0, q, (x.shape[0],), generator=torch.Generator().manual_seed(0))
        out[case] = (m, Dataset(write_data(tmp / f"{case}.safetensors", x), m.arg_names, 1, m.dtype))
        out[case + "+labels"] = (m, Dataset(write_data(tmp / f"{case}_y.safetensors", x, labels), m.arg_names, 1, m.dtype))
    return out


@pytest.mark.parametrize("criterion", sorted(REGISTRY))
def test_every_criterion_on_every_site_kind(criterion, models):
    for m, data in models.values():
        a = score_model(m, data, criterion, m.sites, seed=3)
        b = score_model(m, data, criterion, m.sites, seed=3)
        assert a == b  # deterministic for a seed
        for site, s in zip(m.sites, a.sites):
            scores, repl = torch.tensor(s.scores), torch.tensor(s.replacement)
            assert scores.shape == repl.shape == (site.width,)
            assert torch.isfinite(scores).all() and torch.isfinite(repl).all()
            if criterion != "cmr-const":  # eq. (9) may be negative: replacing can lower the loss
                assert (scores >= 0).all()


def test_unknown_criterion_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown criterion") as e:
        get_criterion("nope")
    assert all(name in e.value.hint for name in REGISTRY)


def test_cmr_logit_is_the_expected_squared_logit_distortion_of_mean_replacement(tmp_path):
    # For a site feeding the logits, replacing unit j by its mean changes the logits by
    # W[:, j] (mean_j - a_j); the expected squared norm is Var[a_j] ||W[:, j]||^2.
    x = inputs_for((6,), n=500)
    m = TorchScriptModel(save_ts(build(TinyMLP), tmp_path / "m.pt", "script", None))
    data = Dataset(write_data(tmp_path / "d.safetensors", x), m.arg_names, 1, m.dtype)
    site = m.site("fc2")
    assert site.feeds_logits
    s = score_model(m, data, "cmr-logit", [site]).sites[0]
    base, vals = m.run([x], capture=["fc2"])
    for j in range(site.width):
        mask = torch.zeros(site.width, dtype=torch.bool)
        mask[j] = True
        fill = torch.zeros(site.width, dtype=torch.float64)
        fill[j] = s.replacement[j]
        z, _ = m.run([x], edits={"fc2": (mask, fill)})
        d2 = (z - base).square().sum(1).mean().item()
        assert d2 == pytest.approx(s.scores[j], rel=1e-9, abs=1e-15)


def test_random_depends_on_seed_and_site_only(models):
    m, data = models["mlp"]
    a = score_model(m, data, "random", m.sites, seed=1)
    b = score_model(m, data, "random", list(reversed(m.sites)), seed=1)
    c = score_model(m, data, "random", m.sites, seed=2)
    assert a.site("fc1").scores == b.site("fc1").scores
    assert a.site("fc1").scores != c.site("fc1").scores
