"""Large buffers travel out of band: beside the pickle stream, never copied into it.

From the producer's pickler (``dumps_call``, ``dumps_value``) through the wire (``Pickled``
payloads, one frame per buffer), the journal, and the supervisor's pipe to its executors, back
to ``loads_payload``: values come back as the same types, and small values pickle as before.
"""

from __future__ import annotations

import array
import io
import multiprocessing
import os
import pickle
import socket
import threading
from typing import Any

import msgpack
import pytest

from taskmesh.executor import _FunctionCache, from_pipe, recv_message, run_task, send_message
from taskmesh.executor import to_pipe as pipe_form
from taskmesh.journal import FinishedTask, JournalBatch, PendingTask, SqliteJournal
from taskmesh.protocol import (
    INLINE_BLOB_MAX,
    PRODUCER,
    WORKER,
    Assignment,
    Outcome,
    Outcomes,
    Pickled,
    ProtocolError,
    Results,
    Status,
    Submit,
    Tasks,
    TaskSpec,
    decode,
    encode,
    pack_outcome,
    pack_task,
    unpack_outcome,
    unpack_task,
)
from taskmesh.serialize import (
    OUT_OF_BAND_MIN,
    dependency_value,
    dumps_call,
    dumps_function,
    dumps_value,
    load_outcome,
    loads_payload,
)

pytestmark = pytest.mark.timeout(60)

LARGE = OUT_OF_BAND_MIN * 4


