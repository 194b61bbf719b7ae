"""The producer's side of pickling: calls out, outcomes back to the right exception type."""

from __future__ import annotations

import pickle
import sys
import threading
import types
from concurrent.futures import CancelledError
from typing import Any

import cloudpickle
import pytest

from taskmesh.errors import (
    RemoteError,
    SerializationError,
    TaskCancelled,
    TaskLost,
    TaskmeshError,
    TaskTimeout,
    WorkerLost,
)
from taskmesh.executor import _FunctionCache, run_task
from taskmesh.protocol import ErrorInfo, Outcome, Status
from taskmesh.serialize import callable_name, dumps_call, dumps_function, load_outcome

pytestmark = pytest.mark.timeout(30)

REMOTE_TB = 'Traceback (most recent call last):\n  File "job.py", line 3, in f\nValueError: bad\n'


class AppError(Exception):
    pass


def info(type_name: str = "ValueError", message: str = "bad", tb: str = REMOTE_TB) -> ErrorInfo:
    return ErrorInfo(type_name, message, tb, (type_name, "Exception", "BaseException"))


def load(outcome: Outcome) -> tuple[bool, Any]:
    return load_outcome(outcome, "my_task")


# --------------------------------------------------------------------------- dumps_call


def test_dumps_call_round_trips() -> None:
    blob = dumps_call("f", [1, "two"], {"three": 3.0})
    assert cloudpickle.loads(blob) == ((1, "two"), {"three": 3.0})


def test_dumps_call_names_the_unpicklable_positional_argument() -> None:
    with pytest.raises(SerializationError) as info_:
        dumps_call("crunch", (1, "ok", threading.Lock()), {})
    message = str(info_.value)
    assert "crunch(...)" in message
    assert "argument 2 (a lock)" in message
    assert isinstance(info_.value, TypeError)  # except TypeError works, as with pickle
    assert info_.value.__cause__ is not None


def test_dumps_call_names_the_unpicklable_keyword_argument() -> None:
    with pytest.raises(SerializationError, match=r"keyword argument 'conn' \(a lock\)"):
        dumps_call("crunch", (1,), {"ok": 2, "conn": threading.Lock()})


def test_dumps_function_caches_the_pickle() -> None:
    def fn(x: int) -> int:
        return x

    first = dumps_function(fn)
    assert dumps_function(fn) is first
    assert cloudpickle.loads(first)(7) == 7


class Unpicklable:
    def __init__(self) -> None:
        self.lock = threading.Lock()

    def __call__(self) -> None:
        return None


def test_dumps_function_of_an_unpicklable_callable_names_it() -> None:
    with pytest.raises(SerializationError, match="task function Unpicklable cannot be pickled"):
        dumps_function(Unpicklable())


def test_callable_name() -> None:
    assert callable_name(test_callable_name) == "test_callable_name"
    assert callable_name(Unpicklable()) == "Unpicklable"


# --------------------------------------------------------------------------- load_outcome


def test_ok_gives_the_value() -> None:
    assert load(Outcome("t1", Status.OK, pickle.dumps({"a": [1, 2]}))) == (True, {"a": [1, 2]})


def test_ok_with_a_value_that_cannot_be_unpickled_is_a_serialization_error() -> None:
    ok, exc = load(Outcome("t1", Status.OK, b"\x80\x05garbage"))
    assert ok is False
    assert isinstance(exc, SerializationError)
    assert "my_task [t1]" in str(exc)


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (Status.TIMEOUT, TaskTimeout),
        (Status.WORKER_LOST, WorkerLost),
        (Status.CANCELLED, TaskCancelled),
        (Status.UNKNOWN, TaskLost),
    ],
)
def test_broker_statuses_map_to_taskmesh_errors(status: Status, expected: type) -> None:
    ok, exc = load(Outcome("t1", status, b"", info("X", f"{status.name} message")))
    assert ok is False
    assert type(exc) is expected
    assert isinstance(exc, TaskmeshError)
    if status is not Status.UNKNOWN:
        assert str(exc) == f"{status.name} message"  # the broker's own words
    else:
        assert "no record of task my_task [t1]" in str(exc)


@pytest.mark.parametrize(
    ("status", "expected", "words"),
    [
        (Status.TIMEOUT, TaskTimeout, "timed out"),
        (Status.WORKER_LOST, WorkerLost, "was lost"),
        (Status.CANCELLED, TaskCancelled, "was cancelled"),
    ],
)
def test_broker_statuses_without_error_info_get_a_default_message(
    status: Status, expected: type, words: str
) -> None:
    ok, exc = load(Outcome("t1", status))
    assert ok is False
    assert type(exc) is expected
    assert str(exc) == f"task my_task [t1] {words}"


