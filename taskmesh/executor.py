"""Runs user code: the executor process, fed batches of tasks by its worker supervisor.

An executor holds no ZeroMQ context and no socket; it talks to its supervisor over a pipe. User
code may crash it (``os._exit``, a segfault, the OOM killer) or hang it: the supervisor notices
through the process sentinel, reports the task lost or timed out, and starts a fresh executor.
So nothing here tries to survive that; it only turns every *Python* outcome into a report.

Pipe protocol (``send_message``/``recv_message``, both directions): a header message with the
size of each large buffer and whether it is read-only, the pickled object, then each large
buffer as raw bytes. The reader reads a read-only buffer straight into a new ``bytes`` (the
``bytes`` argument it becomes, with no further copy) and a writable one into fresh anonymous
memory. Supervisor -> executor: a list of ``(seq, task_id, name, fn, args, deps)`` per batch.
Executor -> supervisor: one pickled list of ``(seq, status, value, error, run_s)`` per flush,
where ``error`` is ``None`` or ``(type_name, message, traceback, mro)``. Arguments and values
cross the pipe as ``to_pipe`` makes them, and ``from_pipe`` turns them back into payloads.
Results are flushed at the end of each batch and whenever a couple of milliseconds have
passed, so short tasks cost one pipe message per batch rather than one per task.

Progress. Before each task the executor writes the task's ``seq`` and start time into a small
shared array (a memory write, no system call); it writes ``-1`` when idle. That is how the
supervisor knows which task to blame when the process dies, and when a time limit is hit.
"""

from __future__ import annotations

import asyncio
import inspect
import mmap
import os
import pickle
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

import cloudpickle

from taskmesh.protocol import Payload, Pickled, Status
from taskmesh.serialize import dependency_values, dumps_value, loads_payload, qualified_name

_FN_CACHE_SIZE = 256
#: blobs larger than this cross the pipe as raw out-of-band buffers, not inside a pickle
LARGE_BLOB = 64 * 1024
_FLUSH_EVERY_S = 0.002

ErrorTuple = tuple[str, str, str, tuple[str, ...]]

#: index of the running task's seq and of its start time in the shared progress array
PROGRESS_SEQ = 0
PROGRESS_STARTED = 1
IDLE = -1.0


def describe_exception(exc: BaseException) -> ErrorTuple:
    """Names and text of an exception: what survives even when the exception does not unpickle."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return (qualified_name(type(exc)), str(exc), text, exception_mro(type(exc)))


def exception_mro(cls: type) -> tuple[str, ...]:
    return tuple(qualified_name(c) for c in cls.__mro__ if c is not object)


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
    cache: _FunctionCache,
    task_id: str,
    name: str,
    fn_blob: bytes,
    args_blob: Payload,
    deps: Sequence[tuple[str, Payload]] = (),
) -> tuple[int, Payload, ErrorTuple | None]:
    """Run one task and classify how it ended. Never raises."""
    try:
        fn = cache.load(fn_blob)
    except BaseException as exc:
        return _load_failure(f"could not load the function of task {name} [{task_id}]", exc)
    try:
        if deps:
            # the results of the tasks this call refers to, for its references to resolve to
            values = {dep_id: loads_payload(blob) for dep_id, blob in deps}
            with dependency_values(values):
                args, kwargs = loads_payload(args_blob)
        else:
            args, kwargs = loads_payload(args_blob)
    except BaseException as exc:
        return _load_failure(f"could not unpickle the arguments of task {name} [{task_id}]", exc)
    try:
        value = fn(*args, **kwargs)
        if inspect.iscoroutine(value):
            value = asyncio.run(value)
    except BaseException as exc:
        return int(Status.ERROR), pickle_exception(exc), describe_exception(exc)
    try:
        return int(Status.OK), dumps_value(value), None
    except BaseException as exc:
        message = (
            f"the result of task {name} [{task_id}] cannot be pickled: "
            f"{type(exc).__name__}: {exc} (result type {type(value).__name__})"
        )
        return _serialization_error(message, exc)


def _load_failure(what: str, exc: BaseException) -> tuple[int, bytes, ErrorTuple]:
    hint = ""
    if isinstance(exc, ModuleNotFoundError | ImportError | AttributeError):
        hint = (
            ". Functions from an importable module travel by reference: install that module "
            "where the worker runs (or start the worker from its folder), or ship it by value "
            "with cloudpickle.register_pickle_by_value(module)"
        )
    return _serialization_error(f"{what}: {type(exc).__name__}: {exc}{hint}", exc)


def _serialization_error(message: str, cause: BaseException) -> tuple[int, bytes, ErrorTuple]:
    from taskmesh.errors import SerializationError

    exc = SerializationError(message)
    _, _, text, _ = describe_exception(cause)
    info = (qualified_name(SerializationError), message, text, exception_mro(SerializationError))
    return int(Status.ERROR), pickle_exception(exc), info


def _watch_parent(parent_pid: int) -> None:
    """Exit when the supervisor is gone, even in the middle of a task: no orphaned executors."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent_pid:
            os._exit(70)


