"""The digits MLP, penultimate layer at keep 0.5: folding keeps held-out accuracy within 1.5
points of the original; deleting the same units without folding (replacement zero) is worse.
The figures are quoted in the README."""

from __future__ import annotations

import torch
from helpers import SAMPLES
from safetensors.torch import load_file

from cmrtool import api


def _logits(path):
    d = load_file(str(SAMPLES / "eval.safetensors"))
    with torch.no_grad():
        return torch.jit.load(str(path)).eval()(d["input"]).double(), d["labels"]


def test_folding_keeps_accuracy_and_beats_deletion(tmp_path):
    calib = SAMPLES / "calib.safetensors"
    folded, deleted = tmp_path / "folded.pt", tmp_path / "deleted.pt"
    api.compile(SAMPLES / "digits_mlp.pt", folded, calib=calib, sites=["body.3"], keep=0.5)
    api.compile(SAMPLES / "digits_mlp.pt", deleted, calib=calib, sites=["body.3"], keep=0.5, replacement="zero")
    z0, y = _logits(SAMPLES / "digits_mlp.pt")
    zf, _ = _logits(folded)
    zd, _ = _logits(deleted)
    acc = {k: (z.argmax(1) == y).double().mean().item() * 100 for k, z in (("orig", z0), ("fold", zf), ("zero", zd))}
    d2 = {k: (z - z0).square().sum(1).mean().item() for k, z in (("fold", zf), ("zero", zd))}
    kl = {k: torch.nn.functional.kl_div(z.log_softmax(1), z0.log_softmax(1), log_target=True, reduction="batchmean").item() for k, z in (("fold", zf), ("zero", zd))}
    assert acc["orig"] - acc["fold"] <= 1.5, acc
    assert acc["zero"] < acc["fold"], acc
    assert d2["zero"] > 1.15 * d2["fold"], d2  # mean replacement minimizes this (Theorem 1)
    assert kl["zero"] > kl["fold"], kl
