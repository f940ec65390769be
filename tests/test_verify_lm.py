"""verify on token models (issue 13): per-token figures against hand-computed values, padding
invariance, token interchange against a direct run, and the memory bound (no eval-tokens ×
vocabulary logits). Tiny LLaMA causal LMs and a BERT masked LM built from configs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

from cmrtool import api  # noqa: E402
from cmrtool.backends import load_model  # noqa: E402
from cmrtool.backends.module.checkpoint import load_reduced  # noqa: E402
from cmrtool.verify.token_metrics import Quantiles, TokenFidelity  # noqa: E402


def _llama(vocab: int = 40, dtype: torch.dtype = torch.float64, **kw):
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, initializer_range=0.1, **kw)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def _data(path, n: int = 12, length: int = 9, pad_extra: int = 0, vocab: int = 40):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, 6:] = 0  # right padding on every third sequence
    ids[mask == 0] = 0
    if pad_extra:
        ids = torch.cat([ids, torch.zeros(n, pad_extra, dtype=ids.dtype)], 1)
        mask = torch.cat([mask, torch.zeros(n, pad_extra, dtype=mask.dtype)], 1)
    save_file({"input_ids": ids, "attention_mask": mask}, str(path))
    return ids, mask


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    _llama().save_pretrained(str(root / "llama"))
    ids, mask = _data(root / "data.safetensors")
    _data(root / "padded.safetensors", pad_extra=4)
    api.compile(root / "llama", root / "r.safetensors", calib=root / "data.safetensors", kinds=["neuron", "head"], keep=0.5)
    return root, ids, mask


def test_token_fidelity_by_hand():
    # Two tokens over a 3-word vocabulary; the second token's target is word 2.
    zo = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    zr = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    acc = TokenFidelity()
    acc.add(zo[:1], zr[:1], target=torch.tensor([0]))
    acc.add(zo[1:], zr[1:], target=torch.tensor([2]))
    f = acc.result()
    e = math.e
    # token 1: identical; token 2: p = (1, e, 1)/(e+2), q = (1, 1, e)/(e+2): KL = (e-1)/(e+2)
    assert f.tokens == 2 and f.agreement == 0.5
    assert f.kl == pytest.approx((e - 1) / (e + 2) / 2) and f.kl_max == pytest.approx((e - 1) / (e + 2))
    assert f.dlogit_mean == pytest.approx((0 + 2 / 3) / 2) and f.dlogit_max == 1.0
    nll_o = [-math.log(e * e / (e * e + 2)), -math.log(1 / (e + 2))]
    nll_r = [-math.log(e * e / (e * e + 2)), -math.log(e / (e + 2))]
    assert f.ppl_base == pytest.approx(math.exp(sum(nll_o) / 2)) and f.ppl_q == pytest.approx(math.exp(sum(nll_r) / 2))
    assert f.ppl_ratio == pytest.approx(math.exp((nll_r[1] - nll_o[1]) / 2))
    assert (f.accuracy_base, f.accuracy_q) == (0.5, 1.0)


def test_quantiles_exact_then_histogram():
    rng = np.random.default_rng(0)
    x = rng.exponential(0.1, 5000)
    exact, sketch = Quantiles(), Quantiles(limit=1000)
    for part in np.array_split(x, 7):
        exact.add(part)
        sketch.add(part)
    assert exact.exact and exact.quantile(0.99) == pytest.approx(np.quantile(x, 0.99))
    assert not sketch.exact
    for q in (0.5, 0.99):
        assert sketch.quantile(q) == pytest.approx(np.quantile(x, q), rel=0.011)


def _oracle(root, ids, mask):
    """Per-token figures from the models' full logits, by explicit loops over the samples."""
    o, r = load_model(root / "llama"), load_reduced(root / "r.safetensors")
    with torch.no_grad():
        zo, zr = o.forward([ids, mask]).double(), r.forward([ids, mask]).double()
    agree, kls, nll_o, nll_r, dls = [], [], [], [], []
    for i in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if not (mask[i, t] and mask[i, t + 1]):
                continue
            p, q = torch.log_softmax(zo[i, t], 0), torch.log_softmax(zr[i, t], 0)
            agree.append(int(zo[i, t].argmax() == zr[i, t].argmax()))
            kls.append(float((p.exp() * (p - q)).sum()))
            nll_o.append(-float(p[ids[i, t + 1]]))
            nll_r.append(-float(q[ids[i, t + 1]]))
            dls.append(float((zr[i, t] - zo[i, t]).abs().mean()))
    return agree, kls, nll_o, nll_r, dls


