"""The process's allocator policy: freed tensor memory is kept for the next step.

glibc's malloc hands blocks above its mmap threshold (at most 32 MiB) straight back to the
kernel when they are freed, so a training step that allocates tensors of hundreds of MB takes
a page fault on every 4 KiB of them, every step. Measured on the project's 2-core machine, one
MMGCN step at Elec size (255k nodes) took 36 s that way and 15-17 s with the memory kept (the
same results: only where the bytes come from changes). Demo-sized tensors are below the
threshold already and gain nothing.
"""

from __future__ import annotations

import ctypes
import logging
import platform

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
MMAP_THRESHOLD = 1 << 30  # blocks below 1 GiB come from the heap, where a freed one is reused
TRIM_THRESHOLD = (1 << 31) - 1  # the heap keeps up to 2 GiB free at its top (mallopt's int)


def keep_freed_memory() -> bool:
    """Set glibc's malloc to reuse freed blocks below 1 GiB instead of returning them to the
    kernel; True when set, False where the C library is not glibc (nothing changes there)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    done = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    done = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and done
    if not done:
        log.debug("glibc refused the allocator settings: freed memory goes back to the kernel")
    return done
