"""Distributed scoring under ``torchrun``: batches dealt out to ranks, statistics gathered exactly.

``torchrun --nproc-per-node N -m cmrtool score …`` (or ``compile``) starts N copies of cmrtool
with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set. cmrtool
joins one process group (gloo on CPU, NCCL when CUDA is available; ``CMRTOOL_DIST_BACKEND``
overrides), each rank streams its share of the calibration batches through the model, and only
rank 0 prints results and writes files.

**Sharding, and why the result is exactly the single-process one.** The single-process pass cuts
the data into batches ``b = 0, 1, …`` of ``--batch-size`` rows and folds each batch's partial
``(count, mean, M2)`` into float64 :class:`~cmrtool.score.stats.Moments`, in that order. The
distributed pass cuts the same batches (boundaries at multiples of the batch size) and deals
them out in rounds of ``R · N`` batches: in round k, rank r computes the R consecutive batches
that start at batch ``(k·N + r)·R`` (R is the read-ahead chunk, at most 16 batches, and smaller
when the data is small so that every rank gets work). A batch's partial comes from the same graph
on the same rows, so it is bit-identical to the single-process one. After each round the partials
are all-gathered (float64 holds float32 exactly) and every rank folds all of them in global batch
order: the same sequence of :meth:`~cmrtool.score.stats.Moments.add_partial` calls as the
single-process pass, hence bit-identical statistics, scores and plans on every rank. This holds
for the same ``--threads`` (the intra-op thread count can change float32 reductions; torchrun
sets one thread per rank unless told otherwise). Memory per rank: one round of partials,
``R · N · Σ_sites (2·width + 1)`` float64 values, independent of the data size.

**Failures.** Every exchange starts with an all-gather of one status per rank. A rank that fails
(bad data in its shard, a file missing on its node) calls :func:`fail`, which joins the exchange
the other ranks wait in with a failure status; all ranks then all-gather the failing ranks'
messages and raise the lowest failing rank's error (a :class:`RemoteError` on the others), so
the job stops everywhere with one ``error:`` line, printed by rank 0. The CLI ends every command
with :func:`finish`, a last exchange, so a rank that fails where the others run no collective
still meets them. Interrupts (Ctrl-C, torchrun's SIGTERM) are not exchanged: they stop the rank.

Nothing here imports ``torch.distributed`` unless ``WORLD_SIZE`` > 1.
"""

from __future__ import annotations

import atexit
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from cmrtool.errors import CmrError, UsageError

__all__ = [
    "world_size",
    "rank",
    "enabled",
    "is_writer",
    "init",
    "fail",
    "sync",
    "finish",
    "RemoteError",
    "gather_partials",
]

Partials = dict[str, tuple[int, Any, Any]]  # site → (samples, mean, M2) of one batch
_MESSAGE_BYTES = 16384


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, "") or default)
    except ValueError:
        return default


def world_size() -> int:
    """Number of ranks (``WORLD_SIZE`` as set by torchrun; 1 when unset)."""
    return max(1, _env_int("WORLD_SIZE", 1))


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return _env_int("RANK", 0) if world_size() > 1 else 0


def enabled() -> bool:
    """Whether this process is one of several ranks."""
    return world_size() > 1


def is_writer() -> bool:
    """Whether this process prints results and writes files (rank 0)."""
    return rank() == 0


class RemoteError(CmrError):
    """The error another rank stopped with; the job reports it once, from rank 0."""

    def __init__(self, origin: int, message: str, hint: str, exit_code: int) -> None:
        super().__init__(f"rank {origin}: {message}", hint)
        self.origin = origin
        self.exit_code = exit_code