def test_per_token_figures_match_the_full_logits(lm):
    root, ids, mask = lm
    v = api.verify(root / "llama", root / "r.safetensors", root / "data.safetensors", swaps=40)
    agree, kls, nll_o, nll_r, dls = _oracle(root, ids, mask)
    assert v.unit == "token" and v.samples == len(agree) == 4 * (5 + 8 + 8)
    assert v.agreement == pytest.approx(np.mean(agree)) and 0 <= v.agreement <= 1
    assert v.kl == pytest.approx(np.mean(kls)) and v.tokens.kl_max == pytest.approx(max(kls))
    assert v.tokens.kl_p99 == pytest.approx(np.quantile(kls, 0.99))
    assert v.dlogit_mean == pytest.approx(np.mean(dls))
    assert v.tokens.ppl_base == pytest.approx(math.exp(np.mean(nll_o)))
    assert v.tokens.ppl_ratio == pytest.approx(math.exp(np.mean(nll_r) - np.mean(nll_o)))
    assert v.fold_error < 1e-10 and v.kl > 1e-6  # exact fold, not vacuous
    d = v.to_json()
    assert d["perplexity_ratio"] == pytest.approx(v.tokens.ppl_ratio) and d["tokens"]["same_top_p"] == v.agreement
    # mean ≤ max for every figure; percentiles ordered
    assert d["kl"] <= d["kl_max"] and d["dlogit_mean"] <= d["dlogit_max"] and d["tokens"]["median_kld"] <= d["kl_p99"] <= d["kl_max"]
    for s in [*d["sites"], d["all_sites"]]:
        assert 0 <= s["iia"] <= 1 and s["swaps"] == 40 and s["certificate_holds"]


def test_padding_does_not_change_the_report(lm):
    root, _, _ = lm
    a = api.verify(root / "llama", root / "r.safetensors", root / "data.safetensors", swaps=40, seed=3).to_json()
    b = api.verify(root / "llama", root / "r.safetensors", root / "padded.safetensors", swaps=40, seed=3).to_json()
    assert a["samples"] == b["samples"]
    for k in ("agreement", "kl", "kl_p99", "kl_max", "dlogit_mean", "dlogit_max", "perplexity_original", "perplexity_ratio"):
        assert a[k] == pytest.approx(b[k], rel=1e-9, abs=1e-12), k
    for sa, sb in zip([*a["sites"], a["all_sites"]], [*b["sites"], b["all_sites"]]):
        assert sa["iia"] == sb["iia"] and sa["kl"] == pytest.approx(sb["kl"], rel=1e-9, abs=1e-12)


def test_token_swap_equals_a_direct_intervention(lm):
    """p = 1: the retained units of the site at (base, t) take the source's values; the low
    level's logits at t must equal a full forward with that edit."""
    from cmrtool.verify.interchange import _generator
    from cmrtool.verify.lm import sample_mask, token_models
    from cmrtool.io.data import open_data
    from cmrtool.verify.token_swaps import draw_token_swaps

    root, ids, mask = lm
    o, r = load_model(root / "llama"), load_reduced(root / "r.safetensors")
    data = open_data(root / "data.safetensors", o)
    pair = token_models(o, r, data)
    assert pair is not None and pair[0].causal
    samples = sample_mask(ids, mask, True)
    seq, pos = samples.nonzero(as_tuple=True)
    base, source = draw_token_swaps(samples, 50, _generator(0, "x"))
    assert bool((pos[base] == pos[source]).all()) and bool((seq[base] != seq[source]).all())
    # The run's one swap, by hand: its draw is seeded by its label (the site name).
    name = "model.layers.0.mlp"
    kept = list(r.plan.site(name).kept)
    v = api.verify(root / "llama", root / "r.safetensors", root / "data.safetensors", swaps=1, p=1.0, seed=0, sites=[name])
    base1, source1 = draw_token_swaps(samples, 1, _generator(0, name))
    i, j, t = int(seq[base1[0]]), int(seq[source1[0]]), int(pos[base1[0]])

    def swapped(model, units):
        """The model on sequence i with ``units`` of the site at position t from sequence j."""
        _, clean = model.run([ids[j : j + 1], mask[j : j + 1]], capture=[name])
        width = clean[name].shape[-1]
        m = torch.zeros(1, ids.shape[1], width, dtype=torch.bool)
        m[0, t, units] = True
        return model.run([ids[i : i + 1], mask[i : i + 1]], edits={name: (m, clean[name][:, t : t + 1].expand(1, ids.shape[1], width))})[0]

    with torch.no_grad():
        z, zh = swapped(o, kept), swapped(r, list(range(len(kept))))
        assert not torch.allclose(z[0, t], o.forward([ids[i : i + 1], mask[i : i + 1]])[0, t])  # the swap changes something
    lp, lq = torch.log_softmax(z[0, t], 0), torch.log_softmax(zh[0, t], 0)
    assert v.sites[0].kl == pytest.approx(float((lp.exp() * (lp - lq)).sum()), rel=1e-9)
    assert v.sites[0].iia == float(z[0, t].argmax() == zh[0, t].argmax())


