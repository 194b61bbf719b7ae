"""The wire format: every message round-trips, and malformed frames raise ProtocolError only."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taskmesh.errors import ProtocolError
from taskmesh.protocol import (
    INLINE_BLOB_MAX,
    PRODUCER,
    PROTOCOL_VERSION,
    SIGNATURES,
    WORKER,
    Abort,
    Ack,
    Assignment,
    Bye,
    Cancel,
    Credit,
    Delivered,
    Disconnect,
    Error,
    ErrorInfo,
    Heartbeat,
    Hello,
    Kind,
    Message,
    Outcome,
    Outcomes,
    PeriodicTask,
    Ready,
    Reconnect,
    Release,
    Results,
    ResultsAck,
    Schedule,
    Status,
    StatusReply,
    StatusRequest,
    Submit,
    Tasks,
    TaskSpec,
    Unschedule,
    Watch,
    Welcome,
    allowed,
    decode,
    encode,
)

pytestmark = pytest.mark.timeout(60)

# Deterministic fuzzing: the same examples on every run, no example database on disk.
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=300,
    suppress_health_check=[HealthCheck.too_slow],
)

BIG = INLINE_BLOB_MAX + 1

ERROR_INFO = ErrorInfo(
    "builtins.ValueError", "bad value", "Traceback...\nValueError: bad value\n", ("ValueError",)
)


def spec(task_id: str = "t1", *, fn: bytes = b"fn", args: bytes = b"args") -> TaskSpec:
    return TaskSpec(
        task_id=task_id,
        name="mod.add",
        queue="cpu",
        fn=fn,
        args=args,
        priority=7,
        timeout_s=2.5,
        retries=2,
        max_attempts=4,
        countdown_s=1.25,
        key="user-42",
    )


# One instance of every message kind, with non-default values where a field has a default.
EVERY_MESSAGE: list[Message] = [
    Hello("client-1", "producer", "host-a", 1234),
    Submit([spec("t1"), spec("t2")]),
    Submit([]),
    Cancel(["t1", "t2"], terminate=True),
    StatusRequest(),
    Watch(["t1"]),
    Delivered(["t1", "t2"]),
    Schedule([PeriodicTask("nightly", None, "0 3 * * *", spec("tpl"))]),
    Schedule([PeriodicTask("tick", 30.0, None, spec("tpl"))]),
    Unschedule(["nightly"]),
    Bye(),
    Ready("w-1", "worker", "host-b", 99, ["default", "cpu"], 4, 3),
    Ready("w-1", "worker", "host-b", 99, ["default"], 4, 2, held=["t1", "t2"]),
    Credit(5),
    Results([Outcome("t1", Status.OK, b"value", None, 0.5)], credit=2),
    Results([], credit=1, started=["t2", "t3"]),
    Disconnect(),
    Release(["t1", "t2"]),
    Welcome("broker-1", 1.5, 3),
    Ack(["t1", "t2"]),
    Outcomes(
        [
            Outcome("t1", Status.ERROR, b"exc", ERROR_INFO, 0.25),
            Outcome("t2", Status.WORKER_LOST),
        ]
    ),
    StatusReply({"workers": [{"name": "w"}], "queues": [], "counters": {"done": 3}}),
    Tasks([Assignment("t1", "mod.add", b"fn", b"args", 2, 30.0)]),
    Tasks([Assignment("t1", "mod.add", b"fn", b"args", 1, None)]),
    Tasks([Assignment("t2", "mod.add", b"fn", b"args", 1, None, (("t1", b"5"),))]),
    ResultsAck(["t1"]),
    Abort(["t1", "t3"]),
    Heartbeat(),
    Reconnect(),
    Error("bad-credit", "invalid credit -1", ["t1"]),
]


def test_every_kind_has_a_sample() -> None:
    assert {m.KIND for m in EVERY_MESSAGE} == set(Kind)


@pytest.mark.parametrize("msg", EVERY_MESSAGE, ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("signature", SIGNATURES, ids=["producer", "worker"])
def test_round_trip(signature: bytes, msg: Message) -> None:
    frames = encode(signature, msg)
    assert frames[0] == signature
    assert frames[1] == bytes([msg.KIND])
    assert len(frames) == 3  # every blob here is small: nothing out of band
    got_signature, got = decode(frames)
    assert got_signature == signature
    assert type(got) is type(msg)
    assert got == msg


def test_results_from_a_worker_without_start_reports_still_decode() -> None:
    body = msgpack.packb([[], 3], use_bin_type=True)
    _, msg = decode([WORKER, bytes([Kind.RESULTS]), body])
    assert msg == Results([], 3, [])


def test_kind_values_are_fixed() -> None:
    # these bytes are on the wire: changing one breaks every deployed peer
    assert Kind.HELLO == 0x01
    assert Kind.SUBMIT == 0x02
    assert Kind.READY == 0x21
    assert Kind.RESULTS == 0x23
    assert Kind.OUTCOMES == 0x43
    assert Kind.TASKS == 0x61
    assert Kind.HEARTBEAT == 0x70
    assert Kind.ERROR == 0x7F
    assert (PRODUCER[:3], PRODUCER[3]) == (b"TMP", PROTOCOL_VERSION)
    assert (WORKER[:3], WORKER[3]) == (b"TMW", PROTOCOL_VERSION)


def test_blob_at_the_inline_limit_stays_in_the_body() -> None:
    blob = b"x" * INLINE_BLOB_MAX
    frames = encode(PRODUCER, Submit([spec(fn=blob)]))
    assert len(frames) == 3
    _, got = decode(frames)
    assert isinstance(got, Submit)
    assert got.tasks[0].fn == blob


def test_large_blobs_travel_as_extra_frames() -> None:
    fn = b"f" * BIG
    args = bytes(range(256)) * (BIG // 256 + 1)
    msg = Submit([spec("t1", fn=fn, args=b"small"), spec("t2", fn=b"small", args=args)])
    frames = encode(PRODUCER, msg)
    assert len(frames) == 5
    assert frames[3] == fn
    assert frames[4] == args
    assert len(frames[2]) < 1024  # the body holds frame indexes, not the blobs
    _, got = decode(frames)
    assert got == msg
    assert isinstance(got, Submit)
    assert bytes(got.tasks[0].fn) == fn
    assert bytes(got.tasks[1].args) == args


@pytest.mark.parametrize(
    "msg",
    [
        Tasks([Assignment("t1", "n", b"a" * BIG, b"b" * BIG, 1, None)]),
        Results([Outcome("t1", Status.OK, b"r" * BIG)], credit=1),
        Outcomes([Outcome("t1", Status.OK, b"r" * BIG), Outcome("t2", Status.OK, b"s" * BIG)]),
    ],
    ids=["tasks", "results", "outcomes"],
)
def test_large_blobs_round_trip_in_every_carrier(msg: Message) -> None:
    frames = encode(WORKER, msg)
    assert len(frames) > 3
    _, got = decode(frames)
    assert got == msg


def test_memoryview_blobs_round_trip_inline_and_out_of_band() -> None:
    small = memoryview(b"small result")
    large = memoryview(bytearray(b"L" * BIG))
    msg = Results([Outcome("t1", Status.OK, small), Outcome("t2", Status.OK, large)], credit=2)
    frames = encode(WORKER, msg)
    assert len(frames) == 4
    # a frame received as a memoryview (zero-copy) decodes as well
    frames = [*frames[:3], memoryview(bytes(frames[3]))]
    _, got = decode(frames)
    assert isinstance(got, Results)
    assert bytes(got.outcomes[0].value) == b"small result"
    assert bytes(got.outcomes[1].value) == b"L" * BIG
    assert got.credit == 2


def test_decode_accepts_memoryview_frames_everywhere() -> None:
    frames = encode(PRODUCER, Hello("c", "n", "h", 1))
    _, got = decode([memoryview(bytes(f)) for f in frames])
    assert got == Hello("c", "n", "h", 1)


@pytest.mark.parametrize(
    ("signature", "msg", "expected"),
    [
        (PRODUCER, Submit([]), True),
        (PRODUCER, Heartbeat(), True),
        (PRODUCER, Ready("w", "n", "h", 1, ["q"], 1, 1), False),
        (WORKER, Ready("w", "n", "h", 1, ["q"], 1, 1), True),
        (WORKER, Results([]), True),
        (WORKER, Submit([]), False),
        (WORKER, Tasks([]), False),  # broker -> worker only
        (PRODUCER, Outcomes([]), False),  # broker -> producer only
    ],
)
def test_allowed(signature: bytes, msg: Message, expected: bool) -> None:
    assert allowed(signature, msg) is expected


# --------------------------------------------------------------------------- malformed input


def frames_for(kind: Kind, body: Any, *blobs: bytes, signature: bytes = PRODUCER) -> list[bytes]:
    return [signature, bytes([kind]), msgpack.packb(body, use_bin_type=True), *blobs]


def good_task_wire(**override: Any) -> list[Any]:
    """A valid task as it sits in a SUBMIT body, with some fields replaced by name."""
    valid = TaskSpec("t1", "name", "q", b"fn", b"args")
    body = msgpack.unpackb(encode(PRODUCER, Submit([valid]))[2], raw=False)
    wire: list[Any] = body[0][0]
    names = [f.name for f in dataclasses.fields(TaskSpec)]
    assert len(wire) == len(names)  # the wire order is the declaration order
    for name, value in override.items():
        wire[names.index(name)] = value
    return wire


def test_good_task_wire_is_valid() -> None:
    # the baseline of the malformed cases below decodes
    _, got = decode(frames_for(Kind.SUBMIT, [[good_task_wire()]]))
    assert isinstance(got, Submit)
    assert got.tasks[0].task_id == "t1"


MALFORMED: dict[str, list[Any]] = {
    "no frames": [],
    "one frame": [PRODUCER],
    "two frames": [PRODUCER, bytes([Kind.HEARTBEAT])],
    "empty signature": [b"", bytes([Kind.HEARTBEAT]), msgpack.packb([])],
    "bad signature": [b"HTTP", bytes([Kind.HEARTBEAT]), msgpack.packb([])],
    "three byte signature": [b"TMP", bytes([Kind.HEARTBEAT]), msgpack.packb([])],
    "long signature": [PRODUCER + b"x", bytes([Kind.HEARTBEAT]), msgpack.packb([])],
    "version 0": [b"TMP\x00", bytes([Kind.HEARTBEAT]), msgpack.packb([])],
    "version 3 worker": [b"TMW\x03", bytes([Kind.HEARTBEAT]), msgpack.packb([])],
    "empty kind": [PRODUCER, b"", msgpack.packb([])],
    "two byte kind": [PRODUCER, b"\x70\x00", msgpack.packb([])],
    "unknown kind 0x00": [PRODUCER, b"\x00", msgpack.packb([])],
    "unknown kind 0xff": [PRODUCER, b"\xff", msgpack.packb([])],
    "empty body": [PRODUCER, bytes([Kind.HEARTBEAT]), b""],
    "truncated body": [PRODUCER, bytes([Kind.HELLO]), msgpack.packb(["c", "n", "h", 1])[:-2]],
    "trailing bytes": [PRODUCER, bytes([Kind.HEARTBEAT]), msgpack.packb([]) + b"\x00"],
    "reserved msgpack byte": [PRODUCER, bytes([Kind.HEARTBEAT]), b"\xc1"],
    "non-string map key": [PRODUCER, bytes([Kind.STATUS_REPLY]), msgpack.packb([{1: 2}])],
    "body not an array": frames_for(Kind.HEARTBEAT, {"a": 1}),
    "body a scalar": frames_for(Kind.HELLO, 5),
    "heartbeat with a field": frames_for(Kind.HEARTBEAT, [1]),
    "hello too few fields": frames_for(Kind.HELLO, ["c", "n", "h"]),
    "hello too many fields": frames_for(Kind.HELLO, ["c", "n", "h", 1, 2]),
    "hello pid a string": frames_for(Kind.HELLO, ["c", "n", "h", "1"]),
    "hello pid a bool": frames_for(Kind.HELLO, ["c", "n", "h", True]),
    "hello client id bytes": frames_for(Kind.HELLO, [b"c", "n", "h", 1]),
    "cancel terminate an int": frames_for(Kind.CANCEL, [["t1"], 1]),
    "cancel ids not a list": frames_for(Kind.CANCEL, ["t1", False]),
    "watch ids of ints": frames_for(Kind.WATCH, [[1, 2]]),
    "credit a float": frames_for(Kind.CREDIT, [1.5], signature=WORKER),
    "ready queues a string": frames_for(
        Kind.READY, ["w", "n", "h", 1, "default", 1, 1], signature=WORKER
    ),
    "welcome interval a string": frames_for(Kind.WELCOME, ["b", "1.0", 3]),
    "status reply not a map": frames_for(Kind.STATUS_REPLY, [[1, 2]]),
    "error task ids a map": frames_for(Kind.ERROR, ["c", "m", {"t": 1}]),
    "submit no fields": frames_for(Kind.SUBMIT, []),
    "submit tasks not a list": frames_for(Kind.SUBMIT, [{"t": 1}]),
    "task too few fields": frames_for(Kind.SUBMIT, [[good_task_wire()[:-1]]]),
    "task not a list": frames_for(Kind.SUBMIT, [["t1"]]),
    "task id an int": frames_for(Kind.SUBMIT, [[good_task_wire(task_id=1)]]),
    "task fn a string": frames_for(Kind.SUBMIT, [[good_task_wire(fn="fn")]]),
    "task fn a float": frames_for(Kind.SUBMIT, [[good_task_wire(fn=1.0)]]),
    "task fn a bool": frames_for(Kind.SUBMIT, [[good_task_wire(fn=True)]]),
    "task priority a float": frames_for(Kind.SUBMIT, [[good_task_wire(priority=1.5)]]),
    "task timeout a string": frames_for(Kind.SUBMIT, [[good_task_wire(timeout_s="1")]]),
    "task max_attempts 0": frames_for(Kind.SUBMIT, [[good_task_wire(max_attempts=0)]]),
    "task retries negative": frames_for(Kind.SUBMIT, [[good_task_wire(retries=-1)]]),
    "task countdown None": frames_for(Kind.SUBMIT, [[good_task_wire(countdown_s=None)]]),
    "task key an int": frames_for(Kind.SUBMIT, [[good_task_wire(key=5)]]),
    "task id empty": frames_for(Kind.SUBMIT, [[good_task_wire(task_id="")]]),
    "task queue empty": frames_for(Kind.SUBMIT, [[good_task_wire(queue="")]]),
    "task timeout zero": frames_for(Kind.SUBMIT, [[good_task_wire(timeout_s=0.0)]]),
    "task timeout nan": frames_for(Kind.SUBMIT, [[good_task_wire(timeout_s=float("nan"))]]),
    "task countdown negative": frames_for(Kind.SUBMIT, [[good_task_wire(countdown_s=-1.0)]]),
    "task countdown nan": frames_for(Kind.SUBMIT, [[good_task_wire(countdown_s=float("nan"))]]),
    "blob frame index missing": frames_for(Kind.SUBMIT, [[good_task_wire(fn=0)]]),
    "blob frame index past the end": frames_for(
        Kind.SUBMIT, [[good_task_wire(fn=0, args=1)]], b"only one blob"
    ),
    "blob frame index negative": frames_for(Kind.SUBMIT, [[good_task_wire(fn=-1)]], b"blob"),
    "blob frame index huge": frames_for(Kind.SUBMIT, [[good_task_wire(fn=2**64 - 1)]], b"b"),
    "assignment too many fields": frames_for(
        Kind.TASKS, [[["t1", "n", b"f", b"a", 1, None, "extra"]]], signature=WORKER
    ),
    "assignment attempt a string": frames_for(
        Kind.TASKS, [[["t1", "n", b"f", b"a", "1", None]]], signature=WORKER
    ),
    "assignment blob index out of range": frames_for(
        Kind.TASKS, [[["t1", "n", 3, b"a", 1, None]]], b"x", signature=WORKER
    ),
    "results missing credit": frames_for(Kind.RESULTS, [[]], signature=WORKER),
    "results credit a string": frames_for(Kind.RESULTS, [[], "1"], signature=WORKER),
    "outcome unknown status": frames_for(
        Kind.RESULTS, [[["t1", 99, b"", None, 0.0]], 0], signature=WORKER
    ),
    "outcome negative status": frames_for(Kind.OUTCOMES, [[["t1", -1, b"", None, 0.0]]]),
    "outcome status a string": frames_for(Kind.OUTCOMES, [[["t1", "OK", b"", None, 0.0]]]),
    "outcome status a bool": frames_for(Kind.OUTCOMES, [[["t1", True, b"", None, 0.0]]]),
    "outcome value index out of range": frames_for(Kind.OUTCOMES, [[["t1", 0, 0, None, 0.0]]]),
    "outcome too few fields": frames_for(Kind.OUTCOMES, [[["t1", 0, b"", None]]]),
    "outcome error not a list": frames_for(Kind.OUTCOMES, [[["t1", 1, b"", "oops", 0.0]]]),
    "outcome error wrong arity": frames_for(Kind.OUTCOMES, [[["t1", 1, b"", ["T", "m"], 0.0]]]),
    "outcome error mro of ints": frames_for(
        Kind.OUTCOMES, [[["t1", 1, b"", ["T", "m", "tb", [1]], 0.0]]]
    ),
    "outcome run_s a string": frames_for(Kind.OUTCOMES, [[["t1", 0, b"", None, "0"]]]),
}


@pytest.mark.parametrize("frames", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_frames_raise_protocol_error(frames: list[bytes]) -> None:
    with pytest.raises(ProtocolError):
        decode(frames)


def test_unsupported_version_is_named_in_the_error() -> None:
    with pytest.raises(ProtocolError, match="version 1 is not supported"):
        decode([b"TMP\x01", bytes([Kind.HEARTBEAT]), msgpack.packb([])])


def test_unknown_outcome_status_is_named_in_the_error() -> None:
    frames = frames_for(Kind.OUTCOMES, [[["t1", 42, b"", None, 0.0]]])
    with pytest.raises(ProtocolError, match="42"):
        decode(frames)


def test_out_of_range_blob_index_is_named_in_the_error() -> None:
    frames = frames_for(Kind.SUBMIT, [[good_task_wire(args=5)]], b"blob0")
    with pytest.raises(ProtocolError, match="frame 5"):
        decode(frames)


# --------------------------------------------------------------------------- fuzzing

texts = st.text(max_size=12)
ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
scalars = (
    st.none()
    | st.booleans()
    | ints
    | st.floats(allow_nan=True, allow_infinity=True)
    | texts
    | st.binary(max_size=16)
)
msgpack_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=6) | st.dictionaries(texts, children, max_size=4),
    max_leaves=30,
)
signatures = st.sampled_from([*SIGNATURES, b"TMP\x01", b"TMW\x03", b"TMX\x02", b""])
kind_bytes = st.sampled_from([bytes([k]) for k in Kind]) | st.binary(max_size=2)
blob_frames = st.lists(st.binary(max_size=16), max_size=3)


def check_decode(frames: list[Any]) -> None:
    """decode returns a well-formed message or raises ProtocolError; nothing else escapes."""
    try:
        signature, msg = decode(frames)
    except ProtocolError:
        return
    assert signature in SIGNATURES
    assert signature == bytes(frames[0])
    assert bytes([msg.KIND]) == bytes(frames[1])
    assert dataclasses.is_dataclass(msg)


@FUZZ
@given(st.lists(st.binary(max_size=40), max_size=6))
def test_fuzz_decode_arbitrary_binary_frames(frames: list[bytes]) -> None:
    check_decode(frames)


@FUZZ
@given(signatures, kind_bytes, msgpack_values, blob_frames)
def test_fuzz_decode_random_msgpack_bodies(
    signature: bytes, kind: bytes, body: Any, blobs: list[bytes]
) -> None:
    check_decode([signature, kind, msgpack.packb(body, use_bin_type=True), *blobs])


@FUZZ
@given(
    st.sampled_from(list(Kind)),
    st.lists(scalars | st.lists(scalars, max_size=3), max_size=12),
    blob_frames,
)
def test_fuzz_decode_bodies_shaped_like_arrays_of_fields(
    kind: Kind, fields: list[Any], blobs: list[bytes]
) -> None:
    # arrays of the right length reach the per-field checks rather than the arity check
    check_decode([PRODUCER, bytes([kind]), msgpack.packb(fields, use_bin_type=True), *blobs])


WITH_BLOB_FRAME = Results([Outcome("t1", Status.OK, b"v" * BIG)], credit=1)


def _replace_leaf(value: Any, path: list[int], new: Any) -> Any:
    """Replace one element of a nested list body, chosen by ``path`` (indexes taken modulo)."""
    if not path or not isinstance(value, list) or not value:
        return new
    i = path[0] % len(value)
    copy = list(value)
    copy[i] = _replace_leaf(value[i], path[1:], new)
    return copy


@FUZZ
@given(
    st.sampled_from([*EVERY_MESSAGE, WITH_BLOB_FRAME]),
    st.lists(st.integers(min_value=0, max_value=20), min_size=1, max_size=4),
    msgpack_values,
    st.booleans(),
)
def test_fuzz_decode_mutated_valid_messages(
    msg: Message, path: list[int], new: Any, keep_blob_frames: bool
) -> None:
    frames = encode(WORKER, msg)
    body = msgpack.unpackb(frames[2], raw=False)
    mutated = msgpack.packb(_replace_leaf(body, path, new), use_bin_type=True)
    blobs = list(frames[3:]) if keep_blob_frames else []
    check_decode([frames[0], frames[1], mutated, *blobs])


blobs_st = st.binary(max_size=24) | st.sampled_from([b"\x00" * BIG])
opt_float = st.none() | st.floats(allow_nan=False, min_value=-1e9, max_value=1e9)
nonempty = st.text(min_size=1, max_size=12)
positive = st.floats(min_value=1e-3, max_value=1e9)
task_specs = st.builds(
    TaskSpec,
    task_id=nonempty,
    name=texts,
    queue=nonempty,
    fn=blobs_st,
    args=blobs_st,
    priority=st.integers(-(2**31), 2**31),
    timeout_s=st.none() | positive,
    retries=st.integers(0, 100),
    max_attempts=st.integers(1, 100),
    countdown_s=st.floats(allow_nan=False, min_value=0, max_value=1e6),
    key=st.none() | texts,
    retry_backoff_s=st.floats(allow_nan=False, min_value=0, max_value=1e6),
    retry_on=st.lists(texts, max_size=3).map(tuple),
)
error_infos = st.builds(ErrorInfo, texts, texts, texts, st.lists(texts, max_size=3).map(tuple))
outcomes_st = st.builds(
    Outcome,
    task_id=texts,
    status=st.sampled_from(list(Status)),
    value=blobs_st,
    error=st.none() | error_infos,
    run_s=st.floats(allow_nan=False, min_value=0, max_value=1e6),
)
assignments = st.builds(
    Assignment, texts, texts, blobs_st, blobs_st, st.integers(1, 1000), opt_float
)
messages = st.one_of(
    st.builds(Submit, st.lists(task_specs, max_size=3)),
    st.builds(Tasks, st.lists(assignments, max_size=3)),
    st.builds(Results, st.lists(outcomes_st, max_size=3), st.integers(0, 1000)),
    st.builds(Outcomes, st.lists(outcomes_st, max_size=3)),
    st.builds(Hello, texts, texts, texts, st.integers(0, 2**31)),
    st.builds(Cancel, st.lists(texts, max_size=3), st.booleans()),
    st.builds(Error, texts, texts, st.lists(texts, max_size=3)),
)


@FUZZ
@given(st.sampled_from(SIGNATURES), messages)
def test_fuzz_round_trip(signature: bytes, msg: Message) -> None:
    got_signature, got = decode(encode(signature, msg))
    assert got_signature == signature
    assert got == msg
