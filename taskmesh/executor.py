"""Runs user code: one executor process, one task at a time, fed by its worker supervisor.

An executor holds no ZeroMQ context and no socket; it talks to its supervisor over a pipe. User
code may crash it (``os._exit``, a segfault, the OOM killer) or hang it: the supervisor notices
through the process sentinel, reports the task lost or timed out, and starts a fresh executor.
So nothing here tries to survive that; it only turns every *Python* outcome into a report.

Pipe protocol (supervisor -> executor): three byte strings per task, ``header`` (a pickled
``(task_id, name)``), the pickled function and the pickled ``(args, kwargs)``.
Executor -> supervisor: one pickled ``(task_id, status, value, error, run_s)`` per task, where
``error`` is ``None`` or ``(type_name, message, traceback, mro)``.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from collections import OrderedDict
from multiprocessing.connection import Connection
from typing import Any

import cloudpickle

from taskmesh.protocol import Status
from taskmesh.serialize import qualified_name

_FN_CACHE_SIZE = 256

ErrorTuple = tuple[str, str, str, tuple[str, ...]]


def describe_exception(exc: BaseException) -> ErrorTuple:
    """Names and text of an exception: what survives even when the exception does not unpickle."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    mro = tuple(qualified_name(c) for c in type(exc).__mro__ if c not in (object,))
    return (qualified_name(type(exc)), str(exc), text, mro)


def pickle_exception(exc: BaseException) -> bytes:
    """The exception pickled for the producer, or ``b""`` when it cannot be (then the producer
    gets a ``RemoteError`` built from its names and text)."""
    try:
        blob: bytes = cloudpickle.dumps(exc, protocol=5)
        cloudpickle.loads(blob)  # some exceptions pickle but fail to unpickle (bad __init__)
    except Exception:
        return b""
    return blob


class _FunctionCache:
    def __init__(self) -> None:
        self._cache: OrderedDict[bytes, Any] = OrderedDict()

    def load(self, blob: bytes) -> Any:
        fn = self._cache.get(blob)
        if fn is None:
            fn = cloudpickle.loads(blob)
            self._cache[blob] = fn
            if len(self._cache) > _FN_CACHE_SIZE:
                self._cache.popitem(last=False)
        return fn


def run_task(
    cache: _FunctionCache, task_id: str, name: str, fn_blob: bytes, args_blob: bytes
) -> tuple[int, bytes, ErrorTuple | None]:
    """Run one task and classify how it ended. Never raises."""
    try:
        fn = cache.load(fn_blob)
    except BaseException as exc:
        return _load_failure(f"could not load the function of task {name} [{task_id}]", exc)
    try:
        args, kwargs = cloudpickle.loads(args_blob)
    except BaseException as exc:
        return _load_failure(f"could not unpickle the arguments of task {name} [{task_id}]", exc)
    try:
        value = fn(*args, **kwargs)
        if inspect.iscoroutine(value):
            value = asyncio.run(value)
    except BaseException as exc:
        return int(Status.ERROR), pickle_exception(exc), describe_exception(exc)
    try:
        return int(Status.OK), cloudpickle.dumps(value, protocol=5), None
    except BaseException as exc:
        message = (
            f"the result of task {name} [{task_id}] cannot be pickled: "
            f"{type(exc).__name__}: {exc} (result type {type(value).__name__})"
        )
        return _error("taskmesh.errors.SerializationError", message, exc)


def _load_failure(what: str, exc: BaseException) -> tuple[int, bytes, ErrorTuple]:
    hint = ""
    if isinstance(exc, ModuleNotFoundError | ImportError | AttributeError):
        hint = (
            ". Functions from an importable module travel by reference: install that module "
            "where the worker runs (or start the worker from its folder), or ship it by value "
            "with cloudpickle.register_pickle_by_value(module)"
        )
    message = f"{what}: {type(exc).__name__}: {exc}{hint}"
    return _error("taskmesh.errors.SerializationError", message, exc)


def _error(type_name: str, message: str, cause: BaseException) -> tuple[int, bytes, ErrorTuple]:
    from taskmesh.errors import SerializationError

    exc = SerializationError(message)
    _, _, text, _ = describe_exception(cause)
    mro = tuple(qualified_name(c) for c in SerializationError.__mro__ if c is not object)
    return int(Status.ERROR), pickle_exception(exc), (type_name, message, text, mro)


def _watch_parent(parent_pid: int) -> None:
    """Exit when the supervisor is gone, even in the middle of a task: no orphaned executors."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent_pid:
            os._exit(70)


def executor_main(conn: Connection, worker_name: str) -> None:
    """Entry point of an executor process (started by the supervisor through a forkserver)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.environ["TASKMESH_WORKER_NAME"] = worker_name
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    cache = _FunctionCache()
    while True:
        try:
            header = conn.recv_bytes()
            fn_blob = conn.recv_bytes()
            args_blob = conn.recv_bytes()
        except (EOFError, OSError):
            return
        task_id, name = pickle.loads(header)
        started = time.perf_counter()
        status, value, error = run_task(cache, task_id, name, fn_blob, args_blob)
        run_s = time.perf_counter() - started
        try:
            conn.send_bytes(pickle.dumps((task_id, status, value, error, run_s), protocol=5))
        except (BrokenPipeError, OSError):
            return
        sys.stdout.flush()
