"""The whole taskmesh exception tree.

::

    TaskmeshError
    ├── TaskTimeout          the task ran past its time limit; its executor was killed
    ├── WorkerLost           the task's workers died max_attempts times (poison-task protection)
    ├── TaskCancelled        the task was cancelled before it produced an outcome
    ├── DependencyFailed     a task this one depends on failed or was cancelled: it never ran
    ├── TaskLost             the broker has no record of the task (restarted without a journal)
    ├── BrokerUnavailable    no broker answered in time, or the address is unusable
    ├── ProtocolError        a peer sent a message taskmesh cannot accept
    ├── AuthenticationError  the broker refused this peer's credentials
    ├── SerializationError   a task, an argument or a result could not be pickled (also TypeError)
    └── RemoteError          a remote exception that could not be unpickled here

A remote exception that *does* unpickle is re-raised as its own type (so ``except ValueError``
works), with the remote traceback attached as a note (``add_note``).
"""

from __future__ import annotations

from concurrent.futures import CancelledError


class TaskmeshError(Exception):
    """Base class of every error taskmesh itself raises."""


class TaskTimeout(TaskmeshError):
    """The task overran its time limit and its executor was killed."""


class WorkerLost(TaskmeshError):
    """The task's workers or executors died ``max_attempts`` times while running it."""


class TaskCancelled(TaskmeshError, CancelledError):
    """The task was cancelled before it produced an outcome (also a ``CancelledError``)."""


class DependencyFailed(TaskmeshError):
    """A task given as an argument (a ``TaskFuture``) failed or was cancelled, so the task
    that depends on it never ran. The message names the failed task and its error."""


class TaskLost(TaskmeshError):
    """The broker has no record of the task: it restarted without a journal, or the outcome
    outlived its retention time."""


class BrokerUnavailable(TaskmeshError):
    """No broker answered within the timeout, or the broker address cannot be used."""


class ProtocolError(TaskmeshError):
    """A peer sent a malformed, oversized, unknown or wrong-version message."""


class AuthenticationError(TaskmeshError):
    """The broker refused this peer's keys or role."""


class SerializationError(TaskmeshError, TypeError):
    """A task function, an argument or a result could not be pickled or unpickled."""


class RemoteError(TaskmeshError):
    """A remote exception that could not be unpickled on this side.

    It carries what is always transferable: the remote type's name, its message and the
    formatted remote traceback.
    """

    def __init__(self, type_name: str, message: str, traceback_text: str = "") -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.traceback_text = traceback_text

    def __reduce__(self) -> tuple[type[RemoteError], tuple[str, str, str]]:
        return (RemoteError, (self.type_name, self.message, self.traceback_text))


__all__ = [
    "AuthenticationError",
    "BrokerUnavailable",
    "DependencyFailed",
    "ProtocolError",
    "RemoteError",
    "SerializationError",
    "TaskCancelled",
    "TaskLost",
    "TaskTimeout",
    "TaskmeshError",
    "WorkerLost",
]
