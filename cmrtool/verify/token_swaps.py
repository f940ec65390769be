"""Interchange interventions between tokens, and the token-model verify run (DESIGN §3.5).

A token swap takes a base token (sequence i, position t) and a source token (sequence j ≠ i,
the same position t), both samples (:func:`cmrtool.verify.lm.sample_mask`), and a mask m over a
site's retained units (each 1 with probability p). Low level: O on sequence i with the
retained units of the site at position t set to ``m⊙a_O(j, t) + (1−m)⊙a_O(i, t)`` (replaced
units and every other position keep their own values); high level: R the same with a_R. The
compared predictions are both models' logits at (i, t): z_L and z_H. IIA, its Wilson interval,
KL both ways, D2 and the margin certificates are then those of per-sample verify
(:func:`cmrtool.verify.report.summarize_swaps`), one swap = one token.

Draws: the base is uniform over the sample tokens whose position holds a sample in at least two
sequences; the source uniform over the other sequences' samples at that position; masks as for
per-sample verify. All streams depend only on (seed, run label[, site]), and tokens are numbered
in (sequence, position) order over samples only, so padding does not change them.

Runs are batched, one row per swap. A causal LM's prediction at t reads positions ≤ t only, and
the positions before t are those of the clean run, so a swap runs the one token at t through the
model on the clean KV cache of its sequence (kept from the fidelity passes), attending to the
first t positions: the same value as a run of the sequence cut after t, for one token's work. An
encoder re-runs the base sequence. The edit is a boolean mask set at the swapped position only. Source values come from the clean passes of the fidelity stream
(:class:`cmrtool.verify.lm.Stores`: only the drawn sources, O's retained units only).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from cmrtool.errors import InputError
from cmrtool.verify.lm import Stores, TokenModel, chunk_for, sample_mask, stream_fidelity
from cmrtool.verify.token_metrics import TokenFidelity, swap_scalars

__all__ = ["draw_token_swaps", "verify_token_model"]

_SWAP_BYTES = 64 << 20  # edit masks and site values of one interchange pass


def draw_token_swaps(samples: torch.Tensor, swaps: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Base and source sample indices ``(swaps,)`` (module docstring), from ``samples`` ``(n, T)``."""
    seq, pos = samples.nonzero(as_tuple=True)  # row-major: index = sample number
    per_pos = torch.bincount(pos, minlength=samples.shape[1])
    eligible = (per_pos[pos] >= 2).nonzero().squeeze(1)
    if eligible.numel() == 0:
        raise InputError(
            "token interchange needs two sequences with a sample token at the same position",
            "verify on at least two sequences (two rows of input_ids whose attention masks keep the same position)",
        )
    base = eligible[torch.randint(eligible.numel(), (swaps,), generator=g)]
    # The samples at each position, grouped: order[starts[t] : starts[t] + per_pos[t]].
    order = torch.argsort(pos * samples.shape[0] + seq)
    starts = torch.cumsum(per_pos, 0) - per_pos
    t = pos[base]
    k = (torch.rand(swaps, generator=g, dtype=torch.float64) * (per_pos[t] - 1).to(torch.float64)).floor().to(torch.int64)
    where = torch.empty_like(order)
    where[order] = torch.arange(order.numel())
    rank = where[base] - starts[t]  # the base's place among the samples at t
    k = k + (k >= rank).to(torch.int64)  # skip the base itself
    return base, order[starts[t] + k]


def _site_cols(model: Any, name: str, kept: Sequence[int] | None) -> torch.Tensor | None:
    """The value columns of ``kept`` units (all for None), channels of one unit together."""
    if kept is None:
        return None
    g = model.site(name).group
    return (torch.tensor(kept, dtype=torch.int64).unsqueeze(1) * g + torch.arange(g)).reshape(-1)