def test_cancelled_is_also_a_concurrent_futures_cancelled_error() -> None:
    _, exc = load(Outcome("t1", Status.CANCELLED))
    assert isinstance(exc, CancelledError)


def test_every_status_maps_to_a_value_or_an_exception() -> None:
    for status in Status:
        value = pickle.dumps(1) if status is Status.OK else b""
        ok, result = load(Outcome("t1", status, value, info()))
        assert ok is (status is Status.OK), status
        if not ok:
            assert isinstance(result, BaseException), status


def test_error_reraises_the_original_type_with_the_remote_traceback() -> None:
    blob = cloudpickle.dumps(AppError("it broke"))
    ok, exc = load(Outcome("t1", Status.ERROR, blob, info("AppError", "it broke")))
    assert ok is False
    assert type(exc) is AppError
    assert exc.args == ("it broke",)
    (note,) = exc.__notes__
    assert note.startswith("Remote traceback of task my_task [t1]:\n")
    assert note.endswith("ValueError: bad")  # the remote text, trailing newline stripped


def test_error_without_traceback_text_adds_no_note() -> None:
    blob = pickle.dumps(KeyError("k"))
    _, exc = load(Outcome("t1", Status.ERROR, blob, info(tb="")))
    assert type(exc) is KeyError
    assert getattr(exc, "__notes__", []) == []


@pytest.mark.parametrize(
    "value",
    [
        b"",  # the worker could not pickle the exception
        b"\x80\x05garbage",  # it does not unpickle here
        cloudpickle.dumps("not an exception"),
    ],
    ids=["empty", "unloadable", "not-an-exception"],
)
def test_error_that_cannot_be_rebuilt_is_a_remote_error(value: bytes) -> None:
    ok, exc = load(Outcome("t1", Status.ERROR, value, info("mod.Weird", "it broke")))
    assert ok is False
    assert type(exc) is RemoteError
    assert exc.type_name == "mod.Weird"
    assert exc.message == "it broke"
    assert exc.traceback_text == REMOTE_TB
    assert str(exc) == "mod.Weird: it broke"


def test_error_from_a_module_missing_here_is_a_remote_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module = types.ModuleType("taskmesh_test_only_on_the_worker")
    exec("class Err(Exception):\n    pass\n", module.__dict__)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    blob = pickle.dumps(module.Err("x"))
    monkeypatch.delitem(sys.modules, module.__name__)
    with pytest.raises(ModuleNotFoundError):
        pickle.loads(blob)
    _, exc = load(Outcome("t1", Status.ERROR, blob, info(f"{module.__name__}.Err", "x")))
    assert type(exc) is RemoteError
    assert exc.type_name == f"{module.__name__}.Err"
    assert exc.message == "x"


def test_error_without_any_info_is_a_plain_remote_error() -> None:
    _, exc = load(Outcome("t1", Status.ERROR))
    assert type(exc) is RemoteError
    assert exc.type_name == "Exception"
    assert exc.traceback_text == ""


def test_remote_error_pickles() -> None:
    exc = RemoteError("mod.Weird", "msg", "tb")
    copy = pickle.loads(pickle.dumps(exc))
    assert (copy.type_name, copy.message, copy.traceback_text) == ("mod.Weird", "msg", "tb")


def test_executor_report_round_trips_to_the_producer() -> None:
    """run_task on the worker, load_outcome on the producer: the user's except clause works."""

    def job(path: str) -> None:
        raise AppError(f"cannot open {path}")

    status, value, error = run_task(
        _FunctionCache(), "t7", "job", cloudpickle.dumps(job), cloudpickle.dumps((("x.csv",), {}))
    )
    assert error is not None
    outcome = Outcome("t7", Status(status), value, ErrorInfo(*error))
    ok, exc = load_outcome(outcome, "job")
    assert ok is False
    assert type(exc) is AppError
    assert str(exc) == "cannot open x.csv"
    assert "in job" in exc.__notes__[0]  # the remote frame


def test_unpicklable_result_reaches_the_producer_as_a_type_error() -> None:
    status, value, error = run_task(
        _FunctionCache(),
        "t8",
        "make_lock",
        cloudpickle.dumps(threading.Lock),
        cloudpickle.dumps(((), {})),
    )
    assert error is not None
    ok, exc = load_outcome(Outcome("t8", Status(status), value, ErrorInfo(*error)), "make_lock")
    assert ok is False
    assert isinstance(exc, SerializationError)
    assert isinstance(exc, TypeError)
    assert "cannot be pickled" in str(exc)
