"""The ``taskmesh`` command: thin typer commands that build a config and call one library function.

Every option also reads a ``TASKMESH_*`` environment variable (shown in ``--help``).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
from typing import Annotated, Any

import typer

from taskmesh.config import (
    DEFAULT_BROKER,
    BrokerConfig,
    HeartbeatConfig,
    WorkerConfig,
    default_worker_name,
)
from taskmesh.errors import TaskmeshError

app = typer.Typer(
    name="taskmesh",
    help="taskmesh: a distributed task queue and worker framework over ZeroMQ.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

StatusTimeout = Annotated[
    float,
    typer.Option(
        "--timeout",
        envvar="TASKMESH_STATUS_TIMEOUT",
        min=0.1,
        help="Seconds to wait for the broker.",
    ),
]
LogJson = Annotated[
    bool,
    typer.Option("--log-json", envvar="TASKMESH_LOG_JSON", help="Log one JSON object per line."),
]
LogLevel = Annotated[
    str,
    typer.Option("--log-level", envvar="TASKMESH_LOG_LEVEL", help="DEBUG, INFO, WARNING, ERROR."),
]
HbInterval = Annotated[
    float,
    typer.Option(
        "--heartbeat-interval",
        envvar="TASKMESH_HEARTBEAT_INTERVAL",
        min=0.01,
        help="Seconds between heartbeats.",
    ),
]
HbLiveness = Annotated[
    int,
    typer.Option(
        "--heartbeat-liveness",
        envvar="TASKMESH_HEARTBEAT_LIVENESS",
        min=1,
        help="Missed heartbeats before a peer is declared dead.",
    ),
]
BrokerUrl = Annotated[
    str,
    typer.Option("--broker", envvar="TASKMESH_BROKER", help="Broker address, tcp://HOST:PORT."),
]
CurveSecret = Annotated[
    str | None,
    typer.Option(
        "--curve-secret",
        envvar="TASKMESH_CURVE_SECRET",
        help="This peer's NAME.key_secret (taskmesh keys generate): turns on CurveZMQ.",
    ),
]
BrokerKey = Annotated[
    str | None,
    typer.Option(
        "--broker-key", envvar="TASKMESH_BROKER_KEY", help="The broker's public key file."
    ),
]


class _JsonFormatter(logging.Formatter):
    """One JSON object per line, for log collectors (--log-json)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _setup_logging(level: str, as_json: bool = False) -> None:
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise typer.BadParameter(f"unknown log level {level!r}", param_hint="--log-level")
    handler = logging.StreamHandler(sys.stderr)
    if as_json:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    logging.basicConfig(level=numeric, handlers=[handler])


# A young-generation collection every 20,000 allocations instead of 700: the broker and the
# worker supervisor allocate a few short-lived objects per task and keep many long-lived ones
# (every pending task's record), and the default thresholds made the collector walk them over
# and over: 12 % of the broker's CPU per no-op task. Cyclic garbage waits at most 20,000
# allocations longer. Only these two long-running processes of ours are tuned; executors (user
# code) and producers (the user's process) keep Python's defaults.
_SERVICE_GC_THRESHOLDS = (20_000, 20, 100)


def _tune_for_service() -> None:
    gc.freeze()  # what start-up loaded (modules, config) is never garbage: stop walking it
    gc.set_threshold(*_SERVICE_GC_THRESHOLDS)
    from taskmesh.heap import KEEPER

    KEEPER.keep_large_payloads()  # large payloads land in warm memory: see taskmesh/heap.py


