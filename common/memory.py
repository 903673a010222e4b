"""Keep freed memory for reuse in the processes that run the data path (docs/scaling.md).

The streamed validation and the feature shards allocate and free arrays of a few to a few
hundred megabytes, one batch or partition after another. glibc's malloc serves each such array
with its own `mmap` and gives it back to the kernel when freed (its threshold starts at 128 KB),
so the next batch faults every page in again: about 600,000 page faults and 2.5-3 s of kernel
time per worker on a 10 M-event build on two workers (docs/benchmarks.md). With arrays up to
32 MB taken from the heap and up to 512 MB of freed heap kept, the same build faulted about a
quarter as often and ran about 9% faster, with peaks about 100 MB higher per process.

`keep_freed_memory()` sets that once per process (idempotent); it does nothing where the C
library is not glibc (macOS, musl), where these settings do not exist.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger(__name__)

MMAP_THRESHOLD = 32 << 20  # bytes: larger allocations still get their own mmap (glibc's maximum)
TRIM_THRESHOLD = 512 << 20  # bytes of free heap kept before any is given back to the kernel
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
_done: bool | None = None  # None: not tried yet in this process


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds (above) for this process, once; whether they are set."""
    global _done
    if _done is None:
        _done = False
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                _done = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
                    libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
            except (OSError, AttributeError) as e:  # no mallopt: leave malloc as it is
                log.debug("keep_freed_memory: %s", e)
    return _done
