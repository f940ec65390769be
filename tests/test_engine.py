"""The block engine on tiny float64 LLaMA (causal LM, tied embeddings, grouped-query attention)
and BERT (sequence classifier) models built from configs: exactness of every block kind against
the whole model with the replaced units clamped, bit-for-bit agreement of ``--calibration
original`` with the whole-model path, padding invariance, the sequential statistics, bounded
allocations (no calibration × vocabulary logits), spilling, bf16 and sharded checkpoints, and
bad options."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()

from cmrtool import api  # noqa: E402
from cmrtool.backends import load_model  # noqa: E402
from cmrtool.backends.module.checkpoint import load_reduced  # noqa: E402
from cmrtool.compile.clamp import clamp_edits, fold_error, site_ranks  # noqa: E402
from cmrtool.io.data import Dataset  # noqa: E402
from cmrtool.errors import UsageError  # noqa: E402
from cmrtool.compile.fold import fold  # noqa: E402
from cmrtool.reduce.planner import plan_reduction  # noqa: E402
from cmrtool.score.scoring import score_model, select_sites  # noqa: E402

VOCAB = 40


def _llama(**kw):
    return transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0, initializer_range=0.4, tie_word_embeddings=True, **kw,
    )


def _bert():
    return transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24,
        max_position_embeddings=32, num_labels=3, initializer_range=0.4,
    )


def _tokens(n: int, lengths: torch.Tensor, width: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``n`` sentences of the given lengths, right-padded with id 0 to ``width`` tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, int(lengths.max())), generator=g)
    out = torch.zeros(n, width, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.long)
    for i, k in enumerate(lengths.tolist()):
        out[i, :k] = ids[i, :k]
        mask[i, :k] = 1
    return {"input_ids": out, "attention_mask": mask}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(_llama()).double().eval().save_pretrained(str(root / "llama"))
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(_bert()).double().eval().save_pretrained(str(root / "bert"))
    lengths = torch.randint(3, 10, (24,), generator=torch.Generator().manual_seed(1))
    save_file(_tokens(24, lengths, 9), str(root / "pad9.safetensors"))
    save_file(_tokens(24, lengths, 14), str(root / "pad14.safetensors"))
    full = _tokens(24, torch.full((24,), 9), 9, seed=2)
    save_file(full, str(root / "full.safetensors"))
    return root


def _inputs(path) -> list[torch.Tensor]:
    return list(Dataset(path, ["input_ids", "attention_mask"], 1).all().inputs)


@pytest.mark.parametrize(("name", "kind", "calibration"), [
    ("llama", "neuron", "sequential"), ("llama", "head", "sequential"), ("llama", "neuron", "original"),
    ("bert", "neuron", "sequential"), ("bert", "head", "sequential"),
])
def test_compiled_equals_the_clamped_whole_model(models, name, kind, calibration, tmp_path):
    out = tmp_path / "r.safetensors"
    report = api.compile(models / name, out, calib=models / "pad9.safetensors", kinds=[kind], keep=0.5, calibration=calibration)
    assert report.fold_error.relative <= 1e-10 and report.dtype == "float64" and report.calibration == calibration
    original, reduced = load_model(models / name), load_reduced(out)
    assert reduced.num_params() == report.params_after < report.params_before
    assert reduced.plan.source_sha256 == original.sha256
    x = _inputs(models / "pad9.safetensors")
    fe = fold_error(original, reduced, reduced.plan, x)  # the whole model, logits included
    assert fe.relative <= 1e-10, fe
    with torch.no_grad():
        assert (reduced.forward(x) - original.forward(x)).abs().max() > 1e-6  # not vacuous


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_original_calibration_equals_the_whole_model_path_bit_for_bit(models, name, tmp_path):
    data = models / "full.safetensors"  # no padding: the one case where both paths count the same tokens
    whole = load_model(models / name)
    chosen = select_sites(whole.sites, None, ["neuron", "head"])
    ds = Dataset(data, whole.arg_names, whole.required_args, whole.dtype)
    want = score_model(whole, ds, "cmr-logit", chosen, 0, 256)
    got = api.score(models / name, data, kinds=["neuron", "head"])
    assert [s.to_json() for s in got.sites] == [s.to_json() for s in want.sites]
    neurons = [s for s in chosen if s.kind == "neuron"]
    plan = plan_reduction(whole, ds, neurons, None, 0.5, None, None, 1, _no_progress, criterion="cmr-logit", replacement="auto",
                          allocation="site", joint_refit=False, parents=8, ridge=1e-3, curvature="auto", seed=0, batch_size=256, loss="auto")
    report = api.compile(models / name, tmp_path / "r.safetensors", calib=data, keep=0.5, calibration="original")
    assert report.plan.sites == plan.sites
    expected = fold(whole.tensors(), whole.sites, plan).tensors
    written = load_file(str(tmp_path / "r.safetensors"))
    assert written and all(torch.equal(v, expected[k]) for k, v in written.items())


def _no_progress(*a, **k):
    import contextlib

    return contextlib.nullcontext(lambda n: None)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_padding_is_excluded_everywhere(models, name, tmp_path):
    short, long = models / "pad9.safetensors", models / "pad14.safetensors"
    a, b = api.score(models / name, short, kinds=["neuron", "head"]), api.score(models / name, long, kinds=["neuron", "head"])
    for sa, sb in zip(a.sites, b.sites):
        torch.testing.assert_close(torch.tensor(sa.scores), torch.tensor(sb.scores), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(torch.tensor(sa.mean), torch.tensor(sb.mean), rtol=1e-10, atol=1e-12)
        assert sa.samples == sb.samples
    ra = api.compile(models / name, tmp_path / "a.safetensors", calib=short, keep=0.5)
    rb = api.compile(models / name, tmp_path / "b.safetensors", calib=long, keep=0.5)
    assert [(s.kept, s.replaced) for s in ra.plan.sites] == [(s.kept, s.replaced) for s in rb.plan.sites]
    for sa, sb in zip(ra.plan.sites, rb.plan.sites):
        torch.testing.assert_close(torch.tensor(sa.replacement.values), torch.tensor(sb.replacement.values), rtol=1e-10, atol=1e-12)
    # Not vacuous: the whole-model path counts padding tokens, so its means depend on the padding.
    whole = load_model(models / name)
    site = [s for s in whole.sites if s.kind == "neuron"]
    sa = score_model(whole, Dataset(short, whole.arg_names, 1, whole.dtype), "cmr-logit", site)
    sb = score_model(whole, Dataset(long, whole.arg_names, 1, whole.dtype), "cmr-logit", site)
    assert max(abs(x - y) for x, y in zip(sa.sites[0].mean, sb.sites[0].mean)) > 1e-6


def test_sequential_calibration_sees_the_earlier_reductions(models, tmp_path):
    """Layer 1's replacement constants are its means over kept tokens in the model whose layer 0
    is already reduced (clamped), not in the original model."""
    data = models / "pad9.safetensors"
    report = api.compile(models / "llama", tmp_path / "r.safetensors", calib=data, keep=0.5, calibration="sequential")
    plan = report.plan
    first, second = plan.sites[0], plan.sites[1]
    whole = load_model(models / "llama")
    x = _inputs(data)
    only_first = type(plan)(plan.source_sha256, plan.criterion, (first,), plan.replacement, plan.seed, ())
    with torch.no_grad():
        edits = clamp_edits(whole, only_first, site_ranks(whole, x, [first.name]))
        _, seq = whole.run(x, capture=[second.name], edits=edits)
        _, orig = whole.run(x, capture=[second.name])
    keep = x[1].bool()
    mean_seq, mean_orig = seq[second.name][keep].mean(0), orig[second.name][keep].mean(0)
    got = torch.tensor(second.replacement.values, dtype=torch.float64)
    torch.testing.assert_close(got, mean_seq[list(second.replaced)], rtol=1e-9, atol=1e-12)
    assert (got - mean_orig[list(second.replaced)]).abs().max() > 1e-6


def test_compile_never_materializes_calibration_times_vocabulary(tmp_path):
    """The head never runs: no tensor anywhere near tokens × vocabulary is allocated."""
    from torch.utils._python_dispatch import TorchDispatchMode

    vocab, n, t = 20000, 64, 32
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(str(tmp_path / "m"))
    save_file({"input_ids": torch.randint(0, vocab, (n, t)), "attention_mask": torch.ones(n, t, dtype=torch.long)}, str(tmp_path / "d.safetensors"))

    class Largest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            out = func(*args, **(kwargs or {}))
            for o in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(o, torch.Tensor):
                    self.largest = max(self.largest, o.numel())
            return out

    with Largest() as mode:
        api.compile(tmp_path / "m", tmp_path / "r.safetensors", calib=tmp_path / "d.safetensors", keep=0.5)
    assert mode.largest < n * t * vocab // 16, mode.largest
    whole = load_model(tmp_path / "m")  # not vacuous: one whole-model forward makes the logits
    with Largest() as ref, torch.no_grad():
        whole.forward(_inputs(tmp_path / "d.safetensors"))
    assert ref.largest >= n * t * vocab


def test_spilled_buffers_give_the_same_result_and_leave_nothing(models, tmp_path):
    work = tmp_path / "work"
    a = api.score(models / "llama", models / "pad9.safetensors")
    b = api.score(models / "llama", models / "pad9.safetensors", max_memory="1KB", work_dir=work)
    assert [s.to_json() for s in a.sites] == [s.to_json() for s in b.sites]
    r = api.compile(models / "llama", tmp_path / "r.safetensors", calib=models / "pad9.safetensors", keep=0.5, max_memory=1, work_dir=work)
    assert r.engine["spilled_bytes"] > 0 and r.fold_error.relative <= 1e-10
    assert work.is_dir() and not any(work.iterdir())


def test_bf16_sharded_checkpoint_is_written_in_bf16_and_loads_with_from_pretrained(models, tmp_path):
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(_llama()).to(torch.bfloat16).save_pretrained(str(tmp_path / "m"), max_shard_size="4KB")
    assert (tmp_path / "m" / "model.safetensors.index.json").is_file()
    out = f"{tmp_path}/r/"
    r = api.compile(tmp_path / "m", out, calib=models / "pad9.safetensors", keep=0.5, kinds=["neuron"])
    assert r.dtype == "bfloat16" and r.fold_error.relative <= 1e-10
    written = load_file(str(tmp_path / "r" / "model.safetensors"))
    assert {v.dtype for v in written.values()} == {torch.bfloat16}
    stock = transformers.LlamaForCausalLM.from_pretrained(out, local_files_only=True)
    assert stock.config.intermediate_size == 12 and stock.model.layers[0].mlp.down_proj.bias is not None
    assert json.loads((tmp_path / "r" / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("reserve", [0, 40, 4096])  # always copied; header too large for the room; written in place
def test_stream_writer_shards_with_an_index(tmp_path, reserve):
    from safetensors import safe_open

    from cmrtool.engine.writer import StreamWriter

    tensors = {f"t{i}": torch.randn(100, 7).to(torch.bfloat16 if i % 2 else torch.float32) for i in range(5)}
    (tmp_path / "s").mkdir()
    w = StreamWriter(tmp_path / "s", shard_bytes=3000, reserve=reserve)
    for k, v in tensors.items():
        w.add(k, v)
    files = w.finish(tmp_path, None, {"format": "pt", "plan": "x" * 100})
    assert len(files) > 1 and not any((tmp_path / "s").iterdir())
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    got = {k: v for f in files for k, v in load_file(str(f)).items()}
    assert set(index) == set(tensors) and all(torch.equal(got[k], v) for k, v in tensors.items())
    for f in files:
        with safe_open(str(f), "pt") as sf:
            assert sf.metadata() == {"format": "pt", "plan": "x" * 100}
        data = sum(t.numel() * t.element_size() for t in load_file(str(f)).values())
        header = int.from_bytes(f.read_bytes()[:8], "little")
        assert (f.stat().st_size == reserve + data) == (reserve == 4096) and (8 + header) % 8 == 0
    single = StreamWriter(tmp_path / "s", shard_bytes=1 << 62, reserve=reserve)
    for k, v in tensors.items():
        single.add(k, v)
    single.finish(None, tmp_path / "one.safetensors", {"format": "pt"})
    one = load_file(str(tmp_path / "one.safetensors"))
    assert all(torch.equal(one[k], v) for k, v in tensors.items()) and not any((tmp_path / "s").iterdir())


@pytest.mark.parametrize(("args", "message"), [
    (["--calibration", "bogus"], "unknown --calibration"),
    (["--fold-check", "float16"], "unknown --fold-check"),
    (["--max-memory", "lots"], "invalid --max-memory"),
    (["-c", "cmr-const"], "needs the loss gradient"),
    (["--joint-refit"], "--joint-refit needs the curvature"),
    (["--work-dir", "FILE"], "is not a directory"),
])
def test_bad_engine_options_are_usage_errors(models, cli, tmp_path, args, message):
    (tmp_path / "file").write_text("x")
    args = [str(tmp_path / "file") if a == "FILE" else a for a in args]
    r = cli("compile", models / "llama", "--calib", models / "pad9.safetensors", "--keep", "0.5", "-o", f"{tmp_path}/out/", *args)
    assert r.code == 2 and message in r.err and "hint:" in r.err and "Traceback" not in r.err
    assert not (tmp_path / "out").exists()


def test_engine_options_validate_once():
    from cmrtool.engine import EngineOptions, parse_memory

    assert parse_memory("1.5GB") == 3 << 29 and parse_memory("512m") == 512 << 20 and parse_memory(None) is None
    with pytest.raises(UsageError, match="--batch-size"):
        EngineOptions(batch_size=0)
    assert EngineOptions(batch_size=256, batch_tokens=2048).batch_for(128) == 16


@pytest.mark.slow
def test_torchrun_compiles_the_single_process_checkpoint(models, tmp_path):
    """Two ranks shard the calibration batches of every layer; statistics, plan and the written
    bytes equal the single-process ones."""
    from test_distributed import _run

    args = ["compile", models / "llama", "--calib", models / "pad9.safetensors", "--keep", "0.5", "--batch-size", "4", "--calibration", "sequential", "--json", "-q"]
    one, two = _run([*args, "-o", tmp_path / "one.safetensors"], None), _run([*args, "-o", tmp_path / "two.safetensors"], 2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "two.safetensors").read_bytes()
    a, b = json.loads(one.stdout), json.loads(two.stdout)
    assert a["sites"] == b["sites"] and a["fold_error"] == b["fold_error"] and b["calibration"] == "sequential"


def test_a_block_satisfies_the_backend_protocol_and_declares_no_gradients(models):
    from cmrtool.backends.protocol import Backend, Block, require
    from cmrtool.engine import BlockStack
    from cmrtool.errors import UnsupportedModelError

    stack = BlockStack(models / "llama")
    block = stack.block(1, stack.read_layer(1))
    assert isinstance(block, Block) and isinstance(stack.meta, Backend)
    assert [s.name for s in block.sites] == ["model.layers.1.self_attn", "model.layers.1.mlp"]
    require(block, "capture", "scoring")
    with pytest.raises(UnsupportedModelError, match="gradients"):
        require(block, "gradients", "cmr-const")


def test_check_window_takes_few_kept_tokens_and_skips_left_padding():
    from cmrtool.engine.loop import check_window
    from cmrtool.engine.options import EngineOptions

    mask = torch.ones(32, 128, dtype=torch.long)
    mask[0] = 0  # an all-padding sequence is never checked
    mask[1:, :100] = 0  # left padding: the window starts at the first kept token
    rows, cols = check_window(mask, EngineOptions())
    assert rows.tolist() == [1] and (cols.start, cols.stop) == (64, 128) and int(mask[1, cols].sum()) == 28
    rows, cols = check_window(torch.ones(64, 4, dtype=torch.long), EngineOptions(check_tokens=12))
    assert rows.tolist() == [0, 1, 2] and (cols.start, cols.stop) == (0, 4)  # 12 tokens: 3 sequences of 4
    assert check_window(torch.ones(64, 4, dtype=torch.long), EngineOptions(check_samples=2)) is not None
    assert check_window(torch.zeros(4, 8, dtype=torch.long), EngineOptions()) is None


@pytest.mark.parametrize("replacement", ["mean", "affine"])
def test_fold_in_float64_from_the_tensors_as_read_is_the_float64_fold(models, replacement):
    """fold(raw, dtype=float64) — rows and columns selected before widening, the engine's check
    path — equals folding the widened tensors, and cast back it is the default fold of raw."""
    whole = load_model(models / "llama")
    raw = {k: v.to(torch.bfloat16) for k, v in whole.tensors().items()}
    wide = {k: v.to(torch.float64) for k, v in raw.items()}
    neurons = [s for s in whole.sites if s.kind == "neuron"]
    ds = Dataset(models / "full.safetensors", whole.arg_names, whole.required_args, whole.dtype)
    plan = plan_reduction(whole, ds, neurons, None, 0.5, None, None, 1, _no_progress, criterion="cmr-logit", replacement=replacement,
                          allocation="site", joint_refit=False, parents=None, ridge=1e-3, curvature="auto", seed=0, batch_size=256, loss="auto")
    a = fold(raw, whole.sites, plan, dtype=torch.float64)
    b = fold(wide, whole.sites, plan)
    c = fold(raw, whole.sites, plan)
    assert a.changed and set(a.changed) == set(b.changed)
    for k in a.changed:
        assert a.tensors[k].dtype == torch.float64 and torch.equal(a.tensors[k], b.tensors[k]), k
        assert torch.equal(c.tensors[k], b.tensors[k].to(torch.bfloat16)), k
    assert all(a.tensors[k] is raw[k] for k in raw if k not in a.changed)  # unchanged: as read


def test_compile_reports_where_its_time_went_and_hashes_beside_the_work(models, tmp_path):
    from cmrtool.backends.module.hf import _sha256_dir
    from cmrtool.engine import BlockStack

    r = api.compile(models / "llama", tmp_path / "r.safetensors", calib=models / "pad9.safetensors", keep=0.5)
    phases = r.engine["phases"]
    assert {"read", "statistics", "check", "write", "copy", "finish"} <= set(phases)
    assert all(v >= 0 for v in phases.values()) and phases["statistics"] > 0 and phases["check"] > 0
    assert sum(phases.values()) <= r.engine["seconds"] + phases["copy"] + phases["finish"] + 1e-3
    stack = BlockStack(models / "llama")
    assert stack.sha256 == stack.meta.sha256 == _sha256_dir(stack.path, stack.weights.files) == r.plan.source_sha256


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(_llama()).to(torch.bfloat16).save_pretrained(str(root / "m"))
    return root / "m"


def test_fold_check_is_float64_on_the_first_layer_and_a_float32_screen_after(models, bf16_llama, tmp_path):
    from cmrtool.engine.loop import screen_tolerance  # noqa: F401  (the bound the report is held to)

    r = api.compile(bf16_llama, tmp_path / "a.safetensors", calib=models / "pad9.safetensors", keep=0.5, kinds=["neuron"])
    check = r.engine["fold_check"]
    assert check["mode"] == "auto" and check["float64_layers"] == [0] and check["float32_layers"] == 2
    assert 0 < check["float32_max_relative"] <= 4 * torch.finfo(torch.float32).eps * 24**0.5  # width 24
    assert r.fold_error.relative <= 1e-10 and any("screened in float32" in n for n in r.notes)
    every = api.compile(bf16_llama, tmp_path / "b.safetensors", calib=models / "pad9.safetensors", keep=0.5, kinds=["neuron"],
                        fold_check="float64")
    assert every.engine["fold_check"]["float64_layers"] == [0, 1, 2] and every.engine["fold_check"]["float32_layers"] == 0
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the check never changes what is written


def test_a_layer_above_the_screen_bound_is_decided_in_float64(models, bf16_llama, tmp_path, monkeypatch):
    from cmrtool.engine import loop
    from cmrtool.errors import CmrError

    monkeypatch.setattr(loop, "screen_tolerance", lambda dtype, plan: 0.0)  # every screen escalates
    r = api.compile(bf16_llama, tmp_path / "a.safetensors", calib=models / "pad9.safetensors", keep=0.5, kinds=["neuron"])
    assert r.engine["fold_check"]["float64_layers"] == [0, 1, 2] and r.engine["fold_check"]["float32_layers"] == 2
    assert r.fold_error.relative <= 1e-10  # rounding, confirmed exact in float64: no false alarm

    real = loop.fold

    def broken(tensors, sites, plan, dtype=None):  # a fold that is wrong in the last layer
        result = real(tensors, sites, plan, dtype=dtype)
        for k in result.changed:
            if ".layers.2." in k and k.endswith("down_proj.bias"):
                result.tensors[k] = result.tensors[k] + 1e-2
        return result

    monkeypatch.undo()
    monkeypatch.setattr(loop, "fold", broken)
    with pytest.raises(CmrError, match="differs from its clamped original"):
        api.compile(bf16_llama, tmp_path / "c.safetensors", calib=models / "pad9.safetensors", keep=0.5, kinds=["neuron"])
    assert not (tmp_path / "c.safetensors").exists()