def _json_option(option: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{option} is not valid JSON ({exc}): {text!r}") from None


def _routes(values: list[str]) -> tuple[tuple[str, str], ...]:
    routes = []
    for value in values:
        for item in value.split(","):
            queue, sep, strategy = item.strip().partition("=")
            if not sep or not queue or not strategy:
                raise typer.BadParameter(
                    f"expected QUEUE=STRATEGY, got {item!r}", param_hint="--route"
                )
            routes.append((queue.strip(), strategy.strip()))
    return tuple(routes)


def _importable(modules: str) -> tuple[str, ...]:
    """Check that each module can be found (without running it here) for --import."""
    import importlib.util

    names = tuple(m.strip() for m in modules.split(",") if m.strip())
    for name in names:
        try:
            found = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            found = None
        if found is None:
            raise ValueError(f"--import: cannot find module {name!r}")
    return names


def _fail(message: str) -> typer.Exit:
    typer.echo(f"taskmesh: {message}", err=True)
    return typer.Exit(1)


@app.command()
def broker(
    bind: Annotated[
        str,
        typer.Option(
            "--bind", envvar="TASKMESH_BIND", help="Address to listen on; port 0 picks a free one."
        ),
    ] = DEFAULT_BROKER,
    journal: Annotated[
        str,
        typer.Option(
            "--journal",
            envvar="TASKMESH_JOURNAL",
            help="Journal file; :memory: for no persistence.",
        ),
    ] = "taskmesh.db",
    journal_sync: Annotated[
        str,
        typer.Option(
            "--journal-sync",
            envvar="TASKMESH_JOURNAL_SYNC",
            help="FULL (survives power loss) or NORMAL (survives a killed broker).",
        ),
    ] = "FULL",
    heartbeat_interval: HbInterval = 1.0,
    heartbeat_liveness: HbLiveness = 3,
    result_ttl: Annotated[
        float,
        typer.Option(
            "--result-ttl", envvar="TASKMESH_RESULT_TTL", min=0, help="Seconds outcomes are kept."
        ),
    ] = 3600.0,
    max_message_bytes: Annotated[
        int,
        typer.Option(
            "--max-message-bytes",
            envvar="TASKMESH_MAX_MESSAGE_BYTES",
            min=1024,
            help="Larger messages are dropped.",
        ),
    ] = 1 << 30,
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure", envvar="TASKMESH_INSECURE", help="Allow a non-loopback bind without keys."
        ),
    ] = False,
    port_file: Annotated[
        str | None,
        typer.Option(
            "--port-file", envvar="TASKMESH_PORT_FILE", help="Write the bound address to this file."
        ),
    ] = None,
    curve_secret: Annotated[
        str | None,
        typer.Option(
            "--curve-secret",
            envvar="TASKMESH_CURVE_SECRET",
            help="The broker's NAME.key_secret: CurveZMQ encryption and key authentication.",
        ),
    ] = None,
    producers: Annotated[
        str | None,
        typer.Option(
            "--producers",
            envvar="TASKMESH_PRODUCER_KEYS",
            help="Folder of public keys (*.key) allowed to submit, cancel and read status.",
        ),
    ] = None,
    workers: Annotated[
        str | None,
        typer.Option(
            "--workers",
            envvar="TASKMESH_WORKER_KEYS",
            help="Folder of public keys (*.key) allowed to run tasks.",
        ),
    ] = None,
    readers: Annotated[
        str | None,
        typer.Option(
            "--readers",
            envvar="TASKMESH_READER_KEYS",
            help="Folder of public keys (*.key) allowed to read status only.",
        ),
    ] = None,
    route: Annotated[
        list[str] | None,
        typer.Option(
            "--route",
            envvar="TASKMESH_ROUTE",
            help="QUEUE=STRATEGY (least-loaded, round-robin, random, weighted, key); repeatable.",
        ),
    ] = None,
    priority_aging: Annotated[
        float,
        typer.Option(
            "--priority-aging",
            envvar="TASKMESH_PRIORITY_AGING",
            min=0,
            help="Seconds of waiting worth one priority level (0: strict priorities).",
        ),
    ] = 0.0,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port",
            envvar="TASKMESH_METRICS_PORT",
            min=1,
            max=65535,
            help="Serve Prometheus metrics on this port.",
        ),
    ] = None,
    metrics_host: Annotated[
        str,
        typer.Option(
            "--metrics-host", envvar="TASKMESH_METRICS_HOST", help="Address for the metrics."
        ),
    ] = "127.0.0.1",
    log_level: LogLevel = "INFO",
    log_json: LogJson = False,
) -> None:
    """Run the broker. Key folders are re-read when they change and on SIGHUP."""
    from taskmesh.broker import Broker, is_loopback

    _setup_logging(log_level, log_json)
    _tune_for_service()
    try:
        config = BrokerConfig(
            bind=bind,
            journal=journal,
            journal_sync=journal_sync,
            heartbeat=HeartbeatConfig(heartbeat_interval, heartbeat_liveness),
            result_ttl_s=result_ttl,
            max_message_bytes=max_message_bytes,
            insecure=insecure,
            port_file=port_file,
            curve_secret=curve_secret,
            producers=producers,
            workers=workers,
            readers=readers,
            routes=_routes(route or []),
            priority_aging_s=priority_aging,
            metrics_port=metrics_port,
            metrics_host=metrics_host,
        )
        server = Broker(config)
    except (TaskmeshError, ValueError) as exc:
        raise _fail(str(exc)) from None
    if not is_loopback(bind) and not curve_secret:
        logging.getLogger("taskmesh").warning(
            "INSECURE: %s accepts unauthenticated, unencrypted peers: anyone who reaches it can "
            "submit tasks, which run as code on every worker, and can read every argument and "
            "result on the wire. Use --curve-secret with --producers and --workers instead.",
            bind,
        )
    try:
        server.run()
    except TaskmeshError as exc:
        raise _fail(str(exc)) from None
    if server.failed:
        raise _fail("the broker stopped because its journal could not be written")


