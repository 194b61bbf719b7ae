"""What /proc says about a process group: used to check that a group froze or ended."""

from __future__ import annotations

import os


def group_members(pgid: int) -> list[tuple[int, str]]:
    """``(pid, state)`` of every process in the group, zombies excluded (PID 1 here may never
    reap orphans, and a zombie runs nothing)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state != "Z":
            members.append((int(entry), state))
    return members
