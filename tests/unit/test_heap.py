"""The keeper of large payloads' memory: kept while they flow, given back once they stop."""

from __future__ import annotations

import pytest

from taskmesh.heap import KEEP_BYTES, LARGE_PAYLOAD, HeapKeeper

pytestmark = pytest.mark.timeout(10)

TRIM_THRESHOLD, MMAP_MAX = -1, -4


class _Libc:
    """Records what the keeper asks of glibc (the real thing is checked on real processes in
    tests/integration/test_large_payloads.py)."""

    def __init__(self) -> None:
        self.settings: dict[int, int] = {}
        self.trims = 0

    def mallopt(self, option: int, value: int) -> int:
        self.settings[option] = value
        return 1

    def malloc_trim(self, pad: int) -> int:
        assert pad == 0
        self.trims += 1
        return 1


def test_memory_is_kept_from_the_first_large_payload_to_the_first_quiet_tick() -> None:
    libc = _Libc()
    keeper = HeapKeeper(libc)
    keeper.saw(LARGE_PAYLOAD - 1)
    keeper.tick()
    keeper.tick()
    assert libc.settings == {} and libc.trims == 0  # nothing large came: glibc's defaults
    for _ in range(3):  # a burst: a large payload in every interval
        keeper.saw(LARGE_PAYLOAD)
        assert libc.settings == {TRIM_THRESHOLD: KEEP_BYTES, MMAP_MAX: 0}
        keeper.tick()
    assert libc.trims == 0
    keeper.tick()  # the first quiet interval: defaults again, and the memory goes back
    assert libc.settings == {TRIM_THRESHOLD: 128 * 1024, MMAP_MAX: 65536}
    assert libc.trims == 1
    keeper.tick()
    assert libc.trims == 1
    keeper.saw(LARGE_PAYLOAD * 10)
    assert libc.settings[MMAP_MAX] == 0
    keeper.tick()
    keeper.tick()
    assert libc.trims == 2


def test_a_keeper_without_glibc_does_nothing() -> None:
    keeper = HeapKeeper()
    assert not keeper.active
    keeper.saw(LARGE_PAYLOAD)
    keeper.tick()
    keeper.tick()  # no allocator to switch or trim: no error either