@app.command()
def worker(
    broker: BrokerUrl = DEFAULT_BROKER,
    concurrency: Annotated[
        int,
        typer.Option(
            "--concurrency", "-c", envvar="TASKMESH_CONCURRENCY", min=1, help="Executor processes."
        ),
    ] = os.cpu_count() or 1,
    queues: Annotated[
        str,
        typer.Option(
            "--queues", "-q", envvar="TASKMESH_QUEUES", help="Comma-separated queues to serve."
        ),
    ] = "default",
    name: Annotated[
        str | None,
        typer.Option(
            "--name", envvar="TASKMESH_WORKER_NAME", help="Worker name; default HOST-PID."
        ),
    ] = None,
    prefetch: Annotated[
        int | None,
        typer.Option(
            "--prefetch",
            envvar="TASKMESH_PREFETCH",
            min=0,
            help="Tasks held waiting beyond the free slots, so that no executor idles between "
            "two tasks; default: one per executor. Never started there, they are requeued "
            "without a charge if the worker dies.",
        ),
    ] = None,
    weight: Annotated[
        float,
        typer.Option(
            "--weight",
            envvar="TASKMESH_WEIGHT",
            min=0.001,
            help="Share of tasks under the broker's weighted routing.",
        ),
    ] = 1.0,
    grace: Annotated[
        float,
        typer.Option(
            "--grace",
            envvar="TASKMESH_SHUTDOWN_GRACE",
            min=0,
            help="On SIGTERM, seconds running tasks may take to finish (0: leave at once).",
        ),
    ] = 60.0,
    max_tasks_per_child: Annotated[
        int,
        typer.Option(
            "--max-tasks-per-child",
            envvar="TASKMESH_MAX_TASKS_PER_CHILD",
            min=0,
            help="Replace an executor after this many tasks (0: never).",
        ),
    ] = 0,
    max_memory_per_child: Annotated[
        int,
        typer.Option(
            "--max-memory-per-child",
            envvar="TASKMESH_MAX_MEMORY_PER_CHILD",
            min=0,
            help="Replace an executor grown past this many MB (0: never).",
        ),
    ] = 0,
    imports: Annotated[
        str,
        typer.Option(
            "--import",
            envvar="TASKMESH_IMPORT",
            help="Comma-separated modules to preload into every executor.",
        ),
    ] = "",
    heartbeat_interval: HbInterval = 1.0,
    heartbeat_liveness: HbLiveness = 3,
    curve_secret: CurveSecret = None,
    broker_key: BrokerKey = None,
    log_level: LogLevel = "INFO",
    log_json: LogJson = False,
) -> None:
    """Run a worker node: a supervisor and N executor processes."""
    from taskmesh.worker import WorkerNode

    _setup_logging(log_level, log_json)
    _tune_for_service()
    # like `python script.py`, let tasks import modules from the folder the worker starts in
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        config = WorkerConfig(
            broker=broker,
            concurrency=concurrency,
            queues=tuple(q.strip() for q in queues.split(",") if q.strip()),
            name=name or default_worker_name(),
            heartbeat=HeartbeatConfig(heartbeat_interval, heartbeat_liveness),
            prefetch=prefetch,
            weight=weight,
            shutdown_grace_s=grace,
            max_tasks_per_child=max_tasks_per_child,
            max_memory_per_child_mb=max_memory_per_child,
            imports=_importable(imports),
            curve_secret=curve_secret,
            broker_key=broker_key,
        )
        node = WorkerNode(config)
        node.run()
    except (TaskmeshError, ValueError) as exc:
        raise _fail(str(exc)) from None


