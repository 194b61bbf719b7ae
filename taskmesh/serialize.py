"""The producer's side of pickling: calls out, outcomes back.

Functions defined in ``__main__`` (or in a module registered with
``cloudpickle.register_pickle_by_value``) travel by value, so workers need no copy of a script.
Functions from importable modules travel by reference: the worker imports the module.
"""

from __future__ import annotations

import contextlib
import pickle
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import cloudpickle

from taskmesh.errors import (
    DependencyFailed,
    RemoteError,
    SerializationError,
    TaskCancelled,
    TaskLost,
    TaskTimeout,
    WorkerLost,
)
from taskmesh.protocol import Outcome, Status

_fn_cache: weakref.WeakKeyDictionary[Any, bytes] = weakref.WeakKeyDictionary()


def qualified_name(cls: type) -> str:
    """How an exception type is named on the wire (and in ``retry_on``)."""
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def callable_name(fn: Any) -> str:
    name = getattr(fn, "name", None) or getattr(fn, "__qualname__", None)
    return name if isinstance(name, str) else type(fn).__name__


def dumps_function(fn: Callable[..., Any]) -> bytes:
    """Pickle a task's callable once and reuse the bytes for every later call.

    The cache holds the callable weakly; a callable that cannot be weakly referenced (a bound
    method, a ``functools.partial``) is pickled on every call.
    """
    try:
        return _fn_cache[fn]
    except (KeyError, TypeError):
        pass
    try:
        blob: bytes = cloudpickle.dumps(fn, protocol=5)
    except Exception as exc:
        raise SerializationError(
            f"the task function {callable_name(fn)} cannot be pickled: {type(exc).__name__}: {exc}"
        ) from exc
    try:
        _fn_cache[fn] = blob
    except TypeError:
        pass
    return blob


#: values that plain pickle handles exactly as cloudpickle would (no code, no classes by value)
_PLAIN = frozenset({int, float, str, bytes, bool, type(None), complex, bytearray})


def is_plain(value: Any) -> bool:
    """Whether ``pickle`` can stand in for ``cloudpickle``: builtin scalars, and lists, tuples
    and dicts of them (one level deep). Checking is far cheaper than a cloudpickle Pickler."""
    kind = type(value)
    if kind in _PLAIN:
        return True
    if kind is list or kind is tuple:
        return all(type(v) in _PLAIN for v in value)
    if kind is dict:
        return all(type(k) in _PLAIN and type(v) in _PLAIN for k, v in value.items())
    return False


def dumps_value(value: Any) -> bytes:
    """Pickle a result or an argument tuple: plain pickle when it is enough, else cloudpickle."""
    if is_plain(value):
        return pickle.dumps(value, protocol=5)
    blob: bytes = cloudpickle.dumps(value, protocol=5)
    return blob


# --------------------------------------------------------------------------- dependencies
# A TaskFuture among a call's arguments (at any depth) pickles as a reference to its task
# (``TaskFuture.__reduce__``): the broker holds the call until that task has succeeded and hands
# the worker its pickled result, which ``dependency_values`` makes the reference resolve to.

_local = threading.local()


def dependency_collector() -> list[Any] | None:
    """The futures referred to by the call being pickled in this thread (None outside one)."""
    found: list[Any] | None = getattr(_local, "deps", None)
    return found


@contextlib.contextmanager
def _thread_scoped(attr: str, value: Any) -> Iterator[None]:
    previous = getattr(_local, attr, None)
    setattr(_local, attr, value)
    try:
        yield
    finally:
        setattr(_local, attr, previous)


def collecting_dependencies(found: list[Any]) -> contextlib.AbstractContextManager[None]:
    """While a call is pickled in this thread: where the futures it refers to are noted."""
    return _thread_scoped("deps", found)


def dependency_values(values: Mapping[str, Any]) -> contextlib.AbstractContextManager[None]:
    """On a worker: what each dependency's reference unpickles to while a call is loaded."""
    return _thread_scoped("values", values)


