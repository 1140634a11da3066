"""The process's glibc heap: its counters, and handing its free pages back to the system.

Linux with glibc >= 2.33 only (``mallinfo2``): :data:`HEAP` is ``None`` elsewhere. The
inner loop's recompute (:mod:`mamlext.maml.recompute`) uses it to keep the resident memory
of a checkpointed meta-step near what it uses (``docs/memory.md``); the memory benchmark
and ``benchmarks/heap_probe.py`` read its counters.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["HEAP", "GlibcHeap", "MallInfo2", "resident_bytes"]


class GlibcHeap:
    """glibc's heap kept near what the checkpointed loop uses, without fresh pages each segment.

    Every segment frees its temporaries. glibc keeps freed memory in its heap, and how much
    of it the next segments cannot reuse depends on the order of allocations: with none
    handed back, single runs of one meta-step at K = 100 peaked between 129 and 1,301 MB of
    RSS (``docs/memory.md``). After each segment's forward and backward, when the resident
    memory that no allocation uses (RSS minus glibc's bytes in use) exceeds by ``MARGIN``
    its least value seen in this process, ``malloc_trim(0)`` returns the heap's free pages.
    Not after every segment: each release costs page faults when the memory is used again
    (a floor measured after a release, lower, made them 5 to 20 times as frequent).
    """

    MARGIN = 128 << 20

    def __init__(self, libc: ctypes.CDLL) -> None:
        self._libc = libc
        self._libc.mallinfo2.restype = MallInfo2
        self._libc.malloc.restype = ctypes.c_void_p
        self._libc.free.argtypes = [ctypes.c_void_p]
        self._floor: int | None = None  # least RSS - bytes in use: what cannot be returned
        self._top_kept = False

    def keep_freed_top(self) -> None:
        """Let glibc keep up to 60 MiB free at its heap's top, as after any 30 MiB free.

        glibc hands the top of its heap back to the system once more than its trim
        threshold (128 KiB at start, later twice its mmap threshold) is free there, so every
        segment's temporaries were fresh pages again: a third of a checkpointed step's time
        on a 2-core VM (system time 14 s of 38 s). Freeing a block it had mapped raises the
        mmap threshold to that block's size and the trim threshold to twice it (``man 3
        mallopt``, M_MMAP_THRESHOLD); a process that set them itself (``MALLOC_*_``
        variables, ``mallopt``) keeps its own.
        """
        if not self._top_kept:
            self._libc.free(self._libc.malloc(30 << 20))
            self._top_kept = True

    @classmethod
    def load(cls) -> GlibcHeap | None:
        """The process's heap on Linux with glibc >= 2.33 (``mallinfo2``), else ``None``."""
        if not sys.platform.startswith("linux"):
            return None
        try:
            libc = ctypes.CDLL("libc.so.6")
        except OSError:  # another C library
            return None
        if not (hasattr(libc, "mallinfo2") and hasattr(libc, "malloc_trim")):
            return None
        return cls(libc)

    def mallinfo(self) -> MallInfo2:
        """glibc's counters of its heap: ``uordblks`` bytes in use, ``arena`` held, ..."""
        return self._libc.mallinfo2()

    def trim(self) -> None:
        """Hand every free page of the heap back to the system (``malloc_trim(0)``)."""
        self._libc.malloc_trim(0)

    def release_if_idle(self) -> None:
        unused = self._unused_resident()
        self._floor = unused if self._floor is None else min(self._floor, unused)
        if unused > self._floor + self.MARGIN:
            self.trim()
            self._floor = min(self._floor, self._unused_resident())

    def _unused_resident(self) -> int:
        info = self.mallinfo()
        return resident_bytes() - info.uordblks - info.hblkhd


def resident_bytes() -> int:
    """This process's resident set size (RSS) in bytes, from ``/proc/self/statm``."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (``man 3 mallinfo2``)."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in [
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        ]
    ]


HEAP: GlibcHeap | None = GlibcHeap.load()
