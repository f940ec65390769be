"""The block engine on every family whose stack the family table describes (Gemma, Gemma-2, Gemma-3, Phi-3,
GPT-2, GPT-NeoX, OPT, Falcon, Qwen3, Mixtral, Qwen2-MoE, Qwen3-MoE; XLM-RoBERTa and ELECTRA
encoders; LLaMA and BERT are in test_engine.py), on the tiny float64 models of test_families.py:
the compiled model equals the original with the replaced units clamped (FFNs and heads, padded
calibration, sequential calibration), a directory output loads with stock ``from_pretrained``,
makes the whole-model path's choice (units deleted where the config holds no FFN bias) and holds
exactly the tensors ``save_pretrained`` writes (experts one by one), ``--calibration original``
gives the whole-model path's scores, plan and tensors bit for bit, padding changes nothing where
the stack makes positions and masks from the attention mask, and the sequential fast path gives
the reduced layer's output for every residual layout it is used on."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()

from test_engine import _no_progress, _tokens  # noqa: E402
from test_families import CONFIGS  # noqa: E402

from cmrtool import api  # noqa: E402
from cmrtool.backends import load_model  # noqa: E402
from cmrtool.backends.module.checkpoint import load_reduced  # noqa: E402
from cmrtool.compile.clamp import clamp_edits, fold_error, site_ranks  # noqa: E402
from cmrtool.io.data import Dataset  # noqa: E402
from cmrtool.engine import supports  # noqa: E402
from cmrtool.compile.fold import fold  # noqa: E402
from cmrtool.reduce.planner import plan_reduction  # noqa: E402
from cmrtool.score.scoring import score_model, select_sites  # noqa: E402

MOE = ["mixtral", "qwen2_moe", "qwen3_moe"]
ENGINE = ["gemma", "gemma2", "gemma3", "phi3", "gpt2", "gpt_neox", "opt", "opt350", "falcon", "qwen3", *MOE]
T = transformers


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine-families")
    # Right padding shorter than Gemma-2's window below: a padded query whose window holds only
    # padding has no key to attend to (NaN in the whole model and the engine alike).
    lengths = torch.randint(6, 9, (12,), generator=torch.Generator().manual_seed(1))
    save_file(_tokens(12, lengths, 8), str(root / "pad8.safetensors"))
    save_file(_tokens(12, lengths, 10), str(root / "pad10.safetensors"))
    save_file(_tokens(12, torch.full((12,), 8), 8, seed=2), str(root / "full.safetensors"))
    return root


_ENC = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24, max_position_embeddings=40,
            num_labels=3, initializer_range=0.3)
ENCODERS = {  # sentence classifiers; ELECTRA's embeddings are narrower than its layers (embeddings_project)
    "xlm-roberta": lambda: T.XLMRobertaConfig(pad_token_id=1, **_ENC),
    "electra": lambda: T.ElectraConfig(embedding_size=8, **_ENC),
}


EXTRA = {  # decoders the whole-model family table test does not build
    "gemma3": lambda: T.Gemma3TextConfig(vocab_size=40, hidden_size=16, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=4, max_position_embeddings=32, initializer_range=0.3,
                                         sliding_window=5, layer_types=["sliding_attention", "full_attention"]),
    # OPT-350m's layout: embeddings narrower than the layers (project_in / project_out), norms after the residual
    "opt350": lambda: T.OPTConfig(vocab_size=40, hidden_size=16, num_attention_heads=4, ffn_dim=96, word_embed_proj_dim=8, init_std=0.3,
                                  num_hidden_layers=2, max_position_embeddings=32, do_layer_norm_before=False),
}


@functools.cache
def _model(root: Path, name: str) -> Path:
    torch.manual_seed(0)
    if name in EXTRA:
        T.AutoModelForCausalLM.from_config(EXTRA[name]()).double().save_pretrained(str(root / name))
        return root / name
    if name in ENCODERS:
        T.AutoModelForSequenceClassification.from_config(ENCODERS[name]()).double().save_pretrained(str(root / name))
        return root / name
    config = CONFIGS[name]()
    if name == "gemma2":
        config.sliding_window = 5  # shorter than the calibration: layer 0 attends through a window
    T.AutoModelForCausalLM.from_config(config).double().save_pretrained(str(root / name))
    return root / name


def _inputs(model, path: Path) -> list[torch.Tensor]:
    return list(Dataset(path, model.arg_names, model.required_args, model.dtype).all().inputs)


def test_the_family_table_routes_these_families_through_the_engine(root, tmp_path):
    for name in [*ENGINE, *ENCODERS]:
        assert supports(_model(root, name)), name
    torch.manual_seed(0)
    T.ViTForImageClassification(T.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                                            image_size=8, patch_size=4)).save_pretrained(str(tmp_path / "vit"))
    assert not supports(tmp_path / "vit")  # no token stack: the whole-model path


@pytest.mark.parametrize("name", [*ENGINE, *ENCODERS])
@pytest.mark.parametrize("kind", ["neuron", "head"])
def test_compiled_equals_the_clamped_whole_model(root, name, kind, tmp_path):
    src = _model(root, name)
    original = load_model(src)
    if not any(s.kind == kind for s in original.sites):
        pytest.skip(f"{name} has no {kind} sites (multi-query fused q/k/v)")
    experts = name in MOE and kind == "neuron"  # expert FFNs have no bias: a directory deletes their units
    out = f"{tmp_path}/r/" if experts else tmp_path / "r.safetensors"
    report = api.compile(src, out, calib=root / "pad8.safetensors", kinds=[kind], keep=0.5, calibration="sequential", warn=lambda _: None)
    assert report.engine["blocks"] == 4 and report.fold_error.relative <= 1e-10 and report.calibration == "sequential"
    assert report.engine  # processed block by block
    reduced = load_model(out) if experts else load_reduced(out)
    assert reduced.num_params() == report.params_after < report.params_before
    x = _inputs(original, root / "pad8.safetensors")
    fe = fold_error(original, reduced, reduced.plan, x)  # the whole model, logits included
    assert fe.relative <= 1e-10, fe
    with torch.no_grad():
        assert (reduced.forward(x) - original.forward(x)).abs().max() > 1e-6  # not vacuous


@pytest.mark.parametrize("name", ENGINE)
def test_directory_output_loads_stock_and_matches_the_whole_model_choice(root, name, tmp_path):
    """FFN sites to a directory: written as the same class with the same notices as the whole-model
    path (Gemma and Phi-3 have no FFN bias: the replaced units are deleted), and stock
    ``from_pretrained`` gives the clamped original's logits."""
    src = _model(root, name)
    data = root / "full.safetensors"
    notes: list[str] = []
    report = api.compile(src, f"{tmp_path}/e/", calib=data, kinds=["neuron"], keep=0.5, calibration="original", warn=notes.append)
    assert report.engine["blocks"] == 4 and report.fold_error.relative <= 1e-10
    deleted = name in ("gemma", "gemma2", "gemma3", "phi3", "qwen3", *MOE)  # no FFN bias in the config: units deleted, as on the whole-model path
    assert any("deleted" in n for n in notes) == deleted and all(not any(sp.replacement.values) for sp in report.plan.sites) == deleted
    stock = T.AutoModelForCausalLM.from_pretrained(f"{tmp_path}/e", local_files_only=True, experts_implementation="eager").eval()
    assert type(stock).__name__ == report.written_as
    original = load_model(src)
    x = torch.randint(1, 40, (3, 7), generator=torch.Generator().manual_seed(1))
    edits = clamp_edits(original, report.plan, site_ranks(original, [x], [s.name for s in report.plan.sites]))
    with torch.no_grad():
        clamped = original.run([x], edits=edits)[0]
        got = stock(x).logits
    torch.testing.assert_close(got, clamped, rtol=1e-10, atol=1e-10 * clamped.abs().max().item())
    stock.save_pretrained(str(tmp_path / "resaved"))  # the stored format save_pretrained writes (experts one by one, GPT-NeoX's embed_out)
    assert _stored(tmp_path / "e") == _stored(tmp_path / "resaved")