@app.command()
def status(
    broker: BrokerUrl = DEFAULT_BROKER,
    as_json: Annotated[bool, typer.Option("--json", help="Print the snapshot as JSON.")] = False,
    timeout: StatusTimeout = 3.0,
    curve_secret: CurveSecret = None,
    broker_key: BrokerKey = None,
) -> None:
    """Print one snapshot of workers, queues and counters; exit 1 if no broker answers."""
    from taskmesh.status import print_status

    snapshot = _snapshot(broker, timeout, curve_secret, broker_key)
    if as_json:
        typer.echo(json.dumps(snapshot, indent=2, sort_keys=True))
    else:
        print_status(snapshot)


@app.command()
def failed(
    broker: BrokerUrl = DEFAULT_BROKER,
    as_json: Annotated[bool, typer.Option("--json", help="Print the failures as JSON.")] = False,
    timeout: StatusTimeout = 3.0,
    curve_secret: CurveSecret = None,
    broker_key: BrokerKey = None,
) -> None:
    """List the last tasks that failed for good, with their exception type and worker."""
    from taskmesh.status import print_failures

    failures = _snapshot(broker, timeout, curve_secret, broker_key).get("recent_failures", [])
    if as_json:
        typer.echo(json.dumps(failures, indent=2))
    else:
        print_failures(failures)


def _snapshot(
    broker: str, timeout: float, curve_secret: str | None, broker_key: str | None
) -> dict[str, Any]:
    """One status snapshot, or exit 1 with a one-line message."""
    from taskmesh.client import fetch_status

    try:
        return fetch_status(broker, timeout, curve_secret=curve_secret, broker_key=broker_key)
    except TaskmeshError as exc:
        raise _fail(str(exc)) from None


@app.command()
def dashboard(
    broker: BrokerUrl = DEFAULT_BROKER,
    refresh: Annotated[
        float,
        typer.Option(
            "--refresh",
            envvar="TASKMESH_DASHBOARD_REFRESH",
            min=0.05,
            help="Seconds between status snapshots.",
        ),
    ] = 0.5,
    curve_secret: CurveSecret = None,
    broker_key: BrokerKey = None,
) -> None:
    """Live view of workers, queues, throughput and failures; q or Ctrl-C quits."""
    from taskmesh.dashboard import run_dashboard

    if not sys.stdout.isatty():
        raise _fail(
            "the dashboard needs a terminal; for a snapshot use `taskmesh status` "
            "(or `taskmesh status --json`)"
        )
    try:
        _use_keys(curve_secret, broker_key)
        run_dashboard(broker, refresh_s=refresh)
    except (TaskmeshError, ValueError) as exc:
        raise _fail(str(exc)) from None


@app.command()
def demo(
    tasks: Annotated[int, typer.Option("--tasks", min=10, help="How many tasks to run.")] = 300,
    workers: Annotated[int, typer.Option("--workers", min=2, help="Local worker nodes.")] = 2,
    concurrency: Annotated[
        int, typer.Option("--concurrency", min=1, help="Executors per worker.")
    ] = 2,
) -> None:
    """An embedded broker and local workers running a real workload, then a summary."""
    from taskmesh.demo import run_demo

    try:
        code = run_demo(tasks=tasks, workers=workers, concurrency=concurrency)
    except TaskmeshError as exc:
        raise _fail(str(exc)) from None
    raise typer.Exit(code)


