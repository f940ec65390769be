"""Resident memory of this process: now (``/proc/self/statm``) and at its peak (``getrusage``),
and handing freed heap back to the OS between blocks (glibc ``malloc_trim``)."""

from __future__ import annotations

import ctypes
import gc
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
    """Collect garbage and return free heap pages to the OS (a block's tensors are gone)."""
    gc.collect()
    if sys.platform == "linux":
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass
