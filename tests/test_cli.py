"""The command line: JSON contract (DESIGN §7), composition through pipes, exit codes, and the
rule that bad input gets one ``error:`` line, a ``hint:``, no traceback and no output file."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import SAMPLES, NothingReducible, build, inputs_for, save_ts, write_data

from cmrtool.backends.torchscript.model import TorchScriptModel

MLP = SAMPLES / "digits_mlp.pt"
CALIB = SAMPLES / "calib.safetensors"


def test_help_lists_commands_and_examples(cli):
    r = cli("--help")
    assert r.code == 0
    for cmd in ("inspect", "score", "compile"):
        assert cmd in r.out
    for cmd in ("inspect", "score", "compile"):
        h = cli(cmd, "--help")
        assert h.code == 0 and "Examples:" in h.out and "cmrtool " + cmd in h.out


def test_version(cli):
    from cmrtool import __version__

    r = cli("--version")
    assert r.code == 0 and __version__ in r.out


def test_inspect_json_contract(cli):
    r = cli("inspect", MLP, "--calib", CALIB)
    assert r.code == 0, r.err
    d = r.json()
    assert {"schema_version", "tool_version", "sites", "params", "macs"} <= set(d)
    assert d["params"] == 85002 and d["macs"] == 64 * 256 + 256 * 256 + 256 * 10
    site = d["sites"][0]
    assert {"name", "kind", "width", "fold", "producers", "consumers"} <= set(site)
    assert [s["name"] for s in d["sites"]] == ["body.0", "body.3"]
    assert site["producers"][0] == {"name": "body.0.weight", "axis": 0}


def test_score_json_contract_and_kept(cli):
    r = cli("score", MLP, "--calib", CALIB, "--keep", "0.25")
    assert r.code == 0, r.err
    d = r.json()
    assert d["criterion"] == "cmr-logit" and {"schema_version", "tool_version"} <= set(d)
    for s in d["sites"]:
        assert {"name", "width", "scores", "replacement", "kept"} <= set(s)
        assert len(s["scores"]) == len(s["replacement"]) == s["width"] == 256
        assert len(s["kept"]) == 64 and s["kept"] == sorted(s["kept"])
        # kept = the 64 highest scores
        order = sorted(range(256), key=lambda j: (-s["scores"][j], j))[:64]
        assert sorted(order) == s["kept"]


def test_compile_json_contract_and_checkpoint(cli, tmp_path):
    out = tmp_path / "r.pt"
    r = cli("compile", MLP, "--calib", CALIB, "--keep", "0.5", "-o", out)
    assert r.code == 0, r.err
    d = r.json()
    assert {"output", "params_before", "params_after", "sites", "fold_error"} <= set(d)
    assert d["output"] == str(out) and out.exists()
    assert d["params_before"] == 85002 and d["params_after"] < d["params_before"]
    assert [(s["name"], s["width"], s["kept"], s["replaced"]) for s in d["sites"]] == [
        ("body.0", 256, 128, 128),
        ("body.3", 256, 128, 128),
    ]
    assert d["fold_error_relative"] <= 1e-5
    reduced = TorchScriptModel(out)
    assert reduced.plan is not None and reduced.num_params() == d["params_after"]
    # Stock loader: plain torch.jit.load runs it.
    m = torch.jit.load(str(out))
    assert m(torch.rand(3, 1, 8, 8)).shape == (3, 10)


def test_score_pipes_into_compile(cli, tmp_path):
    s = cli("score", MLP, "--calib", CALIB, "-c", "vbp")
    assert s.code == 0
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    r1 = cli("compile", MLP, "--scores", "-", "--keep", "0.5", "-o", a, stdin=s.out.encode())
    assert r1.code == 0, r1.err
    assert r1.json()["fold_error"] is None  # no data given: nothing to check against
    r2 = cli("compile", MLP, "--calib", CALIB, "-c", "vbp", "--keep", "0.5", "-o", b)
    assert r2.code == 0, r2.err
    pa, pb = TorchScriptModel(a).plan, TorchScriptModel(b).plan
    assert [s.kept for s in pa.sites] == [s.kept for s in pb.sites]
    assert [s.replacement for s in pa.sites] == [s.replacement for s in pb.sites]


def test_scores_from_another_model_are_refused(cli, tmp_path):
    s = cli("score", SAMPLES / "digits_mlp_traced.pt", "--calib", CALIB)
    scores = tmp_path / "s.json"
    scores.write_text(s.out)
    r = cli("compile", MLP, "--scores", scores, "--keep", "0.5", "-o", tmp_path / "r.pt")
    assert r.code == 1 and "another model" in r.err and not (tmp_path / "r.pt").exists()


def test_existing_output_needs_force_and_inputs_are_never_overwritten(cli, tmp_path):
    out = tmp_path / "r.pt"
    out.write_bytes(b"keep me")
    r = cli("compile", MLP, "--calib", CALIB, "--keep", "0.5", "-o", out)
    assert r.code == 2 and "--force" in r.err and out.read_bytes() == b"keep me"
    r = cli("compile", MLP, "--calib", CALIB, "--keep", "0.5", "-o", out, "--force")
    assert r.code == 0 and out.read_bytes() != b"keep me"
    before = MLP.read_bytes()
    r = cli("compile", MLP, "--calib", CALIB, "--keep", "0.5", "-o", MLP, "--force")
    assert r.code == 2 and "one of the inputs" in r.err and MLP.read_bytes() == before


def _bad_inputs(tmp):
    trunc = tmp / "trunc.pt"
    trunc.write_bytes(MLP.read_bytes()[:2000])
    pickled = tmp / "pickle.pt"
    torch.save(torch.nn.Linear(2, 2), pickled)
    nan = torch.rand(4, 1, 8, 8)
    nan[1, 0, 2, 2] = float("inf")
    shapes = write_data(tmp / "shape.safetensors", torch.rand(4, 3, 3))
    return {
        "missing model": (["inspect", tmp / "nope.pt"], 1, "not found"),
        "truncated model": (["inspect", trunc], 1, "truncated"),
        "pickle model": (["inspect", pickled], 1, "torch.save pickle"),
        "missing data": (["score", MLP, "--calib", tmp / "nope.safetensors"], 1, "not found"),
        "corrupt data": (["score", MLP, "--calib", trunc.with_suffix(".safetensors")], 1, "not found"),
        "model as data": (["score", MLP, "--calib", MLP], 1, "TorchScript model, not a data file"),
        "wrong shape": (["score", MLP, "--calib", shapes], 1, "rejected inputs with per-sample shape (3, 3)"),
        "non-finite data": (["score", MLP, "--calib", write_data(tmp / "nan.safetensors", nan)], 1, "NaN or Inf"),
        "empty data": (["score", MLP, "--calib", write_data(tmp / "e.safetensors", torch.rand(0, 1, 8, 8))], 1, "empty"),
        "wrong name": (["score", MLP, "--calib", _named(tmp / "n.safetensors", "pixels")], 1, "no tensor 'input'"),
        "float labels": (["score", MLP, "--calib", _labels(tmp / "l.safetensors")], 1, "expected integers"),
        "unknown criterion": (["score", MLP, "--calib", CALIB, "-c", "bogus"], 2, "unknown criterion"),
        "unknown site": (["score", MLP, "--calib", CALIB, "--site", "nope"], 2, "no site matches"),
        "keep zero": (["compile", MLP, "--calib", CALIB, "--keep", "0", "-o", tmp / "r.pt"], 2, "--keep must be in (0, 1]"),
        "keep above one": (["compile", MLP, "--calib", CALIB, "--keep", "1.5", "-o", tmp / "r.pt"], 2, "--keep must be in (0, 1]"),
        "keep-count too big": (["compile", MLP, "--calib", CALIB, "--keep-count", "256", "-o", tmp / "r.pt"], 2, "not below the width"),
        "no keep": (["compile", MLP, "--calib", CALIB, "-o", tmp / "r.pt"], 2, "--keep"),
        "no calib": (["compile", MLP, "--keep", "0.5", "-o", tmp / "r.pt"], 2, "--calib"),
        "bad output dir": (["compile", MLP, "--calib", CALIB, "--keep", "0.5", "-o", tmp / "no" / "r.pt"], 1, "does not exist"),
        "unknown option": (["compile", MLP, "--bogus"], 2, "No such option"),
        "bad scores": (["compile", MLP, "--scores", CALIB, "--keep", "0.5", "-o", tmp / "r.pt"], 1, "scores file"),
        "onnx model": (["inspect", tmp / "m.onnx"], 1, "output format"),
    }


def _named(path, name):
    from safetensors.torch import save_file

    save_file({name: torch.rand(4, 1, 8, 8)}, str(path))
    return path


def _labels(path):
    from safetensors.torch import save_file

    save_file({"input": torch.rand(4, 1, 8, 8), "labels": torch.rand(4)}, str(path))
    return path




@pytest.mark.parametrize(
    "case",
    [
        "missing model", "truncated model", "pickle model", "missing data", "corrupt data", "model as data",
        "wrong shape", "non-finite data", "empty data", "wrong name", "float labels", "unknown criterion",
        "unknown site", "keep zero", "keep above one", "keep-count too big", "no keep", "no calib",
        "bad output dir", "unknown option", "bad scores", "onnx model",
    ],
)
def test_bad_input_gets_error_and_hint(case, cli, tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"x")
    args, code, text = _bad_inputs(tmp_path)[case]
    before = set(tmp_path.rglob("*"))
    r = cli(*args)
    assert r.code == code, r.err
    lines = r.err.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and text in errors[0], r.err
    assert any(ln.startswith("hint: ") for ln in lines)
    assert "Traceback" not in r.err and r.out == ""
    assert set(tmp_path.rglob("*")) == before  # no output, no partial file


def test_debug_variable_shows_the_traceback(cli, monkeypatch, tmp_path):
    monkeypatch.setenv("CMRTOOL_DEBUG", "1")
    from cmrtool.errors import InputError

    with pytest.raises(InputError):
        cli("inspect", tmp_path / "nope.pt")


def test_interrupted_compile_leaves_no_output(cli, tmp_path, monkeypatch):
    out = tmp_path / "r.pt"

    def boom(self, path, tensors, plan):
        path.write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(TorchScriptModel, "write", boom)
    r = cli("compile", MLP, "--calib", CALIB, "--keep", "0.5", "-o", out)
    assert r.code == 130 and "interrupted" in r.err
    assert list(tmp_path.iterdir()) == []


def test_nothing_reducible_is_an_error_that_says_why(cli, tmp_path):
    path = save_ts(build(NothingReducible), tmp_path / "m.pt", "script", None)
    r = cli("inspect", path)
    assert r.code == 1
    assert r.json()["sites"] == []
    assert "no reducible sites" in r.err and "hint:" in r.err
    r = cli("compile", path, "--calib", write_data(tmp_path / "d.safetensors", inputs_for((5,))), "--keep", "0.5", "-o", tmp_path / "r.pt")
    assert r.code == 1 and "no reducible sites" in r.err and not (tmp_path / "r.pt").exists()


def test_unfoldable_sites_are_skipped_by_default_and_refused_by_name(cli, tmp_path):
    from helpers import NoBiasLinear

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = NoBiasLinear()
            self.fc = torch.nn.Linear(3, 4)
            self.out = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.out(torch.relu(self.fc(self.a(x))))

    path = save_ts(build(Two), tmp_path / "m.pt", "script", None)
    data = write_data(tmp_path / "d.safetensors", inputs_for((5,)))
    r = cli("compile", path, "--calib", data, "--keep", "0.5", "-o", tmp_path / "r.pt")
    assert r.code == 0, r.err
    assert "warning: skipping site a.fc1" in r.err
    assert [s["name"] for s in r.json()["sites"]] == ["fc"]
    r = cli("compile", path, "--calib", data, "--keep", "0.5", "--site", "a.fc1", "-o", tmp_path / "r2.pt")
    assert r.code == 1 and "cannot be folded" in r.err
