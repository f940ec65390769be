"""Fuzzing the file loaders: whatever the bytes, a loader either succeeds or raises a
:class:`~cmrtool.errors.CmrError` (which the CLI turns into ``error:``/``hint:``), never another
exception type and never a crash.

Inputs are random bytes, and valid files truncated, bit-flipped or overwritten: data files in
every format (opened and read to the end), TorchScript archives (whole-file damage and damage to
one member of a re-zipped archive, then a forward pass), safetensors headers built from random
JSON, and the plan and scores JSON documents (random values at every path of a real document).
"""

from __future__ import annotations

import copy
import io
import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SAMPLES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cmrtool.backends.torchscript.model import TorchScriptModel
from cmrtool.io.data import Dataset
from cmrtool.errors import CmrError
from cmrtool.plan import Plan, Replacement, SitePlan
from cmrtool.score.scoring import ScoreReport, SiteScores


def fuzz(examples: int) -> settings:
    # tmp_path is shared by a test's examples: each one overwrites the file it reads.
    return settings(max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SUFFIXES = (".safetensors", ".npy", ".npz", ".pt")


def _valid_data_files() -> dict[str, bytes]:
    from safetensors.torch import save as st_save

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(6, 1, 8, 8, generator=g), torch.arange(6)
    npy, npz, pt = io.BytesIO(), io.BytesIO(), io.BytesIO()
    np.save(npy, x.numpy())
    np.savez(npz, input=x.numpy(), labels=y.numpy())
    torch.save({"input": x, "labels": y}, pt)
    return {".safetensors": st_save({"input": x, "labels": y}), ".npy": npy.getvalue(), ".npz": npz.getvalue(), ".pt": pt.getvalue()}


VALID = _valid_data_files()


@st.composite
def damaged(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` truncated, with bits flipped, or with a span overwritten by random bytes."""
    b = bytearray(data)
    how = draw(st.sampled_from(["truncate", "flip", "overwrite", "random"]))
    if how == "truncate":
        return bytes(b[: draw(st.integers(0, len(b)))])
    if how == "random":
        return draw(st.binary(max_size=512))
    if how == "flip":
        for i in draw(st.lists(st.integers(0, len(b) - 1), min_size=1, max_size=8)):
            b[i] ^= 1 << draw(st.integers(0, 7))
        return bytes(b)
    i = draw(st.integers(0, len(b) - 1))
    b[i : i + 8] = draw(st.binary(min_size=1, max_size=8))
    return bytes(b)


def _consume(path: Path) -> None:
    ds = Dataset(path, ["x"], 1, torch.float32)
    for _ in ds.batches(4):
        pass


def _succeeds_or_refuses(load, path: Path, blob: bytes) -> None:
    """The property: ``load(path)`` on these bytes returns, or raises a CmrError; nothing else."""
    path.write_bytes(blob)
    try:
        load(path)
    except CmrError:
        pass


@fuzz(300)
@given(suffix=st.sampled_from(SUFFIXES), data=st.data())
def test_data_loaders_never_escape(tmp_path, suffix, data):
    _succeeds_or_refuses(_consume, tmp_path / f"d{suffix}", data.draw(damaged(VALID[suffix])))


_EDGES = st.sampled_from([float("inf"), float("-inf"), float("nan"), 1e308, 10**20, 2**63, -1, 0, 1.5, "", "1"])
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6) | _EDGES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_DTYPES = st.sampled_from(["F32", "F64", "F16", "BF16", "I64", "I8", "U8", "BOOL", "U16", "C64", "F8_E4M3", "", "f32"])


@st.composite
def safetensors_files(draw: st.DrawFn) -> bytes:
    """A safetensors file whose header is random but plausible (names, dtypes, shapes, offsets)."""
    names = draw(st.lists(st.sampled_from(["input", "labels", "x", "__metadata__", ""]), max_size=3, unique=True))
    header = {}
    for name in names:
        entry = {
            "dtype": draw(_DTYPES | _JSON),
            "shape": draw(st.lists(st.integers(-2, 9), max_size=4) | _JSON),
            "data_offsets": draw(st.lists(st.integers(-5, 600), min_size=2, max_size=2) | _JSON),
        }
        if draw(st.booleans()):
            entry.pop(draw(st.sampled_from(list(entry))))
        header[name] = entry if name != "__metadata__" else draw(_JSON)
    text = json.dumps(header).encode()
    length = draw(st.sampled_from([len(text), len(text) + 1, max(0, len(text) - 1), 2**40]))
    return struct.pack("<Q", length) + text + draw(st.binary(max_size=600))


@fuzz(300)
@given(blob=safetensors_files())
def test_safetensors_headers_never_escape(tmp_path, blob):
    _succeeds_or_refuses(_consume, tmp_path / "h.safetensors", blob)


MODEL = SAMPLES / "digits_mlp.pt"
MODEL_BYTES = MODEL.read_bytes()
with zipfile.ZipFile(MODEL) as _z:
    MEMBERS = [(info, _z.read(info)) for info in _z.infolist()]
# The members TorchScript parses (code, pickles, constants), not the raw weight blobs.
PARSED = [i for i, (info, _) in enumerate(MEMBERS) if "/data/" not in info.filename]


def _load_and_run(path: Path) -> None:
    model = TorchScriptModel(path)
    with torch.no_grad():
        model.forward([torch.rand(2, 1, 8, 8)])


@fuzz(80)
@given(blob=damaged(MODEL_BYTES))
def test_torchscript_loader_never_escapes_damaged_files(tmp_path, blob):
    _succeeds_or_refuses(_load_and_run, tmp_path / "m.pt", blob)


@fuzz(120)
@given(index=st.sampled_from(PARSED), data=st.data())
def test_torchscript_loader_never_escapes_damaged_members(tmp_path, index, data):
    """A well-formed zip whose code, pickles or constants are damaged (CRCs recomputed, so the
    damage reaches TorchScript's deserializer and compiler)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for i, (info, content) in enumerate(MEMBERS):
            z.writestr(info, data.draw(damaged(content)) if i == index and content else content)
    _succeeds_or_refuses(_load_and_run, tmp_path / "m.pt", out.getvalue())


def _paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:2]):
            yield from _paths(v, (*prefix, i))


def _documents() -> dict[str, dict]:
    site = SitePlan("body.0", "neuron", 4, (0, 2), (1, 3), Replacement("constant", (0.5, -1.25)))
    plan = Plan("ab" * 32, "cmr-logit", (site,), settings=(("keep", 0.5),))
    scores = ScoreReport("cmr-logit", "ab" * 32, 0, 10, (SiteScores("body.0", "neuron", 4, (1.0, 2.0, 0.0, 3.5), (0.1,) * 4, (0.1,) * 4, 10),))
    return {"plan": json.loads(plan.dumps()), "scores": scores.to_json()}


DOCS = _documents()
PARSERS = {"plan": Plan.loads, "scores": ScoreReport.loads}


@fuzz(600)
@given(which=st.sampled_from(sorted(DOCS)), data=st.data(), value=_EDGES | _JSON)
def test_json_parsers_never_escape_random_values(which, data, value):
    doc = copy.deepcopy(DOCS[which])
    path = data.draw(st.sampled_from(list(_paths(doc))))
    if not path:
        doc = value
    else:
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if isinstance(parent, dict) and data.draw(st.booleans()):
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
    try:
        PARSERS[which](json.dumps(doc))
    except CmrError:
        pass


@fuzz(300)
@given(which=st.sampled_from(sorted(DOCS)), text=st.binary(max_size=200) | st.text(max_size=200))
def test_json_parsers_never_escape_random_text(which, text):
    try:
        PARSERS[which](text)
    except CmrError:
        pass


@pytest.mark.parametrize("text", ["[" * 100_000, '{"a":' * 100_000, '{"schema_version": Infinity}', '{"kind": "cmrtool-scores", "sites": [], "criterion": "x", "seed": -Infinity}'])
@pytest.mark.parametrize("which", sorted(DOCS))
def test_json_parsers_known_escapes_are_clean(which, text):
    with pytest.raises(CmrError):
        PARSERS[which](text)


def test_a_huge_width_is_refused_without_allocating():
    doc = copy.deepcopy(DOCS["plan"])
    doc["sites"][0]["width"] = 10**15
    with pytest.raises(CmrError, match="does not partition"):
        Plan.loads(json.dumps(doc))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_replacements_are_refused(value):
    doc = copy.deepcopy(DOCS["scores"])
    doc["sites"][0]["replacement"][1] = value
    with pytest.raises(CmrError, match="NaN or infinite"):
        ScoreReport.loads(json.dumps(doc))
    doc = copy.deepcopy(DOCS["plan"])
    doc["sites"][0]["replacement"]["values"][0] = value
    with pytest.raises(CmrError, match="NaN or infinite"):
        Plan.loads(json.dumps(doc))
