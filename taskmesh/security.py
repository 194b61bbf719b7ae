"""CurveZMQ keys and the broker's ZAP authenticator.

A key pair is two files in the format of ``zmq.auth`` (and czmq): ``NAME.key`` holds the public
key and may be shared; ``NAME.key_secret`` holds the secret key too and is created mode 0600.

The broker lets in a peer only if its public key is in one of the role folders (``KeyRing``).
Its ZAP handler (``ZapHandler``) answers every CURVE handshake: an allowed key's roles become the
connection's ``User-Id`` and the key itself its ``X-Key`` property, which libzmq attaches to every
message from that peer. The broker shell checks both on each message (``may_send``), so a role
is enforced by key, never by the signature a peer chooses, and a key removed from its folder
loses its service on the next message, not only on its next connection.
"""

from __future__ import annotations

import datetime
import functools
import logging
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.utils import z85

from taskmesh import protocol as p
from taskmesh.errors import TaskmeshError

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # where libzmq asks; one handler per context
ZAP_DOMAIN = b"taskmesh"
KEY_PROPERTY = "X-Key"  # connection property carrying the peer's public key (z85)


class Role(StrEnum):
    PRODUCER = "producer"  # submit, cancel, watch, read status
    WORKER = "worker"  # register and take tasks
    READER = "reader"  # read status only (dashboards, monitoring)


def may_send(roles: Iterable[Role], signature: bytes, kind: p.Kind) -> bool:
    """Whether a peer holding ``roles`` may send a message of ``kind`` speaking ``signature``."""
    for role in roles:
        if role is Role.PRODUCER and signature == p.PRODUCER:
            return True
        if role is Role.WORKER and signature == p.WORKER:
            return True
        if role is Role.READER and signature == p.PRODUCER and kind is p.Kind.STATUS:
            return True
    return False


# --------------------------------------------------------------------------- key files


@dataclass(frozen=True, slots=True)
class KeyFiles:
    public: Path
    secret: Path


def generate_keypair(name: str, out_dir: str | os.PathLike[str]) -> KeyFiles:
    """Write ``NAME.key`` and ``NAME.key_secret`` (mode 0600) into ``out_dir``; never overwrite."""
    if not name or name != os.path.basename(name) or name.startswith("."):
        raise TaskmeshError(f"invalid key name {name!r}: use a plain file name such as worker-1")
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.curve_keypair()
    files = KeyFiles(folder / f"{name}.key", folder / f"{name}.key_secret")
    for path in (files.public, files.secret):
        if path.exists():
            raise TaskmeshError(f"{path} exists; remove it first or choose another name")
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    header = f"#   taskmesh CurveZMQ key {name!r}, generated {stamp}\n"
    # the secret first, created 0600 from the start: it is never readable by others, not even
    # for a moment; O_EXCL refuses a file (or a planted symlink) that appeared meanwhile
    _write_new(
        files.secret,
        0o600,
        header + "#   SECRET: keep this file on the machine it belongs to, mode 0600\n"
        f'metadata\ncurve\n    public-key = "{public.decode()}"\n'
        f'    secret-key = "{secret.decode()}"\n',
    )
    _write_new(
        files.public,
        0o644,
        header + "#   public: copy it to the peers that must know this key\n"
        f'metadata\ncurve\n    public-key = "{public.decode()}"\n',
    )
    return files


def _write_new(path: Path, mode: int, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, mode)  # the umask may have taken bits away from a public file


def load_public_key(path: str | os.PathLike[str]) -> bytes:
    """The z85 public key in a ``.key`` or ``.key_secret`` file."""
    public, _ = _load(path)
    return public


def load_secret_key(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """``(public, secret)`` from a ``.key_secret`` file, both z85; checks that they match."""
    public, secret = _load(path)
    if secret is None:
        raise TaskmeshError(f"{path} holds no secret key: pass the NAME.key_secret file")
    if zmq.curve_public(secret) != public:
        raise TaskmeshError(f"{path}: the public key does not belong to the secret key")
    if os.stat(path).st_mode & 0o077:
        log.warning("secret key file %s is readable by other users: chmod 600 it", path)
    return public, secret


def _load(path: str | os.PathLike[str]) -> tuple[bytes, bytes | None]:
    try:
        os.stat(path)
    except FileNotFoundError:  # pyzmq calls a missing file an invalid certificate
        raise TaskmeshError(f"no such key file: {os.fspath(path)}") from None
    except OSError:
        pass  # unreadable: reading it says why
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise TaskmeshError(f"cannot read key file {os.fspath(path)}: {exc}") from None
    for key in (public, secret):
        if key is not None and not _valid_z85_key(key):
            raise TaskmeshError(f"{os.fspath(path)} holds a malformed key")
    return public, secret


def _valid_z85_key(key: bytes) -> bool:
    try:
        return len(key) == 40 and len(z85.decode(key)) == 32
    except (ValueError, KeyError, struct.error):
        return False


@dataclass(frozen=True, slots=True)
class CurveKeys:
    """What a producer, worker or reader needs: its own key pair and the broker's public key."""

    public: bytes
    secret: bytes
    server: bytes

    def apply(self, sock: zmq.Socket[Any]) -> None:
        """Make ``sock`` a CURVE client of the broker (before it connects)."""
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server)


def client_keys(curve_secret: str | None, broker_key: str | None) -> CurveKeys | None:
    """Load a peer's keys from its files; ``None`` when neither is given (plain text)."""
    if not curve_secret and not broker_key:
        return None
    if not curve_secret or not broker_key:
        raise TaskmeshError(
            "CurveZMQ needs both files: --curve-secret (this peer's NAME.key_secret) and "
            "--broker-key (the broker's public broker.key)"
        )
    public, secret = load_secret_key(curve_secret)
    return CurveKeys(public, secret, load_public_key(broker_key))


