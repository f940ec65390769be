"""Per-token fidelity of a reduced token model: streaming accumulators (DESIGN §3.5, "Token models").

Every token that is a sample (an encoder: every token the attention mask keeps; a causal LM:
every kept position t whose next token t+1 is kept too, predicting it) contributes one row of
logits z_O (original) and z_R (reduced), each over the vocabulary V. Rows arrive in chunks of
any size, in any order of sequences, and are folded into running sums at once, so memory is one
chunk of ``chunk × V`` logits whatever the number of eval tokens. With N samples:

- ``agreement``  (llama.cpp "Same top p", as a fraction): (1/N) Σ [argmax z_O = argmax z_R];
- ``kl``         (llama.cpp "Mean KLD"): (1/N) Σ KL(softmax z_O ‖ softmax z_R), in nats;
- ``kl_p99``, ``kl_median`` ("99.0% KLD", "Median KLD"): percentiles of the per-token KL, linear
  interpolation between closest ranks (numpy's default); ``kl_max`` ("Maximum KLD");
- ``dlogit_mean``: (1/N) Σ mean_v |z_R − z_O|; ``dlogit_max``: max over tokens and vocabulary;
- with next-token targets y (a causal LM on a language-model corpus: the input ids are their own
  labels): ``ppl_base`` = exp((1/N) Σ −log softmax(z_O)_y) ("Mean PPL(base)"), ``ppl_q`` the same
  for R ("Mean PPL(Q)"), ``ppl_ratio`` = ppl_q / ppl_base ("Mean PPL(Q)/PPL(base)"),
  ``mean_ln_ppl_ratio`` = ln ppl_ratio ("Mean ln(PPL(Q)/PPL(base))"), and next-token accuracy
  (1/N) Σ [argmax z = y] of both models;
- with O_clamped's logits z_C: the fold error max |z_R − z_C| and the scale max |z_C|.

Percentiles are exact (every per-token KL is kept, 8 bytes a token) up to
:data:`EXACT_LIMIT` tokens; past it the values move to a histogram with log-spaced bins whose
edges differ by a factor of 1.01, and a percentile is read as the geometric middle of its bin:
relative error at most 0.5% for KL in [1e-12, 1e6] (smaller values read as 0).

This module knows nothing of models: any source of logit chunks (a whole-model run, a
block-by-block engine) feeds it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["EXACT_LIMIT", "Quantiles", "TokenFigures", "TokenFidelity", "swap_scalars"]

EXACT_LIMIT = 1 << 20
_LO, _HI, _RATIO = 1e-12, 1e6, 1.01
_BINS = int(math.ceil(math.log(_HI / _LO) / math.log(_RATIO)))


class Quantiles:
    """Percentiles of a stream of non-negative numbers: exact up to ``limit`` values, then a
    log-spaced histogram (module docstring). Order of arrival does not change an exact result."""

    def __init__(self, limit: int = EXACT_LIMIT) -> None:
        self.limit = limit
        self._parts: list[np.ndarray] = []
        self._n = 0
        self._hist: np.ndarray | None = None

    @property
    def exact(self) -> bool:
        return self._hist is None

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        self._n += values.size
        if self._hist is None:
            self._parts.append(values)
            if self._n > self.limit:
                self._hist = np.zeros(_BINS + 2, dtype=np.int64)
                for part in self._parts:
                    self._bin(part)
                self._parts = []
            return
        self._bin(values)

    def _bin(self, values: np.ndarray) -> None:
        assert self._hist is not None
        # bin 0: below _LO (rounding can make a KL slightly negative); last bin: above _HI
        with np.errstate(divide="ignore", invalid="ignore"):
            idx = np.floor(np.log(np.maximum(values, _LO * 0.5) / _LO) / math.log(_RATIO)).astype(np.int64) + 1
        idx = np.clip(np.where(values < _LO, 0, idx), 0, _BINS + 1)
        self._hist += np.bincount(idx, minlength=_BINS + 2)

    def quantile(self, q: float) -> float:
        """The ``q`` quantile (0 ≤ q ≤ 1); NaN for an empty stream."""
        if self._n == 0:
            return float("nan")
        if self._hist is None:
            return float(np.quantile(np.concatenate(self._parts), q))
        rank = q * (self._n - 1)
        b = int(np.searchsorted(np.cumsum(self._hist), math.floor(rank) + 1))
        if b == 0:
            return 0.0
        return _LO * _RATIO ** (b - 1) * math.sqrt(_RATIO)


@dataclass(frozen=True)
class TokenFigures:
    """The per-token figures of a verify run (module docstring for each definition)."""

    tokens: int
    agreement: float
    kl: float
    kl_median: float
    kl_p99: float
    kl_max: float
    kl_quantiles: str  # "exact" or "histogram"
    dlogit_mean: float
    dlogit_max: float
    ppl_base: float | None
    ppl_q: float | None
    accuracy_base: float | None
    accuracy_q: float | None
    fold_error: float
    scale: float

    @property
    def ppl_ratio(self) -> float | None:
        return None if self.ppl_base is None or self.ppl_q is None else self.ppl_q / self.ppl_base

    def to_json(self) -> dict[str, Any]:
        """llama.cpp's names where ``perplexity --kl-divergence`` has one (snake case; ``same_top_p``
        is a fraction, not a percentage)."""
        ratio = self.ppl_ratio
        return {
            "tokens": self.tokens,
            "same_top_p": self.agreement,
            "mean_kld": self.kl,
            "median_kld": self.kl_median,
            "kld_99": self.kl_p99,
            "maximum_kld": self.kl_max,
            "kld_quantiles": self.kl_quantiles,
            "dlogit_mean": self.dlogit_mean,
            "dlogit_max": self.dlogit_max,
            "ppl_base": self.ppl_base,
            "ppl_q": self.ppl_q,
            "ppl_ratio": ratio,
            "mean_ln_ppl_ratio": None if ratio is None else math.log(ratio),
            "accuracy_base": self.accuracy_base,
            "accuracy_q": self.accuracy_q,
        }


class TokenFidelity:
    """Streaming sums of the per-token figures; :meth:`add` one chunk of rows at a time."""

    def __init__(self, limit: int = EXACT_LIMIT) -> None:
        self.n = self.agree = self.correct_o = self.correct_r = self.targets = 0
        self.kl_sum = self.dl_sum = self.nll_o = self.nll_r = 0.0
        self.kl_max = self.dl_max = self.fold_error = self.scale = 0.0
        self.kl = Quantiles(limit)

    def add(self, zo: torch.Tensor, zr: torch.Tensor, zc: torch.Tensor | None = None, target: torch.Tensor | None = None) -> None:
        """Fold in one chunk: ``zo``, ``zr`` (and O_clamped's ``zc``) ``(rows, V)``; ``target``
        ``(rows,)`` next-token ids or None. Per-token figures in the logits' precision (at least
        float32: a float64 chunk of a large vocabulary would double the transient memory),
        sums in float64."""
        if zo.shape[0] == 0:
            return
        dtype = torch.promote_types(zo.dtype, torch.float32)
        zo, zr = zo.to(dtype), zr.to(dtype)
        lp, lq = torch.log_softmax(zo, -1), torch.log_softmax(zr, -1)
        kl = (lp.exp() * (lp - lq)).sum(-1, dtype=torch.float64)  # (F.kl_div is ~4× slower on CPU)
        po, pr = zo.max(-1).indices, zr.max(-1).indices  # (argmax is ~2× slower on CPU)
        d = (zr - zo).abs_()
        self.n += zo.shape[0]
        self.agree += int((po == pr).sum())
        self.kl_sum += float(kl.sum())
        self.kl_max = max(self.kl_max, float(kl.max()))
        self.kl.add(kl.numpy())
        self.dl_sum += float(d.sum(-1, dtype=torch.float64).sum()) / zo.shape[-1]
        self.dl_max = max(self.dl_max, float(d.amax()))
        if zc is not None:
            zc = zc.to(dtype)
            self.fold_error = max(self.fold_error, float((zr - zc).abs_().amax()))
            self.scale = max(self.scale, float(zc.abs().amax()))
        if target is not None:
            t = target.reshape(-1, 1)
            self.targets += t.shape[0]
            self.nll_o -= float(lp.gather(-1, t).sum(dtype=torch.float64))
            self.nll_r -= float(lq.gather(-1, t).sum(dtype=torch.float64))
            self.correct_o += int((po == target).sum())
            self.correct_r += int((pr == target).sum())

    def result(self) -> TokenFigures:
        n, has = max(self.n, 1), self.targets > 0
        return TokenFigures(
            tokens=self.n,
            agreement=self.agree / n,
            kl=self.kl_sum / n,
            kl_median=self.kl.quantile(0.5),
            kl_p99=self.kl.quantile(0.99),
            kl_max=self.kl_max,
            kl_quantiles="exact" if self.kl.exact else "histogram",
            dlogit_mean=self.dl_sum / n,
            dlogit_max=self.dl_max,
            ppl_base=math.exp(self.nll_o / self.targets) if has else None,
            ppl_q=math.exp(self.nll_r / self.targets) if has else None,
            accuracy_base=self.correct_o / self.targets if has else None,
            accuracy_q=self.correct_r / self.targets if has else None,
            fold_error=self.fold_error,
            scale=self.scale,
        )


def swap_scalars(zl: torch.Tensor, zh: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-swap figures of interchange logits ``(rows, V)`` (low level O, high level R), as
    float64 arrays: ``pred`` (argmax z_L), ``agree``, ``sq`` = ‖z_H − z_L‖², ``inf2`` =
    ‖z_H − z_L‖∞², ``kl`` = KL(z_L‖z_H), ``kl_reverse``, ``margin`` (top-1 minus top-2 of z_L).
    One chunk at a time, so a large vocabulary never meets all swaps at once."""
    dtype = torch.promote_types(zl.dtype, torch.float32)
    zl, zh = zl.to(dtype), zh.to(dtype)
    lp, lq = torch.log_softmax(zl, -1), torch.log_softmax(zh, -1)
    diff = zh - zl
    pred = zl.argmax(-1)
    if zl.shape[-1] > 1:
        top2 = zl.topk(2, dim=-1).values
        margin = top2[:, 0] - top2[:, 1]
    else:
        margin = torch.full((zl.shape[0],), math.inf, dtype=dtype)
    return {
        "pred": pred.numpy(),
        "agree": (pred == zh.argmax(-1)).numpy(),
        "sq": diff.square().sum(-1, dtype=torch.float64).numpy(),
        "inf2": diff.abs().amax(-1).double().square().numpy(),
        "kl": (lp.exp() * (lp - lq)).sum(-1, dtype=torch.float64).numpy(),
        "kl_reverse": (lq.exp() * (lq - lp)).sum(-1, dtype=torch.float64).numpy(),
        "margin": margin.double().numpy(),
    }
