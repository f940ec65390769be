"""MAC counting: the analytic count of every sample, for TorchScript (scripted and traced, via the
backend or the bare ScriptModule) and plain nn.Module; per-layer and per-site attribution; the
fused attention formulas."""

from __future__ import annotations

import pytest
import torch
from helpers import SAMPLES
from safetensors.torch import load_file
from torch import nn

from cmrtool import api
from cmrtool.backends.torchscript.model import TorchScriptModel
from cmrtool.measure.macs import count_macs, profile_macs, site_macs
from cmrtool.testing import models

X = torch.zeros(1, 1, 8, 8)
T, D, H, FFN = 8, 32, 4, 128  # the digits transformer: tokens, width, heads, FFN width
ATTENTION = H * T * T * 2 * (D // H)  # QKᵀ and AV of one block
ANALYTIC = {
    "digits_mlp": 64 * 256 + 256 * 256 + 256 * 10,
    "digits_convnet": 16 * 1 * 9 * 64 + 32 * 16 * 9 * 64 + 32 * 32 * 9 * 36 + 32 * 10,
    "digits_transformer": T * 8 * D + 2 * (4 * T * D * D + ATTENTION + 2 * T * D * FFN) + D * 10,
}


def test_the_analytic_counts_are_the_documented_ones():
    assert ANALYTIC == {"digits_mlp": 84480, "digits_convnet": 636224, "digits_transformer": 207168}


@pytest.mark.parametrize("name", list(ANALYTIC))
@pytest.mark.parametrize("variant", ["", "_traced"])
def test_torchscript_macs_are_analytic(name, variant):
    path = SAMPLES / f"{name}{variant}.pt"
    assert count_macs(TorchScriptModel(path), [X]) == ANALYTIC[name]  # backend model
    assert count_macs(torch.jit.load(str(path)), [X]) == ANALYTIC[name]  # bare ScriptModule


@pytest.mark.parametrize("name", list(ANALYTIC))
def test_nn_module_macs_are_analytic(name):
    module = getattr(models, name)()
    module.load_state_dict(load_file(str(SAMPLES / f"{name}.safetensors")))
    module.eval()
    assert count_macs(module, [X]) == ANALYTIC[name]
    assert count_macs(module, [X.repeat(3, 1, 1, 1)]) == 3 * ANALYTIC[name]


@pytest.mark.parametrize("name", list(ANALYTIC))
def test_total_is_flop_counter_total_and_layers_add_up(name):
    from torch.utils.flop_counter import FlopCounterMode

    from cmrtool.measure.macs import _custom_mapping

    module = torch.jit.load(str(SAMPLES / f"{name}.pt"))
    with FlopCounterMode(display=False, custom_mapping=_custom_mapping()) as fc, torch.no_grad():
        module(X)
    count = profile_macs(module, [X])
    assert count.total == fc.get_total_flops() // 2
    assert sum(m for _, m in count.layers) + count.unattributed == count.total
    assert sum(m for _, m in count.ops) == count.total


def test_per_layer_and_per_site_macs():
    mlp = TorchScriptModel(SAMPLES / "digits_mlp.pt")
    c = profile_macs(mlp, [X])
    assert dict(c.layers) == {"body.0": 64 * 256, "body.3": 256 * 256, "body.6": 256 * 10}
    assert c.unattributed == 0
    assert {s.name: site_macs(c, s) for s in mlp.sites} == {"body.0": 64 * 256 + 256 * 256, "body.3": 256 * 256 + 256 * 10}

    conv = TorchScriptModel(SAMPLES / "digits_convnet_traced.pt")
    c = profile_macs(conv, [X])
    conv2, conv3 = 32 * 16 * 9 * 64, 32 * 32 * 9 * 36
    assert c.layer("conv2") == conv2 and c.layer("conv3") == conv3 and c.layer("head") == 320
    assert site_macs(c, conv.site("conv2")) == conv2 + conv3
    assert site_macs(c, conv.site("conv3")) == conv3 + 32 * 10

    tf = TorchScriptModel(SAMPLES / "digits_transformer.pt")
    c = profile_macs(tf, [X])
    assert c.unattributed == 2 * ATTENTION  # the attention matmuls read no parameter
    assert dict(c.ops)["_scaled_dot_product_flash_attention_for_cpu"] == 2 * ATTENTION
    assert c.layer("blocks.0.attn.q_proj") == T * D * D
    assert [site_macs(c, s) for s in tf.sites] == [2 * T * D * FFN, 2 * T * D * FFN]


def test_reduced_model_macs_drop_as_expected(tmp_path):
    out = tmp_path / "r.pt"
    api.compile(SAMPLES / "digits_transformer.pt", out, calib=SAMPLES / "calib.safetensors", keep=0.5)
    reduced = TorchScriptModel(out)
    c = profile_macs(reduced, [X])
    assert [site_macs(c, s) for s in reduced.sites] == [2 * T * D * FFN // 2] * 2
    assert c.total == ANALYTIC["digits_transformer"] - 2 * T * D * FFN  # both FFNs halved
    assert c.unattributed == 2 * ATTENTION  # attention untouched


class _MHA(nn.Module):
    def __init__(self, e: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(e, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


def test_fused_attention_formulas():
    b, t, e, f = 2, 8, 32, 64
    x = torch.randn(b, t, e)
    mha = _MHA().eval()
    c = profile_macs(mha, [x])
    assert c.total == b * (4 * t * e * e + 2 * t * t * e)
    assert dict(c.ops).get("_native_multi_head_attention") == c.total  # the fused inference path
    assert dict(c.layers) == {"attn": c.total}  # in_proj_weight and out_proj.weight: one module
    enc = nn.TransformerEncoderLayer(e, 4, f, batch_first=True).eval()
    assert count_macs(enc, [x]) == b * (4 * t * e * e + 2 * t * t * e + 2 * t * e * f)


def test_a_function_of_the_input_list_still_works():
    model = TorchScriptModel(SAMPLES / "digits_mlp.pt")
    assert count_macs(model.forward, [X]) == ANALYTIC["digits_mlp"]
    assert profile_macs(model.forward, [X]).layers == ()  # no module: nothing to attribute to
