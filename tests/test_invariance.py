"""Proposition 2: cmr-logit is invariant to positive per-unit rescaling of ReLU units
(a_j → s a_j, consumer column / s); vbp and magnitude are not.

One site is rescaled at a time. (Rescaling the units of a *later* site also scales the rows of
an earlier site's consumer, which moves that earlier site's next-layer surrogate ‖W_c[:, j]‖²:
the invariance is with respect to the site's own coordinates.)"""

from __future__ import annotations

import pytest
import torch
from helpers import SAMPLES
from safetensors.torch import load_file

from cmrtool.backends.torchscript.model import TorchScriptModel
from cmrtool.reduce.plans import make_plan
from cmrtool.io.data import Dataset
from cmrtool.score.scoring import score_model
from cmrtool.testing.models import digits_convnet, digits_mlp

# site -> (producer-side tensors scaled by s, consumer weight scaled by 1/s on axis 1)
MLP_SCALING = {"body.0": (["body.0.weight", "body.0.bias"], "body.3.weight"), "body.3": (["body.3.weight", "body.3.bias"], "body.6.weight")}
CONV_SCALING = {
    "conv1": (["bn1.weight", "bn1.bias"], "conv2.weight"),
    "conv2": (["bn2.weight", "bn2.bias"], "conv3.weight"),
    "conv3": (["bn3.weight", "bn3.bias"], "head.weight"),
}


def _rescaled_twin(factory, state, scaling, seed, lo=0.01, hi=100.0):
    """A functionally identical model: unit j of every site scaled by s_j ~ LogUniform(lo, hi)."""
    g = torch.Generator().manual_seed(seed)
    state = {k: v.clone() for k, v in state.items()}
    for producers, consumer in scaling.values():
        width = state[producers[0]].shape[0]
        s = torch.exp(torch.empty(width).uniform_(torch.log(torch.tensor(lo)).item(), torch.log(torch.tensor(hi)).item(), generator=g))
        for name in producers:
            t = state[name]
            state[name] = t * s.reshape(-1, *([1] * (t.dim() - 1)))
        w = state[consumer]
        state[consumer] = w / s.reshape(1, -1, *([1] * (w.dim() - 2)))
    model = factory()
    model.load_state_dict(state)
    return model.eval()


def _kept(path, criterion):
    m = TorchScriptModel(path)
    data = Dataset(SAMPLES / "calib.safetensors", m.arg_names, 1, m.dtype)
    report = score_model(m, data, criterion, m.sites)
    plan = make_plan(report, m.sites, keep=0.5)
    return {sp.name: set(sp.kept) for sp in plan.sites}


def _jaccard(a, b):
    return len(a & b) / len(a | b)


CASES = [("digits_mlp", digits_mlp, MLP_SCALING, site) for site in MLP_SCALING] + [
    ("digits_convnet", digits_convnet, CONV_SCALING, site) for site in CONV_SCALING
]


@pytest.mark.parametrize("name,factory,scalings,site", CASES)
def test_cmr_logit_kept_sets_survive_rescaling(name, factory, scalings, site, tmp_path):
    state = load_file(str(SAMPLES / f"{name}.safetensors"))
    original = factory()
    original.load_state_dict(state)
    original.eval()
    scaling = {site: scalings[site]}
    twin = _rescaled_twin(factory, state, scaling, seed=0)
    x = load_file(str(SAMPLES / "eval.safetensors"))["input"]
    with torch.no_grad():
        ref = original(x)
        assert (twin(x) - ref).abs().max() <= 1e-4 * ref.abs().max()  # the same function
    torch.jit.script(original).save(str(tmp_path / "a.pt"))
    torch.jit.script(twin).save(str(tmp_path / "b.pt"))
    for criterion, invariant in (("cmr-logit", True), ("vbp", False), ("magnitude", False)):
        a, b = _kept(tmp_path / "a.pt", criterion), _kept(tmp_path / "b.pt", criterion)
        j = _jaccard(a[site], b[site])
        if invariant:
            assert a[site] == b[site], (criterion, site, j)
        else:
            assert j < 0.8, (criterion, site, j)