def make_server(sock: zmq.Socket[Any], public: bytes, secret: bytes) -> None:
    """Make ``sock`` a CURVE server that asks the ZAP handler about every peer (before bind)."""
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)


# --------------------------------------------------------------------------- the allow-list


class KeyRing:
    """The allowed public keys, by role, read from one folder of ``*.key`` files per role.

    ``refresh()`` re-reads the folders when a file in them was added, removed or changed (by
    name, size and mtime), so keys are granted and revoked by editing the folders."""

    def __init__(self, folders: Mapping[Role, str | os.PathLike[str]]) -> None:
        if not folders:
            raise TaskmeshError("CurveZMQ needs at least one folder of allowed keys")
        for role, folder in folders.items():
            if not os.path.isdir(folder):
                raise TaskmeshError(f"the {role.value} key folder {os.fspath(folder)} is missing")
        self.folders = {role: Path(folder) for role, folder in folders.items()}
        self._stamp: object = None
        self._roles: dict[bytes, frozenset[Role]] = {}
        self.refresh()

    def roles_of(self, key: bytes) -> frozenset[Role]:
        """The roles of a z85 public key; empty if it is not allowed."""
        return self._roles.get(key, frozenset())

    def refresh(self, force: bool = False) -> bool:
        """Re-read the folders if they changed (or ``force``); whether anything was read."""
        stamp = [(role, _folder_stamp(folder)) for role, folder in self.folders.items()]
        if stamp == self._stamp and not force:
            return False
        roles: dict[bytes, set[Role]] = {}
        counts = []
        for role, folder in self.folders.items():
            keys = _read_folder(folder)
            counts.append(f"{len(keys)} {role.value}")
            for key in keys:
                roles.setdefault(key, set()).add(role)
        self._roles = {key: frozenset(r) for key, r in roles.items()}
        if self._stamp is not None:
            log.info("allowed keys reloaded: %s", ", ".join(counts))
        self._stamp = stamp
        return True


def _folder_stamp(folder: Path) -> tuple[tuple[str, int, int], ...] | None:
    try:
        with os.scandir(folder) as entries:
            found = []
            for entry in entries:
                if entry.name.endswith(".key"):
                    st = entry.stat()
                    found.append((entry.name, st.st_mtime_ns, st.st_size))
    except OSError:
        return None
    return tuple(sorted(found))


def _read_folder(folder: Path) -> set[bytes]:
    """The public keys of every readable ``*.key`` file in ``folder``; a bad file is skipped."""
    keys: set[bytes] = set()
    if not folder.is_dir():
        log.error("key folder %s is gone; none of its keys is allowed", folder)
        return keys
    for path in sorted(folder.glob("*.key")):
        try:
            keys.add(load_public_key(path))
        except TaskmeshError as exc:
            log.warning("skipped %s", exc)
    return keys


# --------------------------------------------------------------------------- ZAP


class ZapHandler:
    """Answers libzmq's ZAP requests for one context (RFC 27), from the broker's poll loop.

    Bind it before the CURVE socket binds: a CURVE server with no ZAP handler lets everyone in.
    """

    def __init__(self, ctx: zmq.Context[Any], ring: KeyRing) -> None:
        self.ring = ring
        self.socket: zmq.Socket[Any] = ctx.socket(zmq.REP)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(ZAP_ENDPOINT)
        self._refused: set[tuple[bytes, bytes]] = set()  # (address, key) already logged

    def handle(self) -> None:
        """Answer every request waiting."""
        for _ in range(1000):
            try:
                request = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.socket.send_multipart(self.answer(request))

    def answer(self, request: list[bytes]) -> list[bytes]:
        if len(request) < 6 or request[0] != b"1.0":
            log.error("malformed ZAP request; refused")
            rid = request[1] if len(request) > 1 else b""
            return [b"1.0", rid, b"500", b"malformed ZAP request", b"", b""]
        version, rid, _domain, address, _identity, mechanism, *credentials = request
        if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
            return [version, rid, b"400", b"CURVE required", b"", b""]
        key = z85.encode(credentials[0])
        self.ring.refresh()
        roles = self.ring.roles_of(key)
        if not roles:
            if (address, key) not in self._refused:
                if len(self._refused) > 10_000:  # a flood of fresh keys must not grow memory
                    self._refused.clear()
                self._refused.add((address, key))
                log.warning(
                    "refused a connection from %s: key %s is in no allowed folder",
                    address.decode(errors="replace"),
                    key.decode(),
                )
            return [version, rid, b"400", b"unknown key", b"", b""]
        self._refused.discard((address, key))
        return [version, rid, b"200", b"OK", roles_text(roles).encode(), _metadata(key)]

    def close(self) -> None:
        self.socket.close(0)


def roles_text(roles: Iterable[Role]) -> str:
    """The ``User-Id`` for a set of roles: their values, sorted, comma-separated."""
    return ",".join(sorted(role.value for role in roles))


@functools.lru_cache(maxsize=64)
def parse_roles(text: str) -> frozenset[Role]:
    """The roles in a ``User-Id``; cached, since the broker asks on every message."""
    known = {role.value: role for role in Role}
    return frozenset(known[part] for part in text.split(",") if part in known)


def _metadata(key: bytes) -> bytes:
    """One ZMTP property, ``X-Key``: the peer's public key, on every message it sends."""
    name = KEY_PROPERTY.encode()
    return bytes([len(name)]) + name + struct.pack(">I", len(key)) + key


__all__ = [
    "CurveKeys",
    "KeyFiles",
    "KeyRing",
    "Role",
    "ZapHandler",
    "client_keys",
    "generate_keypair",
    "load_public_key",
    "load_secret_key",
    "make_server",
    "may_send",
]