class _Group:
    """The process group and where its collectives run."""

    def __init__(self) -> None:
        import torch
        import torch.distributed as dist

        backend = os.environ.get("CMRTOOL_DIST_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
        self.device = torch.device("cpu")
        if backend == "nccl":
            self.device = torch.device("cuda", _env_int("LOCAL_RANK", 0) % max(1, torch.cuda.device_count()))
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():
            try:
                dist.init_process_group(backend, rank=rank(), world_size=world_size())
            except (ValueError, RuntimeError) as e:
                raise UsageError(
                    f"cannot join the process group of {world_size()} ranks ({backend}): {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                    "launch with: torchrun --nproc-per-node N -m cmrtool ... (WORLD_SIZE alone is not enough)",
                ) from e
            atexit.register(_shutdown)
        self.backend = backend
        self.open = True  # peers may still be waiting in an exchange
        self.failed: BaseException | None = None

    def all_gather(self, t: Any) -> list[Any]:
        import torch.distributed as dist

        t = t.to(self.device)
        out = [t.new_empty(t.shape) for _ in range(world_size())]
        dist.all_gather(out, t)
        return [o.cpu() for o in out]


_group: _Group | None = None


def group_device() -> Any:
    """The device the group's collectives run on (CPU for gloo)."""
    init()
    assert _group is not None
    return _group.device


def init() -> None:
    """Join the torchrun process group (idempotent; a no-op unless ``WORLD_SIZE`` > 1)."""
    global _group
    if enabled() and _group is None:
        _group = _Group()


def _shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # pragma: no cover - best effort at exit
            pass


def _code(error: BaseException) -> int:
    """The exit code an error ends the command with (never 0: a status of 0 means success)."""
    code = getattr(error, "exit_code", 1)
    return code if isinstance(code, int) and code != 0 else 1


def _statuses(code: int) -> list[int]:
    import torch

    assert _group is not None
    return [int(t.item()) for t in _group.all_gather(torch.tensor([code], dtype=torch.int64))]


def _settle(statuses: list[int], own: BaseException | None) -> BaseException:
    """All-gather the failing ranks' messages; the error every rank reports (the lowest's)."""
    import torch

    assert _group is not None
    msg = {"message": "", "hint": "", "code": 1}
    if own is not None:
        msg = {"message": f"internal error: {type(own).__name__}: {own}", "hint": "set CMRTOOL_DEBUG=1 to see the traceback, and please report it", "code": _code(own)}
        if isinstance(own, CmrError):
            msg.update(message=own.message, hint=own.hint)
    msg.update(message=msg["message"][:2000], hint=msg["hint"][:1000])  # ≤ 12 kB of UTF-8 as JSON
    raw = json.dumps(msg, ensure_ascii=False).encode()
    buf = torch.zeros(_MESSAGE_BYTES, dtype=torch.uint8)
    buf[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    texts = _group.all_gather(buf)
    _group.open = False
    origin = next(r for r, s in enumerate(statuses) if s != 0)
    if origin == rank() and own is not None:
        _group.failed = own
        return own
    try:
        other = json.loads(bytes(texts[origin].tolist()).rstrip(b"\0").decode("utf-8", "replace"))
    except ValueError:
        other = {"message": "failed", "hint": "see that rank's output", "code": statuses[origin]}
    err = RemoteError(origin, str(other.get("message", "")), str(other.get("hint", "")), int(other.get("code", 1)))
    _group.failed = err
    return err


def _exchange(payload: Any) -> list[Any]:
    """Status round, then the payloads of all ranks (raises if any rank failed)."""
    assert _group is not None
    statuses = _statuses(0)
    if any(statuses):
        raise _settle(statuses, None)
    return _group.all_gather(payload)


def fail(error: BaseException) -> tuple[BaseException, bool]:
    """Report a local failure to the other ranks; return ``(error to report, print it here)``.

    Single-process: ``(error, True)``. Distributed: the lowest failing rank's error, printed by
    rank 0 only; after the last exchange the error is local and printed where it happened.
    """
    if _group is None:
        return error, True
    if error is _group.failed or isinstance(error, RemoteError):
        return error, is_writer()
    if not _group.open:
        return error, True
    settled = _settle(_statuses(_code(error)), error)
    return settled, is_writer()


def sync() -> None:
    """An exchange without data: returns when every rank got here, raises if any rank failed.

    ``compile`` calls it before rank 0 writes, so that rank 0 never writes the output while
    another rank is still checking its options (it would then find the output existing).
    """
    if _group is not None and _group.open:
        import torch

        _exchange(torch.zeros(1, dtype=torch.float64))


def finish() -> None:
    """A last exchange at the end of a command: raises the error of any rank that failed."""
    sync()
    if _group is not None:
        _group.open = False


def gather_partials(
    data: Any,
    batch_size: int,
    limit: int | None,
    compute: Callable[[Any], Partials],
    widths: Sequence[tuple[str, int]],
) -> Iterator[tuple[int, Partials]]:
    """Yield ``(rows, partials)`` for every batch of ``data`` in global order, computing this
    rank's share with ``compute(batch)`` and receiving the others' (see the module docstring).

    Args:
        data: a :class:`~cmrtool.io.data.Dataset`.
        batch_size: rows per batch (the single-process batching).
        limit: use at most this many rows.
        compute: a batch's per-site ``(samples, mean, M2)``.
        widths: ``(site, width)`` in a fixed order, the same on every rank.
    """
    import torch

    init()
    assert _group is not None
    n_rows = data.n if limit is None else min(data.n, limit)
    n_batches = math.ceil(n_rows / batch_size)
    world, me = world_size(), rank()
    per = max(1, min(data.chunk_batches(batch_size), math.ceil(n_batches / world)))
    row_len = 1 + sum(1 + 2 * w for _, w in widths)
    for first in range(0, n_batches, per * world):
        payload = torch.zeros(per, row_len, dtype=torch.float64)
        b0 = first + me * per
        start, stop = b0 * batch_size, min(n_rows, (b0 + per) * batch_size)
        for i, batch in enumerate(data.batches(batch_size, stop, labels=False, start=start) if start < stop else ()):
            payload[i] = _pack(len(batch), compute(batch), widths, row_len)
        for rows in _exchange(payload):
            for row in rows:
                if row[0] > 0:
                    yield int(row[0]), _unpack(row, widths)


def _pack(rows: int, partials: Partials, widths: Sequence[tuple[str, int]], row_len: int) -> Any:
    import torch

    out = torch.empty(row_len, dtype=torch.float64)
    out[0] = rows
    at = 1
    for name, w in widths:
        n, mean, m2 = partials[name]
        out[at] = n
        out[at + 1 : at + 1 + w] = mean.reshape(-1)
        out[at + 1 + w : at + 1 + 2 * w] = m2.reshape(-1)
        at += 1 + 2 * w
    return out


def _unpack(row: Any, widths: Sequence[tuple[str, int]]) -> Partials:
    out: Partials = {}
    at = 1
    for name, w in widths:
        out[name] = (int(row[at]), row[at + 1 : at + 1 + w], row[at + 1 + w : at + 1 + 2 * w])
        at += 1 + 2 * w
    return out
