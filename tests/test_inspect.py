"""inspect: sites and MACs, and a clear account when nothing is reducible."""

from __future__ import annotations

from helpers import SAMPLES, NothingReducible, ReluIntoNorm, WithLSTM, build, save_ts

from cmrtool import api
from cmrtool.backends.torchscript.model import TorchScriptModel


def test_macs_match_the_analytic_count():
    r = api.inspect(SAMPLES / "digits_convnet.pt", SAMPLES / "calib.safetensors")
    # conv1 1→16 on 8x8, conv2 16→32 on 8x8, conv3 32→32 on 6x6 (3x3 kernels), head 32→10
    assert r.macs == 16 * 1 * 9 * 64 + 32 * 16 * 9 * 64 + 32 * 32 * 9 * 36 + 32 * 10


def test_reduced_model_records_its_input_shape(tmp_path):
    out = tmp_path / "r.pt"
    api.compile(SAMPLES / "digits_mlp.pt", out, calib=SAMPLES / "calib.safetensors", keep=0.5)
    r = api.inspect(out)
    assert r.macs == 64 * 128 + 128 * 128 + 128 * 10
    assert r.reduced["sites"][0] == {"name": "body.0", "width": 256, "kept": 128}


def test_nothing_reducible_says_why(tmp_path):
    m = TorchScriptModel(save_ts(build(NothingReducible), tmp_path / "a.pt", "script", None))
    assert m.sites == [] and m.rejected == []
    m = TorchScriptModel(save_ts(build(ReluIntoNorm), tmp_path / "b.pt", "script", None))
    assert m.sites == []
    assert [r.name for r in m.rejected] == ["fc1"] and "layer_norm" in m.rejected[0].reason


def test_unsupported_layers_are_named(tmp_path):
    m = TorchScriptModel(save_ts(build(WithLSTM), tmp_path / "c.pt", "script", None))
    assert m.sites == []
    assert any(u.startswith("lstm") and "rnn" in u for u in m.unsupported)
    try:
        m.require_sites()
    except Exception as e:
        assert "lstm" in e.hint
    else:
        raise AssertionError("require_sites must raise")


def test_transformer_macs_include_attention():
    r = api.inspect(SAMPLES / "digits_transformer.pt", SAMPLES / "calib.safetensors")
    t, d, h, ffn = 8, 32, 4, 128
    embed = t * 8 * d
    block = 4 * t * d * d + h * t * t * 2 * (d // h) + 2 * t * d * ffn  # q,k,v,o; QK^T and AV; FFN
    assert r.macs == embed + 2 * block + d * 10
