"""Give back the embedded engine's library pages that the daemon does not run.

chdb's library is 555 MB on disk. Loading it maps most of its read-only pages (read-ahead and fault-around over
a file the page cache holds): ~280 MB of RSS, of which the queries of a running daemon touch about 60 MB.
After the engine opens, `release` unmaps the library's clean read-only pages from this process (MADV_DONTNEED;
they stay in the page cache, so a page needed again, or the next start, costs a minor fault, not a disk read)
and asks for no read-ahead on them from then on (MADV_RANDOM), so the daemon keeps mapped only the code it runs.
A mapping holding copied-on-write pages (the relocated constants) is left alone: dropping those would lose the
relocations. Linux only; anywhere else, or if the kernel refuses, nothing changes but the figure.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import structlog

log = structlog.get_logger(__name__)

MADV_RANDOM = 1
MADV_DONTNEED = 4


def release(library: str = "_chdb.abi3") -> int:
    """Unmap the clean read-only pages of the shared object whose path contains `library`; returns the bytes
    of the mappings advised."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        ranges = clean_read_only_ranges(library)
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except OSError as err:
        log.debug("engine_pages.skipped", reason=str(err))
        return 0
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    advised = 0
    for start, end in ranges:
        if libc.madvise(start, end - start, MADV_RANDOM) == 0 and libc.madvise(start, end - start, MADV_DONTNEED) == 0:
            advised += end - start
        else:
            log.debug("engine_pages.refused", errno=ctypes.get_errno())
            break
    return advised


def clean_read_only_ranges(library: str) -> list[tuple[int, int]]:
    """(start, end) of every mapping of `library` without write permission and without anonymous (copied on
    write) pages, from /proc/self/smaps."""
    ranges, current = [], None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split(maxsplit=5)
            if not fields[0].endswith(":"):  # a mapping's header: "start-end perms offset dev inode path"
                current = None
                if len(fields) == 6 and library in fields[5] and "w" not in fields[1]:
                    start, end = fields[0].split("-")
                    current = (int(start, 16), int(end, 16))
            elif current is not None and fields[0] == "Anonymous:":
                if fields[1] == "0":
                    ranges.append(current)
                current = None
    return ranges
