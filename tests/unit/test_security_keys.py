"""Key files, the allow-list folders and the role rules, without sockets."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import zmq
import zmq.auth

from taskmesh import protocol as p
from taskmesh.errors import TaskmeshError
from taskmesh.security import (
    KeyRing,
    Role,
    client_keys,
    generate_keypair,
    load_public_key,
    load_secret_key,
    may_send,
    parse_roles,
    roles_text,
)

pytestmark = pytest.mark.timeout(30)


def test_generate_writes_a_public_file_and_a_0600_secret_file(tmp_path: Path) -> None:
    files = generate_keypair("worker-1", tmp_path / "keys")

    assert files.public == tmp_path / "keys" / "worker-1.key"
    assert files.secret == tmp_path / "keys" / "worker-1.key_secret"
    assert stat.S_IMODE(files.secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(files.public.stat().st_mode) == 0o644
    public = load_public_key(files.public)
    assert load_secret_key(files.secret)[0] == public
    assert zmq.curve_public(load_secret_key(files.secret)[1]) == public
    assert b"secret-key" not in files.public.read_bytes()
    # the format of zmq.auth (and czmq): other ZeroMQ tools read these files
    assert zmq.auth.load_certificate(files.secret) == load_secret_key(files.secret)


def test_generate_never_overwrites_and_wants_a_plain_name(tmp_path: Path) -> None:
    first = generate_keypair("broker", tmp_path)
    before = first.secret.read_bytes()
    with pytest.raises(TaskmeshError, match="exists"):
        generate_keypair("broker", tmp_path)
    assert first.secret.read_bytes() == before
    for bad in ("", "../escape", "a/b", ".hidden"):
        with pytest.raises(TaskmeshError, match="invalid key name"):
            generate_keypair(bad, tmp_path)


def test_loading_explains_what_is_wrong(tmp_path: Path) -> None:
    files = generate_keypair("p", tmp_path)
    with pytest.raises(TaskmeshError, match="no secret key"):
        load_secret_key(files.public)
    with pytest.raises(TaskmeshError, match="no such key file"):
        load_public_key(tmp_path / "missing.key")
    not_a_key = tmp_path / "notes.key"
    not_a_key.write_text("hello\n")
    with pytest.raises(TaskmeshError, match="cannot read key file"):
        load_public_key(not_a_key)
    garbled = tmp_path / "garbled.key"
    garbled.write_text('curve\n    public-key = "not-a-key"\n')
    with pytest.raises(TaskmeshError, match="malformed"):
        load_public_key(garbled)
    other = generate_keypair("q", tmp_path)
    mixed = tmp_path / "mixed.key_secret"
    public = load_public_key(files.public).decode()
    secret = load_secret_key(other.secret)[1].decode()
    mixed.write_text(f'curve\n    public-key = "{public}"\n    secret-key = "{secret}"\n')
    with pytest.raises(TaskmeshError, match="does not belong"):
        load_secret_key(mixed)


def test_client_keys_need_both_files_or_neither(tmp_path: Path) -> None:
    me = generate_keypair("me", tmp_path)
    broker = generate_keypair("broker", tmp_path)
    assert client_keys(None, None) is None
    with pytest.raises(TaskmeshError, match="both"):
        client_keys(str(me.secret), None)
    with pytest.raises(TaskmeshError, match="both"):
        client_keys(None, str(broker.public))
    keys = client_keys(str(me.secret), str(broker.public))
    assert keys is not None
    assert keys.public == load_public_key(me.public)
    assert keys.server == load_public_key(broker.public)


def _folders(tmp_path: Path) -> dict[Role, Path]:
    folders = {role: tmp_path / f"{role.value}s" for role in Role}
    for folder in folders.values():
        folder.mkdir()
    return folders


def _allow(name: str, folder: Path, keys: Path) -> bytes:
    files = generate_keypair(name, keys)
    (folder / files.public.name).write_bytes(files.public.read_bytes())
    return load_public_key(files.public)


def test_keyring_reads_roles_from_the_folders(tmp_path: Path) -> None:
    folders = _folders(tmp_path)
    producer = _allow("p", folders[Role.PRODUCER], tmp_path)
    worker = _allow("w", folders[Role.WORKER], tmp_path)
    both = _allow("pw", folders[Role.PRODUCER], tmp_path)
    (folders[Role.WORKER] / "pw.key").write_bytes((folders[Role.PRODUCER] / "pw.key").read_bytes())
    (folders[Role.WORKER] / "README").write_text("not a key file: ignored")
    (folders[Role.WORKER] / "broken.key").write_text("garbage")  # skipped, not fatal

    ring = KeyRing(folders)

    assert ring.roles_of(producer) == {Role.PRODUCER}
    assert ring.roles_of(worker) == {Role.WORKER}
    assert ring.roles_of(both) == {Role.PRODUCER, Role.WORKER}
    assert ring.roles_of(b"x" * 40) == frozenset()


def test_keyring_refresh_sees_added_and_removed_keys(tmp_path: Path) -> None:
    folders = _folders(tmp_path)
    old = _allow("old", folders[Role.PRODUCER], tmp_path)
    ring = KeyRing(folders)
    assert ring.refresh() is False  # nothing changed: nothing read

    new = _allow("new", folders[Role.PRODUCER], tmp_path)
    (folders[Role.PRODUCER] / "old.key").unlink()
    assert ring.refresh() is True

    assert ring.roles_of(new) == {Role.PRODUCER}
    assert ring.roles_of(old) == frozenset()
    assert ring.refresh() is False
    assert ring.refresh(force=True) is True


def test_keyring_sees_a_file_rewritten_in_place(tmp_path: Path) -> None:
    folders = _folders(tmp_path)
    first = _allow("a", folders[Role.WORKER], tmp_path)
    ring = KeyRing(folders)
    second = generate_keypair("b", tmp_path)
    target = folders[Role.WORKER] / "a.key"
    target.write_bytes(second.public.read_bytes())
    os.utime(target, ns=(1, 1))  # a new mtime even on a coarse clock

    assert ring.refresh() is True
    assert ring.roles_of(first) == frozenset()
    assert ring.roles_of(load_public_key(second.public)) == {Role.WORKER}


def test_keyring_folder_that_disappears_allows_nobody(tmp_path: Path) -> None:
    folders = _folders(tmp_path)
    key = _allow("p", folders[Role.PRODUCER], tmp_path)
    ring = KeyRing(folders)
    (folders[Role.PRODUCER] / "p.key").unlink()
    folders[Role.PRODUCER].rmdir()

    assert ring.refresh() is True
    assert ring.roles_of(key) == frozenset()


def test_keyring_needs_existing_folders(tmp_path: Path) -> None:
    with pytest.raises(TaskmeshError, match="missing"):
        KeyRing({Role.PRODUCER: tmp_path / "nope"})
    with pytest.raises(TaskmeshError, match="at least one"):
        KeyRing({})


@pytest.mark.parametrize(
    ("roles", "signature", "kind", "allowed"),
    [
        ({Role.PRODUCER}, p.PRODUCER, p.Kind.SUBMIT, True),
        ({Role.PRODUCER}, p.PRODUCER, p.Kind.STATUS, True),
        ({Role.PRODUCER}, p.WORKER, p.Kind.READY, False),  # a producer key posing as a worker
        ({Role.WORKER}, p.WORKER, p.Kind.READY, True),
        ({Role.WORKER}, p.WORKER, p.Kind.RESULTS, True),
        ({Role.WORKER}, p.PRODUCER, p.Kind.SUBMIT, False),  # a worker key posing as a producer
        ({Role.WORKER}, p.PRODUCER, p.Kind.STATUS, False),
        ({Role.READER}, p.PRODUCER, p.Kind.STATUS, True),
        ({Role.READER}, p.PRODUCER, p.Kind.SUBMIT, False),
        ({Role.READER}, p.PRODUCER, p.Kind.HELLO, False),
        ({Role.READER}, p.WORKER, p.Kind.READY, False),
        ({Role.PRODUCER, Role.WORKER}, p.WORKER, p.Kind.READY, True),
        (set(), p.PRODUCER, p.Kind.STATUS, False),
    ],
)
def test_roles_decide_what_a_key_may_send(
    roles: set[Role], signature: bytes, kind: p.Kind, allowed: bool
) -> None:
    assert may_send(roles, signature, kind) is allowed


def test_user_id_round_trip() -> None:
    roles = {Role.WORKER, Role.PRODUCER}
    assert roles_text(roles) == "producer,worker"
    assert parse_roles(roles_text(roles)) == roles
    assert parse_roles("") == frozenset()
    assert parse_roles("admin,reader") == {Role.READER}  # unknown roles grant nothing
