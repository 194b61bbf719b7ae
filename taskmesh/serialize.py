"""The producer's side of pickling: calls out, outcomes back.

Functions defined in ``__main__`` (or in a module registered with
``cloudpickle.register_pickle_by_value``) travel by value, so workers need no copy of a script.
Functions from importable modules travel by reference: the worker imports the module.

Large buffers travel out of band (pickle protocol 5): a ``bytes``, ``bytearray`` or
``memoryview`` of at least ``OUT_OF_BAND_MIN`` bytes, a NumPy array, anything that pickles
through a ``PickleBuffer``, is left out of the pickle stream and sent as a frame of its own
(``protocol.Pickled``), so a 100 MB argument is never copied into a pickle on the way out nor
out of one on the way in. ``bytes`` and ``bytearray`` offer no out-of-band pickling of their
own, so a persistent id stands in for a large one and unpickles back to the same type; on the
worker a ``bytes`` argument is read from the supervisor's pipe straight into its final object.
Persistent ids cost a call per pickled object, so they are used only when a bounded look
through the value finds such a buffer (``_holds_large_buffer``).
"""

from __future__ import annotations

import contextlib
import io
import pickle
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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
from taskmesh.protocol import Blob, Outcome, Payload, Pickled, Status

#: buffers at least this large travel beside the pickle stream instead of inside it
OUT_OF_BAND_MIN = 64 * 1024

# persistent id tags: what a large buffer unpickles back to
_BYTES = "bytes"
_BYTEARRAY = "bytearray"

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


def _small_plain(values: Iterable[Any]) -> bool:
    """Whether every value is plain and none a buffer worth sending out of band."""
    for v in values:
        kind = type(v)
        if kind not in _PLAIN:
            return False
        if (kind is bytes or kind is bytearray) and len(v) >= OUT_OF_BAND_MIN:
            return False
    return True


def _plain_and_small(value: Any) -> bool:
    """Whether ``pickle.dumps`` alone does: ``is_plain`` and no large buffer among them."""
    kind = type(value)
    if kind in _PLAIN:
        return not ((kind is bytes or kind is bytearray) and len(value) >= OUT_OF_BAND_MIN)
    if kind is list or kind is tuple:
        return _small_plain(value)
    if kind is dict:
        return all(type(k) in _PLAIN for k in value) and _small_plain(value.values())
    return False


