#!/usr/bin/env python3
"""A local multi-host test bed for taskmesh on Linux network namespaces (root only, stdlib only).

One run (a *prefix*) is a private Ethernet segment: a switch namespace ``PREFIX-sw`` holding a
bridge, and N host namespaces ``PREFIX-h1`` .. ``PREFIX-hN``, each with ``lo`` up and one
``eth0`` (address ``10.213.0.I/24`` by default), the other end of which (``pI``) is a port of the
switch's bridge. Every link is created inside those namespaces (``ip -n``), never in the root
namespace, and no namespace has a route out: the machine's own interfaces, addresses and routes
are never touched, and traffic can only go between the run's namespaces. Two runs with different
prefixes share nothing but the ``ip netns`` name list, so they can run side by side (even on the
same subnet).

    netns.py up --hosts 3 --prefix demo
    netns.py start-broker 1 --prefix demo --heartbeat-interval 0.25
    netns.py start-worker 2 --prefix demo --concurrency 2
    netns.py start-worker 3 --prefix demo --concurrency 2
    netns.py status --prefix demo            # `taskmesh status --json` from inside host 1
    netns.py cut 3 --prefix demo             # pull host 3's cable (its switch port goes down)
    netns.py restore 3 --prefix demo
    netns.py exec 2 --prefix demo -- ip -br addr
    netns.py show --prefix demo              # hosts, addresses, processes, logs
    netns.py down --prefix demo              # kill every process, delete every namespace

Processes run under ``ip netns exec`` in their own session (so their process group id is their
pid), log to ``STATE_DIR/NAME.log``, and are recorded, with their namespace inode and start
time, in ``STATE_DIR/state.json`` (``STATE_DIR`` defaults to ``/tmp/taskmesh-netns/PREFIX``).
``down`` signals only process groups whose every live member sits in one of the run's
namespaces, then kills whatever still runs inside them, then deletes the run's links and
namespaces (found from the state file, or from the prefix if the state file is gone). Every
command is idempotent: ``up`` repairs what is missing, ``down`` twice is harmless.

Tests import this file as a module and drive a ``Testbed`` directly (see
``tests/chaos/test_netns.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

DEFAULT_SUBNET = "10.213.0"  # host I gets DEFAULT_SUBNET.I/24
DEFAULT_PORT = 5555
STATE_ROOT = Path(os.environ.get("TASKMESH_NETNS_DIR", "/tmp/taskmesh-netns"))
BRIDGE = "br0"  # in the switch namespace
HOST_IF = "eth0"  # in each host namespace; its peer in the switch namespace is pI
MAX_HOSTS = 200
IP_TIMEOUT_S = 15.0
_LOSS_ALL = ("netem", "loss", "100%")  # `cut --how netem`: drop every packet

_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SUBNET_RE = re.compile(r"^10\.(\d{1,3})\.(\d{1,3})$")


class NetnsError(RuntimeError):
    """A namespace, link or process operation failed."""


# ---------------------------------------------------------------------------- small helpers


def _run(argv: Sequence[str], *, check: bool = True, timeout: float = IP_TIMEOUT_S) -> str:
    """Run a command, return its stdout; ``NetnsError`` with its stderr when it fails."""
    try:
        done = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"{' '.join(argv)}: {exc}") from None
    if check and done.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def netns_list() -> set[str]:
    """The names ``ip netns list`` shows."""
    out = _run(["ip", "netns", "list"])
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def netns_inode(name: str) -> int | None:
    """The inode of a named namespace (the number in ``/proc/PID/ns/net``), if it exists."""
    try:
        return os.stat(f"/run/netns/{name}").st_ino
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """``(state, pgid, starttime)`` of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[0], int(fields[2]), int(fields[19])


def _pid_netns(pid: int) -> int | None:
    try:
        link = os.readlink(f"/proc/{pid}/ns/net")  # "net:[4026532177]"
    except OSError:
        return None
    match = re.search(r"\[(\d+)\]", link)
    return int(match.group(1)) if match else None