def _edit(model: Any, name: str, keep: torch.Tensor, cols: torch.Tensor | None, fill: torch.Tensor, t: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (mask, fill) edit of one site for a batch of swaps: True at (row, t_row) on the
    channels of the masked retained units. ``fill`` ``(b, retained channels)``."""
    site = model.site(name)
    b = keep.shape[0]
    unit = keep.repeat_interleave(site.group, dim=1)
    full_mask = torch.zeros(b, site.channels, dtype=torch.bool)
    full_fill = torch.zeros(b, site.channels, dtype=fill.dtype)
    if cols is None:
        full_mask, full_fill = unit, fill
    else:
        full_mask[:, cols], full_fill[:, cols] = unit, fill
    at = torch.zeros(b, length, 1, dtype=torch.bool)
    at[torch.arange(b), t] = True
    return at & full_mask.unsqueeze(1), full_fill.unsqueeze(1)


def _run_group(
    o: TokenModel, r: TokenModel, plan: Any, names: list[str], label: str, inputs: Sequence[torch.Tensor], seq: torch.Tensor,
    pos: torch.Tensor, base: torch.Tensor, source: torch.Tensor, masks: dict[str, torch.Tensor], stores: tuple[Stores, Stores],
    cols: dict[str, torch.Tensor | None], base_pred: torch.Tensor, advance: Callable[[int], None], kv: list[list[tuple[torch.Tensor, torch.Tensor]]] | None,
) -> Any:
    from cmrtool.verify.report import summarize_swaps

    swaps = base.numel()
    length = inputs[0].shape[1]
    t_all = pos[base]
    order = torch.argsort(t_all, stable=True) if o.causal else torch.arange(swaps)  # similar cut lengths together
    channels = sum(o.model.site(s).channels for s in names)
    if kv is not None:  # one token per swap; the cache rows of its sequence, both levels
        per_swap = sum(k[:1].numel() * k.element_size() * 2 for level in kv for k, _ in level) + channels * 16
    else:
        per_swap = length * (channels * 6 + 4 * int(getattr(o.model.hf_config, "hidden_size", 1024))) * 4
    step = max(1, _SWAP_BYTES // max(per_swap, 1))
    parts: list[dict[str, np.ndarray]] = []
    changed: list[np.ndarray] = []
    chunk = chunk_for(o)
    with torch.no_grad():
        for i in range(0, swaps, step):
            idx = order[i : i + step]
            b, s, t = base[idx], source[idx], t_all[idx]
            rows = seq[b]
            z = []
            for level, (tm, store) in enumerate(((o, stores[0]), (r, stores[1]))):
                def edit(n: str, at: torch.Tensor, span: int) -> tuple[torch.Tensor, torch.Tensor]:
                    return _edit(tm.model, n, masks[n][idx], cols[n] if level == 0 else None, store.get(n, s), at, span)

                if kv is not None:  # the swapped token alone, on its sequence's clean cache
                    cache = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in kv[level]]
                    one = torch.zeros_like(t)
                    z.append(tm.step(inputs[0][rows, t], t, cache, {n: edit(n, one, 1) for n in names}))
                    continue
                cut = int(t.max()) + 1 if o.causal else length
                x = [v.index_select(0, rows)[:, :cut] for v in inputs]
                h, _ = tm.hidden(x, edits={n: edit(n, t, cut) for n in names})
                z.append(h[torch.arange(b.numel()), t])
            for c in range(0, b.numel(), chunk):
                zl, zh = o.logits(z[0][c : c + chunk]), r.logits(z[1][c : c + chunk])
                figures = swap_scalars(zl, zh)
                parts.append(figures)
                changed.append(figures["pred"] != base_pred.index_select(0, b[c : c + chunk]).numpy())
            advance(b.numel())
    joined = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    retained = sum(len(plan.site(n).kept) for n in names)
    return summarize_swaps(label, swaps, retained, joined, np.concatenate(changed))


def verify_token_model(
    o: TokenModel, r: TokenModel, plan: Any, data: Any, groups: Sequence[tuple[list[str], str]], swaps: int, p: float, seed: int,
    batch_size: int, clamp_for: Callable[[list[torch.Tensor]], dict[str, Any]], prog: Callable[..., Any],
) -> tuple[TokenFidelity, list[Any], list[str]]:
    """Per-token fidelity and one interchange result per group (sites, then all sites);
    ``swaps`` 0 skips interchange. Returns the accumulators, the results and notes."""
    from cmrtool.verify.interchange import _bernoulli, _generator

    batch = data.all()
    inputs = list(batch.inputs)
    keys = list(data.keys)
    mask = inputs[keys.index("attention_mask")] if "attention_mask" in keys else None
    samples = sample_mask(inputs[0], mask, o.causal)
    if not bool(samples.any()):
        raise InputError(
            f"data file {data.path} has no token to verify on" + (" (a causal LM needs two consecutive kept tokens)" if o.causal else ""),
            "pass sequences whose attention_mask keeps at least two tokens",
        )
    seq, pos = samples.nonzero(as_tuple=True)
    draws = []
    wanted: tuple[dict[str, list[torch.Tensor]], dict[str, list[torch.Tensor]]] = ({}, {})
    if swaps:
        for names, label in groups:
            g = _generator(seed, label)
            base, source = draw_token_swaps(samples, swaps, g)
            kept = {s: len(plan.site(s).kept) for s in names}
            masks = {s: _bernoulli(_generator(seed, f"{label}/{s}"), swaps, w, p) for s, w in kept.items()}
            draws.append((names, label, base, source, masks))
            for s in names:
                for level in wanted:
                    level.setdefault(s, []).append(source)
    cols = {s: _site_cols(o.model, s, plan.site(s).kept) for s in wanted[0]}
    stores = (
        Stores({s: torch.unique(torch.cat(v)) for s, v in wanted[0].items()}, cols),
        Stores({s: torch.unique(torch.cat(v)) for s, v in wanted[1].items()}, {s: None for s in wanted[1]}),
    )
    caches: list[list[Any]] | None = [[], []] if o.causal and draws else None
    with prog("fidelity", data.n, "sequences") as advance:
        acc, base_pred = stream_fidelity(o, r, inputs, samples, clamp_for(inputs), stores, batch_size, advance, caches)
    kv = None if caches is None else [[(torch.cat([p[i][0] for p in level]), torch.cat([p[i][1] for p in level])) for i in range(len(level[0]))] for level in caches]
    results = []
    with prog("interchange", swaps * len(draws), "swaps") as advance:
        for names, label, base, source, masks in draws:
            results.append(_run_group(o, r, plan, names, label, inputs, seq, pos, base, source, masks, stores, cols, base_pred, advance, kv))
    notes = []
    if batch.labels is not None:
        notes.append("per-sequence labels are not used for a token model (a causal LM's labels are its next tokens)")
    return acc, results, notes