def test_bert_masked_lm(tmp_path):
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24,
                                  max_position_embeddings=16, initializer_range=0.1)
    torch.manual_seed(0)
    transformers.BertForMaskedLM(cfg).double().eval().save_pretrained(str(tmp_path / "bert"))
    ids, mask = _data(tmp_path / "d.safetensors")
    api.compile(tmp_path / "bert", tmp_path / "r.safetensors", calib=tmp_path / "d.safetensors", keep=0.5)
    v = api.verify(tmp_path / "bert", tmp_path / "r.safetensors", tmp_path / "d.safetensors", swaps=30)
    assert v.unit == "token" and v.samples == int(mask.sum())  # every kept token of an encoder
    assert v.tokens.ppl_base is None and v.accuracy_original is None  # no next-token labels for an encoder
    assert 0 <= v.agreement <= 1 and v.kl <= v.tokens.kl_max and v.fold_error < 1e-10


_MEMORY_CHILD = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    import cmrtool.verify.lm
    from cmrtool.backends import load_model
    from cmrtool.backends.module.checkpoint import load_reduced
    from cmrtool.io.data import open_data
    from cmrtool.verify.report import verify
    cmrtool.verify.lm._LOGIT_ELEMENTS = 1 << 18  # small head chunks, so the bound below is tight
    root = sys.argv[1]
    o, r = load_model(root + "/llama"), load_reduced(root + "/r.safetensors")
    data = open_data(root + "/d.safetensors", o)
    def status(key):
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))
    verify(o, r, data, swaps=5)  # warm up: lazy imports and allocator pools
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS (VmHWM) to the current RSS
    rss = status("VmRSS:")
    v = verify(o, r, data, swaps=5)
    print(json.dumps({"growth": status("VmHWM:") - rss, "tokens": v.samples, "agreement": v.agreement}))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's peak-RSS reset")
def test_verify_never_holds_eval_tokens_times_vocabulary_logits(tmp_path):
    vocab = 32768
    _llama(vocab=vocab, dtype=torch.float32, tie_word_embeddings=True).save_pretrained(str(tmp_path / "llama"))
    _data(tmp_path / "d.safetensors", n=32, length=32, vocab=vocab)
    api.compile(tmp_path / "llama", tmp_path / "r.safetensors", calib=tmp_path / "d.safetensors", keep=0.5)
    # A fixed mmap threshold: freed chunks go back to the system, so the peak RSS measures live
    # memory rather than glibc's heap retention (which grows past the logits on its own).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "CMRTOOL_MALLOC": "system"}
    out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(tmp_path)], capture_output=True, text=True, env=env, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    full = got["tokens"] * vocab * 4  # one fp32 copy of the eval tokens' logits
    assert got["tokens"] > 600 and 0 <= got["agreement"] <= 1
    assert got["growth"] < full / 4, (got, full)


def test_sweep_rows_are_per_token(lm):
    root, _, _ = lm
    r = api.sweep(root / "llama", root / "data.safetensors", root / "data.safetensors", keeps=[0.5], criteria=["cmr-logit"],
                  kinds=["neuron"], swaps=20)
    row = r.to_json()["rows"][0]
    assert row["unit"] == "token" and 0 <= row["agreement"] <= 1 and 0 < row["fidelity_kl"]
    assert row["perplexity_ratio"] > 0 and 0 <= row["iia"] <= 1


def test_bench_prefill_and_decode(lm, cli):
    root, _, _ = lm
    r = cli("bench", root / "llama", root / "r.safetensors", "--input-shape", "1,9", "--batch", "3", "--device", "cpu", "--dtype", "fp32",
            "--warmup", "1", "--repeats", "2", "--prompt-tokens", "8", "--decode-tokens", "3", "--threads", "1")
    assert r.code == 0, r.err
    d = r.json()
    gen = d["generation"]
    assert (gen["prompt_tokens"], gen["decode_tokens"]) == (8, 3) and d["mac_ratio"] > 1  # old keys kept
    assert [(g["batch"], g["prefill_speedup"] is None) for g in gen["results"]] == [(1, True), (1, False), (3, True), (3, False)]
    assert all(g["prefill_tokens_per_s"] > 0 and g["decode_tokens_per_s"] > 0 for g in gen["results"])
    off = cli("bench", root / "llama", "--input-shape", "1,9", "--device", "cpu", "--dtype", "fp32", "--warmup", "0", "--repeats", "1",
              "--decode-tokens", "0", "--threads", "1")
    assert off.code == 0 and off.json()["generation"] is None


def test_verify_cli_on_a_language_model(lm, cli):
    root, _, _ = lm
    args = ("verify", root / "llama", root / "r.safetensors", "--data", root / "data.safetensors", "--swaps", "10")
    table = cli(*args, "--no-json")
    assert table.code == 0 and "84 tokens" in table.out and "per token: KL median" in table.out and "PPL" in table.out
    strict = cli(*args, "--min-iia", "1")
    assert strict.code == 3 and "error:" in strict.err and strict.json()["unit"] == "token"
