"""A live broker fed garbage: malformed frames, wrong versions, oversized messages, raw TCP
noise. It must log and drop each, answer ``Error`` where the sender can be addressed, and keep
serving real work."""

from __future__ import annotations

import socket
from typing import Any

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taskmesh import protocol as p
from taskmesh.testing import Mesh

MAX_MESSAGE = 64 * 1024


@pytest.fixture(scope="module")
def mesh() -> Any:
    m = Mesh(workers=1, concurrency=1, broker_args=["--max-message-bytes", str(MAX_MESSAGE)])
    m.start()
    try:
        yield m
    except BaseException:
        print(m.logs()[-4000:])
        raise
    finally:
        m.stop()


@pytest.fixture
def raw(mesh: Mesh) -> Any:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(mesh.url)
    yield sock
    sock.close(0)
    ctx.term()


def _still_serves(mesh: Mesh) -> None:
    with mesh.client() as client:
        assert client.submit(pow, 3, 4).result(timeout=15) == 81
    assert mesh.broker is not None and mesh.broker.alive()


def _reply(sock: Any, timeout_s: float = 5.0) -> p.Message | None:
    if not sock.poll(int(timeout_s * 1000)):
        return None
    _, msg = p.decode(sock.recv_multipart())
    return msg


@pytest.mark.timeout(60)
def test_malformed_messages_get_a_protocol_error_reply(mesh: Mesh, raw: Any) -> None:
    cases = [
        [p.PRODUCER, bytes([p.Kind.SUBMIT]), b"\xc1not msgpack"],
        [p.PRODUCER, bytes([p.Kind.SUBMIT]), msgpack.packb([[["only", "three", "fields"]]])],
        [p.PRODUCER, b"\xee", msgpack.packb([])],
        [p.PRODUCER, bytes([p.Kind.TASKS]), msgpack.packb([[]])],  # a broker->worker kind
        [p.WORKER, bytes([p.Kind.SUBMIT]), msgpack.packb([[]])],  # a producer kind as worker
    ]
    for frames in cases:
        raw.send_multipart(frames)
        reply = _reply(raw)
        assert isinstance(reply, p.Error), frames
        assert reply.code == "protocol"
    _still_serves(mesh)


@pytest.mark.timeout(60)
def test_wrong_version_unknown_signature_and_oversize_are_dropped(mesh: Mesh, raw: Any) -> None:
    raw.send_multipart([b"TMP\x09", bytes([p.Kind.HELLO]), msgpack.packb(["x", "", "", 0])])
    raw.send_multipart([b"GET / HTTP/1.1", b"", b""])
    raw.send_multipart([b"x"])
    # none of those can be answered; a valid request afterwards still is
    raw.send_multipart(p.encode(p.PRODUCER, p.StatusRequest()))
    assert isinstance(_reply(raw, 10.0), p.StatusReply)
    # an oversized message makes the broker drop that connection (ZMQ_MAXMSGSIZE)
    raw.send_multipart([p.PRODUCER, bytes([p.Kind.STATUS]), msgpack.packb([]), b"\0" * 200_000])
    assert _reply(raw, 1.0) is None
    _still_serves(mesh)


@pytest.mark.timeout(60)
def test_a_message_over_the_limit_in_many_small_frames_is_refused(mesh: Mesh, raw: Any) -> None:
    # each frame is under MAXMSGSIZE, the whole is not: a payload split into buffer frames
    frames = [p.PRODUCER, bytes([p.Kind.STATUS]), msgpack.packb([])]
    frames += [b"\0" * (MAX_MESSAGE // 4)] * 8
    raw.send_multipart(frames)
    reply = _reply(raw)
    assert isinstance(reply, p.Error) and "size limit" in reply.message
    _still_serves(mesh)


@pytest.mark.timeout(60)
def test_raw_tcp_noise(mesh: Mesh) -> None:
    host, port = mesh.url[len("tcp://") :].rsplit(":", 1)
    for payload in (b"\xff" * 64, b"GET / HTTP/1.0\r\n\r\n", bytes(range(256)) * 50, b""):
        with socket.create_connection((host, int(port)), timeout=5) as conn:
            conn.sendall(payload)
    _still_serves(mesh)


frame = st.binary(max_size=64)
valid_prefix = st.tuples(
    st.sampled_from(p.SIGNATURES), st.sampled_from([bytes([k]) for k in p.Kind])
)
msgpack_body = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=8) | frame,
    lambda children: st.lists(children, max_size=6),
    max_leaves=20,
).map(lambda v: msgpack.packb(v, use_bin_type=True))


@pytest.mark.timeout(120)
@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    st.one_of(
        st.lists(frame, min_size=1, max_size=5),
        st.tuples(valid_prefix, msgpack_body).map(lambda t: [*t[0], t[1]]),
    )
)
def test_fuzzed_frames_never_stop_the_broker(mesh: Mesh, raw: Any, frames: list[bytes]) -> None:
    raw.send_multipart(frames)
    assert mesh.broker is not None and mesh.broker.alive()


@pytest.mark.timeout(60)
def test_broker_serves_after_fuzzing(mesh: Mesh) -> None:
    _still_serves(mesh)
    log = mesh.broker.output() if mesh.broker else ""
    assert "Traceback" not in log, log[-3000:]
