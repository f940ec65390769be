"""Streaming moments: merging partial results equals one pass over everything (float64)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cmrtool.score.stats import Moments, as_samples


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=8), st.integers(0, 10_000))
def test_batched_and_merged_equal_one_pass(sizes, seed):
    g = torch.Generator().manual_seed(seed)
    chunks = [torch.randn(n, 5, generator=g, dtype=torch.float64) * 3 + 7 for n in sizes]
    x = torch.cat(chunks)
    streamed = Moments(5)
    for c in chunks:
        streamed.update(c)
    # Merge in a tree, as ranks would.
    parts = [Moments(5).update(c) for c in chunks]
    while len(parts) > 1:
        parts = [parts[i].merge(parts[i + 1]) if i + 1 < len(parts) else parts[i] for i in range(0, len(parts), 2)]
    for m in (streamed, parts[0]):
        assert m.count == len(x)
        if len(x):
            assert torch.allclose(m.mean, x.mean(0), rtol=0, atol=1e-12)
            assert torch.allclose(m.var, x.var(0, unbiased=False), rtol=1e-10, atol=1e-12)


def test_float32_batches_accumulate_in_float64():
    # Per-batch moments are float32-accurate (two-pass); the running totals are float64, so
    # many batches do not accumulate error.
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(200_000, 3, generator=g) * 2 + 50).float()
    m = Moments(3)
    for chunk in x.split(1000):
        m.update(chunk)
    assert m.mean.dtype == m.m2.dtype == torch.float64
    ref = x.double()
    assert torch.allclose(m.mean, ref.mean(0), rtol=1e-7)
    assert torch.allclose(m.var, ref.var(0, unbiased=False), rtol=1e-6)


def test_channel_values_reduce_over_positions():
    g = torch.Generator().manual_seed(1)
    v = torch.randn(6, 4, 5, 3, generator=g, dtype=torch.float64)
    m = Moments(4).update_value(v, 1)
    ref = v.movedim(1, -1).reshape(-1, 4)
    assert m.count == 6 * 5 * 3
    assert torch.allclose(m.mean, ref.mean(0), rtol=1e-13) and torch.allclose(m.var, ref.var(0, unbiased=False), rtol=1e-12)


def test_state_round_trip():
    m = Moments(4).update(torch.randn(20, 4))
    m2 = Moments.from_state(m.state())
    assert m2.count == 20 and torch.equal(m2.mean, m.mean) and torch.equal(m2.m2, m.m2)


def test_as_samples_puts_units_last():
    v = torch.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5).float()
    s = as_samples(v, 1)
    assert s.shape == (40, 3)
    assert torch.equal(s[:, 1].sort().values, v[:, 1].reshape(-1).sort().values)
    assert as_samples(torch.zeros(2, 7, 6), -1).shape == (14, 6)
