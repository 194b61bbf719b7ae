"""Where a service process keeps the memory of large payloads between one and the next.

glibc serves every allocation over 32 MiB with a mapping of its own and unmaps it on free, so
each large message a process receives lands in fresh pages: for 100 MB, 25,600 page faults, as
much time as the copy itself (about 50 ms on a 2-core virtual machine), paid again on every
hop. The broker and the worker supervisor forward such payloads one after another, so once one
passes they ask glibc to serve large allocations from the heap and to keep what is freed there,
and once a heartbeat interval passes without one they return to glibc's settings and give the
memory back. Executors and producers keep glibc's defaults: their memory is the user's.

Elsewhere (musl, macOS) nothing changes.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_DEFAULT_TRIM_THRESHOLD = 128 * 1024  # glibc's
_DEFAULT_MMAP_MAX = 65536  # glibc's
LARGE_PAYLOAD = 1 << 20  # smaller payloads fit in memory the heap has anyway
KEEP_BYTES = 1 << 30  # freed memory kept at the heap's top while large payloads flow, at most


class HeapKeeper:
    """Keeps freed memory for the next large payload while they flow, and returns it when
    they stop.

    ``saw(nbytes)`` is called for each payload that passes (cheap: a comparison), ``tick()``
    once per heartbeat interval. The first large payload of a burst still lands in fresh pages
    (it was received before anyone looked at it); the ones after it do not.
    """

    __slots__ = ("_keeping", "_libc", "_recent", "active")

    def __init__(self, libc: Any = None) -> None:
        self.active = libc is not None
        self._libc = libc
        self._recent = False
        self._keeping = False

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
        # one arena for every thread: a thread's own arena maps anything over 64 MiB whatever
        # the settings, and ZeroMQ's I/O thread is where received messages are allocated
        if mallopt(_M_ARENA_MAX, 1) != 1:
            return False
        self._libc = libc
        self.active = True
        return True

    def saw(self, nbytes: int) -> None:
        if nbytes >= LARGE_PAYLOAD:
            self._recent = True
            if not self._keeping and self._libc is not None:
                self._keeping = True
                # the trim threshold first: with mappings switched off and the default
                # threshold, every free at the heap's top would hand the memory straight back
                self._libc.mallopt(_M_TRIM_THRESHOLD, KEEP_BYTES)
                self._libc.mallopt(_M_MMAP_MAX, 0)

    def tick(self) -> None:
        if self._recent:
            self._recent = False
        elif self._keeping and self._libc is not None:
            self._keeping = False
            self._libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
            self._libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
            self._libc.malloc_trim(0)  # also frees pages inside the heap, not only at its top


KEEPER = HeapKeeper()
"""The process's one keeper: the allocator it switches is process-wide."""
