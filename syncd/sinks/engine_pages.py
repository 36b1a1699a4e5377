"""Hand the embedded engine's unused code pages back to the kernel.

chdb's library is 555 MB on disk. Loading it maps most of its read-only pages (read-ahead and fault-around over
a file the page cache holds whole): ~280 MB of RSS, of which the queries of a running daemon touch about 60 MB.
After the engine opens, `release` asks the kernel to reclaim the library's read-only mappings (MADV_PAGEOUT:
content-preserving; a page shared with another process, or copied on write, is left as it is) and to fault the
rest in without read-ahead (MADV_RANDOM), so the daemon keeps only the code it runs. Linux ≥ 5.4; anywhere else,
or if the kernel refuses, nothing changes but the figure.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import structlog

log = structlog.get_logger(__name__)

MADV_RANDOM = 1
MADV_PAGEOUT = 21


def release(library: str = "_chdb.abi3") -> int:
    """Reclaim the read-only mappings of the shared object whose path contains `library`; returns the bytes advised."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        ranges = _read_only_ranges(library)
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except OSError as err:
        log.debug("engine_pages.skipped", reason=str(err))
        return 0
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    advised = 0
    for start, end in ranges:
        if libc.madvise(start, end - start, MADV_RANDOM) == 0 and libc.madvise(start, end - start, MADV_PAGEOUT) == 0:
            advised += end - start
        else:
            log.debug("engine_pages.refused", errno=ctypes.get_errno())
            break
    return advised


def _read_only_ranges(library: str) -> list[tuple[int, int]]:
    """(start, end) of every mapping of `library` without write permission, from /proc/self/maps."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and library in fields[5] and "w" not in fields[1]:
                start, end = fields[0].split("-")
                ranges.append((int(start, 16), int(end, 16)))
    return ranges
