"""Memory does not grow with the data: rows are read with positioned reads (nothing of the file
stays mapped), and the statistics keep no reference to a batch's tensors.
``benchmarks/memory.py`` measures the whole CLI at 1×–1024× the calibration data."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import torch
from helpers import write_data

from cmrtool.io.data import Dataset
from cmrtool.score.stats import Moments


def _rss_file_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise LookupError


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_streaming_a_file_does_not_map_it(tmp_path):
    x = torch.rand(100_000, 64)  # 25.6 MB
    path = write_data(tmp_path / "big.safetensors", x)
    del x
    ds = Dataset(path, ["x"])
    before = _rss_file_kib()
    total = 0.0
    for batch in ds.batches(256):
        total += float(batch.inputs[0][:, 0].sum())
    growth_mib = (_rss_file_kib() - before) / 1024
    assert growth_mib < 4, f"file-backed memory grew by {growth_mib:.1f} MiB while streaming a 25.6 MB file"
    assert total > 0


def test_moments_keep_no_reference_to_batch_tensors():
    m = Moments(3)
    mean, m2 = torch.ones(3), torch.full((3,), 2.0)
    refs = [weakref.ref(mean), weakref.ref(m2)]
    m.add_partial(10, mean, m2)
    m.add_partial(5, mean * 3, m2)
    mean.fill_(100.0)  # the partial was copied, not kept
    del mean, m2
    gc.collect()
    assert all(r() is None for r in refs)
    assert torch.allclose(m.mean, torch.full((3,), 5 / 3, dtype=torch.float64))
