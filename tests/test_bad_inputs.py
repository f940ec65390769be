"""Every bad input gets one ``error:`` line, a ``hint:``, the right exit code, no traceback and no
output file (DESIGN §6). ``tests/test_cli.py`` holds the first cases; these are the rest: corrupt
files of every format, pickles, wrong dtypes, mismatched plans and scores, unwritable or aliased
outputs, and out-of-range options."""

from __future__ import annotations

import json
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from helpers import SAMPLES, TinyMLP, build
from safetensors.torch import save_file

from cmrtool.errors import CmrError, InputError
from cmrtool.compile.fold import fold
from cmrtool.plan import Plan, Replacement, SitePlan

MLP = SAMPLES / "digits_mlp.pt"
CALIB = SAMPLES / "calib.safetensors"


class _Mkdir:
    """A pickle that creates a directory when unpickled: proof that nothing was unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _st(path, **tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def _calib(**extra):
    x = torch.rand(8, 1, 8, 8)
    return {"input": x, **extra}


def _cases(tmp, work):
    """name → (argv, exit code, text in the error line). ``tmp`` holds inputs, ``work`` outputs."""
    out = work / "r.pt"
    garbage_onnx = tmp / "m.onnx"
    garbage_onnx.write_bytes(b"\x08\x07\x12\x04onnx" + bytes(range(256)))
    empty = tmp / "empty.pt"
    empty.write_bytes(b"")
    calib_bytes = CALIB.read_bytes()
    trunc_st = tmp / "trunc.safetensors"
    trunc_st.write_bytes(calib_bytes[: len(calib_bytes) // 2])
    bad_header = tmp / "header.safetensors"
    bad_header.write_bytes(calib_bytes[:8] + b"{not json" + calib_bytes[17:])
    huge_header = tmp / "huge.safetensors"
    huge_header.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    zero_st = tmp / "zero.safetensors"
    zero_st.write_bytes(b"")
    zero_npz = tmp / "zero.npz"
    zero_npz.write_bytes(b"")
    evil = tmp / "evil.pt"
    evil.write_bytes(pickle.dumps({"input": _Mkdir(str(tmp / "pwned"))}))
    module_pickle = tmp / "module.pt"
    torch.save(torch.nn.Linear(64, 10), module_pickle)
    np.save(tmp / "complex.npy", np.zeros((4, 1, 8, 8), dtype=np.complex64))
    np.save(tmp / "objects.npy", np.array([{"a": 1}, 2], dtype=object), allow_pickle=True)
    np.savez(tmp / "big_endian.npz", input=np.zeros((4, 1, 8, 8), dtype=">f4"), labels=np.zeros(4, dtype="<f8"))
    link = tmp / "link.pt"
    link.symlink_to(MLP)
    not_a_dir = tmp / "plain_file"
    not_a_dir.write_bytes(b"")
    model_dir = tmp / "model_dir"
    model_dir.mkdir()
    txt_model = tmp / "model.txt"
    txt_model.write_bytes(MLP.read_bytes())
    c = "compile"
    keep = ["--keep", "0.5"]
    return {
        # corrupt, truncated or empty files
        "garbage onnx to score": (["score", garbage_onnx, "--calib", CALIB], 1, "ONNX is an output format"),
        "garbage onnx to compile": ([c, garbage_onnx, "--calib", CALIB, *keep, "-o", out], 1, "ONNX is an output format"),
        "onnx as data": (["score", MLP, "--calib", garbage_onnx], 1, "unknown data format '.onnx'"),
        "empty model file": (["inspect", empty], 1, "not a readable TorchScript archive"),
        "model with unknown suffix": (["inspect", txt_model], 1, "unknown model format '.txt'"),
        "directory as model": (["inspect", model_dir], 1, "a directory without config.json"),
        "directory as data": (["score", MLP, "--calib", model_dir], 1, "is a directory"),
        "truncated safetensors": (["score", MLP, "--calib", trunc_st], 1, "does not fit its shape"),
        "corrupt safetensors header": (["score", MLP, "--calib", bad_header], 1, "header"),
        "huge safetensors header": (["score", MLP, "--calib", huge_header], 1, "header claims"),
        "zero-byte safetensors": (["score", MLP, "--calib", zero_st], 1, "too short"),
        "zero-byte npz": (["score", MLP, "--calib", zero_npz], 1, "cannot read data file"),
        # pickles are never unpickled
        "pickle with code as data": (["score", MLP, "--calib", evil], 1, "cannot read data file"),
        "module pickle as data": (["score", MLP, "--calib", module_pickle], 1, "cannot read data file"),
        "object array as data": (["score", MLP, "--calib", tmp / "objects.npy"], 1, "Python objects"),
        # wrong dtypes, shapes and names
        "bool inputs": (["score", MLP, "--calib", _st(tmp / "bool.safetensors", input=torch.rand(4, 1, 8, 8) > 0.5)], 1, "unsupported dtype torch.bool"),
        "complex inputs": (["score", MLP, "--calib", tmp / "complex.npy"], 1, "complex64"),
        "uint16 inputs": (["score", MLP, "--calib", _st(tmp / "u16.safetensors", input=torch.zeros(4, 1, 8, 8, dtype=torch.uint16))], 1, "U16"),
        "big-endian npz floats labels": (["score", MLP, "--calib", tmp / "big_endian.npz"], 1, "expected integers"),
        "bool labels": (["score", MLP, "--calib", _st(tmp / "bl.safetensors", **_calib(labels=torch.ones(8, dtype=torch.bool)))], 1, "expected integers"),
        "2-d labels": (["score", MLP, "--calib", _st(tmp / "l2.safetensors", **_calib(labels=torch.zeros(8, 2, dtype=torch.int64)))], 1, "expected (n,)"),
        "scalar input": (["score", MLP, "--calib", _st(tmp / "scalar.safetensors", input=torch.tensor(1.0))], 1, "scalar"),
        "wrong rank": (["score", MLP, "--calib", _st(tmp / "rank.safetensors", input=torch.rand(4, 7))], 1, "rejected inputs"),
        "inf in data": (["score", MLP, "--calib", _st(tmp / "inf.safetensors", input=torch.full((4, 1, 8, 8), float("-inf")))], 1, "NaN or Inf (first at sample 0)"),
        # outputs
        "output through a symlink to the model": ([c, MLP, "--calib", CALIB, *keep, "-o", link, "--force"], 2, "one of the inputs"),
        "score output equal to the data": (["score", MLP, "--calib", CALIB, "-o", CALIB, "--force"], 2, "one of the inputs"),
        "file used as directory": ([c, MLP, "--calib", CALIB, *keep, "-o", not_a_dir / "r.pt"], 1, "not a directory"),
        "read-only filesystem": ([c, MLP, "--calib", CALIB, *keep, "-o", "/proc/cmrtool-r.pt"], 1, "not writable: /proc"),
        "output is stdout": ([c, MLP, "--calib", CALIB, *keep, "-o", "-"], 2, "cannot write the model to stdout"),
        # options out of range
        "stdin twice": (["score", "-", "--calib", "-"], 2, "only one input can be read from stdin"),
        "batch size zero": (["score", MLP, "--calib", CALIB, "--batch-size", "0"], 2, "--batch-size must be at least 1"),
        "negative batch size to compile": ([c, MLP, "--calib", CALIB, *keep, "--batch-size", "-3", "-o", out], 2, "--batch-size must be at least 1"),
        "limit zero": (["score", MLP, "--calib", CALIB, "--limit", "0"], 2, "--limit must be at least 1"),
        "huge keep-count": ([c, MLP, "--calib", CALIB, "--keep-count", str(10**15), "-o", out], 2, "not below the width"),
        "keep-count zero": ([c, MLP, "--calib", CALIB, "--keep-count", "0", "-o", out], 2, "--keep-count must be at least 1"),
        "negative keep": (["score", MLP, "--calib", CALIB, "--keep", "-0.5"], 2, "--keep must be in (0, 1]"),
        "keep and keep-count": ([c, MLP, "--calib", CALIB, *keep, "--keep-count", "3", "-o", out], 2, "mutually exclusive"),
        "round-to zero": ([c, MLP, "--calib", CALIB, *keep, "--round-to", "0", "-o", out], 2, "--round-to must be at least 1"),
        "unknown kind": (["score", MLP, "--calib", CALIB, "--kind", "layer"], 2, "unknown site kind"),
        "unknown replacement": ([c, MLP, "--calib", CALIB, *keep, "--replacement", "median", "-o", out], 2, "unknown replacement"),
        "unknown command": (["prune", MLP], 2, "No such command"),
    }


def _case_names() -> list[str]:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "in").mkdir()
        (Path(d) / "out").mkdir()
        return list(_cases(Path(d) / "in", Path(d) / "out"))


def _assert_clean_error(r, code, text):
    assert r.code == code, r.err
    lines = r.err.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and text in errors[0], r.err
    assert sum(ln.startswith("hint: ") for ln in lines) == 1, r.err
    assert "Traceback" not in r.err and r.out == ""


@pytest.mark.parametrize("case", _case_names())
def test_bad_input_is_one_clean_error(case, cli, tmp_path):
    if case == "read-only filesystem" and not os.path.isdir("/proc"):
        pytest.skip("needs /proc")
    inputs, work = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    work.mkdir()
    args, code, text = _cases(inputs, work)[case]
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if not p.is_symlink()}
    r = cli(*args)
    _assert_clean_error(r, code, text)
    assert list(work.iterdir()) == []  # no output, no partial file
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if not p.is_symlink()}
    assert after == before  # inputs untouched, nothing created (the pickle made no directory)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes to read-only directories")
def test_unwritable_output_directory(cli, tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        r = cli("compile", MLP, "--calib", CALIB, "--keep", "0.5", "-o", d / "r.pt")
        _assert_clean_error(r, 1, "not writable")
        assert list(d.iterdir()) == []
    finally:
        d.chmod(0o700)


def _scores_doc(cli, model=MLP):
    r = cli("score", model, "--calib", CALIB)
    assert r.code == 0, r.err
    return r.json()


@pytest.mark.parametrize("edit", ["width", "missing site", "short scores", "not json", "wrong kind"])
def test_scores_that_do_not_match_the_model(edit, cli, tmp_path):
    doc = _scores_doc(cli)
    doc["source_sha256"] = ""  # skip the provenance check: the contents themselves must be checked
    text, expected = None, ""
    if edit == "width":
        s = doc["sites"][0]
        for key in ("scores", "replacement", "mean"):
            s[key] = s[key][:100]
        s["width"] = 100
        expected = "have width 100, the model has 256"
    elif edit == "missing site":
        doc["sites"] = doc["sites"][1:]
        expected = "the scores have no site body.0"
    elif edit == "short scores":
        doc["sites"][0]["scores"] = doc["sites"][0]["scores"][:5]
        expected = "do not have 256 entries"
    elif edit == "not json":
        text, expected = "{'sites': [}", "not valid JSON"
    elif edit == "wrong kind":
        doc["kind"] = "cmrtool-plan"
        expected = "not the output of 'cmrtool score --json'"
    path = tmp_path / "s.json"
    path.write_text(text if text is not None else json.dumps(doc))
    r = cli("compile", MLP, "--scores", path, "--keep", "0.5", "-o", tmp_path / "r.pt")
    _assert_clean_error(r, 1, expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"]


def test_scores_of_the_original_do_not_fit_its_reduced_model(cli, tmp_path):
    doc = _scores_doc(cli)
    reduced = tmp_path / "reduced.pt"
    assert cli("compile", MLP, "--calib", CALIB, "--keep", "0.5", "-o", reduced).code == 0
    path = tmp_path / "s.json"
    path.write_text(json.dumps(doc))
    r = cli("compile", reduced, "--scores", path, "--keep", "0.5", "-o", tmp_path / "r2.pt")
    _assert_clean_error(r, 1, "another model")
    doc["source_sha256"] = ""
    path.write_text(json.dumps(doc))
    r = cli("compile", reduced, "--scores", path, "--keep", "0.5", "-o", tmp_path / "r2.pt")
    _assert_clean_error(r, 1, "have width 256, the model has 128")
    assert not (tmp_path / "r2.pt").exists()


def _plan(name="fc1", width=8, kept=(0, 1, 2, 3), values=None):
    replaced = tuple(i for i in range(width) if i not in kept)
    vals = tuple(values) if values is not None else (0.5,) * len(replaced)
    return Plan("", "cmr-logit", (SitePlan(name, "neuron", width, tuple(kept), replaced, Replacement("constant", vals)),))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from helpers import save_ts

    from cmrtool.backends.torchscript.model import TorchScriptModel

    path = save_ts(build(TinyMLP), tmp_path_factory.mktemp("m") / "m.pt", "script", None)
    return TorchScriptModel(path)


def test_a_plan_for_another_model_is_refused(tiny):
    tensors = tiny.tensors()
    with pytest.raises(InputError, match="does not have") as e:
        fold(tensors, tiny.sites, _plan(name="body.0"))
    assert "different model" in e.value.hint
    with pytest.raises(InputError, match="has width 8 but the plan says 9") as e:
        fold(tensors, tiny.sites, _plan(width=9, kept=(0, 1)))
    assert e.value.hint
    assert torch.equal(tiny.tensors()["fc1.weight"], tensors["fc1.weight"])  # inputs untouched


@pytest.mark.parametrize(
    "make, text",
    [
        (lambda: SitePlan("a", "neuron", 4, (0, 1), (1, 3), Replacement("constant", (0.0, 0.0))), "does not partition"),
        (lambda: SitePlan("a", "neuron", 4, (0, 1), (2, 3), Replacement("constant", (0.0,))), "replacement values"),
        (lambda: Replacement("quadratic", ()), "unknown replacement kind"),
        (lambda: Plan.loads('{"schema_version": 1}'), "plan is malformed"),
        (lambda: Plan.loads('{"schema_version": 99, "source_sha256": "", "criterion": "x", "sites": []}'), "newer than this cmrtool"),
        (lambda: Plan.loads("[1, 2]"), "not a JSON object"),
        (lambda: Plan.loads(b"\xff\xfe"), "not valid JSON"),
    ],
)
def test_malformed_plans_raise_input_errors_with_hints(make, text):
    with pytest.raises(CmrError, match=text) as e:
        make()
    assert e.value.hint


def test_a_reduced_model_with_a_corrupt_embedded_plan_is_refused(cli, tmp_path):
    import zipfile

    reduced = tmp_path / "reduced.pt"
    assert cli("compile", MLP, "--calib", CALIB, "--keep", "0.5", "-o", reduced).code == 0
    bad = tmp_path / "bad.pt"
    with zipfile.ZipFile(reduced) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("cmrtool/plan.json"):
                data = data.replace(b'"kept"', b'"kept_"')
            dst.writestr(item, data)
    r = cli("inspect", bad)
    _assert_clean_error(r, 1, "plan is malformed")


def test_pickled_model_is_not_unpickled(cli, tmp_path):
    path = tmp_path / "evil_model.pt"
    with open(path, "wb") as f:
        torch.save({"weights": _Mkdir(str(tmp_path / "pwned"))}, f)
    r = cli("inspect", path)
    _assert_clean_error(r, 1, "torch.save pickle")
    assert not (tmp_path / "pwned").exists()


# --- The reliability battery (issue 15): each finding that was an exit 0 with a wrong result, an
# "internal error", or a missing check is a bad-input case here.


def _tiny_llama(path, dtype=torch.float32):
    """A random two-layer LLaMA sequence classifier (vocab 40, 3 classes) saved with save_pretrained."""
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    cfg = transformers.LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=16, num_labels=3, pad_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(cfg).to(dtype).eval()
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("battery")
    d = _tiny_llama(root / "llama")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 40, (16, 9), generator=g)
    _st(root / "tok.safetensors", input_ids=ids, labels=torch.randint(0, 3, (16,), generator=g))
    return d, root / "tok.safetensors", ids


def _battery_cases(tmp, llama):
    d, tok, ids = llama
    out = tmp / "out" / "r.pt"
    c, keep = "compile", ["--keep", "0.5"]
    from safetensors.torch import load_file

    sd = load_file(str(SAMPLES / "digits_mlp.safetensors"))
    arch = ["--arch", "cmrtool.testing.models:digits_mlp"]
    return {
        # options that were accepted and silently did something else
        "round-to above the width": ([c, MLP, "--calib", CALIB, *keep, "--round-to", "1000", "-o", out], 2, "--round-to 1000 is larger than the width"),
        "negative check-samples": ([c, MLP, "--calib", CALIB, *keep, "--check-samples", "-1", "-o", out], 2, "--check-samples must be at least 0"),
        "min-iia nan": (["verify", MLP, MLP, "--data", CALIB, "--min-iia", "nan"], 2, "--min-iia must be a finite number"),
        "max-kl negative": (["verify", MLP, MLP, "--data", CALIB, "--max-kl", "-1"], 2, "--max-kl must be a finite number"),
        "threads zero": (["inspect", MLP, "--threads", "0"], 2, "--threads must be at least 1"),
        "negative ridge": (["score", MLP, "--calib", CALIB, "--ridge", "-1"], 2, "--ridge must be a finite number"),
        "parents zero": ([c, MLP, "--calib", CALIB, *keep, "--replacement", "affine", "--parents", "0", "-o", out], 2, "--parents must be 'all' or a positive integer"),
        "output name too long": ([c, MLP, "--calib", CALIB, *keep, "-o", tmp / "out" / ("a" * 300 + ".pt")], 2, "output name is too long"),
        # "internal error" before the fix
        "image data to a LLaMA": (["score", d, "--calib", _st(tmp / "img.safetensors", input=torch.rand(8, 1, 8, 8))], 1, "takes integer token ids"),
        "token ids out of range": (["score", d, "--calib", _st(tmp / "oob.safetensors", input_ids=ids + 100)], 1, "outside the vocabulary"),
        "labels out of range": (["score", MLP, "--calib", _st(tmp / "l12.safetensors", **_calib(labels=torch.full((8,), 12)))], 1, "label 12"),
        "negative labels": (["score", d, "--calib", _st(tmp / "lneg.safetensors", input_ids=ids, labels=torch.full((16,), -3))], 1, "label -3"),
        "int32 weights": (["inspect", _st(tmp / "i32.safetensors", **{k: (v * 100).to(torch.int32) for k, v in sd.items()}), *arch], 1, "dtype int32"),
    }


def _battery_names():
    return ["round-to above the width", "negative check-samples", "min-iia nan", "max-kl negative", "threads zero", "negative ridge",
            "parents zero", "output name too long", "image data to a LLaMA", "token ids out of range", "labels out of range",
            "negative labels", "int32 weights"]


@pytest.mark.parametrize("case", _battery_names())
def test_battery_bad_input_is_one_clean_error(case, cli, tmp_path, llama, capsys):
    (tmp_path / "out").mkdir()
    cases = _battery_cases(tmp_path, llama)
    assert sorted(cases) == sorted(_battery_names())
    args, code, text = cases[case]
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    if case == "threads zero":  # the fixture appends --threads 2, which would win
        from conftest import CliResult

        from cmrtool.cli.main import main

        capsys.readouterr()
        code_ = main([str(a) for a in args])
        cap = capsys.readouterr()
        r = CliResult(code_, cap.out, cap.err)
    else:
        r = cli(*args)
    _assert_clean_error(r, code, text)
    assert list((tmp_path / "out").iterdir()) == []
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def test_disk_full_is_a_bad_input_error(cli, tmp_path, monkeypatch):
    import errno

    real = open

    def full(path, mode="r", *a, **k):  # the checkpoint writer hits ENOSPC mid-write
        f = real(path, mode, *a, **k)
        if "w" in mode and str(path).startswith("/proc/self/fd/"):
            f.close()
            raise OSError(errno.ENOSPC, "No space left on device")
        return f

    monkeypatch.setattr("builtins.open", full)
    out = tmp_path / "r.safetensors"
    r = cli("compile", SAMPLES / "digits_mlp.safetensors", "--arch", "cmrtool.testing.models:digits_mlp", "--calib", CALIB, "--keep", "0.5", "-o", out)
    _assert_clean_error(r, 1, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_hf_weights_that_do_not_match_the_config_are_refused(cli, tmp_path, llama):
    from safetensors.torch import load_file

    d, tok, _ = llama
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((d / "config.json").read_text())
    st = load_file(str(d / "model.safetensors"))
    del st["model.layers.0.mlp.up_proj.weight"]
    st["other.weight"] = torch.zeros(3)
    save_file(st, str(bad / "model.safetensors"), metadata={"format": "pt"})
    r = cli("score", bad, "--calib", tok)
    _assert_clean_error(r, 1, "do not match its config.json: missing model.layers.0.mlp.up_proj.weight; unexpected other.weight")


def test_a_corrupted_byte_in_a_torchscript_tensor_is_refused(cli, tmp_path):
    import zipfile

    data = bytearray(MLP.read_bytes())
    with zipfile.ZipFile(MLP) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size > 64)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)  # local header + name + extra
    data[start + info.file_size // 2] ^= 0x40
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(data))
    r = cli("compile", bad, "--calib", CALIB, "--keep", "0.5", "-o", tmp_path / "r.pt")
    _assert_clean_error(r, 1, "archive member digits_mlp/data/0 is damaged")
    assert not (tmp_path / "r.pt").exists()


def test_safetensors_with_overlapping_tensors_are_refused(cli, tmp_path):
    src = _st(tmp_path / "ok.safetensors", input=torch.rand(8, 1, 8, 8), labels=torch.zeros(8, dtype=torch.int64))
    raw = src.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    b0 = header["input"]["data_offsets"][0]
    header["labels"]["data_offsets"] = [b0, b0 + 64]  # the first 64 bytes of 'input' again
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    bad = tmp_path / "overlap.safetensors"
    bad.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    r = cli("score", MLP, "--calib", bad)
    _assert_clean_error(r, 1, "share bytes")


def test_verify_onnx_of_another_reduction_is_refused_and_parity_has_a_threshold(cli, tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    assert cli("compile", MLP, "--calib", CALIB, "--keep", "0.5", "-o", a, "--onnx", tmp_path / "a.onnx", "--check-samples", "8").code == 0
    assert cli("compile", MLP, "--calib", CALIB, "--keep", "0.75", "-o", b).code == 0
    r = cli("verify", MLP, b, "--data", CALIB, "--onnx", tmp_path / "a.onnx", "--swaps", "20")
    _assert_clean_error(r, 1, "exported from another reduction")
    ok = cli("verify", MLP, a, "--data", CALIB, "--onnx", tmp_path / "a.onnx", "--swaps", "20")
    assert ok.code == 0 and ok.json()["onnx_max_abs_diff"] < 1e-3

    from cmrtool.compile.onnxcheck import ONNX_TOLERANCE, onnx_failure

    assert onnx_failure(12.0) == f"ONNX max |diff| 12 > {ONNX_TOLERANCE}" and onnx_failure(1e-6) is None


def test_compile_json_is_versioned(cli, tmp_path):
    from cmrtool import __version__

    d = cli("compile", MLP, "--calib", CALIB, "--keep", "0.5", "-o", tmp_path / "r.pt", "--json").json()
    assert d["schema_version"] == 1 and d["tool_version"] == __version__


def test_hf_output_without_suffix_is_a_directory_with_save_pretrained_modes(cli, tmp_path, llama, monkeypatch):
    d, tok, _ = llama
    monkeypatch.chdir(tmp_path)
    r = cli("compile", d, "--calib", tok, "--keep", "0.5", "-o", "reduced")
    assert r.code == 0, r.err
    out = tmp_path / "reduced"
    assert out.is_dir() and (out / "config.json").is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()} == {f.name: 0o666 & ~umask for f in out.iterdir()}
    assert not any(f.name.startswith(".") for f in tmp_path.iterdir())  # no partial or marker left
