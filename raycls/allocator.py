"""The driver's malloc arenas: how many glibc may give the `raycls` process's threads.

glibc gives threads that allocate an arena of their own, up to 8 per core, and memory freed in an arena
stays resident. The driver's threads (Tune's, Ray's, the trackers') each grew one: 137-158 MB of RSS per
1,000 trivial trials with no cap, 58-70 with two arenas, 46-51 with one (benchmarks/cluster_scaling.py,
same machine and session), at the same trials per minute: its threads mostly wait on Ray.

glibc fixes the cap the first time a thread asks for an arena, and reuses the arenas it already made, so
the cap holds only when set before any thread allocates: importing pyarrow starts one. `raycls.cli` sets it
first thing; `run_tune` sets it again for library callers (bounding what has not started yet).
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

M_ARENA_MAX = -8  # glibc's mallopt parameter
DRIVER_ARENAS = 1


def bound_malloc_arenas(arenas: int = DRIVER_ARENAS) -> bool:
    """Cap this process's glibc malloc arenas (whether it did). A user's MALLOC_ARENA_MAX wins."""
    libc = _glibc()
    if libc is None or "MALLOC_ARENA_MAX" in os.environ:
        return False
    return bool(libc.mallopt(M_ARENA_MAX, arenas))


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # another C library (musl): its allocator has no arenas to bound
        return None