def _live_pids() -> Iterator[int]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            yield int(entry)


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) members of a process group."""
    members = []
    for pid in _live_pids():
        stat = _proc_stat(pid)
        if stat is not None and stat[1] == pgid and stat[0] != "Z":
            members.append(pid)
    return members


def pids_in_netns(inodes: set[int]) -> list[int]:
    """Live (non-zombie) processes whose network namespace is one of ``inodes``."""
    found: list[int] = []
    if not inodes:
        return found
    for pid in _live_pids():
        if _pid_netns(pid) in inodes:
            stat = _proc_stat(pid)
            if stat is not None and stat[0] != "Z":
                found.append(pid)
    return found


def wait_until(
    predicate: Callable[[], bool], timeout: float, what: str, every: float = 0.05
) -> None:
    """Poll ``predicate`` until true; ``TimeoutError`` naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)


def probe() -> str | None:
    """None if this process can create network namespaces, else the reason why not."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux, not {sys.platform}"
    if os.geteuid() != 0:
        return f"network namespaces need root (euid is {os.geteuid()})"
    name = f"tmprobe-{os.getpid()}-{time.monotonic_ns() % 1_000_000}"
    try:
        _run(["ip", "netns", "add", name])
    except NetnsError as exc:
        return f"`ip netns add` does not work here: {exc}"
    try:
        _run(["ip", "netns", "del", name])
    except NetnsError as exc:
        return f"`ip netns del` does not work here: {exc}"
    return None


# ---------------------------------------------------------------------------- the test bed


class Testbed:
    """One run of the launcher: its namespaces, links and processes, kept in a state file."""

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        prefix: str,
        *,
        state_dir: str | os.PathLike[str] | None = None,
        subnet: str = DEFAULT_SUBNET,
        python: str | None = None,
    ) -> None:
        if not _PREFIX_RE.match(prefix):
            raise NetnsError(f"bad prefix {prefix!r}: letters, digits, _ . - (at most 40)")
        if not _SUBNET_RE.match(subnet) or any(int(n) > 255 for n in subnet.split(".")[1:]):
            raise NetnsError(f"bad subnet {subnet!r}: expected 10.X.Y (hosts get 10.X.Y.I/24)")
        self.prefix = prefix
        self.state_dir = Path(state_dir) if state_dir else STATE_ROOT / prefix
        self.python = python or sys.executable
        self._subnet = subnet
        self._popens: dict[int, subprocess.Popen[bytes]] = {}  # started here: reaped here
        self._state: dict[str, Any] = {
            "prefix": prefix,
            "subnet": subnet,
            "switch": f"{prefix}-sw",
            "hosts": {},
            "inodes": {},
            "cut": {},
            "processes": [],
            "broker": None,
        }
        loaded = self._load()
        if loaded is not None:
            if loaded.get("prefix") != prefix:
                raise NetnsError(f"{self.state_file} belongs to prefix {loaded.get('prefix')!r}")
            self._state.update(loaded)

    # -------------------------------------------------------------- state

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def workdir(self) -> Path:
        return self.state_dir

    @property
    def switch(self) -> str:
        return str(self._state["switch"])

    @property
    def broker_url(self) -> str | None:
        return self._state.get("broker")

    @property
    def hosts(self) -> dict[int, dict[str, str]]:
        return {int(k): v for k, v in self._state["hosts"].items()}

    @property
    def inodes(self) -> dict[str, int]:
        """Namespace name to inode (as in ``/proc/PID/ns/net``): tells where a pid runs."""
        return {k: int(v) for k, v in self._state["inodes"].items()}

    def _load(self) -> dict[str, Any] | None:
        try:
            return dict(json.loads(self.state_file.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise NetnsError(f"unreadable state file {self.state_file}: {exc}") from None

    def _save(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._state, indent=2, sort_keys=True))
        tmp.replace(self.state_file)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise commands on one prefix (two shells, or a test and a shell), then reload."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                loaded = self._load()
                if loaded is not None:
                    self._state.update(loaded)
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def host(self, host: int | str) -> tuple[int, dict[str, str]]:
        """``(index, record)`` of a host given as 3, "3", "h3" or "PREFIX-h3"."""
        text = str(host)
        for form in (f"{self.prefix}-h", "h"):
            if text.startswith(form) and text[len(form) :].isdigit():
                text = text[len(form) :]
                break
        if not text.isdigit() or text not in self._state["hosts"]:
            known = ", ".join(sorted(self._state["hosts"], key=int)) or "none: run up first"
            raise NetnsError(f"no host {host!r} in {self.prefix} (hosts: {known})")
        return int(text), self._state["hosts"][text]

    def ns(self, host: int | str) -> str:
        return self.host(host)[1]["ns"]

    def address(self, host: int | str) -> str:
        return self.host(host)[1]["ip"]

    # -------------------------------------------------------------- topology

    def up(self, hosts: int) -> Testbed:
        """Create (or repair) the switch and hosts 1..``hosts``; harmless when already up."""
        if not 1 <= hosts <= MAX_HOSTS:
            raise NetnsError(f"--hosts must be 1..{MAX_HOSTS}, not {hosts}")
        with self._locked():
            have = len(self._state["hosts"])
            if have and self._state["subnet"] != self._subnet:
                raise NetnsError(
                    f"{self.prefix} is up on {self._state['subnet']}, not {self._subnet}; "
                    "run down first"
                )
            if have > hosts:
                raise NetnsError(f"{self.prefix} is up with {have} hosts; run down first")
            subnet = self._state["subnet"]
            for i in range(1, hosts + 1):  # record first, so that a failed up can be downed
                self._state["hosts"][str(i)] = {
                    "ns": f"{self.prefix}-h{i}",
                    "ip": f"{subnet}.{i}",
                    "port": f"p{i}",
                }
            self._save()
            existing = netns_list()
            sw = self.switch
            self._ensure_ns(sw, existing)
            if not self._link_exists(sw, BRIDGE):
                _run(["ip", "-n", sw, "link", "add", "name", BRIDGE, "type", "bridge"])
            _run(["ip", "-n", sw, "link", "set", BRIDGE, "up"])
            for i in range(1, hosts + 1):
                rec = self._state["hosts"][str(i)]
                ns, port = rec["ns"], rec["port"]
                self._ensure_ns(ns, existing)
                if not self._link_exists(sw, port):
                    if self._link_exists(ns, HOST_IF):  # half a pair cannot exist; be sure
                        _run(["ip", "-n", ns, "link", "del", HOST_IF])
                    veth = ["type", "veth", "peer", "name", HOST_IF, "netns", ns]
                    _run(["ip", "-n", sw, "link", "add", "name", port, *veth])
                _run(["ip", "-n", sw, "link", "set", port, "master", BRIDGE])
                if str(i) not in self._state["cut"]:
                    _run(["ip", "-n", sw, "link", "set", port, "up"])
                _run(["ip", "-n", ns, "addr", "replace", f"{rec['ip']}/24", "dev", HOST_IF])
                _run(["ip", "-n", ns, "link", "set", HOST_IF, "up"])
            self._save()
        return self

    def _ensure_ns(self, ns: str, existing: set[str]) -> None:
        if ns not in existing:
            _run(["ip", "netns", "add", ns])
            existing.add(ns)
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        inode = netns_inode(ns)
        if inode is not None:
            self._state["inodes"][ns] = inode

    @staticmethod
    def _link_exists(ns: str, link: str) -> bool:
        return bool(_run(["ip", "-n", ns, "-o", "link", "show", "dev", link], check=False))

    def cut(self, host: int | str, how: str = "link") -> None:
        """Partition a host: its switch port goes down (``link``), or every packet to and from
        it is dropped (``netem``: 100% loss both ways, needs the sch_netem kernel module)."""
        index, rec = self.host(host)
        if how not in ("link", "netem"):
            raise NetnsError(f"unknown cut {how!r}: link or netem")
        with self._locked():
            self._state["cut"][str(index)] = how  # first: a half-made cut is still restorable
            self._save()
            if how == "link":
                _run(["ip", "-n", self.switch, "link", "set", rec["port"], "down"])
            else:
                for ns, dev in ((self.switch, rec["port"]), (rec["ns"], HOST_IF)):
                    _run(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", *_LOSS_ALL])

    def restore(self, host: int | str) -> None:
        """Undo ``cut`` (whichever way it was made); harmless on a host that is not cut."""
        index, rec = self.host(host)
        with self._locked():
            how = self._state["cut"].pop(str(index), None)
            if how == "netem":
                for ns, dev in ((self.switch, rec["port"]), (rec["ns"], HOST_IF)):
                    _run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], check=False)
            _run(["ip", "-n", self.switch, "link", "set", rec["port"], "up"])
            self._save()

    # -------------------------------------------------------------- processes

    def popen(
        self,
        host: int | str,
        argv: Sequence[str],
        name: str,
        *,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> dict[str, Any]:
        """Start ``argv`` inside a host's namespace in a new session, logging to NAME.log."""
        if not _NAME_RE.match(name):
            raise NetnsError(f"bad process name {name!r}")
        ns = self.ns(host)
        with self._locked():
            if any(p["name"] == name and self._alive(p) for p in self._state["processes"]):
                raise NetnsError(f"a process named {name!r} is already running")
            self._state["processes"] = [p for p in self._state["processes"] if p["name"] != name]
            log_path = self.state_dir / f"{name}.log"
            penv = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
            with open(log_path, "ab") as log:
                popen = subprocess.Popen(
                    ["ip", "netns", "exec", ns, *argv],  # ip execs argv: same pid
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=penv,
                    cwd=cwd,
                    start_new_session=True,
                )
            self._popens[popen.pid] = popen
            stat = _proc_stat(popen.pid)
            record = {
                "name": name,
                "host": self.host(host)[0],
                "ns": ns,
                "pid": popen.pid,
                "pgid": popen.pid,  # a new session: the leader's pid is the group id
                "starttime": stat[2] if stat else None,
                "argv": list(argv),
                "log": str(log_path),
            }
            self._state["processes"].append(record)
            self._save()
        return record

    def start_broker(
        self,
        host: int | str = 1,
        *,
        port: int = DEFAULT_PORT,
        journal: str = ":memory:",
        heartbeat_interval: float = 1.0,
        heartbeat_liveness: int = 3,
        log_level: str = "INFO",
        name: str = "broker",
        extra: Sequence[str] = (),
        timeout: float = 30.0,
    ) -> str:
        """Start ``taskmesh broker`` on the host's own address; return its URL once bound."""
        bind = f"tcp://{self.address(host)}:{port}"
        port_file = self.state_dir / f"{name}.endpoint"
        port_file.unlink(missing_ok=True)
        argv = [
            self.python,
            "-m",
            "taskmesh",
            "broker",
            "--bind",
            bind,
            "--insecure",  # a non-loopback bind without keys: only this run's hosts reach it
            "--journal",
            journal,
            "--port-file",
            str(port_file),
            "--heartbeat-interval",
            str(heartbeat_interval),
            "--heartbeat-liveness",
            str(heartbeat_liveness),
            "--log-level",
            log_level,
            *extra,
        ]
        record = self.popen(host, argv, name)
        try:
            wait_until(
                lambda: port_file.exists() or not self._alive(record), timeout, "the broker to bind"
            )
        except TimeoutError:
            raise NetnsError(f"broker did not bind in {timeout:g}s:\n{self.output(name)}") from None
        if not self._alive(record):
            raise NetnsError(f"broker exited at start:\n{self.output(name)}")
        url = port_file.read_text().strip()
        with self._locked():
            self._state["broker"] = url
            self._save()
        return url

    def start_worker(
        self,
        host: int | str,
        *,
        name: str | None = None,
        broker: str | None = None,
        concurrency: int = 2,
        queues: str = "default",
        heartbeat_interval: float = 1.0,
        heartbeat_liveness: int = 3,
        log_level: str = "INFO",
        extra: Sequence[str] = (),
    ) -> dict[str, Any]:
        """Start ``taskmesh worker`` on a host, against the recorded broker by default."""
        index = self.host(host)[0]
        name = name or f"worker-h{index}"
        broker = broker or self.broker_url
        if not broker:
            raise NetnsError("no broker recorded: start-broker first, or pass --broker")
        argv = [
            self.python,
            "-m",
            "taskmesh",
            "worker",
            "--broker",
            broker,
            "--concurrency",
            str(concurrency),
            "--queues",
            queues,
            "--name",
            name,
            "--heartbeat-interval",
            str(heartbeat_interval),
            "--heartbeat-liveness",
            str(heartbeat_liveness),
            "--log-level",
            log_level,
            *extra,
        ]
        return self.popen(host, argv, name)

    def run(
        self, host: int | str, argv: Sequence[str], *, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside a host's namespace and wait for it (output captured)."""
        try:
            return subprocess.run(
                ["ip", "netns", "exec", self.ns(host), *argv],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise NetnsError(f"{' '.join(argv)} in {self.ns(host)}: {exc}") from None

    def status(
        self, host: int | str | None = None, broker: str | None = None, timeout: float = 2.0
    ) -> dict[str, Any]:
        """``taskmesh status --json`` run inside a host (the broker's by default)."""
        broker = broker or self.broker_url
        if not broker:
            raise NetnsError("no broker recorded")
        if host is None:
            host = next((p["host"] for p in self._state["processes"] if p["name"] == "broker"), 1)
        argv = [self.python, "-m", "taskmesh", "status", "--broker", broker, "--json"]
        done = self.run(host, [*argv, "--timeout", str(timeout)], timeout=timeout + 30.0)
        if done.returncode != 0:
            raise NetnsError(f"taskmesh status failed: {done.stderr.strip() or done.stdout}")
        return dict(json.loads(done.stdout))

    def process(self, name: str) -> dict[str, Any]:
        for record in self._state["processes"]:
            if record["name"] == name:
                return dict(record)
        raise NetnsError(f"no process named {name!r}")

    def alive(self, name: str) -> bool:
        return self._alive(self.process(name))

    def _alive(self, record: dict[str, Any]) -> bool:
        popen = self._popens.get(record["pid"])
        if popen is not None:
            return popen.poll() is None
        stat = _proc_stat(record["pid"])
        return stat is not None and stat[0] != "Z" and stat[2] == record["starttime"]

    def returncode(self, name: str) -> int | None:
        popen = self._popens.get(self.process(name)["pid"])
        return None if popen is None else popen.poll()

    def stop(self, name: str, grace: float = 3.0) -> None:
        """SIGTERM one process's group, SIGKILL it after ``grace``."""
        record = self.process(name)
        inodes = self._inodes()
        self._signal_group(record, signal.SIGTERM, inodes)
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: not self._group_left(record, inodes), grace, f"{name} to exit")
        self._signal_group(record, signal.SIGKILL, inodes)
        self._reap(record, 5.0)

    def output(self, name: str) -> str:
        try:
            return Path(self.process(name)["log"]).read_text(errors="replace")
        except (OSError, NetnsError):
            return ""

    def log_tails(self, chars: int = 6000) -> str:
        """The end of every process log, oldest process first."""
        parts = []
        for record in self._state["processes"]:
            text = self.output(record["name"])
            if len(text) > chars:
                text = "...\n" + text[-chars:]
            parts.append(f"--- {record['name']} on h{record['host']} ({record['log']})\n{text}")
        return "\n".join(parts)

    def _inodes(self) -> set[int]:
        inodes = {int(i) for i in self._state["inodes"].values()}
        for ns in self._namespaces():
            inode = netns_inode(ns)
            if inode is not None:
                inodes.add(inode)
        return inodes

    def _group_left(self, record: dict[str, Any], inodes: set[int]) -> list[int]:
        """Live members of the record's group that are ours (in one of our namespaces)."""
        return [pid for pid in group_members(record["pgid"]) if _pid_netns(pid) in inodes]

    def _signal_group(self, record: dict[str, Any], sig: int, inodes: set[int]) -> None:
        """Signal a recorded group, but only processes in our namespaces: a reused pgid of
        somebody else's is left alone."""
        members = group_members(record["pgid"])
        ours = [pid for pid in members if _pid_netns(pid) in inodes]
        if not ours:
            return
        if len(ours) == len(members):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(record["pgid"], sig)
        else:
            for pid in ours:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)

    def _reap(self, record: dict[str, Any], timeout: float) -> None:
        popen = self._popens.get(record["pid"])
        if popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=timeout)

    # -------------------------------------------------------------- teardown

    def _namespaces(self) -> list[str]:
        """This run's namespaces that exist: from the state, and from the prefix."""
        pattern = re.compile(rf"^{re.escape(self.prefix)}-(sw|h\d+)$")
        existing = netns_list()
        recorded = {self.switch, *(h["ns"] for h in self._state["hosts"].values())}
        return sorted(n for n in existing if n in recorded or pattern.match(n))

    def down(self, grace: float = 3.0, timeout: float = 10.0) -> list[str]:
        """Kill every process, delete every link and namespace of this run; return what could
        not be removed (empty when all is gone). Safe to call again, and on a partial ``up``."""
        problems: list[str] = []
        with self._locked():
            inodes = self._inodes()
            records = list(self._state["processes"])
            for record in records:
                self._signal_group(record, signal.SIGCONT, inodes)
                self._signal_group(record, signal.SIGTERM, inodes)
            with contextlib.suppress(TimeoutError):
                wait_until(
                    lambda: not any(self._group_left(r, inodes) for r in records),
                    grace,
                    "the processes to exit",
                )
            for record in records:
                self._signal_group(record, signal.SIGKILL, inodes)
            # anything else still running inside our namespaces (an `exec`, a lost state file)
            for pid in pids_in_netns(inodes):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for record in records:
                self._reap(record, 5.0)
            try:
                wait_until(lambda: not pids_in_netns(inodes), timeout, "the processes to end")
            except TimeoutError:
                problems.append(f"processes still alive in the namespaces: {pids_in_netns(inodes)}")
            namespaces = self._namespaces()
            if self.switch in namespaces:
                for rec in self._state["hosts"].values():
                    if self._link_exists(self.switch, rec["port"]):
                        _run(["ip", "-n", self.switch, "link", "del", rec["port"]], check=False)
            for ns in namespaces:
                _run(["ip", "netns", "del", ns], check=False)
            left = self._namespaces()
            if left:
                problems.append(f"namespaces not deleted: {left}")
            if problems:  # keep the records, so that another down can try again
                self._save()
            else:
                self._state.update(hosts={}, inodes={}, cut={}, processes=[], broker=None)
                self.state_file.unlink(missing_ok=True)  # the logs stay in the state directory
        return problems

    def describe(self) -> dict[str, Any]:
        """The state, with which processes are alive and which namespaces exist."""
        return {
            **self._state,
            "state_dir": str(self.state_dir),
            "namespaces_present": self._namespaces(),
            "processes": [{**p, "alive": self._alive(p)} for p in self._state["processes"]],
        }

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()


