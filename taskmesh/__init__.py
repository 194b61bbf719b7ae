"""taskmesh: a distributed task queue and worker framework for Python over ZeroMQ.

from taskmesh import task

@task
def add(x, y):
    return x + y

add.submit(2, 3).result(timeout=10)   # 5, computed on a worker
"""

from __future__ import annotations

from concurrent.futures import as_completed, wait
from typing import Any

from taskmesh.client import Client, TaskFuture, connect, default_client
from taskmesh.errors import (
    AuthenticationError,
    BrokerUnavailable,
    DependencyFailed,
    ProtocolError,
    RemoteError,
    SerializationError,
    TaskCancelled,
    TaskLost,
    TaskmeshError,
    TaskTimeout,
    WorkerLost,
)
from taskmesh.progress import progress
from taskmesh.task import Task, task

__version__ = "0.1.0"


def cancel(future: TaskFuture[Any], terminate: bool = False) -> None:
    """Cancel a task; with ``terminate=True`` a running task's executor is killed too."""
    future._client.cancel([future], terminate=terminate)


__all__ = [
    "AuthenticationError",
    "BrokerUnavailable",
    "Client",
    "DependencyFailed",
    "ProtocolError",
    "RemoteError",
    "SerializationError",
    "Task",
    "TaskCancelled",
    "TaskFuture",
    "TaskLost",
    "TaskTimeout",
    "TaskmeshError",
    "WorkerLost",
    "__version__",
    "as_completed",
    "cancel",
    "connect",
    "default_client",
    "progress",
    "task",
    "wait",
]
