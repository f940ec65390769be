"""Resident memory of this process: now (``/proc/self/statm``) and at its peak (``getrusage``),
and handing freed heap back to the OS between blocks (glibc ``malloc_trim``)."""

from __future__ import annotations

import ctypes
import os
import resource
import sys

__all__ = ["rss_bytes", "peak_rss_bytes", "release"]


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # pragma: no cover - not Linux
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb if sys.platform == "darwin" else kb * 1024


def release() -> None:
    """Return free heap pages to the OS once a block's tensors are gone.

    A block's tensors are freed by reference counting when the loop drops them (no cycles hold
    them), so no ``gc.collect()`` here: with transformers loaded a full collection takes a
    second or more, per block.
    """
    if sys.platform == "linux":
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass
