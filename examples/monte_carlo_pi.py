"""Estimate pi by Monte Carlo across several workers, reproducibly.

    python examples/monte_carlo_pi.py              # embedded broker and three workers
    python examples/monte_carlo_pi.py 42           # another seed, another (fixed) estimate
    TASKMESH_BROKER=tcp://host:5555 python examples/monte_carlo_pi.py   # your own mesh

The job is split in chunks; each task throws darts at the unit square and counts those that
land inside the quarter circle. Each chunk has its own seed, derived from the job's seed and
the chunk's index, so the estimate does not depend on which worker ran which chunk or in what
order: the same seed always prints the same digits. The script recomputes two chunks locally
to show that, and exits 0 only if they match and the estimate is within 0.005 of ``math.pi``.
"""

from __future__ import annotations

import math
import os
import random
import socket
import sys
import time
from collections import Counter

from taskmesh import task
from taskmesh.testing import connected

CHUNKS = 24
SAMPLES_PER_CHUNK = 400_000
TOLERANCE = 0.005


@task(timeout=60.0)
def darts(seed: int, n: int) -> tuple[int, str]:
    """How many of ``n`` random points of the unit square fall in the quarter circle, and
    which process counted them."""
    rnd = random.Random(seed).random
    inside = 0
    for _ in range(n):
        x, y = rnd(), rnd()
        if x * x + y * y <= 1.0:
            inside += 1
    return inside, f"{socket.gethostname()}:{os.getpid()}"


def chunk_seed(seed: int, index: int) -> int:
    return seed * 1_000_003 + index


def main() -> int:
    try:
        seed = int(sys.argv[1]) if len(sys.argv) > 1 else 2024
    except ValueError:
        print(f"usage: {sys.argv[0]} [SEED] (a whole number, not {sys.argv[1]!r})", file=sys.stderr)
        return 2
    with connected(workers=3):
        started = time.monotonic()
        results = list(
            darts.map(
                [chunk_seed(seed, i) for i in range(CHUNKS)],
                [SAMPLES_PER_CHUNK] * CHUNKS,
                timeout=120,
            )
        )
        elapsed = time.monotonic() - started

    inside = sum(hits for hits, _ in results)
    total = CHUNKS * SAMPLES_PER_CHUNK
    estimate = 4 * inside / total
    error = estimate - math.pi
    per_process = Counter(where for _, where in results)
    print(f"{total:,} darts in {CHUNKS} tasks, {elapsed:.2f}s, seed {seed}")
    print(f"chunks per executor process: {sorted(per_process.values(), reverse=True)}")
    print(f"pi ~ {estimate:.6f} (math.pi {math.pi:.6f}, error {error:+.6f})")

    ok = True
    for i in (0, CHUNKS - 1):  # plain local calls: the same seed gives the same count here
        local, _ = darts(chunk_seed(seed, i), SAMPLES_PER_CHUNK)
        if local != results[i][0]:
            print(f"chunk {i}: {results[i][0]} remotely, {local} here", file=sys.stderr)
            ok = False
    if abs(error) > TOLERANCE:
        print(f"the estimate is off by more than {TOLERANCE}", file=sys.stderr)
        ok = False
    if not ok:
        return 1
    print(f"pi OK: within {TOLERANCE} of math.pi, and reproducible from seed {seed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
