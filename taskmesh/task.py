"""``@task``: a plain function that can also run on the mesh.

Calling the task runs it here; ``.submit()`` sends it to a worker through the default client
(``taskmesh.connect``); ``.map()`` submits many and yields results in order.
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from datetime import timedelta
from typing import Any, Generic, ParamSpec, TypeVar, overload

import cloudpickle

from taskmesh.client import Client, TaskFuture, default_client
from taskmesh.config import DEFAULT_QUEUE
from taskmesh.options import TaskOptions, split_call_options
from taskmesh.serialize import dumps_function

P = ParamSpec("P")
R = TypeVar("R")


class Task(Generic[P, R]):
    """A function decorated with ``@task``."""

    def __init__(self, fn: Callable[P, R], options: TaskOptions | None = None) -> None:
        if not callable(fn):
            raise TypeError(f"@task needs a function, got {fn!r}")
        self.fn = fn
        self.options = options or TaskOptions()
        self.name = getattr(fn, "__qualname__", getattr(fn, "__name__", repr(fn)))
        self._blob: bytes | None = None
        functools.update_wrapper(self, fn)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<taskmesh task {self.name} queue={self.options.queue!r}>"

    def __reduce__(self) -> tuple[Any, ...]:
        """By reference when the worker can import it, else by value (``__main__``, closures)."""
        module = getattr(self.fn, "__module__", None)
        qualname = getattr(self.fn, "__qualname__", "")
        if module and module != "__main__" and "<locals>" not in qualname:
            owner = sys.modules.get(module)
            if _lookup(owner, qualname) is self and not _pickled_by_value(module):
                return (_load_task, (module, qualname))
        return (_rebuild_task, (self.fn, self.options))

    def with_options(self, **changes: Any) -> Task[P, R]:
        """A copy with other default options, e.g. ``add.with_options(queue="cpu")``."""
        return Task(self.fn, replace(self.options, **changes))

    def submit(self, *args: P.args, **kwargs: P.kwargs) -> TaskFuture[R]:
        """Run on a worker. Per-call options: ``_queue``, ``_priority``, ``_timeout``,
        ``_retries``, ``_retry_backoff``, ``_retry_on``, ``_max_attempts``, ``_countdown``,
        ``_key`` (and ``_client``)."""
        client = kwargs.pop("_client", None)
        overrides = split_call_options(kwargs)
        return self._submit(client, args, kwargs, self.options.merged(overrides))

    def _submit(
        self, client: Any, args: tuple[Any, ...], kwargs: dict[str, Any], options: TaskOptions
    ) -> TaskFuture[R]:
        target: Client = client if client is not None else default_client()
        if self._blob is None:
            self._blob = dumps_function(self)
        future: TaskFuture[R] = target.submit_call(
            self, args, kwargs, options, name=self.name, fn_blob=self._blob
        )
        return future

    def schedule(self, *args: Any, _client: Client | None = None, **kwargs: Any) -> str:
        """Register this task with the broker as periodic, by its ``every=`` or ``cron=``
        (``@task(every=timedelta(minutes=5))``), called with these arguments at each tick.
        Idempotent: registering again replaces the arguments and keeps the schedule's clock.
        Options may be given as for ``submit`` (``_queue=``...), and ``_name=`` to register
        the same task more than once."""
        if self.options.every is None and self.options.cron is None:
            raise ValueError(
                f"task {self.name} has no schedule: declare it as @task(every=...) or "
                "@task(cron=...), or use Client.schedule(fn, every=..., cron=...)"
            )
        name = kwargs.pop("_name", None)
        target: Client = _client if _client is not None else default_client()
        return target.schedule(
            self, *args, _every=self.options.every, _cron=self.options.cron, _name=name, **kwargs
        )

    def unschedule(self, _client: Client | None = None, _name: str | None = None) -> None:
        """Stop this periodic task (registered under its name, or ``_name``)."""
        target: Client = _client if _client is not None else default_client()
        target.unschedule(_name or self.name)

    def map(
        self, *iterables: Iterable[Any], timeout: float | None = None, client: Client | None = None
    ) -> Iterator[R]:
        """Submit one task per item (like ``Executor.map``) and yield results in order."""
        futures = [
            self._submit(client, tuple(a), {}, self.options) for a in zip(*iterables, strict=False)
        ]
        return _results_in_order(futures, timeout)


def _results_in_order(futures: list[TaskFuture[R]], timeout: float | None) -> Iterator[R]:
    import time

    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        for future in futures:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            yield future.result(left)
    finally:
        for future in futures:
            if not future.done():
                future.cancel()


def _lookup(owner: Any, qualname: str) -> Any:
    obj = owner
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _pickled_by_value(module: str) -> bool:
    registered = getattr(cloudpickle, "cloudpickle", None)
    by_value: set[str] = getattr(registered, "_PICKLE_BY_VALUE_MODULES", set())
    return any(module == m or module.startswith(m + ".") for m in by_value)


def _load_task(module: str, qualname: str) -> Task[Any, Any]:
    found = _lookup(importlib.import_module(module), qualname)
    if not isinstance(found, Task):
        raise TypeError(f"{module}.{qualname} is not a taskmesh task on this worker")
    return found


def _rebuild_task(fn: Callable[..., Any], options: TaskOptions) -> Task[Any, Any]:
    return Task(fn, options)


@overload
def task(fn: Callable[P, R], /) -> Task[P, R]: ...


@overload
def task(
    *,
    queue: str = DEFAULT_QUEUE,
    priority: int = 0,
    timeout: float | None = None,
    retries: int = 0,
    retry_backoff: float = 0.0,
    retry_on: type[BaseException] | tuple[type[BaseException], ...] = (),
    max_attempts: int = 3,
    rate_limit: str | float | None = None,
    route: str | None = None,
    every: float | timedelta | None = None,
    cron: str | None = None,
) -> Callable[[Callable[P, R]], Task[P, R]]: ...


def task(
    fn: Callable[P, R] | None = None,
    /,
    *,
    queue: str = DEFAULT_QUEUE,
    priority: int = 0,
    timeout: float | None = None,
    retries: int = 0,
    retry_backoff: float = 0.0,
    retry_on: type[BaseException] | tuple[type[BaseException], ...] = (),
    max_attempts: int = 3,
    rate_limit: str | float | None = None,
    route: str | None = None,
    every: float | timedelta | None = None,
    cron: str | None = None,
) -> Task[P, R] | Callable[[Callable[P, R]], Task[P, R]]:
    """Make a function a taskmesh task: ``@task`` or ``@task(queue="cpu", retries=2, ...)``.

    ``retries`` re-runs a task that raised (``retry_on`` limits which exceptions count) after
    ``retry_backoff * 2**n`` seconds with jitter, scheduled by the broker; ``max_attempts``
    bounds the runs lost to dead workers or executors; ``rate_limit`` ("100/s", "30/m") caps
    how often the broker starts this task, across all workers; ``route`` picks a routing
    strategy for this task within its queue (``"round-robin"``, ``"key"``...). ``every``
    (seconds or a ``timedelta``) or ``cron`` (a five-field line, UTC) declare a periodic task,
    which ``.schedule()`` registers with the broker.
    """
    if isinstance(retry_on, type):
        retry_on = (retry_on,)
    options = TaskOptions(
        queue=queue,
        priority=priority,
        timeout=timeout,
        retries=retries,
        retry_backoff=retry_backoff,
        retry_on=tuple(retry_on),
        max_attempts=max_attempts,
        rate_limit=rate_limit,
        route=route,
        every=every,
        cron=cron,
    )
    if fn is not None:
        return Task(fn, options)

    def decorate(f: Callable[P, R]) -> Task[P, R]:
        return Task(f, options)

    return decorate
