"""glibc malloc tuned for a threaded server that holds large buffers briefly.

An upload (up to ``QRSIGHT_MAX_IMAGE_BYTES``) and its Kafka record are large objects that
live for milliseconds. glibc gives an allocation above ``M_MMAP_THRESHOLD`` its own
``mmap``, returned to the OS when freed, but the threshold is dynamic: freeing the first
10 MB buffer raises it to 10 MB, and from then on such buffers come from the heap arenas
(up to 8 per core, one per busy thread), where freed space stays resident. Under 32
upload threads that is hundreds of MB kept after the uploads are gone, which an RSS limit
counts. Setting the threshold explicitly (1 MiB) turns the dynamic adjustment off, so
every large buffer is unmapped when freed; ``M_ARENA_MAX`` bounds the arenas the small
allocations spread over. ``bench/api_upload_rss.py`` measures the difference
(``docs/RELIABILITY.md``).

Other C libraries (musl) have no ``mallopt``; then nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>
M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 1024 * 1024
ARENA_MAX = 2


def tune_malloc() -> bool:
    """Apply the settings above to this process; False where malloc is not glibc's."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        logger.info("malloc not tuned: no glibc mallopt")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    done = mallopt(M_ARENA_MAX, ARENA_MAX) == 1 and done
    logger.info(
        "malloc tuned=%s mmap_threshold=%s arena_max=%s", done, MMAP_THRESHOLD_BYTES, ARENA_MAX
    )
    return done