def dependency_value(task_id: str) -> Any:
    """Unpickling a reference to another task's result (see ``TaskFuture.__reduce__``)."""
    values: Mapping[str, Any] | None = getattr(_local, "values", None)
    if values is None or task_id not in values:
        raise LookupError(f"the result of task [{task_id}] did not come with this call")
    return values[task_id]


def passthrough(value: Any) -> Any:
    """Unpickling a dependency that had already finished when its dependent was submitted."""
    return value


def dumps_call(
    name: str, args: Sequence[Any], kwargs: Mapping[str, Any], deps: list[Any] | None = None
) -> bytes:
    """Pickle a call's arguments; on failure name the argument that cannot travel. The futures
    found among the arguments are appended to ``deps``."""
    try:
        if all(type(a) in _PLAIN for a in args) and all(type(v) in _PLAIN for v in kwargs.values()):
            return pickle.dumps((tuple(args), dict(kwargs)), protocol=5)  # holds no future
        if deps is None:
            blob: bytes = cloudpickle.dumps((tuple(args), dict(kwargs)), protocol=5)
            return blob
        with collecting_dependencies(deps):
            blob = cloudpickle.dumps((tuple(args), dict(kwargs)), protocol=5)
        return blob
    except DependencyFailed:
        raise
    except Exception as exc:
        culprit = _find_unpicklable(args, kwargs)
        raise SerializationError(
            f"cannot send {name}(...) to a worker: {culprit} cannot be pickled: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def _find_unpicklable(args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
    # futures among the arguments pickle as references here too; their pins are undone after
    scratch: list[Any] = []
    try:
        with collecting_dependencies(scratch):
            for i, value in enumerate(args):
                if not _picklable(value):
                    return f"argument {i} (a {type(value).__name__})"
            for key, value in kwargs.items():
                if not _picklable(value):
                    return f"keyword argument {key!r} (a {type(value).__name__})"
        return "an argument"
    finally:
        for future in scratch:
            future._client._unpin(future.task_id)


def _picklable(value: Any) -> bool:
    try:
        cloudpickle.dumps(value)
    except DependencyFailed:
        return True  # not this argument's fault: its dependency failed
    except Exception:
        return False
    return True


def load_outcome(outcome: Outcome, name: str) -> tuple[bool, Any]:
    """Turn an outcome into ``(True, value)`` or ``(False, exception)`` for a future."""
    status = outcome.status
    if status is Status.OK:
        try:
            return True, pickle.loads(outcome.value)
        except Exception as exc:
            err = SerializationError(
                f"the result of task {name} [{outcome.task_id}] cannot be unpickled here: "
                f"{type(exc).__name__}: {exc}"
            )
            return False, err
    info = outcome.error
    message = info.message if info is not None else ""
    if status is Status.TIMEOUT:
        return False, TaskTimeout(message or f"task {name} [{outcome.task_id}] timed out")
    if status is Status.WORKER_LOST:
        return False, WorkerLost(message or f"task {name} [{outcome.task_id}] was lost")
    if status is Status.CANCELLED:
        return False, TaskCancelled(message or f"task {name} [{outcome.task_id}] was cancelled")
    if status is Status.DEPENDENCY_FAILED:
        return False, DependencyFailed(message or f"a dependency of task {name} failed")
    if status is Status.UNKNOWN:
        return False, TaskLost(
            f"the broker has no record of task {name} [{outcome.task_id}]: it restarted without "
            "a journal, or the outcome outlived its retention time"
        )
    # Status.ERROR (and LOST, which a broker never forwards)
    remote = _load_exception(outcome.value)
    tb_text = info.traceback if info is not None else ""
    if remote is None:
        type_name = info.type_name if info is not None else "Exception"
        return False, RemoteError(type_name, message, tb_text)
    if tb_text:
        remote.add_note(f"Remote traceback of task {name} [{outcome.task_id}]:\n{tb_text.rstrip()}")
    return False, remote


def _load_exception(blob: bytes | memoryview) -> BaseException | None:
    if not blob:
        return None
    try:
        loaded = pickle.loads(blob)
    except Exception:
        return None
    return loaded if isinstance(loaded, BaseException) else None
