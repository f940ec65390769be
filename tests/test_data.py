"""Data files: formats, lazy batches, binding to forward arguments, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import write_data

from cmrtool.io.data import Dataset
from cmrtool.errors import InputError


def _check(ds, x, y=None):
    got = torch.cat([b.inputs[0] for b in ds.batches(3)])
    assert torch.equal(got, x)
    if y is not None:
        assert torch.equal(torch.cat([b.labels for b in ds.batches(3)]), y)


def test_formats(tmp_path):
    x, y = torch.rand(10, 4), torch.arange(10)
    _check(Dataset(write_data(tmp_path / "a.safetensors", x, y), ["x"]), x, y)
    np.savez(tmp_path / "b.npz", input=x.numpy(), labels=y.numpy())
    _check(Dataset(tmp_path / "b.npz", ["x"]), x, y)
    np.save(tmp_path / "c.npy", x.numpy())
    _check(Dataset(tmp_path / "c.npy", ["x"]), x)
    torch.save({"input": x, "labels": y}, tmp_path / "d.pt")
    _check(Dataset(tmp_path / "d.pt", ["x"]), x, y)
    torch.save(x, tmp_path / "e.pt")
    _check(Dataset(tmp_path / "e.pt", ["x"]), x)


def test_batches_are_read_lazily_and_cast(tmp_path):
    x = torch.rand(1000, 4, dtype=torch.float32)
    ds = Dataset(write_data(tmp_path / "a.safetensors", x), ["x"], float_dtype=torch.float64)
    b = next(ds.batches(7))
    assert len(b) == 7 and b.inputs[0].dtype == torch.float64 and b.labels is None
    assert sum(len(b) for b in ds.batches(64, limit=100)) == 100


def test_arguments_bind_by_name(tmp_path):
    from safetensors.torch import save_file

    save_file({"input_ids": torch.arange(12).reshape(3, 4), "attention_mask": torch.ones(3, 4, dtype=torch.int64)}, str(tmp_path / "t.safetensors"))
    ds = Dataset(tmp_path / "t.safetensors", ["input_ids", "attention_mask", "labels_unused"], required=1)
    assert ds.keys == ["input_ids", "attention_mask"]
    with pytest.raises(InputError, match="no tensor 'input'"):
        Dataset(tmp_path / "t.safetensors", ["x"])


def test_rows_must_agree(tmp_path):
    from safetensors.torch import save_file

    save_file({"input": torch.rand(4, 2), "labels": torch.arange(3)}, str(tmp_path / "a.safetensors"))
    with pytest.raises(InputError, match="different numbers of rows"):
        Dataset(tmp_path / "a.safetensors", ["x"])


def test_pickles_are_not_executed(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"input": Evil()}, f)
    with pytest.raises(InputError):
        Dataset(tmp_path / "evil.pt", ["x"])