@app.command()
def bench(
    broker: Annotated[
        str | None,
        typer.Option("--broker", help="Measure an existing mesh instead of an embedded one."),
    ] = None,
    workloads: Annotated[
        str, typer.Option("--workloads", "-w", help="Comma-separated: throughput,latency,...")
    ] = "throughput,latency,sleep,payload,scale",
    tasks: Annotated[
        int, typer.Option("--tasks", min=1, help="Tasks per throughput run.")
    ] = 10_000,
    repeat: Annotated[int, typer.Option("--repeat", min=1, help="Runs per figure (median).")] = 3,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Embedded worker nodes.")] = 1,
    concurrency: Annotated[
        int, typer.Option("--concurrency", min=1, help="Executors per embedded worker.")
    ] = 2,
    journal: Annotated[
        bool, typer.Option("--journal/--no-journal", help="Embedded broker with SQLite journal.")
    ] = False,
    payload_mb: Annotated[int, typer.Option("--payload-mb", min=1, help="Payload size.")] = 100,
    scale_pending: Annotated[
        int, typer.Option("--scale-pending", min=1000, help="Tasks queued for the memory figure.")
    ] = 1_000_000,
    curve: Annotated[
        bool, typer.Option("--curve", help="Embedded mesh over CurveZMQ, with throwaway keys.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """The built-in benchmark, each figure beside a baseline measured in the same run."""
    from taskmesh.bench import BenchConfig, run_bench
    from taskmesh.status import print_bench

    try:
        config = BenchConfig(
            workloads=tuple(w.strip() for w in workloads.split(",") if w.strip()),
            broker=broker,
            workers=workers,
            concurrency=concurrency,
            journal="bench.db" if journal else ":memory:",
            tasks=tasks,
            repeat=repeat,
            payload_mb=payload_mb,
            scale_pending=scale_pending,
            curve=curve,
        )
    except ValueError as exc:
        raise _fail(str(exc)) from None
    say = (lambda _msg: None) if as_json else (lambda msg: typer.echo(msg, err=True))
    try:
        report = run_bench(config, progress=say)
    except (TaskmeshError, ValueError) as exc:
        raise _fail(str(exc)) from None
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        print_bench(report)


def _use_keys(curve_secret: str | None, broker_key: str | None) -> None:
    """Check a reader's keys now, and hand them to every ``fetch_status`` of this process
    (which reads TASKMESH_CURVE_SECRET and TASKMESH_BROKER_KEY when given no keys)."""
    from taskmesh.security import client_keys

    client_keys(curve_secret, broker_key)  # a missing or malformed file fails here, not later
    if curve_secret:
        os.environ["TASKMESH_CURVE_SECRET"] = curve_secret
    if broker_key:
        os.environ["TASKMESH_BROKER_KEY"] = broker_key


# ----------------------------------------------------------------------------- taskmesh keys

keys_app = typer.Typer(
    help="CurveZMQ key pairs for a broker, producer, worker or reader (see docs/security.md).",
    no_args_is_help=True,
)
app.add_typer(keys_app, name="keys")


@keys_app.command("generate")
def keys_generate(
    name: Annotated[str, typer.Option("--name", help="Key name: NAME.key and NAME.key_secret.")],
    out: Annotated[str, typer.Option("--out", help="Folder to write them into.")] = ".",
) -> None:
    """Make a key pair: NAME.key (public, to share) and NAME.key_secret (mode 0600, to keep)."""
    from taskmesh.security import generate_keypair, load_public_key

    try:
        files = generate_keypair(name, out)
    except (TaskmeshError, OSError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"public key  {files.public}  {load_public_key(files.public).decode()}")
    typer.echo(f"secret key  {files.secret}  (mode 0600)")


@keys_app.command("show")
def keys_show(
    file: Annotated[str, typer.Argument(help="A NAME.key or NAME.key_secret file.")],
) -> None:
    """Print the public key (z85) in a key file; never the secret."""
    from taskmesh.security import load_public_key

    try:
        typer.echo(load_public_key(file).decode())
    except TaskmeshError as exc:
        raise _fail(str(exc)) from None


# ----------------------------------------------------------------------------- taskmesh schedule

schedule_app = typer.Typer(
    help="Periodic tasks, run by the broker itself (no beat process): add, list, remove.",
    no_args_is_help=True,
)
app.add_typer(schedule_app, name="schedule")

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_every(text: str) -> float:
    """``30``, ``30s``, ``5m``, ``1h``, ``1d`` or ``1h30m`` as seconds."""
    import re

    text = text.strip().lower()
    try:
        return float(text)
    except ValueError:
        pass
    parts = re.fullmatch(r"(?:\d+(?:\.\d+)?[smhd])+", text)
    if not parts:
        raise ValueError(f"--every {text!r}: expected seconds or e.g. 30s, 5m, 1h30m, 1d")
    return sum(float(n) * _UNITS[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([smhd])", text))


def _load_target(target: str) -> Any:
    """``package.module:function``, imported from the current folder like ``python -m``."""
    import importlib

    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected MODULE:FUNCTION, got {target!r}")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name}: {exc}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{target} is not callable")
    return obj


@schedule_app.command("add")
def schedule_add(
    target: Annotated[str, typer.Argument(help="The task as MODULE:FUNCTION (importable here).")],
    every: Annotated[
        str | None, typer.Option("--every", help="Interval: seconds, or 30s, 5m, 1h, 1d.")
    ] = None,
    cron: Annotated[
        str | None, typer.Option("--cron", help='A five-field cron line (UTC), e.g. "0 3 * * *".')
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="Schedule name (default: the task's name).")
    ] = None,
    args: Annotated[str, typer.Option("--args", help="Positional arguments, a JSON list.")] = "[]",
    kwargs: Annotated[
        str, typer.Option("--kwargs", help="Keyword arguments, a JSON object.")
    ] = "{}",
    queue: Annotated[
        str | None, typer.Option("--queue", help="Queue (default: the task's).")
    ] = None,
    broker: BrokerUrl = DEFAULT_BROKER,
    timeout: StatusTimeout = 5.0,
    curve_secret: CurveSecret = None,
    broker_key: BrokerKey = None,
) -> None:
    """Register (or replace, by name) a periodic task; without --every/--cron the task's own
    @task(every=...) or @task(cron=...) is used."""
    from taskmesh.client import Client
    from taskmesh.options import periodic_rule
    from taskmesh.periodic import check_every

    try:
        fn = _load_target(target)
        call_args = _json_option("--args", args)
        call_kwargs = _json_option("--kwargs", kwargs)
        if not isinstance(call_args, list) or not isinstance(call_kwargs, dict):
            raise ValueError("--args takes a JSON list and --kwargs a JSON object")
        if every is not None and cron is not None:
            raise ValueError("give --every or --cron, not both")
        every_s: float | None = parse_every(every) if every is not None else None
        rule = cron
        options = getattr(fn, "options", None)
        if every_s is None and rule is None:
            declared = (options.every, options.cron) if options is not None else (None, None)
            if declared == (None, None):
                raise ValueError(
                    f"{target} declares no schedule (@task(every=...) or @task(cron=...)): "
                    "give --every or --cron"
                )
            every_s, rule = periodic_rule(*declared)
        if every_s is not None:
            check_every(every_s)  # named as the option here, not as a Python argument
        if queue is not None:
            call_kwargs["_queue"] = queue
        with Client(
            broker, connect_timeout_s=timeout, curve_secret=curve_secret, broker_key=broker_key
        ) as client:
            label = client.schedule(
                fn, *call_args, _every=every_s, _cron=rule, _name=name, **call_kwargs
            )
            listed = {s["name"]: s for s in client.schedules()}
    except (TaskmeshError, ValueError, TypeError) as exc:
        raise _fail(str(exc)) from None
    entry = listed.get(label, {})
    typer.echo(f"scheduled {label}: {entry.get('rule', '')}")


@schedule_app.command("list")
def schedule_list(
    broker: BrokerUrl = DEFAULT_BROKER,
    as_json: Annotated[bool, typer.Option("--json", help="Print them as JSON.")] = False,
    timeout: StatusTimeout = 3.0,
    curve_secret: CurveSecret = None,
    broker_key: BrokerKey = None,
) -> None:
    """The broker's periodic tasks: rule, next and last run (UTC), runs, ticks skipped."""
    from rich.console import Console

    from taskmesh.status import schedules_table

    found = _snapshot(broker, timeout, curve_secret, broker_key).get("schedules", [])
    if as_json:
        typer.echo(json.dumps(found, indent=2))
    elif not found:
        typer.echo("no periodic task")
    else:
        Console().print(schedules_table(found))


@schedule_app.command("remove")
def schedule_remove(
    name: Annotated[str, typer.Argument(help="The schedule's name (see taskmesh schedule list).")],
    broker: BrokerUrl = DEFAULT_BROKER,
    timeout: StatusTimeout = 5.0,
    curve_secret: CurveSecret = None,
    broker_key: BrokerKey = None,
) -> None:
    """Stop a periodic task; exit 1 if the broker has none by that name."""
    from taskmesh.client import Client

    try:
        with Client(
            broker, connect_timeout_s=timeout, curve_secret=curve_secret, broker_key=broker_key
        ) as client:
            client.unschedule(name)
    except TaskmeshError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"removed {name}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
