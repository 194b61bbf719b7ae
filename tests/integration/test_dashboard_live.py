"""``taskmesh dashboard`` in a real terminal: a detached tmux session against a real mesh."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskmesh.testing import Mesh, wait_until

MESH_OPTIONS = {"workers": 2, "concurrency": 2}

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed"),
]

REPO = Path(__file__).resolve().parents[2]
TMUX_TIMEOUT_S = 10.0
SHOWS_WORKERS_S = 30.0
QUITS_S = 15.0


class Tmux:
    """A tmux server of our own: its socket and config live in ``folder``, so the test never
    touches the user's sessions and leaves no socket behind."""

    def __init__(self, folder: Path) -> None:
        self.socket = str(folder / "tmux.sock")
        self.session = f"dashboard-{uuid.uuid4().hex[:8]}"
        self.config = folder / "tmux.conf"
        # keep the pane after its command ends, to read what it left and how it exited
        self.config.write_text("set -g remain-on-exit on\nset -g default-shell /bin/sh\n")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TASKMESH_")}
        self.env.pop("TMUX", None)

    def run(self, *args: str) -> str:
        proc = subprocess.run(
            ["tmux", "-S", self.socket, "-f", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=TMUX_TIMEOUT_S,
            env=self.env,
            stdin=subprocess.DEVNULL,
        )
        assert proc.returncode == 0, f"tmux {' '.join(args)}: {proc.stderr}"
        return proc.stdout

    def screen(self, history: bool = False) -> str:
        """The visible screen, or everything the pane's normal screen ever held."""
        return self.run("capture-pane", "-p", *(["-S", "-"] if history else []), "-t", self.session)

    def pane(self, fmt: str) -> str:
        return self.run("display-message", "-p", "-t", self.session, fmt).strip()

    def kill(self) -> None:
        subprocess.run(
            ["tmux", "-S", self.socket, "kill-server"],
            capture_output=True,
            timeout=TMUX_TIMEOUT_S,
            env=self.env,
        )


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    # a short folder: a unix socket path must fit in about 100 bytes, and tmp_path may not
    folder = Path(tempfile.mkdtemp(prefix="tm-tmux-"))
    server = Tmux(folder)
    try:
        yield server
    finally:
        server.kill()  # ends the pane's processes too, whatever the test did
        shutil.rmtree(folder, ignore_errors=True)


def test_dashboard_shows_the_workers_and_quits_on_q(mesh: Mesh, tmux: Tmux) -> None:
    command = (
        f"{shlex.quote(sys.executable)} -m taskmesh dashboard --broker {shlex.quote(mesh.url)} "
        "--refresh 0.2; echo dashboard-exit=$?; stty -a"
    )
    tmux.run(
        "new-session", "-d", "-s", tmux.session, "-x", "120", "-y", "40", "-c", str(REPO), command
    )
    names = [w.name for w in mesh.workers]

    def shows_workers() -> bool:
        screen = tmux.screen()
        return all(name in screen for name in names) and "● live" in screen

    try:
        wait_until(shows_workers, SHOWS_WORKERS_S, "the dashboard to list the workers")
    except TimeoutError:
        pytest.fail(f"the dashboard never showed {names}; the screen:\n{tmux.screen()}")
    screen = tmux.screen()
    assert f"taskmesh {mesh.url}" in screen
    assert "tasks/s" in screen and "queues" in screen and "default" in screen
    assert screen.count(" alive ") >= len(names)

    tmux.run("send-keys", "-t", tmux.session, "q")
    try:
        wait_until(lambda: tmux.pane("#{pane_dead}") == "1", QUITS_S, "the dashboard to quit")
    except TimeoutError:
        pytest.fail(f"q did not quit the dashboard; the screen:\n{tmux.screen()}")

    after = tmux.screen(history=True)  # tmux's "Pane is dead" line may scroll the screen
    assert "dashboard-exit=0" in after, after
    assert "● live" not in after  # the alternate screen is gone: the shell's screen is back
    # the terminal modes are restored: canonical input and echo again
    assert re.search(r"(?<![-\w])icanon\b", after), after
    assert re.search(r"(?<![-\w])echo\b", after), after
