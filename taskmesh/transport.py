"""The ZeroMQ plumbing every shell shares: checking an address, making a socket, and watching
its handshakes with the broker."""

from __future__ import annotations

import re
import socket
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from taskmesh.errors import BrokerUnavailable
from taskmesh.security import CurveKeys

_ENDPOINT = re.compile(
    r"^(tcp://(\[[0-9a-fA-F:.]+\]|[^\s:/\[\]]+):(\d+|\*)|ipc://\S+|inproc://\S+)$"
)


def check_endpoint(url: str, *, what: str = "broker address") -> str:
    """Return ``url`` if it is a usable ZeroMQ endpoint; else raise ``BrokerUnavailable``."""
    if not isinstance(url, str) or not _ENDPOINT.match(url):
        raise BrokerUnavailable(
            f"invalid {what} {url!r}: expected tcp://HOST:PORT (for example tcp://127.0.0.1:5555)"
            " or ipc://PATH"
        )
    if url.startswith("tcp://"):
        port = url.rsplit(":", 1)[1]
        if port != "*" and not 0 <= int(port) <= 65535:
            raise BrokerUnavailable(f"invalid {what} {url!r}: port {port} is out of range")
    return url


def watched_dealer(
    ctx: zmq.Context[Any],
    url: str,
    *,
    max_message_bytes: int | None = None,
    curve: CurveKeys | None = None,
) -> tuple[zmq.Socket[Any], HandshakeWatch]:
    """A DEALER connected to the broker (no linger, so closing never blocks on a dead broker;
    a CurveZMQ client with ``curve``), with a ``HandshakeWatch`` attached before it connects:
    on loopback a refused handshake can be over before a monitor attached afterwards would
    hear of it."""
    sock = _dealer_socket(ctx, url, max_message_bytes, curve)
    watch = HandshakeWatch(sock, curve is not None)
    try:
        _connect(sock, url)
    except BrokerUnavailable:
        watch.close()
        raise
    return sock, watch


def _dealer_socket(
    ctx: zmq.Context[Any], url: str, max_message_bytes: int | None, curve: CurveKeys | None
) -> zmq.Socket[Any]:
    check_endpoint(url)
    _resolve(url)
    sock: zmq.Socket[Any] = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, 0)
    if curve is not None:
        curve.apply(sock)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
    if max_message_bytes:
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    return sock


def _connect(sock: zmq.Socket[Any], url: str) -> None:
    try:
        sock.connect(url)
    except zmq.ZMQError as exc:
        sock.close(0)
        raise BrokerUnavailable(f"cannot connect to broker at {url}: {exc}") from None


def _resolve(url: str) -> None:
    """Fail fast on a host name that does not resolve: ZeroMQ would retry it silently forever."""
    if not url.startswith("tcp://"):
        return
    host = url[len("tcp://") :].rsplit(":", 1)[0].strip("[]")
    try:
        socket.getaddrinfo(host, None)
    except OSError as exc:
        raise BrokerUnavailable(f"cannot resolve broker host {host!r} in {url}: {exc}") from None


_HANDSHAKES = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
_MECHANISM_MISMATCH = 0x11000002  # ZMQ_PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH


class HandshakeWatch:
    """How a DEALER's handshakes with the broker end, from a ZeroMQ socket monitor.

    A refusal (the broker rejected the key, or the two sides disagree on CurveZMQ) is final:
    libzmq does not reconnect that socket, so the caller must report it, not wait."""

    def __init__(self, sock: zmq.Socket[Any], curve: bool) -> None:
        self._sock = sock
        self.socket: zmq.Socket[Any] = sock.get_monitor_socket(_HANDSHAKES)
        self.curve = curve
        self.hint = ""  # why the last handshake failed, for a timeout's message

    def refusal(self) -> str | None:
        """Read every event waiting; the explanation of a refusal among them, or ``None``."""
        refused = None
        while True:
            try:
                event = recv_monitor_message(self.socket, zmq.NOBLOCK)
            except zmq.Again:
                return refused
            kind, value = event["event"], event["value"]
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.hint = ""
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                refused = (
                    "the broker refused this peer's CurveZMQ key: check that its public key is "
                    "in the broker's folder for its role (--producers, --workers or --readers)"
                )
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                if value == _MECHANISM_MISMATCH and not self.curve:
                    refused = (
                        "the broker requires CurveZMQ keys: pass --curve-secret and --broker-key "
                        "(or set TASKMESH_CURVE_SECRET and TASKMESH_BROKER_KEY)"
                    )
                elif value == _MECHANISM_MISMATCH:
                    refused = (
                        "the broker does not use CurveZMQ (it runs without --curve-secret), but "
                        "this peer has keys"
                    )
                else:
                    refused = f"the CurveZMQ handshake failed (protocol error {value:#x})"
            elif self.curve:  # the broker hung up mid-handshake: it could not decrypt us
                self.hint = (
                    "the CurveZMQ handshake failed: check that --broker-key is the broker's "
                    "public key"
                )
            if refused:
                self.hint = refused

    def close(self) -> None:
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.socket.close(0)