def _stored(directory: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    out: dict[str, tuple[int, ...]] = {}
    for f in sorted(directory.glob("model*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            out.update({k: tuple(sf.get_slice(k).get_shape()) for k in sf.keys()})
    return out


@pytest.mark.parametrize("name", [*ENGINE, *ENCODERS])
def test_original_calibration_equals_the_whole_model_path_bit_for_bit(root, name, tmp_path):
    src = _model(root, name)
    data = root / "full.safetensors"  # no padding: the one case where both paths count the same tokens
    whole = load_model(src)
    chosen = select_sites(whole.sites, None, ["neuron", "head"])
    ds = Dataset(data, whole.arg_names, whole.required_args, whole.dtype)
    want = score_model(whole, ds, "cmr-logit", chosen, 0, 256)
    got = api.score(src, data, kinds=["neuron", "head"])
    assert [s.to_json() for s in got.sites] == [s.to_json() for s in want.sites]
    neurons = [s for s in chosen if s.kind == "neuron"]
    replacement = "zero" if name in MOE else "auto"  # a file keeps folded constants, and experts have no bias to hold them
    plan = plan_reduction(whole, ds, neurons, None, 0.5, None, None, 1, _no_progress, criterion="cmr-logit", replacement=replacement,
                          allocation="site", joint_refit=False, parents=8, ridge=1e-3, curvature="auto", seed=0, batch_size=256, loss="auto")
    report = api.compile(src, tmp_path / "r.safetensors", calib=data, keep=0.5, calibration="original", replacement=replacement)
    assert report.plan.sites == plan.sites
    expected = whole.stock(fold(whole.tensors(), whole.sites, plan).tensors)  # stock layout (GPT-2's Conv1D, Phi-3's fused)
    written = load_file(str(tmp_path / "r.safetensors"))
    assert written and all(torch.equal(v, expected[k]) for k, v in written.items() if k in expected)
    assert set(written) - set(expected) <= {"plan"}  # nothing the whole-model path would not write


@pytest.mark.parametrize("name", ["gemma2", "gemma3", "gpt2", "opt", "mixtral", "xlm-roberta"])  # windowed masks; learned positions; positions from the mask; from the ids
def test_padding_is_excluded_everywhere(root, name):
    src = _model(root, name)
    a, b = api.score(src, root / "pad8.safetensors", kinds=["neuron", "head"]), api.score(src, root / "pad10.safetensors", kinds=["neuron", "head"])
    for sa, sb in zip(a.sites, b.sites, strict=True):
        torch.testing.assert_close(torch.tensor(sa.scores), torch.tensor(sb.scores), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(torch.tensor(sa.mean), torch.tensor(sb.mean), rtol=1e-9, atol=1e-12)
        assert sa.samples == sb.samples


@pytest.mark.parametrize("name", ["gemma", "phi3", "gpt2", "gpt_neox", "opt", "falcon"])  # the sequential fast path (ffn_last)
def test_sequential_fast_path_sees_the_earlier_reductions(root, name, tmp_path):
    """Layer 1's replacement constants are its FFN means over kept tokens in the model whose layer
    0 is already reduced: the fast path (recorded output + the replaced units' change through the
    consumer columns) must give the reduced layer's output for each family's residual layout."""
    src = _model(root, name)
    data = root / "pad8.safetensors"
    plan = api.compile(src, tmp_path / "r.safetensors", calib=data, keep=0.5, kinds=["neuron"], calibration="sequential").plan
    first, second = plan.sites
    whole = load_model(src)
    x = _inputs(whole, data)
    only_first = type(plan)(plan.source_sha256, plan.criterion, (first,), plan.replacement, plan.seed, ())
    with torch.no_grad():
        edits = clamp_edits(whole, only_first, site_ranks(whole, x, [first.name]))
        _, seq = whole.run(x, capture=[second.name], edits=edits)
        _, orig = whole.run(x, capture=[second.name])
    keep = load_file(str(data))["attention_mask"].bool()
    mean_seq = seq[second.name].reshape(*keep.shape, -1)[keep].mean(0)
    mean_orig = orig[second.name].reshape(*keep.shape, -1)[keep].mean(0)
    got = torch.tensor(second.replacement.values, dtype=torch.float64)
    torch.testing.assert_close(got, mean_seq[list(second.replaced)], rtol=1e-9, atol=1e-12)
    assert (got - mean_orig[list(second.replaced)]).abs().max() > 1e-6
