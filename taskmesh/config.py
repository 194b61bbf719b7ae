"""Settings as frozen dataclasses. Defaults live here and nowhere else.

Precedence: these defaults < ``TASKMESH_*`` environment variables < command-line flags. The CLI
reads the variables through typer (each option names its variable) and builds one of these.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

DEFAULT_BROKER = "tcp://127.0.0.1:5555"
DEFAULT_QUEUE = "default"


def default_broker() -> str:
    """The broker a producer or worker uses when none is named: TASKMESH_BROKER, else loopback."""
    return os.environ.get("TASKMESH_BROKER") or DEFAULT_BROKER


def default_curve_secret() -> str | None:
    """This peer's CurveZMQ secret key file: TASKMESH_CURVE_SECRET, else none (plain text)."""
    return os.environ.get("TASKMESH_CURVE_SECRET") or None


def default_broker_key() -> str | None:
    """The broker's CurveZMQ public key file: TASKMESH_BROKER_KEY, else none."""
    return os.environ.get("TASKMESH_BROKER_KEY") or None


def default_worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True, slots=True)
class HeartbeatConfig:
    interval_s: float = 1.0
    liveness: int = 3  # missed intervals before a peer is declared dead

    def __post_init__(self) -> None:
        if self.interval_s <= 0:
            raise ValueError(f"heartbeat interval must be > 0 seconds, got {self.interval_s}")
        if self.liveness < 1:
            raise ValueError(f"heartbeat liveness must be >= 1, got {self.liveness}")

    @property
    def timeout_s(self) -> float:
        return self.interval_s * self.liveness


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    bind: str = DEFAULT_BROKER
    journal: str = "taskmesh.db"
    journal_sync: str = "FULL"  # FULL survives power loss; NORMAL survives a killed broker
    heartbeat: HeartbeatConfig = field(default_factory=HeartbeatConfig)
    result_ttl_s: float = 3600.0
    max_message_bytes: int = 1 << 30
    insecure: bool = False
    port_file: str | None = None  # where to write the bound endpoint (for --bind ...:0)
    curve_secret: str | None = None  # the broker's NAME.key_secret: turns CurveZMQ on
    producers: str | None = None  # folders of allowed public keys (*.key), one per role
    workers: str | None = None
    readers: str | None = None
    routes: tuple[tuple[str, str], ...] = ()  # (queue, strategy)
    priority_aging_s: float = 0.0  # 0: strict priorities
    metrics_port: int | None = None  # serve Prometheus metrics on this port
    metrics_host: str = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    broker: str = field(default_factory=default_broker)
    concurrency: int = field(default_factory=lambda: os.cpu_count() or 1)
    queues: tuple[str, ...] = (DEFAULT_QUEUE,)
    name: str = field(default_factory=default_worker_name)
    heartbeat: HeartbeatConfig = field(default_factory=HeartbeatConfig)
    prefetch: int | None = None  # tasks waiting beyond the free slots; None: concurrency
    weight: float = 1.0  # share of tasks under the broker's "weighted" routing
    shutdown_grace_s: float = 60.0  # on SIGTERM: how long running tasks may take to finish
    max_tasks_per_child: int = 0  # replace an executor after this many tasks (0: never)
    max_memory_per_child_mb: int = 0  # replace an executor grown past this size (0: never)
    imports: tuple[str, ...] = ()  # modules preloaded into every executor
    reconnect_max_s: float = 10.0
    max_message_bytes: int = 1 << 30
    curve_secret: str | None = field(default_factory=default_curve_secret)
    broker_key: str | None = field(default_factory=default_broker_key)

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.prefetch is not None and self.prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {self.prefetch}")
        if not self.queues or any(not q for q in self.queues):
            raise ValueError(f"queues must be non-empty names, got {self.queues!r}")


@dataclass(frozen=True, slots=True)
class ClientConfig:
    broker: str = field(default_factory=default_broker)
    connect_timeout_s: float = 10.0  # unacknowledged submits fail after this long without a broker
    heartbeat: HeartbeatConfig = field(default_factory=HeartbeatConfig)
    name: str = ""
    curve_secret: str | None = field(default_factory=default_curve_secret)
    broker_key: str | None = field(default_factory=default_broker_key)
