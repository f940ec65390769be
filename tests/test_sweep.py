"""``sweep``: one compiled-and-verified row per (criterion, keep), the JSON contract of DESIGN §7,
the table, the PNG, and bad inputs (``error:`` + ``hint:`` before any work)."""

from __future__ import annotations

import sys

import pytest
from helpers import SAMPLES

from cmrtool import api

MLP = SAMPLES / "digits_mlp.pt"
CALIB = SAMPLES / "calib.safetensors"
EVAL = SAMPLES / "eval.safetensors"
CONTRACT = {"keep", "criterion", "params", "macs", "accuracy", "agreement", "iia", "kl"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report():
    """A tiny sweep: 2 keeps x 2 criteria on both MLP sites, 50 swaps."""
    return api.sweep(MLP, CALIB, EVAL, keeps="0.75,0.5", criteria="cmr-logit,random", swaps=50)


def test_one_row_per_combination_with_contract_keys(report):
    d = report.to_json()
    assert {"schema_version", "tool_version", "rows"} <= set(d)
    assert [(r["criterion"], r["keep"]) for r in d["rows"]] == [
        ("cmr-logit", 0.75), ("cmr-logit", 0.5), ("random", 0.75), ("random", 0.5)
    ]
    for r in d["rows"]:
        assert CONTRACT <= set(r)
        assert r["iia_of"] == "all" and [s["name"] for s in r["sites"]] == ["body.0", "body.3"]
        assert 0 <= r["iia"] <= 1 and r["kl"] >= 0 and 0 <= r["accuracy"] <= 1
        assert r["fold_error"] < 1e-4
    assert d["original"] == {"params": 85002, "macs": 84480, "accuracy": pytest.approx(0.9765, abs=1e-4)}


def test_sizes_follow_the_keep_fraction(report):
    by = {(r.criterion, r.keep): r for r in report.rows}
    # 128 of 256 units kept at each hidden layer: 64·128 + 128·128 + 128·10 MACs
    assert by["cmr-logit", 0.5].macs == 64 * 128 + 128 * 128 + 128 * 10
    assert by["cmr-logit", 0.5].macs_ratio == pytest.approx(by["cmr-logit", 0.5].macs / 84480)
    assert by["cmr-logit", 0.75].macs > by["cmr-logit", 0.5].macs
    assert by["random", 0.5].params == by["cmr-logit", 0.5].params  # same widths, whatever the criterion
    assert [s["kept"] for s in by["cmr-logit", 0.75].sites] == [192, 192]


def test_row_equals_a_standalone_compile_and_verify(report, tmp_path):
    out = tmp_path / "r.pt"
    api.compile(MLP, out, calib=CALIB, criterion="cmr-logit", keep=0.5)
    v = api.verify(MLP, out, EVAL, swaps=50)
    row = next(r for r in report.rows if (r.criterion, r.keep) == ("cmr-logit", 0.5))
    assert row.iia == v.all_sites.iia and row.kl == v.all_sites.kl
    assert row.agreement == v.agreement and row.fidelity_kl == v.kl and row.accuracy == v.accuracy_reduced


def test_single_site_reports_that_site(tmp_path):
    r = api.sweep(MLP, CALIB, EVAL, keeps=[0.5], criteria=["vbp"], sites=["body.3"], swaps=20, keep_models=tmp_path / "kept")
    (row,) = r.rows
    assert row.iia_of == "body.3" and row.iia == row.sites[0]["iia"]
    assert row.model is not None and (tmp_path / "kept" / "digits_mlp-vbp-keep0.5.pt").is_file()


def test_temporary_checkpoints_are_removed(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    api.sweep(MLP, CALIB, EVAL, keeps=[0.5], criteria=["vbp"], sites=["body.3"], swaps=10)
    assert list(tmp_path.iterdir()) == []


def test_table_renders(report):
    from rich.console import Console

    from cmrtool.cli.render import sweep_table

    console = Console(record=True, width=100)
    sweep_table(report, console)
    text = console.export_text()
    for word in ("keep", "criterion", "params", "MACs", "accuracy", "agreement", "IIA", "KL", "cmr-logit", "random"):
        assert word in text
    assert text.count("cmr-logit") == 2


def test_figure_has_labelled_axes_and_one_line_per_criterion(report):
    from cmrtool.studies.plot import sweep_figure

    fig = sweep_figure(report)
    iia_ax, kl_ax = fig.axes[:2]
    assert "MACs kept" in iia_ax.get_xlabel() and "MACs kept" in kl_ax.get_xlabel()
    assert "IIA" in iia_ax.get_ylabel() and "KL" in kl_ax.get_ylabel()
    assert [t.get_text() for t in iia_ax.get_legend().get_texts()] == ["cmr-logit", "random"]
    assert len(kl_ax.get_lines()) == 2 and all(len(line.get_xdata()) == 2 for line in kl_ax.get_lines())


@pytest.mark.slow
def test_cli_json_and_png(cli, tmp_path):
    import matplotlib.image

    png = tmp_path / "sweep.png"
    r = cli("sweep", MLP, "--calib", CALIB, "--data", EVAL, "--keep", "0.75,0.5", "-c", "cmr-logit,vbp", "--swaps", "50",
            "--plot", png, "--site", "body.3")
    assert r.code == 0, r.err
    d = r.json()
    assert len(d["rows"]) == 4 and all(CONTRACT <= set(row) for row in d["rows"])
    data = png.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    h, w = matplotlib.image.imread(str(png)).shape[:2]
    assert 800 <= w <= 3000 and 400 <= h <= 2000
    again = cli("sweep", MLP, "--calib", CALIB, "--data", EVAL, "--keep", "0.5", "--plot", png)
    assert again.code == 2 and "already exists" in again.err and "hint:" in again.err


def test_arch_models_sweep_heads_and_keep_safetensors(cli, tmp_path):
    model, arch = SAMPLES / "digits_transformer.safetensors", "cmrtool.testing.models:digits_transformer"
    kept = tmp_path / "kept"
    r = cli("sweep", model, "--arch", arch, "--calib", CALIB, "--data", EVAL, "--keep", "0.5", "-c", "cmr-logit",
            "--kind", "head", "--swaps", "50", "--keep-models", kept)
    assert r.code == 0, r.err
    (row,) = r.json()["rows"]
    assert [(s["name"], s["kept"]) for s in row["sites"]] == [("blocks.0.attn", 2), ("blocks.1.attn", 2)]
    assert row["model"].endswith("digits_transformer-cmr-logit-keep0.5.safetensors") and row["macs"] < r.json()["original"]["macs"]
    reloaded = api.verify(model, row["model"], EVAL, swaps=50, arch=arch)
    assert reloaded.sites[0].iia == pytest.approx(row["sites"][0]["iia"])


def test_help_has_examples(cli):
    r = cli("sweep", "--help")
    assert r.code == 0 and "Examples:" in r.out and "cmrtool sweep" in r.out and "--plot" in r.out
    assert "sweep" in cli("--help").out


def test_cli_table(cli):
    r = cli("sweep", MLP, "--calib", CALIB, "--data", EVAL, "--keep", "0.5", "-c", "cmr-logit", "--swaps", "20",
            "--site", "body.3", "--no-json")
    assert r.code == 0, r.err
    assert "cmr-logit" in r.out and "IIA" in r.out and "sweep:" in r.err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--keep", "0.5,1.5"], "keep fractions must be in (0, 1]"),
        (["--keep", "0"], "keep fractions must be in (0, 1]"),
        (["--keep", "half"], "invalid keep fraction"),
        (["--keep", ","], "no keep fractions"),
        (["-c", "cmr-logit,nope"], "unknown criterion 'nope'"),
        (["--swaps", "0"], "--swaps"),
        (["--site", "nothing.here"], "no site matches"),
    ],
)
def test_bad_inputs(cli, tmp_path, args, message):
    png = tmp_path / "s.png"
    r = cli("sweep", MLP, "--calib", CALIB, "--data", EVAL, "--plot", png, *args)
    assert r.code == 2, r.err
    assert message in r.err and "hint:" in r.err and "Traceback" not in r.err
    assert not png.exists()


def test_missing_matplotlib_fails_before_any_work(cli, tmp_path, monkeypatch):
    import cmrtool.studies.sweep

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    monkeypatch.setattr(cmrtool.studies.sweep, "run_sweep", lambda *a, **k: pytest.fail("sweep ran without matplotlib"))
    r = cli("sweep", MLP, "--calib", CALIB, "--data", EVAL, "--plot", tmp_path / "s.png")
    assert r.code == 1
    assert "error: --plot needs matplotlib" in r.err and "hint: pip install 'cmrtool[plot]'" in r.err


def test_missing_data_file_fails_before_any_work(cli, tmp_path, monkeypatch):
    import cmrtool.studies.sweep

    monkeypatch.setattr(cmrtool.studies.sweep, "run_sweep", lambda *a, **k: pytest.fail("sweep ran without its data"))
    r = cli("sweep", MLP, "--calib", CALIB, "--data", tmp_path / "nope.safetensors", "--keep", "0.5")
    assert r.code == 1 and "error: held-out data not found" in r.err and "hint:" in r.err
