"""The five-minute tour in one file.

    python examples/quickstart.py                 # embedded broker and two local workers
    TASKMESH_BROKER=tcp://host:5555 python examples/quickstart.py   # your own mesh

Functions defined here (in ``__main__``) travel by value, so the workers need no copy of this
file.
"""

from __future__ import annotations

import asyncio
import os
from contextlib import nullcontext

import taskmesh
from taskmesh import task
from taskmesh.testing import Mesh


@task
def add(x: int, y: int) -> int:
    return x + y


@task(retries=1, timeout=10.0)
def divide(x: float, y: float) -> float:
    return x / y


async def gather_async() -> list[int]:
    return list(await asyncio.gather(*(add.submit(i, i) for i in range(5))))


def main() -> None:
    own_broker = os.environ.get("TASKMESH_BROKER")
    with nullcontext() if own_broker else Mesh(workers=2, concurrency=2) as mesh:
        taskmesh.connect(own_broker or mesh.url)

        print("add(2, 3) here:       ", add(2, 3))
        print("add.submit(2, 3):     ", add.submit(2, 3).result(timeout=10))
        print("add.map(...):         ", list(add.map([1, 2, 3], [10, 20, 30])))
        print("awaited from asyncio: ", asyncio.run(gather_async()))
        try:
            divide.submit(1, 0).result(timeout=10)
        except ZeroDivisionError as exc:
            print("a remote exception:   ", repr(exc), "(remote traceback in exc.__notes__)")
        futures = [add.submit(i, 1) for i in range(100)]
        done = sum(1 for _ in taskmesh.as_completed(futures, timeout=30))
        print("as_completed:         ", done, "futures done")


if __name__ == "__main__":
    main()