def large_bytes(n: int = LARGE) -> bytes:
    return bytes(range(256)) * (n // 256)


def base_of(view: Any) -> Any:
    while isinstance(view, memoryview):
        view = view.obj
    return view


def as_received(payload: Any) -> Any:
    """A payload as a receiver decodes it: every part a writable memoryview of a frame."""
    if not isinstance(payload, Pickled):
        return payload
    frames = tuple(memoryview(bytearray(b)) for b in payload.buffers)
    return Pickled(bytes(payload.stream), frames, payload.readonly)


def echo(value: Any) -> Any:
    return value


# --------------------------------------------------------------------------- the pickler


def test_large_bytes_argument_travels_beside_a_small_stream_without_a_copy() -> None:
    data = large_bytes()
    payload = dumps_call("f", (data,), {})
    assert isinstance(payload, Pickled)
    assert len(payload.stream) < 1024  # the stream refers to the buffer, it does not hold it
    assert payload.readonly == (True,)
    (buffer,) = payload.buffers
    assert base_of(buffer) is data  # a view of the caller's bytes: nothing was copied
    assert len(payload) == len(payload.stream) + len(data)
    args, kwargs = loads_payload(as_received(payload))
    assert type(args[0]) is bytes
    assert args[0] == data
    assert kwargs == {}


def test_bytes_received_as_bytes_unpickle_without_a_copy() -> None:
    data = large_bytes()
    payload = dumps_value(data)
    assert isinstance(payload, Pickled)
    received = Pickled(payload.stream, (bytes(data),), payload.readonly)
    assert loads_payload(received) is received.buffers[0]


@pytest.mark.parametrize("value", [None, 7, "text", b"small", bytearray(b"small"), [1, 2.5]])
def test_small_values_pickle_exactly_as_before(value: Any) -> None:
    assert dumps_value(value) == pickle.dumps(value, protocol=5)
    call = dumps_call("f", (value,), {"k": value})
    assert call == pickle.dumps(((value,), {"k": value}), protocol=5)


def test_a_buffer_just_under_the_limit_stays_in_the_stream() -> None:
    data = b"x" * (OUT_OF_BAND_MIN - 1)
    assert type(dumps_value(data)) is bytes
    assert type(dumps_value(data + b"x")) is Pickled


def test_large_bytearray_comes_back_as_a_bytearray_copied_at_submit() -> None:
    data = bytearray(large_bytes())
    payload = dumps_call("f", (), {"buffer": data})
    assert isinstance(payload, Pickled)
    assert payload.readonly == (False,)
    data[:4] = b"XXXX"  # changed after submit: the task still gets what was submitted
    _, kwargs = loads_payload(as_received(payload))
    assert type(kwargs["buffer"]) is bytearray
    assert kwargs["buffer"] == large_bytes()


def test_memoryviews_unpickle_as_bytes_as_before_and_large_ones_travel_out_of_band() -> None:
    numbers = array.array("d", range(LARGE // 8))
    shaped = memoryview(numbers).cast("B").cast("d", [LARGE // 64, 8])
    small = memoryview(b"tiny")
    expected = shaped.tobytes()
    payload = dumps_call("f", (shaped, small), {})
    assert isinstance(payload, Pickled)
    assert len(payload.buffers) == 1  # the small one rides in the stream
    assert payload.readonly == (True,)
    numbers[0] = 99.0  # changed after submit: the task still gets what was submitted
    (got_shaped, got_small), _ = loads_payload(as_received(payload))
    assert type(got_shaped) is bytes
    assert got_shaped == expected
    assert got_small == b"tiny"


def test_a_memoryview_of_bytes_travels_without_a_copy() -> None:
    data = large_bytes()
    payload = dumps_value(memoryview(data)[OUT_OF_BAND_MIN:])
    assert isinstance(payload, Pickled)
    assert base_of(payload.buffers[0]) is data
    assert loads_payload(as_received(payload)) == data[OUT_OF_BAND_MIN:]


def test_a_non_contiguous_memoryview_is_copied_into_the_stream() -> None:
    view = memoryview(large_bytes())[::2]
    payload = dumps_value(view)
    assert isinstance(payload, Pickled)  # the copy cloudpickle makes is a large bytes
    assert loads_payload(as_received(payload)) == view.tobytes()


def test_large_buffers_nested_in_containers_and_objects_travel_out_of_band() -> None:
    first, second = large_bytes(), large_bytes(LARGE * 2)
    value = {"parts": [first, second], "meta": {"name": "x"}, "fn": echo}
    payload = dumps_value(value)
    assert isinstance(payload, Pickled)
    assert len(payload.buffers) == 2
    assert len(payload.stream) < 4096
    got = loads_payload(as_received(payload))
    assert got["parts"] == [first, second]
    assert got["fn"](3) == 3


class Holder:
    def __init__(self, blob: bytes) -> None:
        self.blob = blob


class Fussy:
    """An object whose attribute lookups all fail, even ``__dict__``."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"no {name} here")

    def __reduce__(self) -> tuple[Any, ...]:
        return (Fussy, ())


def test_a_large_buffer_in_an_object_attribute_travels_out_of_band() -> None:
    data = large_bytes()
    payload = dumps_call("f", (Holder(data), Fussy()), {})
    assert isinstance(payload, Pickled)
    assert base_of(payload.buffers[0]) is data
    (holder, fussy), _ = loads_payload(as_received(payload))
    assert holder.blob == data
    assert isinstance(fussy, Fussy)


def test_a_large_buffer_beyond_the_scan_still_round_trips_in_the_stream() -> None:
    data = large_bytes()
    value = [[data], list(range(20_000))]  # the scan gives up before it reaches the buffer
    payload = dumps_value(value)
    assert isinstance(payload, bytes)
    assert pickle.loads(payload) == value


def test_the_same_buffer_twice_is_sent_once() -> None:
    data = large_bytes()
    payload = dumps_value([data, data])
    assert isinstance(payload, Pickled)
    assert len(payload.buffers) == 1
    got = loads_payload(as_received(payload))
    assert got == [data, data]
    assert got[0] is got[1]  # restored once, as pickle would
    received = Pickled(payload.stream, (bytes(data),), payload.readonly)
    got = loads_payload(received)
    assert got[0] is got[1] is received.buffers[0]


def test_a_stream_with_an_unknown_persistent_id_is_refused() -> None:
    class Tagger(pickle.Pickler):
        def persistent_id(self, obj: Any) -> Any:
            return ("something-else", 1) if obj == "x" else None

    out = io.BytesIO()
    Tagger(out, protocol=5).dump(["x"])
    del Tagger
    with pytest.raises(pickle.UnpicklingError, match="unknown persistent id"):
        loads_payload(Pickled(out.getvalue()))


def test_numpy_arrays_travel_out_of_band_and_keep_their_flags() -> None:
    np = pytest.importorskip("numpy")
    writable = np.arange(LARGE // 8, dtype=np.float64).reshape(-1, 16)
    readonly = np.frombuffer(large_bytes(), dtype=np.uint8)
    assert not readonly.flags.writeable
    payload = dumps_call("f", (writable, readonly), {})
    assert isinstance(payload, Pickled)
    assert payload.readonly == (False, True)
    assert len(payload.stream) < 1024
    (got_writable, got_readonly), _ = loads_payload(as_received(payload))
    assert np.array_equal(got_writable, writable)
    assert got_writable.flags.writeable
    assert np.array_equal(got_readonly, readonly)
    assert not got_readonly.flags.writeable


def test_load_outcome_unpickles_a_result_received_as_frames() -> None:
    data = large_bytes()
    outcome = Outcome("t1", Status.OK, as_received(dumps_value(data)))
    ok, value = load_outcome(outcome, "echo")
    assert ok
    assert type(value) is bytes
    assert value == data


def test_run_task_takes_and_returns_out_of_band_payloads() -> None:
    data = large_bytes()
    status, value, error = run_task(
        _FunctionCache(), "t1", "echo", dumps_function(echo), dumps_call("echo", (data,), {})
    )
    assert (status, error) == (Status.OK, None)
    assert isinstance(value, Pickled)
    assert base_of(value.buffers[0]) is data  # the result is the argument: no copy either way
    assert loads_payload(as_received(value)) == data


class ResultOf:
    """Pickles as a reference to another task's result, as a ``TaskFuture`` argument does."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id

    def __reduce__(self) -> tuple[Any, ...]:
        return (dependency_value, (self.task_id,))


def test_a_large_dependency_result_reaches_the_task_that_refers_to_it() -> None:
    data = large_bytes()
    dep_value = as_received(dumps_value(data))
    assert isinstance(dep_value, Pickled)
    status, value, error = run_task(
        _FunctionCache(),
        "t2",
        "echo",
        dumps_function(echo),
        dumps_call("echo", (ResultOf("t1"),), {}),
        [("t1", dep_value)],
    )
    assert (status, error) == (Status.OK, None)
    assert loads_payload(as_received(value)) == data


# --------------------------------------------------------------------------- the wire


def pickled(*sizes: int, stream: bytes = b"stream") -> Pickled:
    buffers = tuple(bytes([i]) * size for i, size in enumerate(sizes))
    return Pickled(stream, buffers, tuple(i % 2 == 0 for i in range(len(sizes))))


def task_spec(args: Any) -> TaskSpec:
    return TaskSpec("t1", "mod.f", "default", b"fn", args)


def test_each_buffer_is_a_frame_of_its_own_in_every_carrier() -> None:
    payload = pickled(LARGE, LARGE * 2)
    messages: list[tuple[bytes, Any]] = [
        (PRODUCER, Submit([task_spec(payload)])),
        (WORKER, Tasks([Assignment("t1", "mod.f", b"fn", payload, 1, None)])),
        (WORKER, Tasks([Assignment("t1", "mod.f", b"fn", b"args", 1, None, (("t0", payload),))])),
        (WORKER, Results([Outcome("t1", Status.OK, payload)], credit=1)),
        (PRODUCER, Outcomes([Outcome("t1", Status.OK, payload)])),
    ]
    for signature, msg in messages:
        frames = encode(signature, msg)
        assert len(frames) == 5
        assert [len(f) for f in frames[3:]] == [LARGE, LARGE * 2]
        assert frames[3] is payload.buffers[0]  # not copied, not joined
        assert len(frames[2]) < 1024
        _, got = decode([*frames[:3], *(memoryview(bytearray(f)) for f in frames[3:])])
        assert got == msg


def test_a_large_stream_is_a_frame_too_and_small_buffers_may_be_inline() -> None:
    payload = pickled(10, LARGE, stream=b"s" * (INLINE_BLOB_MAX + 1))
    frames = encode(PRODUCER, Submit([task_spec(payload)]))
    assert len(frames) == 5  # the stream and the large buffer; the 10 bytes stay in the body
    _, got = decode(frames)
    assert isinstance(got, Submit)
    assert got.tasks[0].args == payload


@pytest.mark.parametrize(
    "wire",
    [
        [b"s"],
        [b"s", [0], []],
        [b"s", [b"x"], [1]],
        [b"s", 0, []],
        [b"s", [5], [True]],
        [3.5, [], []],
    ],
)
def test_malformed_payloads_are_protocol_errors(wire: Any) -> None:
    body = [["t1", "mod.f", b"fn", wire, 1, None]]
    frames = [WORKER, bytes([Tasks.KIND]), msgpack.packb([body]), b"frame"]
    with pytest.raises(ProtocolError):
        decode(frames)


def test_the_journal_keeps_every_part_of_a_payload(tmp_path: Any) -> None:
    payload = pickled(LARGE, 3)
    spec = task_spec(payload)
    assert unpack_task(pack_task(spec)) == spec
    outcome = Outcome("t1", Status.OK, payload, None, 0.5)
    assert unpack_outcome(pack_outcome(outcome)) == outcome
    journal = SqliteJournal(str(tmp_path / "journal.db"))
    finished = TaskSpec("t2", "mod.f", "default", b"fn", b"args")
    journal.write(
        JournalBatch(submitted=[PendingTask(spec, "client", 1), PendingTask(finished, "client", 2)])
    )
    journal.write(JournalBatch(finished=[FinishedTask("t2", "client", "done", outcome, 1.0, 2)]))
    journal.close()
    recovered = SqliteJournal(str(tmp_path / "journal.db")).load()
    assert recovered.pending[0].spec == spec
    assert recovered.finished[0].outcome == outcome


# --------------------------------------------------------------------------- the pipe


def across_the_pipe(message: Any) -> Any:
    """``message`` sent by one end of a supervisor-executor pipe, as the other end reads it."""
    left, right = multiprocessing.Pipe(duplex=True)
    sender = threading.Thread(target=send_message, args=(left, message))
    try:
        sender.start()  # a large buffer fills the pipe: the reader must read meanwhile
        received = recv_message(right)
        sender.join(timeout=10)
    finally:
        left.close()
        right.close()
    return received


def test_the_pipe_delivers_read_only_buffers_as_bytes_and_writable_ones_writable() -> None:
    readonly = large_bytes()
    writable = bytearray(large_bytes(LARGE * 2))
    payload = Pickled(b"stream", (memoryview(bytearray(readonly)), writable), (True, False))
    ((seq, got, small),) = across_the_pipe([(1, pipe_form(payload), pipe_form(b"small"))])
    assert (seq, small) == (1, b"small")
    got = from_pipe(got)
    assert isinstance(got, Pickled)
    assert type(got.buffers[0]) is bytes
    assert got.buffers[0] == readonly
    assert not memoryview(got.buffers[1]).readonly
    assert bytes(got.buffers[1]) == writable
    assert got.readonly == (True, False)


def test_an_argument_crosses_the_pipe_into_the_bytes_the_task_receives() -> None:
    data = large_bytes()
    (got,) = across_the_pipe([pipe_form(as_received(dumps_call("f", (data,), {})))])
    payload = from_pipe(got)
    assert isinstance(payload, Pickled)
    args, _ = loads_payload(payload)
    assert args[0] == data
    assert args[0] is payload.buffers[0]  # read from the pipe straight into the argument


def test_a_numpy_result_crosses_the_pipe_writable() -> None:
    np = pytest.importorskip("numpy")
    array_ = np.arange(LARGE, dtype=np.uint8)
    (got,) = across_the_pipe([pipe_form(as_received(dumps_value(array_)))])
    value = loads_payload(from_pipe(got))
    assert np.array_equal(value, array_)
    assert value.flags.writeable


def test_the_pipe_stays_blocking_whatever_the_default_socket_timeout() -> None:
    left, right = multiprocessing.Pipe(duplex=True)
    data = large_bytes()
    sender = threading.Thread(target=send_message, args=(left, [pipe_form(dumps_value(data))]))
    socket.setdefaulttimeout(0.5)  # user code may set it in an executor
    try:
        sender.start()
        (got,) = recv_message(right)
        sender.join(timeout=10)
        assert os.get_blocking(right.fileno())  # the Connection relies on it
    finally:
        socket.setdefaulttimeout(None)
        left.close()
        right.close()
    assert loads_payload(from_pipe(got)) == data


# --------------------------------------------------------------------------- review fixes


class _ViewState:
    """Hands pickle a fresh memoryview as its state: short-lived, one per object."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __getstate__(self) -> memoryview:
        return memoryview(self.data)

    def __setstate__(self, state: bytes) -> None:
        self.data = bytes(state)


def test_short_lived_views_are_not_mistaken_for_each_other() -> None:
    # each view may be freed before the next is made, at the same address: an id() cache that
    # did not keep them alive sent the first one's bytes for all of them
    values = [_ViewState(bytes([i]) * 100_000) for i in range(5)]
    restored = loads_payload(dumps_value(values))
    assert [v.data[0] for v in restored] == [0, 1, 2, 3, 4]


class _ArrayLike:
    """Like a NumPy array: its buffer pickles out of band and it rebuilds over what it gets."""

    def __init__(self, buffer: Any) -> None:
        self.buffer = buffer

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return (_array_like, (pickle.PickleBuffer(self.buffer),))


def _array_like(buffer: Any) -> _ArrayLike:
    return _ArrayLike(memoryview(buffer))


@pytest.mark.parametrize("size", [OUT_OF_BAND_MIN, OUT_OF_BAND_MIN + 1])
def test_a_writable_buffer_comes_back_writable_by_every_path(size: int) -> None:
    payload = dumps_value(_ArrayLike(bytearray(size)))
    assert isinstance(payload, Pickled) and payload.readonly == (False,)
    outcome = Outcome("t", Status.OK, payload)
    over_the_wire = decode(encode(WORKER, Outcomes([outcome])))[1]
    assert isinstance(over_the_wire, Outcomes)
    from_journal = unpack_outcome(pack_outcome(outcome))
    for received in (over_the_wire.outcomes[0].value, from_journal.value):
        restored = loads_payload(received)
        assert not restored.buffer.readonly
        restored.buffer[0] = 1  # what `array += 1` does


def test_the_scan_finds_a_buffer_behind_many_scalars() -> None:
    value = {"numbers": list(range(5_000)), "blob": bytes(OUT_OF_BAND_MIN)}
    payload = dumps_value(value)
    assert isinstance(payload, Pickled) and len(payload.buffers) == 1
    assert loads_payload(payload) == value
