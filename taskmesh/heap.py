"""Where a service process keeps the memory of large payloads between one and the next.

glibc serves every allocation over its mmap threshold (32 MiB at most) with a mapping of its own
and unmaps it on free, so each large message a process receives lands in fresh pages: for
100 MB, 25,600 page faults, as much time as the copy itself (about 50 ms on a 2-core virtual
machine), paid again on every hop. The broker and the worker supervisor forward such payloads
one after another, so once one passes they ask glibc to serve large allocations from the heap
and to keep what is freed there; once a heartbeat interval passes without one they switch
back and give the memory back. Executors and producers keep glibc's defaults: their memory is
the user's.

At start-up the two services also fix the thresholds glibc would otherwise move on its own
(its "dynamic" mode ends once any of them is set, and switching back and forth would leave it
wherever it stood): 32 MiB for a mapping of its own and 64 MiB of free memory at the heap's
top before it is returned, the values glibc's dynamic mode ends up with after large frees.

Elsewhere (musl, macOS) nothing changes.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable
from typing import Any

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 64 << 20
_MMAP_MAX = 65536  # glibc's default
KEEP_TRIM_THRESHOLD = 1 << 30  # free memory kept at the heap's top while payloads flow
LARGE_PAYLOAD = 1 << 20  # smaller payloads fit in memory the heap has anyway
WORTH_TRIMMING = 32 << 20  # growth of the heap over a burst that a trim gives back


class HeapKeeper:
    """Keeps freed memory for the next large payload while they flow, and gives it back when
    they stop.

    ``saw(nbytes)`` is called for each payload that passes (cheap: a comparison), ``tick()``
    once per heartbeat interval. The first large payload of a burst still lands in fresh pages
    (it was received before anyone looked at it); the ones after it do not. What the payloads
    in flight needed at their peak stays resident until the first quiet interval.
    """

    __slots__ = ("_heap_before", "_heap_top", "_keeping", "_libc", "_recent", "active")

    def __init__(self, libc: Any = None, heap_top: Callable[[], int] | None = None) -> None:
        self.active = libc is not None
        self._libc = libc
        self._heap_top = heap_top or (lambda: 0)
        self._recent = False
        self._keeping = False
        self._heap_before = 0

    def keep_large_payloads(self) -> bool:
        """Take charge of this process's allocator (once, at start-up, before any thread is
        started); False where it is not glibc. Process-wide: for the broker and the worker
        supervisor only."""
        if not sys.platform.startswith("linux"):
            return False
        try:
            libc = ctypes.CDLL(None)
            mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
        except (OSError, AttributeError):
            return False  # not glibc
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        malloc_trim.argtypes = [ctypes.c_size_t]
        sbrk = libc.sbrk
        sbrk.argtypes = [ctypes.c_ssize_t]
        sbrk.restype = ctypes.c_void_p
        # one arena for every thread: a thread's own arena maps anything over 64 MiB whatever
        # the settings, and ZeroMQ's I/O thread is where received messages are allocated
        if mallopt(_M_ARENA_MAX, 1) != 1:
            return False
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        self._libc = libc
        self._heap_top = lambda: sbrk(0) or 0  # where the heap ends now: one cheap call
        self.active = True
        return True

    def saw(self, nbytes: int) -> None:
        if nbytes >= LARGE_PAYLOAD:
            self._recent = True
            if not self._keeping and self._libc is not None:
                self._keeping = True
                self._heap_before = self._heap_top()
                # the trim threshold first: with mappings switched off and a low threshold,
                # every free at the heap's top would hand the memory straight back
                self._libc.mallopt(_M_TRIM_THRESHOLD, KEEP_TRIM_THRESHOLD)
                self._libc.mallopt(_M_MMAP_MAX, 0)

    def tick(self) -> None:
        if self._recent:
            self._recent = False
        elif self._keeping and self._libc is not None:
            self._keeping = False
            self._libc.mallopt(_M_MMAP_MAX, _MMAP_MAX)
            self._libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
            # a trim walks every free chunk of the heap (and frees pages inside it, not only
            # at its top): worth it only when the burst grew the heap much
            if self._heap_top() - self._heap_before >= WORTH_TRIMMING:
                self._libc.malloc_trim(0)


KEEPER = HeapKeeper()
"""The process's one keeper: the allocator it switches is process-wide."""