# ---------------------------------------------------------------------------- the CLI


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--prefix",
        default=os.environ.get("TASKMESH_NETNS_PREFIX"),
        help="names this run's namespaces (PREFIX-sw, PREFIX-hN); env TASKMESH_NETNS_PREFIX",
    )
    common.add_argument("--state-dir", help=f"state and logs; default {STATE_ROOT}/PREFIX")

    parser = argparse.ArgumentParser(
        prog="netns.py",
        description="A local multi-host taskmesh test bed on Linux network namespaces (root).",
        epilog="Words after `--` go untouched to taskmesh (start-broker, start-worker) or are "
        "the command to run (exec). Example: netns.py up --hosts 3 --prefix demo; "
        "netns.py start-broker 1 --prefix demo; netns.py start-worker 2 --prefix demo -- "
        "--prefetch 1; netns.py cut 2 --prefix demo; netns.py down --prefix demo",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", parents=[common], help="create the switch and N hosts")
    up.add_argument("--hosts", type=int, required=True)
    up.add_argument("--subnet", default=DEFAULT_SUBNET, help="10.X.Y: host I gets 10.X.Y.I/24")

    hb = argparse.ArgumentParser(add_help=False)
    hb.add_argument("--heartbeat-interval", type=float, default=1.0)
    hb.add_argument("--heartbeat-liveness", type=int, default=3)
    hb.add_argument("--log-level", default="INFO")

    broker = sub.add_parser(
        "start-broker", parents=[common, hb], help="run `taskmesh broker` on HOST's address"
    )
    broker.add_argument("host")
    broker.add_argument("--port", type=int, default=DEFAULT_PORT)
    broker.add_argument("--journal", default=":memory:")
    broker.add_argument("--name", default="broker")

    worker = sub.add_parser("start-worker", parents=[common, hb], help="run `taskmesh worker`")
    worker.add_argument("host")
    worker.add_argument("--broker", help="default: the broker this run started")
    worker.add_argument("--name", help="default: worker-hN")
    worker.add_argument("--concurrency", type=int, default=2)
    worker.add_argument("--queues", default="default")

    status = sub.add_parser("status", parents=[common], help="`taskmesh status --json`")
    status.add_argument("--host", help="run it from this host (default: the broker's)")
    status.add_argument("--broker", help="default: the broker this run started")

    execute = sub.add_parser("exec", parents=[common], help="run `-- CMD ...` inside HOST")
    execute.add_argument("host")

    cut = sub.add_parser("cut", parents=[common], help="take HOST off the network")
    cut.add_argument("host")
    cut.add_argument("--how", choices=["link", "netem"], default="link")
    restore = sub.add_parser("restore", parents=[common], help="put HOST back on the network")
    restore.add_argument("host")

    stop = sub.add_parser("stop", parents=[common], help="stop one process by name")
    stop.add_argument("name")
    sub.add_parser("show", parents=[common], help="print the state as JSON")
    sub.add_parser("down", parents=[common], help="kill every process, delete every namespace")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``netns.py COMMAND [options] [-- taskmesh options | -- command]``."""
    words = list(sys.argv[1:] if argv is None else argv)
    tail: list[str] = []
    if "--" in words:  # what follows goes, untouched, to taskmesh (or to `exec`)
        at = words.index("--")
        words, tail = words[:at], words[at + 1 :]
    args = _parser().parse_args(words)
    if not args.prefix:
        print("netns.py: --prefix is required (or TASKMESH_NETNS_PREFIX)", file=sys.stderr)
        return 2
    try:
        bed = Testbed(
            args.prefix,
            state_dir=args.state_dir,
            subnet=getattr(args, "subnet", DEFAULT_SUBNET),
        )
        if args.command == "up":
            bed.up(args.hosts)
            for index, rec in sorted(bed.hosts.items()):
                print(f"h{index}  {rec['ns']}  {rec['ip']}")
        elif args.command == "start-broker":
            url = bed.start_broker(
                args.host,
                port=args.port,
                journal=args.journal,
                heartbeat_interval=args.heartbeat_interval,
                heartbeat_liveness=args.heartbeat_liveness,
                log_level=args.log_level,
                name=args.name,
                extra=tail,
            )
            print(url)
        elif args.command == "start-worker":
            record = bed.start_worker(
                args.host,
                name=args.name,
                broker=args.broker,
                concurrency=args.concurrency,
                queues=args.queues,
                heartbeat_interval=args.heartbeat_interval,
                heartbeat_liveness=args.heartbeat_liveness,
                log_level=args.log_level,
                extra=tail,
            )
            print(f"{record['name']} pid {record['pid']} log {record['log']}")
        elif args.command == "status":
            print(json.dumps(bed.status(args.host, args.broker), indent=2, sort_keys=True))
        elif args.command == "exec":
            if not tail:
                print("netns.py exec: no command (exec HOST -- CMD ...)", file=sys.stderr)
                return 2
            return subprocess.call(["ip", "netns", "exec", bed.ns(args.host), *tail])
        elif args.command == "cut":
            bed.cut(args.host, args.how)
        elif args.command == "restore":
            bed.restore(args.host)
        elif args.command == "stop":
            bed.stop(args.name)
        elif args.command == "show":
            print(json.dumps(bed.describe(), indent=2, sort_keys=True))
        elif args.command == "down":
            problems = bed.down()
            for problem in problems:
                print(f"netns.py: {problem}", file=sys.stderr)
            return 1 if problems else 0
    except NetnsError as exc:
        print(f"netns.py: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
