"""Every program in ``examples/`` runs, succeeds and cleans up after itself.

Each example runs as a subprocess with this interpreter, twice: on its own embedded mesh (the
one-command form) and against a running broker through ``TASKMESH_BROKER``. It must exit 0,
print its key line, and leave no process behind: every process it starts inherits a marker
variable, and none with that marker may outlive the example.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from taskmesh.testing import Mesh

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"
EXAMPLES = sorted(path.name for path in EXAMPLES_DIR.glob("*.py"))

#: a line each example prints only when its results check out
KEY_LINES = {
    "mapreduce_wordcount.py": "word count OK: ",
    "monte_carlo_pi.py": "pi OK: within 0.005 of math.pi",
    "periodic_report.py": "periodic OK: 3 runs, schedule removed",
    "progress_bar.py": "progress OK: 300 of 300 done",
    "quickstart.py": "100 futures done",
    "retries_and_failures.py": "every failure was handled as expected",
}

RUN_TIMEOUT_S = 90.0
MARKER = "TM_EXAMPLE_RUN"

MESH_OPTIONS = {"workers": 2, "concurrency": 2}

pytestmark = pytest.mark.timeout(240)


def marked_processes(run_id: str) -> list[int]:
    """Live processes (zombies excluded) whose environment carries ``MARKER=run_id``."""
    needle = f"{MARKER}={run_id}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if stat[stat.rfind(")") + 2] != "Z" and needle in environ.split(b"\0"):
            found.append(int(entry))
    return found


def run_example(name: str, *args: str, broker: str | None = None) -> str:
    """Run ``examples/NAME ARGS``; return its output after checking its exit code, its key line
    and that it left no process behind."""
    run_id = uuid.uuid4().hex
    env = {**os.environ, MARKER: run_id, "PYTHONUNBUFFERED": "1"}
    env.pop("TASKMESH_BROKER", None)
    if broker is not None:
        env["TASKMESH_BROKER"] = broker
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES_DIR / name), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    started = time.monotonic()
    try:
        output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        for pid in marked_processes(run_id):  # its mesh runs in process groups of its own
            os.kill(pid, signal.SIGKILL)
        pytest.fail(f"{name} did not finish in {RUN_TIMEOUT_S:g}s:\n{output.decode()}")
    elapsed = time.monotonic() - started
    text = output.decode(errors="replace")
    print(f"{name}: exit {proc.returncode} in {elapsed:.1f}s\n{text}")

    deadline = time.monotonic() + 5.0
    while (leftovers := marked_processes(run_id)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in leftovers:
        os.kill(pid, signal.SIGKILL)
    assert not leftovers, f"{name} left processes running: {leftovers}\n{text}"
    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{text}"
    assert KEY_LINES[name] in text, f"{name} did not print {KEY_LINES[name]!r}:\n{text}"
    return text


def test_every_example_has_a_key_line() -> None:
    assert EXAMPLES, f"no examples found in {EXAMPLES_DIR}"
    assert set(EXAMPLES) == set(KEY_LINES)


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_on_its_own_embedded_mesh(name: str) -> None:
    run_example(name)


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_against_a_running_broker(name: str, mesh: Mesh) -> None:
    run_example(name, broker=mesh.url)


def test_wordcount_over_a_given_folder(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("the mesh and the broker\n", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("The worker, the task; it's done.\n", "utf-8")
    text = run_example("mapreduce_wordcount.py", str(tmp_path))
    assert "2 files" in text
    assert "word count OK: 11 words" in text


@pytest.mark.parametrize(
    ("name", "arg"),
    [
        ("progress_bar.py", "abc"),
        ("progress_bar.py", "-5"),
        ("monte_carlo_pi.py", "1.5"),
        ("mapreduce_wordcount.py", "-"),
    ],
)
def test_an_example_given_a_bad_argument_says_so_and_exits_2(name: str, arg: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES_DIR / name), arg],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert proc.returncode == 2, proc.stderr
    assert arg in proc.stderr and "Traceback" not in proc.stderr