class _Outbox:
    """Outcomes waiting to go back to the supervisor, flushed in batches.

    The main thread flushes at the end of each batch of tasks; a watchdog thread flushes
    whatever has waited ``_FLUSH_EVERY_S`` while the main thread is busy in a longer task, so a
    quick task's outcome never waits behind a slow neighbour (nor dies with it)."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._results: list[tuple[int, int, Any, ErrorTuple | None, float]] = []
        self._due: float | None = None
        self.broken = False
        threading.Thread(target=self._watch, name="taskmesh-outbox", daemon=True).start()

    def add(self, result: tuple[int, int, Any, ErrorTuple | None, float]) -> None:
        with self._lock:
            self._results.append(result)
            if self._due is None:
                self._due = time.monotonic() + _FLUSH_EVERY_S
                self._wakeup.notify()

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        self._due = None
        if not self._results:
            return
        results, self._results = self._results, []
        try:
            send_message(self._conn, results)
        except (BrokenPipeError, OSError):
            self.broken = True

    def _watch(self) -> None:
        with self._lock:
            while True:
                if self._due is None:
                    self._wakeup.wait()
                    continue
                left = self._due - time.monotonic()
                if left > 0:
                    self._wakeup.wait(left)
                    continue
                self._flush_locked()


def executor_main(conn: Connection, progress: Any, worker_name: str) -> None:
    """Entry point of an executor process (started by the supervisor through a forkserver)."""
    # Ctrl-C and SIGTERM are the supervisor's to handle, even when sent to the whole process
    # group (systemd, a terminal): it decides whether running tasks finish or are handed back,
    # and it ends executors with SIGKILL
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.environ["TASKMESH_WORKER_NAME"] = worker_name
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    cache = _FunctionCache()
    outbox = _Outbox(conn)
    clock = time.monotonic
    progress[PROGRESS_SEQ] = IDLE
    while not outbox.broken:
        try:
            batch = recv_message(conn)
        except (EOFError, OSError):
            return
        for seq, task_id, name, fn_blob, args_blob, deps in batch:
            started = clock()
            progress[PROGRESS_STARTED] = started
            progress[PROGRESS_SEQ] = seq
            args = from_pipe(args_blob)
            received = [(dep_id, from_pipe(value)) for dep_id, value in deps] if deps else ()
            status, value, error = run_task(cache, task_id, name, bytes(fn_blob), args, received)
            finished = clock()
            progress[PROGRESS_SEQ] = IDLE
            outbox.add((seq, status, to_pipe(value), error, finished - started))
        outbox.flush()
        sys.stdout.flush()


def out_of_band(blob: Any) -> Any:
    """Mark a large blob to travel beside the pickle rather than inside it."""
    return pickle.PickleBuffer(blob) if len(blob) > LARGE_BLOB else blob


def to_pipe(payload: Payload) -> Any:
    """A payload as it crosses the pipe: a blob, or ``(stream, buffers)`` whose buffers each
    cross as raw bytes, read-only or writable as the unpickled object expects."""
    if type(payload) is bytes and len(payload) <= LARGE_BLOB:
        return payload  # the common case first: a small pickle
    if not isinstance(payload, Pickled):
        return out_of_band(payload)
    buffers = tuple(
        pickle.PickleBuffer(_view(b, readonly))
        for b, readonly in zip(payload.buffers, payload.readonly, strict=True)
    )
    return (out_of_band(payload.stream), buffers)


def _view(buffer: Any, readonly: bool) -> memoryview:
    view = memoryview(buffer)
    if readonly:
        return view.toreadonly()
    return view if not view.readonly else memoryview(bytearray(view))


def from_pipe(value: Any) -> Payload:
    """The other end of ``to_pipe``: read-only buffers arrive as ``bytes``."""
    if type(value) is not tuple:
        return value  # type: ignore[no-any-return]
    stream, buffers = value
    return Pickled(stream, buffers, tuple(type(b) is bytes for b in buffers))


def send_message(conn: Connection, obj: Any) -> None:
    """Send a pickled object; its out-of-band buffers follow as raw bytes on the same pipe.

    The header message carries each buffer's size and whether it is read-only, so the reader
    can read each one straight into memory of the right size and kind (``Connection.recv_bytes``
    would grow and copy it in pieces).
    """
    buffers: list[pickle.PickleBuffer] = []
    body = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    head = struct.pack(
        f"!I{len(raws)}Q{len(raws)}?",
        len(raws),
        *(r.nbytes for r in raws),
        *(r.readonly for r in raws),
    )
    conn.send_bytes(head + body)
    fd = conn.fileno()
    for raw in raws:
        view = raw
        while view.nbytes:
            view = view[os.write(fd, view) :]


def recv_message(conn: Connection) -> Any:
    """The other end of ``send_message``: a read-only buffer arrives as ``bytes``, a writable
    one as anonymous memory."""
    data = conn.recv_bytes()
    (count,) = struct.unpack_from("!I", data)
    sizes = struct.unpack_from(f"!{count}Q", data, 4)
    flags = struct.unpack_from(f"!{count}?", data, 4 + 8 * count)
    fd = conn.fileno()
    buffers = [
        _read_bytes(fd, size) if readonly else _read_writable(fd, size)
        for size, readonly in zip(sizes, flags, strict=True)
    ]
    return pickle.loads(memoryview(data)[4 + 9 * count :], buffers=buffers)


def _read_bytes(fd: int, size: int) -> bytes:
    """Read exactly ``size`` bytes into a new ``bytes`` object, in one system call that copies
    them straight into it (reading into a buffer first would cost a second copy)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:  # not a socket: a plain pipe
        return bytes(_read_writable(fd, size))
    try:
        sock.settimeout(None)  # blocking, as the Connection needs it, whatever the default
        data = sock.recv(size, socket.MSG_WAITALL)
    finally:
        sock.detach()
    if len(data) == size:
        return data
    if not data:
        raise EOFError("pipe closed in the middle of a buffer")
    # a signal cut the read short: read the rest the slow way
    return data + bytes(_read_writable(fd, size - len(data)))


def _read_writable(fd: int, size: int) -> bytearray | mmap.mmap:
    """Read exactly ``size`` bytes into fresh writable memory. Large buffers get an anonymous
    mapping, whose pages the kernel fills as it copies (a ``bytearray`` is zeroed first)."""
    buffer: bytearray | mmap.mmap
    if size < mmap.PAGESIZE:
        buffer = bytearray(size)
    else:
        buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = os.readv(fd, [view[got:]])
        if n == 0:
            raise EOFError("pipe closed in the middle of a buffer")
        got += n
    view.release()
    return buffer
