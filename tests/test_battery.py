"""The reliability battery's remaining findings (issue 15): a scripted model whose layers sit in
``prim::If`` branches chosen by an ``int`` argument, tables in an 80-column terminal, the
documented ``verify`` examples, and sweep's wall time."""

from __future__ import annotations

import os
import re

import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT, SAMPLES, build, inputs_for
from safetensors.torch import save_file
from torch import nn

from cmrtool.backends.torchscript.model import TorchScriptModel

MLP = SAMPLES / "digits_mlp.pt"
CALIB = SAMPLES / "calib.safetensors"


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(1, 6, 3)
        self.c2 = nn.Conv1d(6, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.c2(F.relu(self.c1(x))))


class RateSwitched(nn.Module):
    """Like a third-party audio model: its encoder is chosen by an ``int`` sample rate, so the
    convolutions sit inside ``prim::If`` branches of the scripted graph."""

    def __init__(self) -> None:
        super().__init__()
        self.enc8 = Encoder()
        self.enc16 = Encoder()
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, sample_rate: int = 8000) -> torch.Tensor:
        if sample_rate == 8000:
            h = self.enc8(x)
        else:
            h = self.enc16(x)
        return self.head(h.mean(-1))


class DataSwitched(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.a = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pre(x)
        if bool(h.sum() > 0):
            h = self.head(torch.relu(self.a(h)))
        else:
            h = self.head(torch.relu(self.a(-h)))
        return h


@pytest.fixture(scope="module")
def rate_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("branches")
    model = build(RateSwitched)
    torch.jit.script(model).save(str(d / "m.pt"))
    x = inputs_for((1, 12), n=48)
    save_file({"input": x}, str(d / "d8.safetensors"))
    save_file({"input": x, "sample_rate": torch.tensor(16000)}, str(d / "d16.safetensors"))
    return d, model, x


def test_layers_in_branches_chosen_by_an_int_argument_are_reduced_exactly(rate_model, cli):
    d, model, x = rate_model
    assert [s.name for s in TorchScriptModel(d / "m.pt").sites] == ["enc8.c1", "enc8.c2"]  # the default, 8000
    assert [s.name for s in TorchScriptModel(d / "m.pt", d / "d16.safetensors").sites] == ["enc16.c1", "enc16.c2"]
    for data, rate, branch in (("d8", 8000, "enc8"), ("d16", 16000, "enc16")):
        out = d / f"r{rate}.pt"
        r = cli("compile", d / "m.pt", "--calib", d / f"{data}.safetensors", "--keep", "0.5", "-o", out)
        assert r.code == 0, r.err
        doc = r.json()
        assert [s["name"] for s in doc["sites"]] == [f"{branch}.c1", f"{branch}.c2"]
        assert doc["fold_error_relative"] <= 1e-10  # float64: exact
        reduced = torch.jit.load(str(out))
        assert getattr(reduced, branch).c1.weight.shape[0] == 3 and getattr(reduced, "enc16" if rate == 8000 else "enc8").c1.weight.shape[0] == 6
        v = cli("verify", d / "m.pt", out, "--data", d / f"{data}.safetensors", "--swaps", "40")
        assert v.code == 0 and v.json()["fold_error"] <= 1e-10, v.err


def test_a_non_scalar_argument_tensor_is_refused(rate_model, cli):
    d, _, x = rate_model
    save_file({"input": x, "sample_rate": torch.full((48,), 16000)}, str(d / "bad.safetensors"))
    r = cli("inspect", d / "m.pt", "--calib", d / "bad.safetensors")
    assert r.code == 1 and "store it as a 0-d tensor" in r.err and "Traceback" not in r.err


def test_layers_inside_data_dependent_branches_are_refused_at_inspect_with_the_reason(tmp_path, cli):
    path = tmp_path / "m.pt"
    torch.jit.script(build(DataSwitched)).save(str(path))
    save_file({"input": inputs_for((4,), n=16)}, str(tmp_path / "d.safetensors"))
    doc = cli("inspect", path, "--calib", tmp_path / "d.safetensors", "--json").json()
    assert [s["name"] for s in doc["sites"]] == ["pre"] or doc["sites"] == []
    reasons = {r["name"]: r["reason"] for r in doc["rejected"]}
    assert "prim::If" in reasons["a"] and "control flow" in reasons["a"]
    r = cli("compile", path, "--calib", tmp_path / "d.safetensors", "--site", "a", "--keep", "0.5", "-o", tmp_path / "r.pt")
    assert r.code != 0 and "check that the data was prepared" not in r.err and not (tmp_path / "r.pt").exists()


def test_tables_are_readable_at_80_columns(cli, tmp_path, monkeypatch):
    from rich.console import Console

    from cmrtool.cli import render

    long = "model.layers.0.self_attn.very_long_projection_name"
    doc = {"criterion": "cmr-logit", "samples": 64, "sites": [
        {"name": long, "kind": "neuron", "width": 4096, "samples": 1024, "scores": [1.234567e-7, 0.5, 123456.0]},
    ]}
    for width in (80, 50):
        console = Console(width=width, record=True, color_system=None, file=open(os.devnull, "w"))
        render.score_table(doc, console)
        text = console.export_text()
        assert "…" not in text and "1.23e-07" in text and "1.23e+05" in text, text
        frags = [ln.split("│")[0].strip() for ln in text.splitlines() if "│" in ln]
        assert "".join(frags) == long if frags else long in text.replace("\n", ""), text  # folded, never cut
        assert "on 64 samples" in text and "values" in text  # the header explains the 1024 per row
    monkeypatch.setenv("COLUMNS", "80")
    out = tmp_path / "r.pt"
    assert cli("compile", MLP, "--calib", CALIB, "--keep", "0.5", "-o", out).code == 0
    v = cli("verify", MLP, out, "--data", CALIB, "--swaps", "50", "--no-json")
    assert v.code == 0 and "…" not in v.out and max(len(ln) for ln in v.out.splitlines()) <= 80


def test_the_documented_verify_examples_pass_on_their_samples(cli, tmp_path, monkeypatch):
    """`cmrtool --help` and README compile samples/digits_mlp.pt at --keep 0.5 and verify it with
    --min-iia: those thresholds must hold on the samples they name."""
    from cmrtool.cli.app import app

    help_text = " ".join(app.info.epilog.split())
    readme = (ROOT / "README.md").read_text()
    thresholds = [float(x) for x in re.findall(r"verify samples/digits_mlp\.pt reduced\.pt --data samples/eval\.safetensors --min-iia ([0-9.]+)", help_text)]
    thresholds += [float(x) for x in re.findall(r"cmrtool verify +model\.pt reduced\.pt --data heldout\.safetensors --swaps 2000 --min-iia ([0-9.]+)", readme)]
    assert len(thresholds) == 2, thresholds
    monkeypatch.chdir(tmp_path)
    assert cli("compile", MLP, "--calib", CALIB, "--keep", "0.5", "-o", "reduced.pt").code == 0
    r = cli("verify", MLP, "reduced.pt", "--data", SAMPLES / "eval.safetensors", "--swaps", "2000", "--min-iia", str(max(thresholds)))
    assert r.code == 0, r.err


def test_sweep_reports_its_wall_time(cli):
    r = cli("sweep", MLP, "--calib", CALIB, "--data", CALIB, "--keep", "0.5", "--criterion", "random", "--swaps", "20")
    assert r.code == 0, r.err
    doc = r.json()
    row = doc["rows"][0]["seconds"]
    assert doc["wall_seconds"] >= row["score"] + row["compile"] + row["verify"]
    assert re.search(r"sweep: 1 reductions in [0-9.]+s", r.err)