class _BufferPickler(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle, with every large ``PickleBuffer`` (a NumPy array's, say) set aside instead
    of copied into the stream."""

    def __init__(self, file: io.BytesIO) -> None:
        raws: list[memoryview] = []

        def set_aside(buffer: pickle.PickleBuffer) -> bool:
            """Pickle's ``buffer_callback``: True keeps a small buffer in the stream."""
            raw = buffer.raw()
            if raw.nbytes < OUT_OF_BAND_MIN:
                return True
            raws.append(raw)
            return False

        # a closure, not a bound method: a pickler in a reference cycle would be freed by the
        # garbage collector, which may clear a memoryview while a buffer of it is exported
        super().__init__(file, protocol=5, buffer_callback=set_aside)
        self.raws = raws


class _OutOfBandPickler(_BufferPickler):
    """Also sets aside large ``bytes``, ``bytearray`` and ``memoryview`` objects, which have no
    out-of-band pickling of their own, through persistent ids. Pickle then calls
    ``persistent_id`` for every object, which costs, so this pickler is kept for values known
    to hold such a buffer (``_holds_large_buffer``)."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file)
        # id(obj) -> (obj, its persistent id): holding obj keeps its id from being reused by
        # another object while the dump runs (a memoryview built by a __reduce__ may be freed
        # before the next one is made, at the same address)
        self._ids: dict[int, tuple[Any, tuple[str, pickle.PickleBuffer]]] = {}

    def persistent_id(self, obj: Any) -> Any:
        kind = type(obj)
        if kind is bytes or kind is memoryview or kind is bytearray:
            return self._buffer_id(obj, kind)
        return None

    def _buffer_id(self, obj: Any, kind: type) -> tuple[str, pickle.PickleBuffer] | None:
        """A large ``bytes`` or ``bytearray`` travels as its buffer, tagged with its type. So
        does a large contiguous ``memoryview``, which unpickles as ``bytes`` as cloudpickle's
        own reducer makes it do."""
        seen = self._ids.get(id(obj))
        if seen is not None and seen[0] is obj:
            return seen[1]  # the same object again: the stream refers back to the first copy
        if kind is memoryview:
            if obj.nbytes < OUT_OF_BAND_MIN or not obj.c_contiguous:
                return None
            pid = (_BYTES, pickle.PickleBuffer(obj.toreadonly()))
        elif len(obj) < OUT_OF_BAND_MIN:
            return None
        else:
            pid = (_BYTES if kind is bytes else _BYTEARRAY, pickle.PickleBuffer(obj))
        self._ids[id(obj)] = (obj, pid)
        return pid


#: how many objects ``_holds_large_buffer`` looks at before it gives up
_SCAN_BUDGET = 10_000
_SCALARS = frozenset({int, float, str, bool, type(None), complex})


def _large_buffer(obj: Any) -> bool:
    kind = type(obj)
    if kind is bytes or kind is bytearray:
        return len(obj) >= OUT_OF_BAND_MIN
    return kind is memoryview and obj.nbytes >= OUT_OF_BAND_MIN


def _holds_large_buffer(value: Any) -> bool:
    """Whether a large ``bytes``, ``bytearray`` or ``memoryview`` is in ``value``: in it or in
    its containers and instance attributes, among the first ``_SCAN_BUDGET`` objects. One found
    later is pickled into the stream: slower, never wrong."""
    pending = [value]
    for _ in range(_SCAN_BUDGET):
        if not pending:
            return False
        obj = pending.pop()
        kind = type(obj)
        if kind in _SCALARS:
            continue  # most of what a call holds: nothing inside, nothing to look up
        if _large_buffer(obj):
            return True
        if kind is list or kind is tuple or kind is set or kind is frozenset:
            pending.extend(obj)
        elif kind is dict:
            pending.extend(obj.values())
        elif not isinstance(obj, type):
            try:
                attributes = getattr(obj, "__dict__", None)
            except Exception:  # a __getattr__ that fails: nothing to look in
                continue
            if type(attributes) is dict:
                pending.extend(attributes.values())
    return False


def _snapshot(view: memoryview) -> Blob:
    """The view itself when its memory can never change; else a copy that stays writable
    when the original is (a NumPy array must unpickle writable)."""
    if _immutable(view):
        return view
    return bytes(view) if view.readonly else memoryview(bytearray(view))


def _immutable(view: memoryview) -> bool:
    """Whether the memory behind a view can never change: it belongs to a ``bytes``."""
    base: Any = view
    while isinstance(base, memoryview):
        base = base.obj
    return type(base) is bytes


def _dumps_out_of_band(value: Any) -> Payload:
    """cloudpickle with large buffers out of band; one blob when there is none."""
    file = io.BytesIO()
    pickler_type = _OutOfBandPickler if _holds_large_buffer(value) else _BufferPickler
    pickler = pickler_type(file)
    pickler.dump(value)
    stream = file.getvalue()
    raws = pickler.raws
    if not raws:
        return stream
    return Pickled(stream, tuple(_snapshot(r) for r in raws), tuple(r.readonly for r in raws))


def dumps_value(value: Any) -> Payload:
    """Pickle a result or an argument tuple: plain pickle when it is enough, else cloudpickle
    with large buffers out of band."""
    if _plain_and_small(value):
        return pickle.dumps(value, protocol=5)
    return _dumps_out_of_band(value)


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
) -> Payload:
    """Pickle a call's arguments; on failure name the argument that cannot travel. The futures
    found among the arguments are appended to ``deps``."""
    try:
        if _small_plain(args) and _small_plain(kwargs.values()):
            return pickle.dumps((tuple(args), dict(kwargs)), protocol=5)  # holds no future
        if deps is None:
            return _dumps_out_of_band((tuple(args), dict(kwargs)))
        with collecting_dependencies(deps):
            return _dumps_out_of_band((tuple(args), dict(kwargs)))
    except DependencyFailed:
        raise
    except Exception as exc:
        culprit = _find_unpicklable(args, kwargs, deps)
        raise SerializationError(
            f"cannot send {name}(...) to a worker: {culprit} cannot be pickled: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def _find_unpicklable(
    args: Sequence[Any], kwargs: Mapping[str, Any], deps: list[Any] | None
) -> str:
    # futures pickle as references here too: noted in ``deps``, which the caller releases
    scope = collecting_dependencies(deps) if deps is not None else contextlib.nullcontext()
    with scope:
        for i, value in enumerate(args):
            if not _picklable(value):
                return f"argument {i} (a {type(value).__name__})"
        for key, value in kwargs.items():
            if not _picklable(value):
                return f"keyword argument {key!r} (a {type(value).__name__})"
    return "an argument"


def _picklable(value: Any) -> bool:
    try:
        cloudpickle.dumps(value)
    except DependencyFailed:
        return True  # not this argument's fault: its dependency failed
    except Exception:
        return False
    return True


class _OutOfBandUnpickler(pickle.Unpickler):
    """Unpickles a ``Pickled``: its buffers, and the persistent ids of large buffers. An object
    the stream refers to twice (the same persistent id) is restored once, as pickle would."""

    def __init__(self, file: io.BytesIO, buffers: Iterable[Any]) -> None:
        super().__init__(file, buffers=buffers)
        self._restored: dict[int, tuple[Any, Any]] = {}  # id(pid): (pid, what it stood for)

    def persistent_load(self, pid: Any) -> Any:
        seen = self._restored.get(id(pid))
        if seen is not None and seen[0] is pid:
            return seen[1]
        value = _restore_buffer(pid)
        self._restored[id(pid)] = (pid, value)
        return value


def _restore_buffer(pid: Any) -> Any:
    """What a persistent id of ``_OutOfBandPickler`` stood for."""
    tag = pid[0] if type(pid) is tuple and len(pid) == 2 else None
    if tag == _BYTES:
        return _as_bytes(pid[1])
    if tag == _BYTEARRAY:
        return bytearray(pid[1])
    raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")


def _as_bytes(buffer: Any) -> bytes:
    """The buffer as ``bytes``, without a copy when it is one already (a receiver that read it
    from a stream straight into a ``bytes``)."""
    if type(buffer) is bytes:
        return buffer
    view = memoryview(buffer)
    base = view.obj
    while isinstance(base, memoryview):
        base = base.obj
    if type(base) is bytes and len(base) == view.nbytes:
        return base
    return bytes(view)


def loads_payload(payload: Payload) -> Any:
    """Unpickle arguments or a result, with their out-of-band buffers if they have any."""
    if not isinstance(payload, Pickled):
        return pickle.loads(payload)
    buffers = [
        _writable(b) if not readonly else b
        for b, readonly in zip(payload.buffers, payload.readonly, strict=False)
    ]
    unpickler = _OutOfBandUnpickler(io.BytesIO(payload.stream), buffers=buffers)
    return unpickler.load()


def _writable(buffer: Any) -> Any:
    """A buffer pickled writable (a NumPy array's) must unpickle writable, also when it came
    inside a message body or from the journal, as read-only ``bytes``."""
    view = memoryview(buffer)
    return view if not view.readonly else memoryview(bytearray(view))


def load_outcome(outcome: Outcome, name: str) -> tuple[bool, Any]:
    """Turn an outcome into ``(True, value)`` or ``(False, exception)`` for a future."""
    status = outcome.status
    if status is Status.OK:
        try:
            return True, loads_payload(outcome.value)
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


def _load_exception(blob: Payload) -> BaseException | None:
    if not blob:
        return None
    try:
        loaded = loads_payload(blob)
    except Exception:
        return None
    return loaded if isinstance(loaded, BaseException) else None
