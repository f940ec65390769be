"""Recorded layer outputs, the sequential correction, and sharing them across torchrun ranks.

A layer runs once over the calibration set: its statistics pass records the layer's output rows
(and, for the sequential fast path, its FFN sites' values, token-major without padding). For a
decoder layer, whose FFN output is added to the residual stream last, the reduced layer's output
is then the recorded one plus the change of the replaced units through their consumer columns
(Proposition 1 applied to the output instead of the bias)::

    h_reduced = h + (a_repl − a)_S W_c[:, S]ᵀ      a_repl = c (constant) or β0 + β·a_P (affine)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from cmrtool import distributed
from cmrtool.engine.blocks import BlockModel
from cmrtool.engine.buffer import BlockData
from cmrtool.plan import Plan

__all__ = ["Recorder", "share_outputs", "correct"]


class Recorder:
    """Stores a block's output rows (and sites' kept-token values) the first time it runs them."""

    def __init__(self, h_in: torch.Tensor, h_out: torch.Tensor, mask: torch.Tensor, sites: Mapping[str, torch.Tensor]) -> None:
        self.h_in, self.h_out, self.sites = h_in, h_out, dict(sites)
        self.row = h_in[0].numel()
        self.done = torch.zeros(h_in.shape[0], dtype=torch.bool)
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), mask.sum(1).long().cumsum(0)])

    def __call__(self, inputs: Sequence[torch.Tensor], out: torch.Tensor, values: Mapping[str, torch.Tensor]) -> None:
        x = inputs[0]
        if x.untyped_storage().data_ptr() != self.h_in.untyped_storage().data_ptr():
            return
        start = (x.storage_offset() - self.h_in.storage_offset()) // self.row
        stop = start + int(x.shape[0])
        if bool(self.done[start:stop].all()):
            return
        self.h_out[start:stop] = out
        t0, t1 = int(self.offsets[start]), int(self.offsets[stop])
        for name, buf in self.sites.items():
            v = values[name]
            buf[t0:t1] = v.reshape(t1 - t0, v.shape[-1])
        self.done[start:stop] = True


def share_outputs(
    block: BlockModel, data: BlockData, recorder: Recorder, values: Mapping[str, torch.Tensor], h_out: torch.Tensor,
    site_buf: torch.Tensor | None, batch_size: int,
) -> None:
    """Under torchrun: every rank ends with the whole layer output (and recorded site values).

    Each rank recorded the rows of the batches it ran (the statistics pass deals batches out,
    :func:`cmrtool.distributed.gather_partials`); rows nobody ran are dealt out by batch index.
    Every row is then held by exactly one rank and zero on the others, so an all-reduce sum
    assembles the buffers exactly (x + 0 = x).
    """
    import torch.distributed as dist

    distributed.init()
    counts = recorder.done.to(torch.int32)
    dist.all_reduce(counts)
    world, me = distributed.world_size(), distributed.rank()
    for k, batch in enumerate(data.batches(batch_size)):
        rows = slice(batch.start, batch.start + len(batch))
        if k % world == me and not bool(counts[rows].all()):
            recorder.done[rows] = False  # this rank owns the batch now
            block.run(batch.inputs, capture=list(values))
        elif not bool(counts[rows].all()):
            recorder.done[rows] = False
    mine = recorder.done
    h_out[~mine] = 0
    if site_buf is not None:
        for r in (~mine).nonzero().flatten().tolist():
            site_buf[int(recorder.offsets[r]) : int(recorder.offsets[r + 1])] = 0
    for t in (h_out, site_buf):
        if t is not None:
            _all_sum(t)


def _all_sum(t: torch.Tensor, chunk: int = 16 << 20) -> None:
    """In-place all-reduce sum of a CPU tensor, in pieces (through the group's device)."""
    import torch.distributed as dist

    device = distributed.group_device()
    flat = t.view(-1)
    for i in range(0, flat.numel(), chunk):
        piece = flat[i : i + chunk]
        if device.type == "cpu":
            dist.all_reduce(piece)
        else:
            moved = piece.to(device)
            dist.all_reduce(moved)
            piece.copy_(moved.cpu())


def correct(h: torch.Tensor, mask: torch.Tensor, block: BlockModel, plan: Plan, values: Mapping[str, torch.Tensor], chunk: int = 4096) -> None:
    """``h[kept] += (a_repl − a)_S W_c[:, S]ᵀ`` for every replaced FFN unit (the reduced output)."""
    keep = mask.bool().nonzero()
    tensors = block.tensors()
    for sp in plan.sites:
        if not sp.replaced:
            continue
        site = block.site(sp.name)
        w = tensors[site.consumers[0].weight]  # (hidden, width)
        s_idx = torch.tensor(sp.replaced, dtype=torch.long)
        w_s = w[:, s_idx].T.contiguous()  # (|S|, hidden)
        r = sp.replacement
        coef = None
        if r.kind == "affine":  # a_j = β0 + β·a_P: column j of a (width × |S|) map
            coef = torch.zeros(site.width, len(sp.replaced), dtype=w.dtype)
            for col, (parents, betas) in enumerate(zip(r.parents, r.coefficients)):
                coef[list(parents), col] = torch.tensor(betas, dtype=w.dtype)
        const = torch.tensor(r.values, dtype=w.dtype)
        a_all = values[sp.name]
        for t0 in range(0, a_all.shape[0], chunk):
            a = a_all[t0 : t0 + chunk]
            repl = const + (a @ coef if coef is not None else 0.0)
            delta = (repl - a[:, s_idx]) @ w_s  # (tokens, hidden)
            pos = keep[t0 : t0 + chunk]
            h.index_put_((pos[:, 0], pos[:, 1]), delta, accumulate=True)
