"""What an executor reports for each way a task can end, run in-process (no executor process)."""

from __future__ import annotations

import pickle
import sys
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any

import cloudpickle
import pytest

from taskmesh.errors import SerializationError
from taskmesh.executor import (
    _FunctionCache,
    describe_exception,
    pickle_exception,
    qualified_name,
    run_task,
)
from taskmesh.protocol import Status

pytestmark = pytest.mark.timeout(30)


class CustomError(Exception):
    pass


class NeedsTwoArgs(Exception):
    """Pickles, but unpickling calls ``NeedsTwoArgs(a)`` and fails."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(a)
        self.b = b


class HoldsALock(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


def add(x: int, y: int = 0) -> int:
    return x + y


def raise_value_error(message: str) -> None:
    raise ValueError(message)


def raise_custom() -> None:
    raise CustomError("custom failure")


def raise_needs_two_args() -> None:
    raise NeedsTwoArgs("first", "second")


def raise_holds_a_lock() -> None:
    raise HoldsALock("locked")


def exit_3() -> None:
    sys.exit(3)


def return_a_lock() -> threading.Lock:
    return threading.Lock()


async def double_later(x: int) -> int:
    return 2 * x


def run(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[int, bytes, Any]:
    return run_task(
        _FunctionCache(),
        "task-1",
        "my_task",
        cloudpickle.dumps(fn),
        cloudpickle.dumps((args, kwargs)),
    )


# --------------------------------------------------------------------------- success


def test_success_returns_ok_and_the_pickled_value() -> None:
    status, value, error = run(add, 2, y=3)
    assert status == Status.OK
    assert pickle.loads(value) == 5
    assert error is None


def test_coroutine_functions_are_awaited() -> None:
    status, value, error = run(double_later, 21)
    assert (status, pickle.loads(value), error) == (Status.OK, 42, None)


def test_lambda_travels_by_value() -> None:
    offset = 10
    status, value, _ = run(lambda x: x + offset, 5)
    assert status == Status.OK
    assert pickle.loads(value) == 15


# --------------------------------------------------------------------------- exceptions


def test_exception_is_pickled_and_described() -> None:
    status, value, error = run(raise_value_error, "bad input")
    assert status == Status.ERROR
    exc = pickle.loads(value)
    assert type(exc) is ValueError
    assert exc.args == ("bad input",)
    assert error is not None
    type_name, message, tb_text, mro = error
    assert type_name == "ValueError"
    assert message == "bad input"
    assert "raise_value_error" in tb_text  # the remote frame is in the traceback
    assert tb_text.rstrip().endswith("ValueError: bad input")
    assert mro == ("ValueError", "Exception", "BaseException")


def test_custom_exception_keeps_its_qualified_name_and_mro() -> None:
    status, value, error = run(raise_custom)
    assert status == Status.ERROR
    assert type(pickle.loads(value)) is CustomError
    module = CustomError.__module__
    assert error is not None
    assert error[0] == f"{module}.CustomError"
    assert error[3] == (f"{module}.CustomError", "Exception", "BaseException")


@pytest.mark.parametrize("fn", [raise_needs_two_args, raise_holds_a_lock])
def test_exception_that_cannot_travel_leaves_an_empty_blob_and_its_description(
    fn: Callable[[], None],
) -> None:
    status, value, error = run(fn)
    assert status == Status.ERROR
    assert value == b""  # the producer builds a RemoteError from the description
    assert error is not None
    assert error[0].endswith(("NeedsTwoArgs", "HoldsALock"))
    assert error[1] in ("first", "locked")


def test_system_exit_in_user_code_is_an_error_not_an_exit() -> None:
    status, value, error = run(exit_3)
    assert status == Status.ERROR
    assert isinstance(pickle.loads(value), SystemExit)
    assert error is not None
    assert error[0] == "SystemExit"
    assert "BaseException" in error[3]


def test_unpicklable_result_is_a_serialization_error() -> None:
    status, value, error = run(return_a_lock)
    assert status == Status.ERROR
    assert error is not None
    type_name, message, tb_text, mro = error
    assert type_name == "taskmesh.errors.SerializationError"
    assert "my_task [task-1]" in message
    assert "cannot be pickled" in message
    assert "result type lock" in message
    assert "TypeError" in mro  # except TypeError catches it on the producer's side
    assert "taskmesh.errors.TaskmeshError" in mro
    assert "TypeError" in tb_text  # the pickling failure's own traceback
    exc = pickle.loads(value)
    assert isinstance(exc, SerializationError)
    assert str(exc) == message


# --------------------------------------------------------------------------- load failures


@pytest.fixture
def vanishing_module() -> Iterator[types.ModuleType]:
    """A module that exists while a function is pickled by reference, then is gone."""
    name = "taskmesh_test_vanishing_module"
    module = types.ModuleType(name)
    exec("def work(x):\n    return x\n", module.__dict__)
    sys.modules[name] = module
    try:
        yield module
    finally:
        sys.modules.pop(name, None)


def test_function_from_a_missing_module_gets_the_by_reference_hint(
    vanishing_module: types.ModuleType,
) -> None:
    fn_blob = cloudpickle.dumps(vanishing_module.work)
    assert vanishing_module.__name__.encode() in fn_blob  # by reference, not by value
    del sys.modules[vanishing_module.__name__]
    status, value, error = run_task(
        _FunctionCache(), "task-9", "work", fn_blob, cloudpickle.dumps(((1,), {}))
    )
    assert status == Status.ERROR
    assert error is not None
    type_name, message, tb_text, mro = error
    assert type_name == "taskmesh.errors.SerializationError"
    assert message.startswith("could not load the function of task work [task-9]")
    assert "ModuleNotFoundError" in message
    assert "travel by reference" in message
    assert "register_pickle_by_value" in message
    assert "ModuleNotFoundError" in tb_text
    assert mro[0] == "taskmesh.errors.SerializationError"
    assert isinstance(pickle.loads(value), SerializationError)


def test_function_missing_from_its_module_gets_the_hint(
    vanishing_module: types.ModuleType,
) -> None:
    fn_blob = cloudpickle.dumps(vanishing_module.work)
    del vanishing_module.work
    _, _, error = run_task(_FunctionCache(), "t", "work", fn_blob, cloudpickle.dumps(((), {})))
    assert error is not None
    assert "AttributeError" in error[1]
    assert "travel by reference" in error[1]


def test_corrupt_function_blob_is_reported_without_the_hint() -> None:
    status, _, error = run_task(
        _FunctionCache(), "t", "work", b"not a pickle", cloudpickle.dumps(((), {}))
    )
    assert status == Status.ERROR
    assert error is not None
    assert error[1].startswith("could not load the function of task work [t]")
    assert "travel by reference" not in error[1]


def test_corrupt_arguments_are_reported() -> None:
    status, value, error = run_task(
        _FunctionCache(), "t", "work", cloudpickle.dumps(add), b"garbage"
    )
    assert status == Status.ERROR
    assert error is not None
    assert error[0] == "taskmesh.errors.SerializationError"
    assert error[1].startswith("could not unpickle the arguments of task work [t]")
    assert isinstance(pickle.loads(value), SerializationError)


def test_function_cache_loads_each_blob_once() -> None:
    cache = _FunctionCache()
    blob = cloudpickle.dumps(lambda: 1)
    assert cache.load(blob) is cache.load(blob)


# --------------------------------------------------------------------------- helpers


def test_describe_exception_of_a_never_raised_exception() -> None:
    type_name, message, tb_text, mro = describe_exception(KeyError("k"))
    assert type_name == "KeyError"
    assert message == "'k'"
    assert tb_text == "KeyError: 'k'\n"
    assert mro == ("KeyError", "LookupError", "Exception", "BaseException")


def test_qualified_name() -> None:
    assert qualified_name(ValueError) == "ValueError"
    assert qualified_name(SerializationError) == "taskmesh.errors.SerializationError"


def test_pickle_exception_round_trips_a_good_exception() -> None:
    blob = pickle_exception(CustomError("x"))
    loaded = pickle.loads(blob)
    assert type(loaded) is CustomError
    assert loaded.args == ("x",)
