"""The ZeroMQ plumbing every shell shares: checking an address and making a socket."""

from __future__ import annotations

import re
import socket
from typing import Any

import zmq

from taskmesh.errors import BrokerUnavailable

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


def dealer(
    ctx: zmq.Context[Any], url: str, *, max_message_bytes: int | None = None
) -> zmq.Socket[Any]:
    """A DEALER connected to the broker: no linger, so closing never blocks on a dead broker."""
    check_endpoint(url)
    _resolve(url)
    sock: zmq.Socket[Any] = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
    if max_message_bytes:
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    try:
        sock.connect(url)
    except zmq.ZMQError as exc:
        sock.close(0)
        raise BrokerUnavailable(f"cannot connect to broker at {url}: {exc}") from None
    return sock


def _resolve(url: str) -> None:
    """Fail fast on a host name that does not resolve: ZeroMQ would retry it silently forever."""
    if not url.startswith("tcp://"):
        return
    host = url[len("tcp://") :].rsplit(":", 1)[0].strip("[]")
    try:
        socket.getaddrinfo(host, None)
    except OSError as exc:
        raise BrokerUnavailable(f"cannot resolve broker host {host!r} in {url}: {exc}") from None
