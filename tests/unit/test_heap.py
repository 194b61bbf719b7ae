"""The keeper of large payloads' memory: kept while they flow, given back once they stop."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from taskmesh.heap import (
    KEEP_TRIM_THRESHOLD,
    LARGE_PAYLOAD,
    TRIM_THRESHOLD,
    WORTH_TRIMMING,
    HeapKeeper,
)

pytestmark = pytest.mark.timeout(30)

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


class _Libc:
    """Records what the keeper asks of glibc, in order (real glibc is exercised below and on
    real processes in tests/integration/test_large_payloads.py)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self.trims = 0

    def mallopt(self, option: int, value: int) -> int:
        self.calls.append((option, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        assert pad == 0
        self.trims += 1
        return 1


def test_memory_is_kept_from_the_first_large_payload_to_the_first_quiet_tick() -> None:
    libc = _Libc()
    top = [100 << 20]
    keeper = HeapKeeper(libc, heap_top=lambda: top[0])
    keeper.saw(LARGE_PAYLOAD - 1)
    keeper.tick()
    keeper.tick()
    assert libc.calls == [] and libc.trims == 0  # nothing large came: nothing switched
    for _ in range(3):  # a burst: a large payload in every interval
        keeper.saw(LARGE_PAYLOAD)
        # the trim threshold goes up before mappings go off, never after
        assert libc.calls == [(M_TRIM_THRESHOLD, KEEP_TRIM_THRESHOLD), (M_MMAP_MAX, 0)]
        keeper.tick()
    top[0] += WORTH_TRIMMING
    keeper.tick()  # the first quiet interval: switched back, and the memory goes back
    assert libc.calls[2:] == [(M_MMAP_MAX, 65536), (M_TRIM_THRESHOLD, TRIM_THRESHOLD)]
    assert libc.trims == 1
    keeper.tick()
    assert libc.trims == 1
    keeper.saw(LARGE_PAYLOAD * 10)  # a burst that left little behind: no walk of the heap
    keeper.tick()
    keeper.tick()
    assert libc.calls[-1] == (M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    assert libc.trims == 1


def test_a_keeper_without_glibc_does_nothing() -> None:
    keeper = HeapKeeper()
    assert not keeper.active
    keeper.saw(LARGE_PAYLOAD)
    keeper.tick()
    keeper.tick()  # no allocator to switch or trim: no error either


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_after_a_burst_glibc_serves_mid_sized_buffers_from_the_heap_again() -> None:
    """Switching back must not leave glibc mapping every mid-sized buffer apart: its dynamic
    threshold (which would have risen to 32 MiB with large frees) does not come back by itself
    once a threshold is set, so the keeper sets the one it would have reached."""
    code = textwrap.dedent(
        """
        import ctypes, platform, sys
        from taskmesh.heap import KEEPER, LARGE_PAYLOAD
        if platform.libc_ver()[0] != "glibc" or not KEEPER.keep_large_payloads():
            print("skip"); sys.exit(0)
        libc = ctypes.CDLL(None)
        class Info(ctypes.Structure):
            _fields_ = [(name, ctypes.c_size_t) for name in (
                "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                "uordblks", "fordblks", "keepcost")]
        libc.mallinfo2.restype = Info
        before = libc.mallinfo2().hblks  # mappings made before the switch
        KEEPER.saw(LARGE_PAYLOAD)
        big = bytearray(64 << 20)  # from the heap while keeping
        assert libc.mallinfo2().hblks <= before
        del big
        KEEPER.tick(); KEEPER.tick()  # a quiet interval: switched back
        worst = 0
        for _ in range(50):
            buffer = bytearray(16 << 20)
            worst = max(worst, libc.mallinfo2().hblks - before)
            del buffer
        print("mapped", worst)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=20, check=True
    ).stdout.strip()
    if out == "skip":
        pytest.skip("not glibc")
    assert out == "mapped 0"
