"""Plans: JSON round trip, validation, byte-identical output for the same inputs and seed."""

from __future__ import annotations

import pytest
from helpers import SAMPLES

from cmrtool.backends.torchscript.model import TorchScriptModel
from cmrtool.reduce.plans import make_plan
from cmrtool.io.data import Dataset
from cmrtool.errors import InputError
from cmrtool.plan import Plan, Replacement, SitePlan
from cmrtool.score.scoring import score_model


def _plan(criterion="cmr-logit", seed=0):
    m = TorchScriptModel(SAMPLES / "digits_convnet.pt")
    data = Dataset(SAMPLES / "calib.safetensors", m.arg_names, 1, m.dtype)
    return make_plan(score_model(m, data, criterion, m.sites, seed=seed), m.sites, keep=0.5, round_to=4)


def test_round_trip_and_determinism():
    p = _plan()
    assert Plan.loads(p.dumps()) == p
    assert _plan().dumps() == p.dumps()  # same inputs → byte-identical
    assert _plan("random", 1).dumps() == _plan("random", 1).dumps()
    assert _plan("random", 1).dumps() != _plan("random", 2).dumps()


def test_round_to_keeps_multiples():
    p = _plan()
    assert [len(s.kept) for s in p.sites] == [8, 16, 16]


def test_invalid_plans_are_rejected():
    with pytest.raises(InputError, match="partition"):
        SitePlan("a", "neuron", 4, (0, 1), (1, 3), Replacement("constant", (0.0, 0.0)))
    with pytest.raises(InputError, match="replacement values"):
        SitePlan("a", "neuron", 4, (0, 1), (2, 3), Replacement("constant", (0.0,)))
    with pytest.raises(InputError, match="not valid JSON"):
        Plan.loads("{")
    with pytest.raises(InputError, match="malformed"):
        Plan.loads('{"schema_version": 1}')
